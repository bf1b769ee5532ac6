"""What megassm knows about a kind of token mixer: one ``MixerSpec`` per kind, in a registry.

A block's mixer is picked by its symbol in ``model.pattern``; every place that needs to know what a
kind of mixer is -- the block that builds it, the parameter / FLOP / memory accounting, the TP shard
plan, the parallel-degree checks, the communication model, the checkpoint tools -- asks the registry
(``mixer_for_symbol``) instead of comparing symbols. A new mixer is one file that defines its layer
and its ``MixerSpec`` and calls ``register_mixer``, plus its parallel twin (docs/architecture.md §8).

The spec holds plain arithmetic and names; the parallel twin is named by an import path (or given
as a callable), so ``megassm.models`` never imports ``megassm.parallel``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ShardSpec:
    """TP split of one tensor: split ``dim``; ``segments`` lists (length, split?) along it, in order."""

    dim: int
    segments: tuple[tuple[int, bool], ...]

    @property
    def size(self) -> int:
        return sum(n for n, _ in self.segments)

    def local_size(self, tp_size: int) -> int:
        return sum(n // tp_size if split else n for n, split in self.segments)

    def local_segments(self, tp_size: int) -> list[tuple[int, int, bool]]:
        """(start, stop, split?) of each segment in the *local* tensor."""
        out, start = [], 0
        for n, split in self.segments:
            m = n // tp_size if split else n
            out.append((start, start + m, split))
            start += m
        return out


# (op, group, payload bytes, what) as megassm.parallel.comm_model.Collective takes them
CollectiveTuple = tuple[str, str, int, str]
# (degree name "tp" | "cp", what, size): the degree must divide ``size``
DivisibilityCheck = tuple[str, str, int]


def _none(*_a, **_k):
    return []


@dataclass(frozen=True)
class MixerSpec:
    """One kind of token mixer. Sizes are functions of the ``ModelConfig`` (``m``).

    name            kind name ("hydra", "attention"); ``accounting.param_counts`` reports ``{name}_mixers``
    label           how checkpoint inspection names its parameters ("Hydra mixers")
    symbols         pattern symbol -> scan order (``models/scan.py``) it runs in; None: the mixer sees the
                    canonical order (a permutation-equivariant mixer such as attention, given RoPE angles)
    descriptions    pattern symbol -> one line for error messages and reports
    build(m)        the single-process module; it has ``mix(x, grid, scan_order)`` -> (B, L, d)
    parallel        its parallel twin: ``"module:function"`` or a callable ``(mixer, ctx, m) -> module``
                    with the same parameter names and ``mix(x, grid, scan_order)`` on sequence shards
    params(m)       exact parameter count of one mixer
    flops(m, L)     forward FLOPs per token at L tokens per sample (matmul-like work, multiply-add = 2)
    activation_bytes(m, bytes_per_el)  what autograd keeps for backward per token, fp32 statistics included
    shard_specs(m, tp)  parameter name inside the mixer -> ShardSpec (absent: replicated over TP)
    divisibility(m, tp) the sizes that tp / cp must divide (``ParallelDims.check_model``)
    layout_errors(m, tp, cp)  further layout rules, as messages (empty: fine)
    config_errors(m)    rules on the model config alone, as messages (checked at config load)
    collectives(m, B, L, tp, cp, sp, act_bytes, param_bytes, cp_impl="ulysses")  the mixer's own collectives
                    per training step, beyond the Megatron entry / exit every mixer has (``parallel/comm_model.py``);
                    ``cp_impl``: "ulysses" or "state_passing", as the block runs under CP
    keep_init       submodule names whose nn.Linear keeps its own init (HTHModel xavier-initialises the rest)
    lora_targets    the nn.Linear submodules LoRA adapts when ``finetune.lora.targets`` names this kind
                    (``megassm/lora/adapters.py: target_kinds``)
    """

    name: str
    label: str
    symbols: Mapping[str, str | None]
    descriptions: Mapping[str, str]
    build: Callable[[Any], nn.Module]
    parallel: str | Callable[..., nn.Module]
    params: Callable[[Any], int]
    flops: Callable[[Any, int], int]
    activation_bytes: Callable[[Any, int], int]
    shard_specs: Callable[[Any, int], dict[str, ShardSpec]]
    divisibility: Callable[[Any, int], list[DivisibilityCheck]] = _none
    layout_errors: Callable[[Any, int, int], list[str]] = _none
    config_errors: Callable[[Any], list[str]] = _none
    collectives: Callable[..., list[CollectiveTuple]] = _none
    keep_init: tuple[str, ...] = field(default=())
    lora_targets: tuple[str, ...] = field(default=())

    def parallelize(self, mixer: nn.Module, ctx, model_cfg) -> nn.Module:
        """The parallel twin of ``mixer`` (already TP-sharded parameters) for the parallel context ``ctx``."""
        fn = self.parallel
        if isinstance(fn, str):
            module, _, attr = fn.partition(":")
            fn = getattr(importlib.import_module(module), attr)
        return fn(mixer, ctx, model_cfg)


_REGISTRY: dict[str, MixerSpec] = {}  # kind name -> spec, in registration order
_BY_SYMBOL: dict[str, MixerSpec] = {}


def register_mixer(spec: MixerSpec, *, replace: bool = False) -> MixerSpec:
    """Add a kind of mixer; its symbols become valid in ``model.pattern``. Returns ``spec``."""
    if set(spec.symbols) != set(spec.descriptions):
        raise ValueError(f"mixer {spec.name!r}: symbols {sorted(spec.symbols)} and descriptions "
                         f"{sorted(spec.descriptions)} must name the same symbols")
    for s in spec.symbols:
        if len(s) != 1:
            raise ValueError(f"mixer {spec.name!r}: pattern symbol {s!r} must be one character")
        other = _BY_SYMBOL.get(s)
        if other is not None and other.name != spec.name:
            raise ValueError(f"pattern symbol {s!r} of mixer {spec.name!r} is taken by mixer {other.name!r}")
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"mixer {spec.name!r} is already registered (replace=True to redefine it)")
    unregister_mixer(spec.name)
    _REGISTRY[spec.name] = spec
    for s in spec.symbols:
        _BY_SYMBOL[s] = spec
    return spec


def unregister_mixer(name: str) -> None:
    spec = _REGISTRY.pop(name, None)
    if spec is not None:
        for s in spec.symbols:
            _BY_SYMBOL.pop(s, None)


def mixer_kinds() -> list[MixerSpec]:
    """Every registered kind, in registration order."""
    return list(_REGISTRY.values())


def pattern_symbols() -> dict[str, str]:
    """Every valid pattern symbol -> its description."""
    return {s: spec.descriptions[s] for spec in _REGISTRY.values() for s in spec.symbols}


def mixer_for_symbol(symbol: str) -> MixerSpec:
    spec = _BY_SYMBOL.get(symbol)
    if spec is None:
        valid = ", ".join(f"'{k}' ({v})" for k, v in pattern_symbols().items())
        raise ValueError(f"unknown block symbol {symbol!r}; valid: {valid}")
    return spec


def is_mixer_symbol(symbol: str) -> bool:
    return symbol in _BY_SYMBOL


def kinds_in(pattern: str) -> list[MixerSpec]:
    """The kinds ``pattern`` uses, each once, in registration order."""
    used = {mixer_for_symbol(s).name for s in pattern}
    return [spec for spec in _REGISTRY.values() if spec.name in used]


def scan_order_of(symbol: str) -> str | None:
    return mixer_for_symbol(symbol).symbols[symbol]


def pattern_errors(pattern: str) -> list[str]:
    """What is wrong with a ``model.pattern`` string (empty: nothing)."""
    bad = sorted({c for c in pattern if c not in _BY_SYMBOL})
    if not pattern or bad:
        allowed = ", ".join(f"'{k}' ({v})" for k, v in pattern_symbols().items())
        return [f"model.pattern={pattern!r} has unknown symbols {bad}; allowed: {allowed}"]
    return []


def spec_errors(m) -> list[str]:
    """The config rules of every kind ``m.pattern`` uses (``MixerSpec.config_errors``)."""
    return [msg for spec in kinds_in(m.pattern) for msg in spec.config_errors(m)]
