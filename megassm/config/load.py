"""Load, compose, override and validate run configs.

A YAML file may name other YAML files under ``base:`` (paths relative to the file);
they are merged first, in order, then the file itself, then ``key=value`` overrides.
Every error is a ``ConfigError`` naming the key / file / value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from megassm.config.schema import ATTENTION_BACKENDS, HYDRA_PATHS, PATTERN_SYMBOLS, RunConfig


class ConfigError(ValueError):
    """A config value, key or combination is invalid. The message says what would be valid."""


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


def _explain_key_error(e: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(e, "full_key", None) or "?"
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    obj: Any = RunConfig()
    for part in parent.split(".") if parent else []:
        obj = getattr(obj, part, None)
    allowed = _known_keys(obj)
    leaf = key.rsplit(".", 1)[-1]
    hint = difflib.get_close_matches(leaf, allowed, n=1)
    msg = f"{where}: unknown config key '{key}'."
    if hint:
        msg += f" Did you mean '{(parent + '.') if parent else ''}{hint[0]}'?"
    if allowed:
        msg += f" Valid keys{(' under ' + repr(parent)) if parent else ''}: {', '.join(allowed)}"
    return ConfigError(msg)


def _merge(base: DictConfig, other: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except (ConfigKeyError, ConfigAttributeError) as e:
        raise _explain_key_error(e, where) from None
    except ValidationError as e:
        key = getattr(e, "full_key", "?")
        raise ConfigError(f"{where}: wrong type for '{key}': {e.msg if hasattr(e, 'msg') else e}") from None


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


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Build a validated ``RunConfig`` from a YAML file (with its bases) and overrides."""
    cfg = OmegaConf.structured(RunConfig)
    if path is not None:
        for file, data in _read_yaml(Path(path)):
            cfg = _merge(cfg, data, str(file))
    for key, value in parse_overrides(overrides):
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


def _choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {list(allowed)}")


def validate_model(m) -> None:
    bad = sorted({c for c in m.pattern if c not in PATTERN_SYMBOLS})
    if not m.pattern or bad:
        allowed = ", ".join(f"'{k}' ({v})" for k, v in PATTERN_SYMBOLS.items())
        raise ConfigError(f"model.pattern={m.pattern!r} has unknown symbols {bad}; allowed: {allowed}")
    if len(m.patch_size) != 3 or any(p < 1 for p in m.patch_size):
        raise ConfigError(f"model.patch_size={list(m.patch_size)} must be three positive ints (pt, ph, pw)")
    if m.d_model % m.num_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}")
    head_dim = m.d_model // m.num_heads
    if any(c == "A" for c in m.pattern) and head_dim % 2:
        raise ConfigError(f"attention head dim d_model/num_heads={head_dim} must be even for RoPE")
    d_inner = m.expand * m.d_model
    if d_inner % m.headdim:
        raise ConfigError(
            f"Hydra inner width expand*d_model={d_inner} is not divisible by model.headdim={m.headdim}"
        )
    nheads = d_inner // m.headdim
    if nheads % m.ngroups:
        raise ConfigError(f"Hydra heads ({nheads}) not divisible by model.ngroups={m.ngroups}")
    if m.d_conv % 2 == 0:
        raise ConfigError(f"model.d_conv={m.d_conv} must be odd (non-causal 'same' convolution)")
    _choice("model.ssd_impl", m.ssd_impl, ["auto", "ref", "triton"])
    _choice("model.attention_backend", m.attention_backend, list(ATTENTION_BACKENDS))
    _choice("model.hydra_path", m.hydra_path, list(HYDRA_PATHS))
    for k in ("d_model", "d_state", "chunk_size", "text_dim", "max_text_len"):
        if getattr(m, k) < 1:
            raise ConfigError(f"model.{k}={getattr(m, k)} must be >= 1")


def validate(cfg: RunConfig) -> None:
    validate_model(cfg.model)
    _choice("data.kind", cfg.data.kind, ["procedural", "shards"])
    if cfg.data.kind == "shards" and not cfg.data.paths:
        raise ConfigError("data.kind=shards needs data.paths (dataset directories written by `megassm preprocess`)")
    if cfg.data.weights and len(cfg.data.weights) != len(cfg.data.paths):
        raise ConfigError(
            f"data.weights has {len(cfg.data.weights)} entries but data.paths has {len(cfg.data.paths)}"
        )
    _choice("data.latent_norm", cfg.data.latent_norm, ["manifest", "config"])
    _choice("data.text_dtype", cfg.data.text_dtype, ["float32", "bfloat16"])
    if cfg.data.frames < 1 or cfg.data.prefetch < 1 or cfg.data.num_workers < 0:
        raise ConfigError("data.frames and data.prefetch must be >= 1 and data.num_workers >= 0")
    _choice("optim.schedule", cfg.optim.schedule, ["constant", "cosine"])
    _choice("train.precision", cfg.train.precision, ["auto", "fp32", "bf16"])
    _choice("train.activation_checkpointing", cfg.train.activation_checkpointing, ["none", "all", "every_k"])
    _choice("parallel.zero_stage", cfg.parallel.zero_stage, [0, 1, 2, 3])
    if not 0.0 <= cfg.diffusion.caption_dropout < 1.0:
        raise ConfigError(f"diffusion.caption_dropout={cfg.diffusion.caption_dropout} must be in [0, 1)")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay={cfg.train.ema_decay} must be in [0, 1) (0 disables EMA)")
    p = cfg.parallel
    for k in ("tp", "cp", "pp"):
        if getattr(p, k) < 1:
            raise ConfigError(f"parallel.{k}={getattr(p, k)} must be >= 1")
    if p.pp > 1 and p.zero_stage > 1:
        raise ConfigError(
            f"parallel.pp={p.pp} with parallel.zero_stage={p.zero_stage} is not supported. megassm has two "
            "regimes: (a) ZeRO-3 + TP + CP (+DP), pp=1 -- the default for hth-5b; (b) PP + TP + CP with "
            "zero_stage <= 1 (DeepSpeed's pipeline engine shards only optimizer state). "
            "Set parallel.zero_stage=1 or parallel.pp=1."
        )
    if p.pp > 1 and len(cfg.model.pattern) < p.pp:
        raise ConfigError(f"parallel.pp={p.pp} exceeds the number of blocks ({len(cfg.model.pattern)})")
    if p.offload_params and p.zero_stage != 3:
        raise ConfigError("parallel.offload_params needs parallel.zero_stage=3")
    if cfg.train.micro_batch_size < 1 or cfg.train.grad_accum < 1 or cfg.train.steps < 0:
        raise ConfigError("train.micro_batch_size and train.grad_accum must be >= 1, train.steps >= 0")
