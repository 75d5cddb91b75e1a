"""The configuration reference (docs/configuration.md), generated from the schemas so that it cannot drift:
every key of every job, its type and allowed range, its default and its description.

    python -m distributed_ebm.config.reference > docs/configuration.md

tests/test_docs.py fails when the committed page differs from what this writes.
"""
from __future__ import annotations

import json
import os
import sys
import typing
from contextlib import contextmanager

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from .attack import AttackConfig
from .common import Section
from .quickstart import QuickstartConfig
from .train import StandaloneTrainConfig, TrainClassifierConfig, TrainEBMConfig
from .tune import TunePurificationConfig, TuneTrainingConfig

# (job, its config class, what runs it), in the order the page lists them
JOBS = [
    ("train-ebm", TrainEBMConfig, "`debm train-ebm`, `jobs/train_ebm.py` (Ray Train)"),
    ("train-ebm, one GPU", StandaloneTrainConfig, "`debm train-ebm-gpu`, `jobs/train_ebm_gpu.py` (one process, "
                                                  "no Ray): the keys of train-ebm and these"),
    ("train-classifier", TrainClassifierConfig, "`debm train-classifier`, `jobs/train_classifier.py`"),
    ("attack", AttackConfig, "`debm attack`, `jobs/attack.py` (Ray Data); `debm attack-local`, "
                             "`jobs/attack_local.py` (one process)"),
    ("tune (purifier)", TunePurificationConfig, "`debm tune`, `jobs/tune_purification.py`"),
    ("tune (training sampler)", TuneTrainingConfig, "`debm tune-training`, `jobs/tune_training.py`"),
    ("quickstart", QuickstartConfig, "`debm quickstart`, `jobs/quickstart.py`"),
]
JOB_SECTIONS = {cls: name for name, cls, _ in JOBS}
SHARED = "$DEBM_SHARED"  # defaults under the shared data folder are shown relative to it
_PLACEHOLDER = "/DEBM_SHARED"  # absolute, so that path validation leaves it as it is


@contextmanager
def _shared_placeholder():
    before = os.environ.get("DEBM_SHARED")
    os.environ["DEBM_SHARED"] = _PLACEHOLDER
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("DEBM_SHARED", None)
        else:
            os.environ["DEBM_SHARED"] = before


def _section_type(annotation) -> type[BaseModel] | None:
    """The Section class of a field (also inside Optional[...]), else None (a dict of sections is a value)."""
    optional = typing.get_origin(annotation) is typing.Union
    for t in (annotation, *(typing.get_args(annotation) if optional else ())):
        if isinstance(t, type) and issubclass(t, Section):
            return t
    return None


def _type(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type(a) for a in inner) + (", or null" if len(inner) < len(args) else "")
    if origin is typing.Annotated:
        return _type(args[0])
    if origin in (list, dict):
        return f"{origin.__name__} of " + ", ".join(_type(a) for a in args)
    if isinstance(annotation, type):
        return {"str": "text", "bool": "true/false", "int": "integer", "float": "number"}.get(annotation.__name__,
                                                                                             annotation.__name__)
    return str(annotation).replace("typing.", "")


def _range(field: FieldInfo) -> str:
    bounds = []
    for m in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "length >="),
                           ("max_length", "length <="), ("pattern", "matches")):
            value = getattr(m, attr, None)
            if value is not None:
                bounds.append(f"{sign} {value:,}" if isinstance(value, int) else f"{sign} {value:g}"
                              if isinstance(value, float) else f"{sign} `{value}`")
    return ", ".join(bounds)


def _path(value):
    """A path as written: under $DEBM_SHARED, or relative to the working directory (validation made it absolute)."""
    return value.replace(_PLACEHOLDER, SHARED).replace(os.getcwd() + os.sep, "") if isinstance(value, str) else value


def _value(value) -> str:
    value = _path(value)
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return "null" if value is None else f"`{json.dumps(value)}`"


def _rows(cls: type[BaseModel], defaults: dict, prefix: str = "") -> list[str]:
    rows = []
    for name, field in cls.model_fields.items():
        key, default = f"{prefix}{name}", defaults.get(name)
        section = _section_type(field.annotation)
        if section in JOB_SECTIONS:
            base = section.model_construct().model_dump(mode="json")
            base = {k: _path(v) for k, v in _flat(base).items()}
            changed = {k: v for k, v in _flat(default).items() if base.get(k) != _path(v)}
            rows.append(f"| `{key}` | the {JOB_SECTIONS[section]} job's keys (its table), as `{key}.KEY` | "
                        + ("; ".join(f"`{k}`: {_value(v)}" for k, v in changed.items()) or "its defaults")
                        + f" | {field.description or ''} |")
        elif section is not None and isinstance(default, dict):
            if field.description:  # what the section is for, then its keys
                rows.append(f"| `{key}.*` | a section | | {field.description} |")
            rows.extend(_rows(section, default, f"{key}."))
        else:
            allowed = ", ".join(p for p in (_type(field.annotation), _range(field)) if p)
            rows.append(f"| `{key}` | {allowed} | {_value(default)} | {field.description or ''} |")
    return rows


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree} if prefix else {}
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def reference() -> str:
    """The whole page."""
    out = ["# Configuration reference", "",
           "Generated from the schemas (`distributed_ebm/config/`) by `python -m distributed_ebm.config.reference "
           "> docs/configuration.md`; `tests/test_docs.py` fails when this page and the schemas disagree. Every job "
           "takes `--config FILE.yaml` plus dotted `key=value` overrides (merged by OmegaConf: defaults, then the "
           "file, then the overrides), validated before any work: a value outside the range below fails with one "
           "line naming the key. Budgets may be written as fractions (`8/255`); paths are local paths or URLs "
           f"(`s3://...`); `{SHARED}` is the shared data folder (default `../shared`).", ""]
    with _shared_placeholder():
        for name, cls, runs in JOBS:
            defaults = cls.model_construct().model_dump(mode="json")
            fields = cls.model_fields
            if cls is StandaloneTrainConfig:  # only what it adds to train-ebm
                fields = {k: v for k, v in fields.items() if k not in TrainEBMConfig.model_fields}
            doc = " ".join((cls.__doc__ or "").split())
            out += [f"## {name} (`{cls.__name__}`)", "", f"Run by {runs}. {doc}".strip(), "",
                    "| key | type, allowed | default | meaning |", "|---|---|---|---|"]
            sub = type("Only", (), {"model_fields": fields}) if cls is StandaloneTrainConfig else cls
            out += _rows(sub, defaults) + [""]
    return "\n".join(line.replace("\n", " ") for line in out)


if __name__ == "__main__":
    sys.stdout.write(reference())
