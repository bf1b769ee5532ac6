"""Seeded, layout-free initial weights: any slice of any parameter, without the full tensor.

``HTHModel.initialize_weights`` draws from the global RNG in construction order, so its weights
depend on what was built before and it needs every full tensor. Here each parameter's values are a
function of (seed, parameter name, position) alone:

    a parameter of shape (R, *rest) is cut into row chunks of ``chunk_rows(shape)`` rows; chunk k is
    drawn from a CPU generator seeded by blake2b(seed, name, k), so rows [a, b) are produced by
    drawing only the chunks that cover them (never more than ``CHUNK_ELEMS`` elements at a time
    beyond the output) and any TP shard (``parallel/sharding.py``'s plan) is cut chunk by chunk.

The same seed therefore gives the same consolidated weights at every world size, TP degree, rank and
construction order. The distributions are today's (``INIT_RULES`` mirrors ``initialize_weights`` and
the layers' own defaults; ``tests/unit/test_partitioned_init.py`` checks each family's statistics):

    Linear weights            xavier-uniform, bound sqrt(6 / (fan_in + fan_out)); biases zero
    Hydra fc_D (nn.Linear's default), conv1d weight and bias: uniform, bound 1 / sqrt(fan_in)
    t_embedder MLP weights    normal, std 0.02
    t_block, final linear     zero (adaLN-Zero: gates closed, v = 0)
    scale_shift_table         zero
    y_null                    normal, std text_dim ** -0.5
    Hydra dt_bias             inverse softplus of dt, log-uniform in [dt_min, dt_max], floored
    Hydra A_log zero, D one; norm weights one, norm biases zero
    LoRA lora_A (r, in)       uniform, bound 1 / sqrt(in) (peft's default); lora_B zero
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

CHUNK_ELEMS = 1 << 20  # elements drawn per generator seed (4 MiB of fp32)
# Hydra's dt range (megassm.models.hydra.Hydra's defaults, which HTHBlock does not override)
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4


@dataclass(frozen=True)
class InitRule:
    """kind: 'uniform' (arg: bound), 'normal' (arg: std), 'const' (arg: value) or 'dt_bias'."""

    kind: str
    arg: float = 0.0


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def _xavier(shape, cfg) -> InitRule:
    fan_in, fan_out = _fans(shape)
    return InitRule("uniform", math.sqrt(6.0 / (fan_in + fan_out)))


def _torch_default(shape, cfg) -> InitRule:
    """nn.Linear / nn.Conv1d's own init (kaiming-uniform with a = sqrt(5)): bound 1 / sqrt(fan_in)."""
    return InitRule("uniform", 1.0 / math.sqrt(_fans(shape)[0]))


def _conv_bias(shape, cfg) -> InitRule:  # the depthwise conv's fan_in is its kernel size
    return InitRule("uniform", 1.0 / math.sqrt(cfg.d_conv))


def _const(v: float) -> Callable:
    return lambda shape, cfg: InitRule("const", v)


# (pattern on the HTHModel parameter name, rule); first match wins. Order: the exceptions to the
# Linear rule, then the Linear rule, then the non-Linear parameters.
INIT_RULES: list[tuple[re.Pattern, Callable]] = [(re.compile(p), r) for p, r in [
    # LoRA factors (megassm/lora/layers.py: peft's default): A (r, in) kaiming-uniform, B (out, r) zero
    (r"\.lora_A$", _torch_default),
    (r"\.lora_B$", _const(0.0)),
    (r"^t_block\.1\.(weight|bias)$", _const(0.0)),
    (r"^final_layer\.linear\.(weight|bias)$", _const(0.0)),
    (r"^t_embedder\.mlp\.[02]\.weight$", lambda s, c: InitRule("normal", 0.02)),
    (r"\.mixer\.fc_D\.weight$", _torch_default),
    (r"\.mixer\.conv1d\.weight$", _torch_default),
    (r"\.mixer\.conv1d\.bias$", _conv_bias),
    (r"(^|\.)(proj|linear|qkv|q|kv|in_proj|out_proj|fc1|fc2|mlp\.[02]|[02]|1)\.weight$", _xavier),
    (r"(^|\.)(proj|linear|qkv|q|kv|in_proj|out_proj|fc1|fc2|mlp\.[02]|[02]|1)\.bias$", _const(0.0)),
    (r"(^|\.)scale_shift_table$", _const(0.0)),
    (r"^y_null$", lambda s, c: InitRule("normal", c.text_dim ** -0.5)),
    (r"\.mixer\.dt_bias$", lambda s, c: InitRule("dt_bias")),
    (r"\.mixer\.A_log$", _const(0.0)),
    (r"\.mixer\.D$", _const(1.0)),
    (r"(norm|norm2|q_norm|k_norm)\.weight$", _const(1.0)),
    (r"norm2\.bias$", _const(0.0)),
]]


def init_rule(name: str, shape: tuple[int, ...], cfg) -> InitRule:
    """The initial distribution of HTHModel parameter ``name`` (full, unsharded ``shape``)."""
    for pattern, rule in INIT_RULES:
        if pattern.search(name):
            return rule(tuple(shape), cfg)
    raise KeyError(f"{name}: no initialisation rule in megassm/models/init.py::INIT_RULES; a new layer's "
                   "parameters need one (its distribution as the layer's own init draws it)")


def chunk_rows(shape: tuple[int, ...]) -> int:
    """Rows per generator seed: a function of the full shape only (so of no layout)."""
    per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
    return max(1, CHUNK_ELEMS // max(per_row, 1))


def chunk_seed(seed: int, name: str, chunk: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _draw(rule: InitRule, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    out = torch.empty(shape, dtype=torch.float32)
    if rule.kind == "const":
        return out.fill_(rule.arg)
    if rule.kind == "uniform":
        return out.uniform_(-rule.arg, rule.arg, generator=gen)
    if rule.kind == "normal":
        return out.normal_(0.0, rule.arg, generator=gen)
    if rule.kind == "dt_bias":  # as Hydra.__init__: log-uniform dt, floored, then softplus^-1
        dt = torch.exp(out.uniform_(0.0, 1.0, generator=gen) * (math.log(DT_MAX) - math.log(DT_MIN))
                       + math.log(DT_MIN)).clamp(min=DT_FLOOR)
        return dt + torch.log(-torch.expm1(-dt))
    raise ValueError(f"unknown init kind {rule.kind!r}")


def init_rows(name: str, shape: tuple[int, ...], cfg, seed: int, start: int, stop: int,
              cols: tuple[int, int] | None = None) -> Tensor:
    """Rows [start, stop) of parameter ``name``'s initial value (full ``shape``), optionally only the
    dim-1 range ``cols`` = (c0, c1): shape (stop - start, *shape[1:]) (dim 1 cut to c1 - c0)."""
    rule = init_rule(name, shape, cfg)
    rest = tuple(shape[1:])
    if cols is not None:
        rest = (cols[1] - cols[0], *rest[1:])
    if rule.kind == "const":
        return torch.full((stop - start, *rest), rule.arg, dtype=torch.float32)
    per = chunk_rows(shape)
    pieces = []
    for k in range(start // per, (stop - 1) // per + 1 if stop > start else 0):
        lo, hi = k * per, min((k + 1) * per, shape[0])
        gen = torch.Generator().manual_seed(chunk_seed(seed, name, k))
        chunk = _draw(rule, (hi - lo, *shape[1:]), gen)[max(start, lo) - lo:min(stop, hi) - lo]
        pieces.append(chunk if cols is None else chunk.narrow(1, cols[0], cols[1] - cols[0]))
    if not pieces:
        return torch.empty((0, *rest), dtype=torch.float32)
    # a copy, so that no piece keeps its whole chunk's storage alive
    return torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0].clone(memory_format=torch.contiguous_format)


def init_full(name: str, shape: tuple[int, ...], cfg, seed: int) -> Tensor:
    """The whole initial value of ``name`` (the reference the sliced draws must equal)."""
    return init_rows(name, tuple(shape), cfg, seed, 0, shape[0])


def init_shard(name: str, shape: tuple[int, ...], cfg, seed: int, spec, tp_rank: int, tp: int) -> Tensor:
    """TP rank ``tp_rank``'s piece of ``name`` under ``spec`` (a ``sharding.ShardSpec``, None: replicated):
    equal to ``sharding.shard_tensor(init_full(...), spec, tp_rank, tp)``, drawn slice by slice."""
    shape = tuple(shape)
    if spec is None or tp == 1:
        return init_full(name, shape, cfg, seed)
    pieces, start = [], 0
    for n, split in spec.segments:
        lo, size = (start + tp_rank * (n // tp), n // tp) if split else (start, n)
        if spec.dim == 0:
            pieces.append(init_rows(name, shape, cfg, seed, lo, lo + size))
        elif spec.dim == 1:
            pieces.append(init_rows(name, shape, cfg, seed, 0, shape[0], cols=(lo, lo + size)))
        else:
            raise ValueError(f"{name}: TP split along dim {spec.dim} is not supported by the seeded init")
        start += n
    return torch.cat(pieces, dim=spec.dim).contiguous()
