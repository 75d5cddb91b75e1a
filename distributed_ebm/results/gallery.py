"""The gallery of an attack run (`gallery.png`): for its first images by id, one row each: the clean image, the
adversarial image, the perturbation (scaled to be seen, the scale printed), one purified chain of each, and under
every picture the defended prediction with the share of the chains that voted for it, or the classifier's
prediction of that one purified chain. The pictures are computed by the caller (recipes/attack.py `gallery_rows`)
from the run's own keyed chains; this module only draws them."""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from ..store import storage

GALLERY = "gallery.png"
CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass
class GalleryRow:
    index: int  # the image's dataset id
    label: int
    clean: np.ndarray  # C x H x W in [-1, 1]
    adversarial: np.ndarray
    adv_point: int  # where the adversarial image was judged (0 = the clean image)
    broken_at: int  # -1 = never
    natural: tuple[int, float | None]  # the defended prediction on the clean image, its chains' vote share
    final: tuple[int, float | None]  # ... on the adversarial image
    purified_clean: np.ndarray | None  # one chain of each (None: undefended)
    purified_adversarial: np.ndarray | None
    purified_preds: tuple[int, int] | None  # the classifier on those two chains


def _name(c: int, classes) -> str:
    return classes[c] if classes and 0 <= c < len(classes) else str(c)


def _show(ax, image: np.ndarray) -> None:
    ax.imshow(((np.clip(image, -1, 1) + 1) / 2).transpose(1, 2, 0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _verdict(pred: int, share: float | None, label: int, classes) -> str:
    mark = "right" if pred == label else "WRONG"
    return f"{_name(pred, classes)} ({mark})" + ("" if share is None else f", {100 * share:.0f}% of chains")


def gallery_png(rows: list[GalleryRow], title: str, classes=CIFAR10) -> tuple[bytes, float]:
    """The PNG and the scale its perturbation column uses (the largest |adversarial - clean| maps to half the
    colour range around grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    largest = max((float(np.abs(r.adversarial - r.clean).max()) for r in rows), default=0.0)
    scale = 1.0 / largest if largest > 0 else 1.0
    defended = any(r.purified_clean is not None for r in rows)
    columns = ["clean", "adversarial", f"perturbation x {scale:.3g}"] + (
        ["a purified chain of the clean", "a purified chain of the adversarial"] if defended else [])
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.3 * len(columns), 2.5 * len(rows)), squeeze=False,
                             layout="constrained")  # makes room for the suptitle, which tight_layout ignores
    for i, r in enumerate(rows):
        where = "never broken" if r.broken_at < 0 else f"broken at point {r.broken_at}"
        cells = [(r.clean, f"id {r.index}, label {_name(r.label, classes)}\n"
                           + _verdict(*r.natural, r.label, classes)),
                 (r.adversarial, (f"point {r.adv_point}" if r.adv_point >= 0 else "point not recorded")
                  + f", {where}\n" + _verdict(*r.final, r.label, classes)),
                 (np.clip(scale * (r.adversarial - r.clean), -1, 1),
                  f"max |delta| {255 * np.abs(r.adversarial - r.clean).max() / 2:.2f}/255")]
        if defended:
            p = r.purified_preds or (-1, -1)
            cells += [(r.purified_clean, f"this chain: {_name(p[0], classes)}"),
                      (r.purified_adversarial, f"this chain: {_name(p[1], classes)}")]
        for j, (image, text) in enumerate(cells):
            ax = axes[i][j]
            if image is None:
                ax.axis("off")
                continue
            _show(ax, image)
            ax.set_xlabel(text, fontsize=7)
            if i == 0:
                ax.set_title(columns[j], fontsize=8)
    fig.suptitle(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue(), scale


def write_gallery(output: str, rows: list[GalleryRow], title: str) -> str | None:
    """`output/gallery.png` (None when there is no row to draw)."""
    if not rows:
        return None
    png, _ = gallery_png(rows, title)
    url = storage.join(output, GALLERY)
    storage.write_bytes(url, png)
    return url
