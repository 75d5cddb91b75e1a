"""EBMs and classifiers read as they are, by format (method/nets/formats.py FORMATS): this project's checkpoints
and released files; and `debm import`.

The files are read by `storage.read_source`: tensors with `weights_only=True`, `.pt2` programs with
`torch.export.load`; nothing is ever unpickled.
"""
from __future__ import annotations

from torch import nn

from ..errors import InputError
from ..method.nets import classifier_checkpoint, ebm_checkpoint
from ..method.nets.classifiers import Classifier
from ..method.nets.ebm import SOFT_ALPHA, SOFT_EPS
from ..method.nets.formats import CONV_EBM_KEYS, FORMATS, EBMOptions, JEMEnergy, build_network, ss_classifier
from . import storage


def load_ebm(url: str, fmt: str = "debm", image_size: int | None = None, channels: int | None = None,
             activation: str | None = None, soft_alpha: float = SOFT_ALPHA, soft_eps: float = SOFT_EPS) -> nn.Module:
    """The EBM at `url` in format `fmt` (FORMATS; `debm`: this project's checkpoint, which
    `nets.ebm_from_checkpoint` checks; `auto`: as its content says, where it can); `image_size` and `channels`: the
    data's, checked where the file records them; `activation` (with its constants): the one the user names
    (ebm_net.activation / --activation), checked for the formats that record or imply one, required for mefa."""
    return build_network("ebm", fmt, storage.read_source(url)[0], url,
                         EBMOptions(image_size, channels, activation, soft_alpha, soft_eps))


def load_classifier_as(c) -> Classifier:
    """The classifier a `ClassifierConfig` names (its `format`, `arch`, weights and normalization)."""
    if c.weights is None:
        raise InputError("classifier.weights is not set: an attack needs a trained classifier")
    return build_network("classifier", c.format, storage.read_source(c.weights)[0], c.weights, c)


def import_model(url: str, fmt: str, out: str, activation: str | None = None) -> dict:
    """Read a released checkpoint as format `fmt` and write it at `out` as this project's checkpoint, with the
    source's URL, SHA-256 and format recorded under `source`, and a short model card at `out`.md.
    Returns {"role", "out", "card", "source"}."""
    names = sorted({f.name for f in FORMATS} - {"debm", "export"})
    if fmt not in names:
        raise InputError(f"--format must be one of {', '.join(names)} (got {fmt!r}); debm checkpoints and "
                         "torch.export programs are used as they are")
    storage.check_destination(out, "--out")
    obj, sha = storage.read_source(url)
    source = {"url": url, "sha256": sha, "format": fmt}
    is_ebm = fmt in ("mefa", "jem") or (isinstance(obj, dict) and set(obj) == set(CONV_EBM_KEYS))
    if is_ebm:
        net = build_network("ebm", fmt, obj, url, EBMOptions(activation=activation))
        if isinstance(net, JEMEnergy):
            ckpt = {"kind": "ebm", **net.spec(), "state_dict": net.state_dict(), "source": source}
        else:
            ckpt = ebm_checkpoint(net, source=source)
    else:
        if activation is not None:
            raise InputError(f"--activation is for EBMs; {url} holds a classifier")
        net = ss_classifier(obj, url)
        ckpt = classifier_checkpoint(net, source=source)
    storage.save_torch(ckpt, out)
    card = out + ".md"
    storage.write_bytes(card, card_text(ckpt, "ebm" if is_ebm else "classifier").encode())
    return {"role": "ebm" if is_ebm else "classifier", "out": out, "card": card, "source": source}


def card_text(ckpt: dict, role: str) -> str:
    """A short model card of an imported checkpoint: where it came from, what it is, how to use it."""
    src = ckpt["source"]
    fmt = next(f for f in FORMATS if f.role == role and f.name == src["format"])
    params = sum(v.numel() for k, v in ckpt["state_dict"].items() if not k.endswith(("running_mean", "running_var",
                                                                                       "num_batches_tracked")))
    if role == "ebm":
        what = (f"JEM WRN-{ckpt['depth']}-{ckpt['widen']} energy" if ckpt.get("network") == "jem_wrn" else
                f"convnet EBM, width {ckpt['width']}, {ckpt['image_size']}x{ckpt['image_size']}, "
                f"activation {' '.join(f'{k}={v}' for k, v in ckpt['activation'].items())}")
        use = "`ebm: <this file>` (ebm_format: debm or auto)"
    else:
        what = f"classifier arch `{ckpt['arch']}`"
        use = f"`classifier: {{arch: {ckpt['arch']}, weights: <this file>}}`"
    return "\n".join([
        f"# Imported {role}: {src['format']}", "",
        "| | |", "|---|---|",
        f"| source | `{src['url']}` |", f"| source SHA-256 | `{src['sha256']}` |",
        f"| source format | `{src['format']}`: {fmt.reads} |", f"| network | {what}; {params:,} parameters |",
        f"| inputs | {fmt.inputs} |", f"| the paper's purification | {fmt.purification} |", f"| use | {use} |",
        "", "Written by `debm import`; the weights are the source's, unchanged (docs/models.md).", ""])
