"""Per-image attack results under an output URL, shared by the single-process and the Ray engines.

    OUTPUT/records/part-<first id>-<last id>-<hash of ids>.parquet   one file per finished batch
    OUTPUT/summary.json, OUTPUT/accuracy.png                         written by `finalize`
    OUTPUT/gallery.png                                                and the rest of a job's end, by `publish`

Each part is written atomically, so a part is complete or absent: a crash loses at most the
batches in flight, and a rerun skips every image that has a record (`done_ids`). Each part carries
the settings that wrote it (store/provenance.py) in its parquet metadata; `check_settings` refuses a rerun
with other settings before any work.

The summary of the records lives here too (`summarize`: the accuracies, the accuracy curve, the ensemble's
per-attack columns); the binomial statistics it uses are in stats.py.
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import InputError
from ..method.attacks import NEVER, ImageRecord, evaluation_points
from ..store import provenance, storage
from .gallery import GalleryRow, write_gallery
from .report import attack_label, log_attack, plot_curves, system_and_attack_labels, upgrade_summary
from .stats import LATE, UNDECIDED_P, chains_to_decide, convergence, gradient_convergence, sign_test_p, wilson_interval  # noqa: F401  (their users import them here)

SUMMARY, PLOT = "summary.json", "accuracy.png"


def part_url(output: str, ids: list[int]) -> str:
    digest = hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()[:10]
    return storage.join(output, "records", f"part-{min(ids):09d}-{max(ids):09d}-{digest}.parquet")


SETTINGS = b"debm.settings"


def write_part(output: str, records: list[ImageRecord], settings: dict) -> str:
    url = part_url(output, [r.index for r in records])
    sink = pa.BufferOutputStream()
    table = pa.Table.from_pylist([r.to_row() for r in records])
    pq.write_table(table.replace_schema_metadata({SETTINGS: json.dumps(settings).encode(),
                                                  b"debm.fingerprint": provenance.fingerprint(settings).encode()}),
                   sink)
    storage.write_bytes(url, sink.getvalue().to_pybytes())
    return url


def list_parts(output: str) -> list[str]:
    fs, path = storage.filesystem(storage.join(output, "records"))
    fs.invalidate_cache()  # other processes write here: never trust a cached listing
    if not fs.exists(path):
        return []
    prefix = output.split("://")[0] + "://" if "://" in output else ""
    return sorted(prefix + p for p in fs.glob(f"{path}/part-*.parquet"))


def _read(url: str, columns=None) -> pa.Table:
    """A part's columns; one written before a column existed gives nulls for it (read_records promotes)."""
    data = io.BytesIO(storage.read_bytes(url))
    if columns is not None:
        present = set(pq.read_schema(data).names)
        data.seek(0)
        columns = [c for c in columns if c in present]
    return pq.read_table(data, columns=columns)


DAMAGED = ".damaged"  # the suffix a part that cannot be read is set aside with


def check_settings(output: str, settings: dict) -> None:
    """Every existing part must have been written with these settings (else one line naming the differences). A
    part that cannot be read (cut short by a copy or a full disk: our own writes are atomic) is set aside as
    `<part>.damaged`, with one line naming it, so that its images count as without a record and are attacked
    again."""
    for url in list_parts(output):
        fs, path = storage.filesystem(url)
        try:
            with fs.open(path, "rb") as f:
                meta = pq.read_schema(f).metadata or {}
        except (pa.ArrowInvalid, OSError) as err:
            fs.mv(path, path + DAMAGED)
            print(f"records: {url} cannot be read ({str(err).splitlines()[0]}); set aside as {url}{DAMAGED}: its "
                  "images are attacked again", file=sys.stderr, flush=True)
            continue
        if SETTINGS not in meta:
            raise InputError(f"{url} records no settings (written before provenance was kept): "
                             "use another output")
        provenance.check(json.loads(meta[SETTINGS]), settings, f"{output}/records")


def done_ids(output: str) -> set[int]:
    return {i for url in list_parts(output) for i in _read(url, ["index"]).column("index").to_pylist()}


def read_records(output: str, columns=None) -> pa.Table:
    """All records, one per image (the first part that holds an image wins), sorted by image id."""
    parts = [_read(url, columns) for url in list_parts(output)]
    if not parts:
        raise FileNotFoundError(f"no attack records under {output}/records")
    table = pa.concat_tables(parts, promote_options="default")
    ids = table.column("index").to_pylist()
    first = {}
    for row, i in enumerate(ids):
        first.setdefault(i, row)
    table = table.take(sorted(first.values()))
    return table.take(pc.sort_indices(table, [("index", "ascending")]))


def finalize(cfg, seconds: float, ids: set[int], new_ids: set[int]) -> dict:
    """Summary of the records of the selected images `ids` (accuracies, 95% intervals, curve,
    throughput of the images computed by this run, `new_ids`; `seconds`: the wall time of every run that computed
    records here, this one's as `seconds_this_run`), written with its plot."""
    a = cfg.attack
    columns = ["index", "natural_protocol_correct", "natural_defense_correct", "broken_at", "image_steps",
               "confirm_image_steps", "natural_votes", "final_votes", "gradient_cosine"]
    columns += ["reeval_correct"] if a.reevaluations else []
    columns += ["broken_by", "broken_restart"] if a.worst_case else []
    table = read_records(cfg.output, columns)
    table = table.filter(pc.is_in(table.column("index"), pa.array(sorted(ids), type=pa.int64())))
    missing = len(ids) - table.num_rows
    if missing:
        raise RuntimeError(f"{missing} selected images have no record under {cfg.output}/records")
    col = lambda name: table.column(name).to_pylist()  # noqa: E731
    summary = summarize(col("natural_protocol_correct"), col("natural_defense_correct"), col("broken_at"),
                        evaluation_points(a), col("reeval_correct") if a.reevaluations else None)
    if a.worst_case:
        summary["ensemble" if a.ensemble is not None else "restarts"] = worst_case_summary(
            a, col("broken_by"), col("broken_restart"))
    new = {k: col(k) if k in table.column_names else [None] * table.num_rows
           for k in ("natural_votes", "final_votes", "gradient_cosine")}  # None: records written before them
    summary["convergence"] = convergence(new["natural_votes"], new["final_votes"], col("broken_at"),
                                         evaluation_points(a), a.eot_defense or a.eot_attack)
    summary["convergence"]["gradient"] = gradient_convergence(new["gradient_cosine"], a.eot_attack)
    confirm = int(sum(col("confirm_image_steps")))
    steps = table.column("image_steps").to_pylist()
    fresh = sum(s for i, s in zip(table.column("index").to_pylist(), steps) if i in new_ids)
    earlier = _earlier_seconds(cfg.output)  # before this summary replaces it
    summary.update({
        "mode": cfg.attack.mode, "seconds": earlier + seconds if new_ids else earlier, "seconds_this_run": seconds,
        "image_steps": int(sum(steps)), "confirm_image_steps": confirm,
        "confirm_share": confirm / sum(steps) if sum(steps) else None,
        "image_steps_this_run": int(fresh), "image_steps_per_second": fresh / seconds if seconds > 0 else None,
        "config": cfg.model_dump(mode="json"),
    })
    storage.write_bytes(storage.join(cfg.output, SUMMARY), json.dumps(summary, indent=2).encode())
    plot_curves([summary], storage.join(cfg.output, PLOT))
    return summary


def publish(cfg, seconds: float, ids: set[int], new_ids: set[int], gallery: list[GalleryRow],
            tracking: bool) -> dict:
    """What an attack job leaves at its end, written here in one place: the summary and its plot (`finalize`), the
    gallery of the rows `gallery` (none: no gallery) and, with `tracking`, the MLflow run that logs them; returns the
    summary."""
    summary = finalize(cfg, seconds, ids, new_ids)
    drawn = write_gallery(cfg.output, gallery, "\n".join(system_and_attack_labels(summary)))
    if tracking:
        log_attack(cfg.mlflow, f"{cfg.attack.name}:{cfg.classifier.arch}", summary,
                   [storage.join(cfg.output, SUMMARY), storage.join(cfg.output, PLOT)] + ([drawn] if drawn else []))
    return summary


def _earlier_seconds(output: str) -> float:
    """The wall time of the earlier runs into `output`, as their summary counted it: a summary's `seconds` sums
    the runs that computed its records (a run that computed nothing adds nothing; a run killed before its
    summary was written is lost to the count)."""
    if not storage.exists(storage.join(output, SUMMARY)):
        return 0.0
    try:
        return float(load_summary(output).get("seconds") or 0.0)
    except (InputError, TypeError, ValueError):  # not a summary: it is replaced, its time unknown
        return 0.0


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class _AttackPart(_Part):
    mode: str
    norm: str
    eps: float
    steps: int
    eot_attack: int
    eot_defense: int


class _PurifyPart(_Part):
    steps: int
    step_size: float
    noise: float


class _ClassifierPart(_Part):
    arch: str


class _ConfigPart(_Part):
    attack: _AttackPart
    purify: _PurifyPart
    classifier: _ClassifierPart


Interval = tuple[float, float]


class _Summary(_Part):
    """What `debm report` reads from a summary.json (extra keys are kept). A summary written before the two
    natural figures has `natural_accuracy` (the protocol's) instead: it is read as that, the defense's unknown.
    One written before the two re-evaluation worst cases has `worst_case_accuracy`, the re-judgements alone: it is
    read as `reeval_all_right_accuracy`, the worst case over every judgement unknown (`upgrade_summary`)."""

    images: int
    natural_protocol_accuracy: float
    natural_protocol_ci95: Interval
    natural_defense_accuracy: Optional[float] = None
    natural_defense_ci95: Optional[Interval] = None
    robust_accuracy: float
    robust_ci95: Interval
    accuracy_curve: list[float]
    config: _ConfigPart
    reevaluations: Optional[int] = None
    reeval_mean_accuracy: Optional[float] = None
    reeval_all_right_accuracy: Optional[float] = None
    reeval_all_right_ci95: Optional[Interval] = None
    worst_of_all_judgements_accuracy: Optional[float] = None
    worst_of_all_judgements_ci95: Optional[Interval] = None


def accuracy_curve(broken_at: list[int], points: int) -> list[float]:
    """Share of images not yet broken after each evaluation point."""
    b = np.asarray(broken_at)
    if b.size == 0:
        return [float("nan")] * points
    return [float(np.mean((b == NEVER) | (b > p))) for p in range(points)]


def summarize(natural_protocol: list[bool], natural_defense: list[bool], broken_at: list[int], points: int,
              reeval_correct: list[list[bool]] | None = None) -> dict:
    """Both natural accuracies (the protocol's: not broken at the clean image; the defense's own: its
    eot_defense-chain vote on the clean image) and robust accuracy, with 95% Wilson intervals, and the
    accuracy curve; with re-evaluations, also their mean accuracy, each one's accuracy, the share of images whose
    adversarial image is judged right every time (`reeval_all_right_*`, which may exceed robust: it looks at one
    image) and the worst case over every judgement (robust under the protocol and right every time, never above
    robust)."""
    n = len(broken_at)
    share = lambda k: k / n if n else float("nan")  # noqa: E731
    protocol = int(sum(bool(c) for c in natural_protocol))
    defense = int(sum(bool(c) for c in natural_defense))
    robust = int(sum(b == NEVER for b in broken_at))
    summary = {
        "images": n,
        "natural_protocol_accuracy": share(protocol), "natural_protocol_ci95": wilson_interval(protocol, n),
        "natural_defense_accuracy": share(defense), "natural_defense_ci95": wilson_interval(defense, n),
        "robust_accuracy": share(robust), "robust_ci95": wilson_interval(robust, n),
        "accuracy_curve": accuracy_curve(list(broken_at), points),
    }
    if reeval_correct and n and len(reeval_correct[0]):
        flags = np.asarray(reeval_correct, dtype=bool)  # images x R
        all_right = flags.all(axis=1)
        worst = int((all_right & (np.asarray(broken_at) == NEVER)).sum())  # robust, and right every re-judgement
        summary.update({
            "reevaluations": int(flags.shape[1]),
            "reeval_accuracies": flags.mean(axis=0).tolist(),
            "reeval_mean_accuracy": float(flags.mean()),
            "reeval_all_right_accuracy": int(all_right.sum()) / n,
            "reeval_all_right_ci95": wilson_interval(int(all_right.sum()), n),
            "worst_of_all_judgements_accuracy": worst / n,
            "worst_of_all_judgements_ci95": wilson_interval(worst, n),
        })
    return summary


def summarize_records(records: list[ImageRecord], points: int) -> dict:
    """`summarize` of records in memory (what `finalize` computes from the record files)."""
    return summarize([r.natural_protocol_correct for r in records], [r.natural_defense_correct for r in records],
                     [r.broken_at for r in records], points,
                     [r.reeval_correct for r in records] if records and records[0].reeval_correct else None)


def worst_case_summary(settings, broken_by: list[int], broken_restart: list[int]) -> list[dict]:
    """Per member, in order: its label, the images it broke (in all, and in each restart), and the robust
    accuracy after it and every member before it (the last entry's is the ensemble's)."""
    n, standing, out = len(broken_by), len(broken_by), []
    for k, member in enumerate(settings.members()):
        broke = sum(b == k for b in broken_by)
        standing -= broke
        per_restart = [sum(b == k and r == j for b, r in zip(broken_by, broken_restart))
                       for j in range(settings.restarts)]
        out.append({"attack": attack_label(member.model_dump(mode="json")), "broken": broke,
                    "broken_per_restart": per_restart,
                    "robust_accuracy": standing / n if n else float("nan"),
                    "robust_ci95": wilson_interval(standing, n)})
    return out


def paired_comparison(output_a: str, output_b: str) -> dict | None:
    """Robustness of the images two runs share, paired: how many each breaks that the other leaves robust,
    and the sign test's p on those; None when they share no image."""
    broken = []
    for url in (output_a, output_b):
        t = read_records(url, ["index", "broken_at"])
        broken.append(dict(zip(t.column("index").to_pylist(), (b != NEVER for b in t.column("broken_at").to_pylist()))))
    shared = sorted(set(broken[0]) & set(broken[1]))
    if not shared:
        return None
    a_only = sum(broken[0][i] and not broken[1][i] for i in shared)
    b_only = sum(broken[1][i] and not broken[0][i] for i in shared)
    both = sum(broken[0][i] and broken[1][i] for i in shared)
    return {"images": len(shared), "broken_by_a_only": a_only, "broken_by_b_only": b_only, "broken_by_both": both,
            "robust_in_both": len(shared) - a_only - b_only - both, "sign_test_p": sign_test_p(a_only, b_only)}


def worst_case_over_runs(outputs: list[str]) -> dict | None:
    """Several runs against one defense, per image they all attacked: robust only if robust under every run (the
    worst case over the runs, from their records); None when they share no image."""
    robust = []
    for url in outputs:
        t = read_records(url, ["index", "broken_at"])
        robust.append(dict(zip(t.column("index").to_pylist(), (b == NEVER for b in t.column("broken_at").to_pylist()))))
    shared = sorted(set.intersection(*(set(r) for r in robust)))
    if not shared:
        return None
    standing = sum(all(r[i] for r in robust) for i in shared)
    return {"runs": len(outputs), "images": len(shared), "robust": standing,
            "robust_accuracy": standing / len(shared), "robust_ci95": wilson_interval(standing, len(shared))}


def load_summary(output: str) -> dict:
    """An attack folder's summary.json, checked: junk fails with one line naming the file and the key."""
    url = storage.join(output, SUMMARY)
    raw = storage.read_bytes(url)
    try:
        summary = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"{url} is not valid JSON ({type(err).__name__})") from None
    if not isinstance(summary, dict):
        raise InputError(f"{url} holds a {type(summary).__name__}, not the summary object of an attack")
    if upgrade_summary(summary):
        raw = json.dumps(summary)
    try:
        _Summary.model_validate_json(raw)  # JSON mode: lists are intervals, strings are not numbers
    except ValidationError as err:
        e = err.errors()[0]
        where = ".".join(str(p) for p in e["loc"])
        raise InputError(f"{url}: {where}: {e['msg']} ({len(err.errors())} problems; is it an attack's summary?)") \
            from None
    return summary
