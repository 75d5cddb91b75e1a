"""The attack job, written once for every executor: preflight, the images without a record, progress, the
batches handed to an executor, and what the job leaves (`results.publish`: the summary, the gallery, the MLflow
run).

An executor attacks the images it is handed and writes each batch's records (`results.write_part`); the one-process
one (`local/attack.py`) runs the batches on one device, the Ray one (`distributed/attack.py`) on an actor pool.
Each image's randomness is keyed by (seed, image id), so its record does not depend on the executor, its batch or
its run. A rerun skips images with records (and refuses records written with other settings, before any work).
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import torch

from ..config import AttackConfig
from ..errors import InputError, Interrupted
from ..method.attacks import Attack, EnsembleAttack
from ..method.attacks.modes import MODES
from ..method.defense import Purifier
from ..method.memory import auto_chunk_size
from ..method.noise import ChainKeys
from ..method.precision import PRECISIONS, set_arithmetic
from ..progress import Progress
from ..results import records as results
from ..results.gallery import GalleryRow, write_gallery
from ..results.report import system_and_attack_labels
from ..store import storage
from ..store.data import Catalog, ImageSet, check_labels, read_images, read_rows
from ..store.provenance import attack_settings
from ..store.released import load_classifier_as, load_ebm
from ..store.tracking import check_tracking


class Rerun(Exception):
    """Raised by an executor that lost work it can run again (a lost Ray actor or node): the records written
    stay, and the recipe hands it the images still without one. Its message says what was lost."""


class Executor(Protocol):
    """Where the batches of an attack run.

    `device`: where the driver builds the job's attack (preflight, gallery). `tracking`: whether the job logs to
    MLflow as `cfg.mlflow` says. `images(cfg)`: the selected images as this executor reads them."""

    device: str | torch.device
    tracking: bool

    def images(self, cfg: AttackConfig) -> Catalog | ImageSet: ...

    def run(self, cfg: AttackConfig, todo: Catalog | ImageSet, settings: dict, attack: Attack | EnsembleAttack,
            gradient_ids: list[int], on_batch: Callable[[int, int], None], reruns: int) -> None:
        """Attack every image of `todo`, writing each batch's records; `on_batch(images, broken)` per finished
        batch. `attack`: the driver's, built on `device` (an executor may build its own from `cfg` and
        `gradient_ids`); `reruns`: how many runs before this one lost work (`Rerun`)."""


def run_attack(cfg: AttackConfig, executor: Executor, data: Catalog | ImageSet | None = None,
               show: bool = True) -> dict:
    """Attack every selected image without a record yet on `executor`; returns the summary of all records.
    `data`: the images (default: the subset `cfg.data` names, as the executor reads it)."""
    data = data if data is not None else executor.images(cfg)
    gradient_ids = sample_ids(data, cfg.report.gradient_check)
    attack = preflight(cfg, data, executor.device, gradient_ids, executor.tracking)
    settings = attack_settings(cfg)
    todo = first = images_without_records(data, cfg.output, settings)
    bar = Progress(len(data), f"attack:{cfg.attack.name}", start=len(data) - len(todo), enabled=show, unit="img")
    t0, count = time.time(), {"broken": 0}  # broken: this run's images, counted across batches

    def on_batch(images: int, broken: int) -> None:
        count["broken"] += broken
        bar.update(images, broken=count["broken"])

    reruns = 0
    try:
        while len(todo):
            try:
                executor.run(cfg, todo, settings, attack, gradient_ids, on_batch, reruns)
                break
            except Rerun as lost:
                reruns += 1
                print(f"attack: {lost}", file=sys.stderr, flush=True)
            todo = images_without_records(data, cfg.output, settings)
    except KeyboardInterrupt:
        bar.close()
        done = len(set(data.ids.tolist()) & results.done_ids(cfg.output))
        raise Interrupted(f"interrupted: {done} of {len(data)} images are recorded under {cfg.output}; the same "
                          "command continues with the others") from None
    bar.close()
    seconds = time.time() - t0
    gallery = gallery_rows(cfg, data, executor.device, attack) if cfg.report.gallery else []  # on the driver
    return results.publish(cfg, seconds, set(data.ids.tolist()), set(first.ids.tolist()), gallery, executor.tracking)


def preflight(cfg: AttackConfig, data: Catalog | ImageSet, device: str | torch.device = "cpu", gradient_ids=(),
              tracking: bool = True) -> Attack | EnsembleAttack:
    """Every input the job will touch, checked before any expensive work, so a bad one fails in seconds with one
    line: the data and subset, labels, the output, classifier and EBM (files, architecture, sizes), MLflow
    (`tracking`). A catalog's pixels stay unread but for its first image's (its size). Returns the attack, built
    on `device`."""
    if len(data) == 0:
        raise InputError("the selected subset holds no image")
    width = (read_rows(data.take([0]), cfg.data.image_size) if isinstance(data, Catalog) else data).data.shape[-1]
    if width != cfg.data.image_size:
        raise InputError(f"images are {width} pixels wide, data.image_size is {cfg.data.image_size}")
    check_labels(data, cfg.classifier.num_classes, f"data {cfg.data.path}")
    storage.check_destination(cfg.output, "output", folder=True)
    attack = build_attack(cfg, device, gradient_ids)  # missing files, wrong architecture or size
    if tracking:
        check_tracking(cfg.mlflow)
    return attack


def dtype_of(cfg: AttackConfig) -> torch.dtype:
    """The dtype of images, chains and classifier (bf16 keeps them in float32: only the EBM autocasts)."""
    return PRECISIONS[cfg.precision].dtype


def build_attack(cfg: AttackConfig, device: torch.device | str = "cpu", gradient_ids=()) -> Attack | EnsembleAttack:
    """Classifier, purifier and attack as the config says (weights loaded with weights_only=True).

    Also the pre-flight check: a missing file, a checkpoint of another architecture or for
    another image size fails here, with a message naming it.
    """
    c, dtype = cfg.classifier, dtype_of(cfg)
    set_arithmetic(device, cfg.precision)
    clf = load_classifier_as(c)  # as classifier.format says
    clf = clf.to(device=device, dtype=dtype, memory_format=torch.channels_last)  # the chains' layout
    purifier = None
    if cfg.attack.defended:
        n = cfg.ebm_net  # every data source here is RGB, as the classifiers are
        ebm = (load_ebm(cfg.ebm, cfg.ebm_format, cfg.data.image_size, channels=3, activation=n.activation,
                           soft_alpha=n.soft_alpha, soft_eps=n.soft_eps).to(device=device, dtype=dtype)
               if cfg.ebm else None)
        p = cfg.purify
        purifier = Purifier(ebm, p.steps, p.step_size, p.noise, amp=PRECISIONS[cfg.precision].amp,
                            init_noise=p.init_noise)
    chunk = cfg.chunk_size
    if chunk is None:  # an exact gradient's footprint grows with the chain length: the fixed default there
        chunk = 1024 if any(MODES[m.mode].exact for m in cfg.attack.members()) else auto_chunk_size(
            purifier, clf, (3, cfg.data.image_size, cfg.data.image_size), device, dtype)
    kind = EnsembleAttack if cfg.attack.worst_case else Attack
    return kind(clf, purifier, cfg.attack, seed=cfg.seed, chunk_size=chunk, gradient_ids=gradient_ids)


def images_without_records(data: Catalog | ImageSet, output: str, settings: dict) -> Catalog | ImageSet:
    """The images without a record under output (all of them on a first run); the records there must
    have been written with the same settings."""
    results.check_settings(output, settings)
    done = results.done_ids(output)
    keep = [k for k, i in enumerate(data.ids.tolist()) if i not in done]
    return data.take(keep)


def sample_ids(data, n: int) -> list[int]:
    """The first `n` images of the run by id (a gallery's, a gradient check's): two runs on a selection compare."""
    return sorted(data.ids.tolist())[:n]


def draw_gallery(cfg: AttackConfig, data=None, device: str | torch.device = "cpu",
                 attack: Attack | EnsembleAttack | None = None) -> str | None:
    """`output/gallery.png` of the first `report.gallery` images of the run by id; None when it draws nothing.
    `attack`: the run's own, when the caller holds it (else built here, as the config says)."""
    rows = gallery_rows(cfg, data, device, attack) if cfg.report.gallery else []
    return write_gallery(cfg.output, rows, "\n".join(system_and_attack_labels({"config": cfg.model_dump(mode="json")})))


def gallery_rows(cfg: AttackConfig, data=None, device: str | torch.device = "cpu",
                 attack: Attack | EnsembleAttack | None = None) -> list[GalleryRow]:
    """The gallery's rows, from the records and the run's own keyed chains (a check's replicate 0: at point 0 for the
    clean image, at the record's adv_point for the adversarial one; the seed of the run that judged it, for an
    ensemble or restarts): no new randomness."""
    n = cfg.report.gallery
    data = data if data is not None else read_images(cfg.data)
    ids = sample_ids(data, n)
    table = results.read_records(cfg.output)
    table = table.filter(pc.is_in(table.column("index"), pa.array(ids, type=pa.int64())))
    rows = table.to_pylist()
    if not rows:
        return []
    if isinstance(data, Catalog):
        data = read_rows(data, cfg.data.image_size)
    where = {i: k for k, i in enumerate(data.ids.tolist())}
    clean = data.floats([where[r["index"]] for r in rows]).to(dtype_of(cfg))
    attack, a = attack if attack is not None else build_attack(cfg, device), cfg.attack
    defense = attack.defense
    out = []
    for k, r in enumerate(rows):
        adv = torch.tensor(r["adv_image"], dtype=clean.dtype).reshape(r["image_shape"])
        chains = lambda broke: (a.eot_defense or a.eot_attack) if broke else a.eot_attack  # noqa: E731
        natural = (r["natural_defense_pred"], _share(r.get("natural_votes"), a.eot_defense or a.eot_attack))
        final = (r["final_pred"], _share(r.get("final_votes"), chains(r["broken_at"] >= 0)))
        purified = preds = None
        if defense is not None:
            x = torch.stack([clean[k], adv]).to(device)
            ident = torch.tensor([r["index"]] * 2, device=device)
            seeds = (cfg.seed, attack.judging_seed(r))
            calls = (0, 2 * adv_point(r)) if adv_point(r) is not None else (0, None)  # unknown: no chain of its own
            purified = torch.cat([defense.purifier(x[j:j + 1], ChainKeys(seeds[j], ident[j:j + 1], ident[:1] * 0,
                                                                         calls[j] if calls[j] is not None else 0))
                                  for j in (0, 1)])
            with torch.no_grad():
                preds = tuple(defense.classifier(purified).argmax(1).tolist())
            purified = purified.float().cpu().numpy()
            if calls[1] is None:
                purified[1], preds = float("nan"), (preds[0], -1)
        out.append(GalleryRow(r["index"], r["label"], clean[k].float().numpy(), adv.float().numpy(),
                              adv_point(r) if adv_point(r) is not None else -1, r["broken_at"], natural, final,
                              None if purified is None else purified[0],
                              None if purified is None or calls[1] is None else purified[1], preds))
    return out


def adv_point(record: dict) -> int | None:
    """The point of a record's adversarial image: recorded, or for records written before, the break's (an image
    never broken then had its last or most adversarial iterate: unknown)."""
    if record.get("adv_point") is not None:
        return record["adv_point"]
    return record["broken_at"] if record["broken_at"] >= 0 else None


def _share(votes, chains: int) -> float | None:
    return None if not votes or votes[0] is None or votes[0] < 0 else votes[0] / chains
