"""Reading a config: the job's defaults, a YAML file and dotted `key=value` overrides, merged and
interpolated by OmegaConf (`${other.key}`, `${oc.env:VAR,default}`), validated by pydantic; a bad value
fails with one line naming the key and the allowed range (`ConfigError`), before anything runs.
OmegaConf is imported only when a config is read, so the method core imports without it."""
from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ValidationError

from ..errors import ConfigError


def validation_message(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key")
        elif not loc:  # a check across keys: its message names them
            parts.append(msg)
        else:
            shown = e.get("input")
            value = "" if isinstance(shown, dict) else f" = {shown!r}"
            parts.append(f"{loc}{value}: {msg}")
    return "; ".join(parts)


def build(cls: type[BaseModel], tree: dict | None) -> BaseModel:
    """Validate `tree` (a config built in code) merged over the job's defaults by OmegaConf, as a file would
    be: a partial section keeps the rest."""
    from omegaconf import OmegaConf

    return _validated(cls, [OmegaConf.create(tree or {})], "config")


def _validated(cls: type[BaseModel], layers: list, where: str) -> BaseModel:
    """The job's defaults with `layers` merged over them in order, interpolated, then validated."""
    from omegaconf import OmegaConf

    try:
        tree = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(cls.model_construct().model_dump()), *layers),
                                      resolve=True)
    except Exception as err:
        raise _omegaconf_error(err, where) from None
    try:
        return cls.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"config error: {validation_message(err)}") from None


def _omegaconf_error(err: Exception, where: str) -> ConfigError:
    """One line from an OmegaConf or YAML error: what is wrong and where."""
    import yaml

    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        m = err.problem_mark
        return ConfigError(f"{where} is not valid YAML: line {m.line + 1}, column {m.column + 1}: {err.problem}")
    if isinstance(err, yaml.YAMLError):
        return ConfigError(f"{where} is not valid YAML: {str(err).splitlines()[0]}")
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    key = getattr(err, "full_key", None)
    hint = (" (environment variables: ${oc.env:VAR} or ${oc.env:VAR,default})"
            if type(err).__name__ == "UnsupportedInterpolationType" else "")
    return ConfigError(f"{where}{f', key {key}' if key else ''}: {first}{hint}")


def _read_file(path: str | os.PathLike, data: bytes | None = None):
    from omegaconf import DictConfig, OmegaConf

    if data is None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} does not exist" + (" (it is a folder)" if p.is_dir() else ""))
        data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text file (not UTF-8)") from None
    try:
        conf = OmegaConf.create(text)
    except Exception as err:  # yaml's parse errors, OmegaConf's key errors
        raise _omegaconf_error(err, f"config file {path}") from None
    if not isinstance(conf, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at the top (key: value lines)")
    return conf


def load_config(cls: type[BaseModel], path: str | os.PathLike | None = None, overrides: list[str] = (),
                data: bytes | None = None) -> BaseModel:
    """The job's defaults, the YAML file over them, the dotted overrides over that (all merged and
    interpolated by OmegaConf), validated by pydantic. A `null` removes a search dimension. `data`: the
    file's bytes, when the caller read `path` itself (a URL: this layer reads local files only)."""
    from omegaconf import OmegaConf

    layers = [] if path is None else [_read_file(path, data)]
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if "=" not in item or not key or not all(key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key=value (dotted key, e.g. attack.steps=10)")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    except Exception as err:
        raise _omegaconf_error(err, "overrides") from None
    return _validated(cls, layers, f"config {path or '(defaults)'}")


def to_yaml(cfg: BaseModel) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
