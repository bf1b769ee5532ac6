"""Load, compose and override run configs; validation is config/validate.py's.

A YAML file may name other YAML files under ``base:`` (paths relative to the file);
they are merged first, in order, then the file itself, then ``key=value`` overrides.
Every error is a ``ConfigError`` naming the key / file / value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from megassm.config.datasets import apply_datasets, explicit_keys
from megassm.config.schema import RunConfig
from megassm.config.validate import ConfigError, check_run, validate

log = logging.getLogger("megassm.config")


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


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), world: int | None = None,
                quiet: bool = False, training: bool = False) -> RunConfig:
    """Build a validated ``RunConfig`` from a YAML file (with its bases) and overrides; ``world``: the world
    size of the launch that will run it, if known (``megassm train`` passes it, before dist init). The model's
    input widths come from the local datasets where the config leaves them out (logged unless ``quiet``);
    ``training`` (``megassm train``): also what a run reads must exist and agree (config/datasets.py)."""
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
    validate(run)
    notes, warnings = apply_datasets(run, explicit_keys([d for _, d in files], parsed), training)
    check_run(run, world)
    for note in notes if not quiet else ():
        log.info(note)
    for warning in warnings if not quiet else ():
        log.warning(warning)
    return run


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def from_dict(data: dict) -> RunConfig:
    """Rebuild a RunConfig from ``to_dict`` output (e.g. a checkpoint's config.json)."""
    cfg = _merge(OmegaConf.structured(RunConfig), data, "stored config")
    run = OmegaConf.to_object(cfg)
    validate(run)
    return run
