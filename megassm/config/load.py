"""Load, compose and override run configs (``compose``, ``structured``); the rules are config/validate.py's,
run with the packages' own by the gate, ``megassm/run_config.py`` (``load_config``, ``from_dict``).

A YAML file may name other YAML files under ``base:`` (paths relative to the file);
they are merged first, in order, then the file itself, then ``key=value`` overrides.
Every error is a ``ConfigError`` naming the key / file / value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from megassm.config.schema import RunConfig
from megassm.config.validate import ConfigError


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """Return [(file, mapping)] for ``path`` and its ``base:`` files, bases first."""
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"config {path}: circular 'base:' chain: {' -> '.join(map(str, chain + (path,)))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: top level must be a mapping of sections, got {type(data).__name__}")
    bases = data.pop("base", []) or []
    if isinstance(bases, str):
        bases = [bases]
    out: list[tuple[Path, dict]] = []
    for b in bases:
        out += _read_yaml((path.parent / b), chain + (path,))
    out.append((path, data))
    return out


def _known_keys(node: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def _field_default(node: Any, name: str) -> Any:
    """node.name, or a default instance of its dataclass type where the default is None (``X | None``)."""
    value = getattr(node, name, None)
    if value is None and dataclasses.is_dataclass(node):
        hint = typing.get_type_hints(type(node)).get(name)
        for t in typing.get_args(hint):
            if dataclasses.is_dataclass(t):
                return t()
    return value


def _explain_key_error(e: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(e, "full_key", None) or "?"
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    obj: Any = RunConfig()
    for part in parent.split(".") if parent else []:
        obj = _field_default(obj, part)
    allowed = _known_keys(obj)
    leaf = key.rsplit(".", 1)[-1]
    hint = difflib.get_close_matches(leaf, allowed, n=1)
    msg = f"{where}: unknown config key '{key}'."
    if hint:
        msg += f" Did you mean '{(parent + '.') if parent else ''}{hint[0]}'?"
    if allowed:
        msg += f" Valid keys{(' under ' + repr(parent)) if parent else ''}: {', '.join(allowed)}"
    return ConfigError(msg)


def _type_name(hint: Any) -> str:
    """'a number', 'a list', 'true or false', ... for a schema field's type hint."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin in (list, tuple) or (args and typing.get_origin(args[0]) in (list, tuple)):
        return "a list"
    if origin in (dict,) or (args and typing.get_origin(args[0]) is dict):
        return "a mapping"
    base = args[0] if args else hint
    if dataclasses.is_dataclass(base):
        return "a mapping"
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string"}.get(base, str(base))


def _explain_type_error(e: ValidationError, where: str, other: Any) -> ConfigError:
    """'optim.lr='fast' is not a number (default 0.0001)', without omegaconf's internals; a list key given a
    single value gets the list spelling."""
    key = getattr(e, "full_key", None)
    if not key:  # omegaconf did not say which key: its own first line
        return ConfigError(f"{where}: wrong type: {str(e).splitlines()[0]}")
    parent, _, leaf = key.rpartition(".")
    obj: Any = RunConfig()
    for part in parent.split(".") if parent else []:
        obj = _field_default(obj, part)
    hint = typing.get_type_hints(type(obj)).get(leaf) if dataclasses.is_dataclass(obj) else None
    try:
        value = OmegaConf.select(OmegaConf.create(other), key) if not isinstance(other, DictConfig) \
            else OmegaConf.select(other, key)
    except OmegaConfBaseException:
        value = "?"
    want = _type_name(hint) if hint is not None else "another type"
    msg = f"{where}: wrong type for '{key}': {value!r} is not {want}"
    default = getattr(obj, leaf, None)
    if want == "a list":
        msg += f"; write a list, e.g. {key}=[{value}] (YAML: [a, b])"
    elif default is not None and not dataclasses.is_dataclass(default):
        msg += f" (e.g. {key}={str(default).lower() if isinstance(default, bool) else default}, the default)"
    return ConfigError(msg)


def _merge(base: DictConfig, other: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except (ConfigKeyError, ConfigAttributeError) as e:
        raise _explain_key_error(e, where) from None
    except ValidationError as e:
        raise _explain_type_error(e, where, other) from None


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.steps=100)")
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        out.append((key.strip(), parsed))
    return out


def _flatten(data: Mapping, prefix: str = "") -> Iterable[str]:
    for k, v in data.items():
        key = f"{prefix}{k}"
        yield key
        if isinstance(v, Mapping):
            yield from _flatten(v, key + ".")


def explicit_keys(files: Iterable[Mapping], overrides: Iterable[tuple[str, Any]]) -> set[str]:
    """Dotted keys set by the YAML mappings (bases included) and the ``(key, value)`` overrides."""
    keys: set[str] = set()
    for data in files:
        keys.update(_flatten(data))
    for key, value in overrides:
        keys.add(key)
        if isinstance(value, Mapping):
            keys.update(_flatten(value, key + "."))
    return keys


def compose(path: str | Path | None = None, overrides: Sequence[str] = ()) -> tuple[RunConfig, set[str]]:
    """A ``RunConfig`` from a YAML file (with its bases) and ``key=value`` overrides, typed but not yet checked
    against the rules (``megassm/run_config.py: load_config`` does both), and the dotted keys the files and
    overrides set themselves (``data/config_checks.explicit_keys``: widths left unset come from the data)."""
    cfg = OmegaConf.structured(RunConfig)
    files = _read_yaml(Path(path)) if path is not None else []
    for file, data in files:
        cfg = _merge(cfg, data, str(file))
    parsed = parse_overrides(overrides)
    for key, value in parsed:
        dotted = OmegaConf.from_dotlist([])
        try:
            OmegaConf.update(dotted, key, value, force_add=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"override '{key}': {e}") from None
        cfg = _merge(cfg, dotted, f"override '{key}={value}'")
    try:
        run: RunConfig = OmegaConf.to_object(cfg)  # resolves ${...} interpolations
    except OmegaConfBaseException as e:
        raise ConfigError(f"config could not be resolved: {e}") from None
    return run, explicit_keys([d for _, d in files], parsed)


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def structured(data: dict) -> RunConfig:
    """A RunConfig from ``to_dict`` output (e.g. a checkpoint's config.json), typed but not yet checked against
    the rules (``megassm/run_config.py: from_dict`` does both)."""
    cfg = _merge(OmegaConf.structured(RunConfig), data, "stored config")
    return OmegaConf.to_object(cfg)
