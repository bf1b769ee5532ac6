"""Tensor-parallel layout of HTH parameters: shard a full state dict for TP rank r of k, merge k back.

One plan (``shard_spec``) says, for every parameter, along which dimension it is split and how
that dimension is made of *segments* that are split separately or kept whole. Packed projections
need the segments: Hydra's ``in_proj`` is [z | x | B_f | C_f | B_b | C_b | dt_f | dt_b] and rank r
keeps the r-th block of every split segment (its heads' z, x, dt; its B/C groups), concatenated in
the same order. The parallel layers (``megassm.parallel.apply``) shard a live model with this same
plan, so ``model.state_dict()`` after ``parallelize_hth`` equals ``shard_state_dict`` of the
unsharded one (a test checks it).

    mixers       each kind's ``MixerSpec.shard_specs`` (megassm/models/mixers/): Hydra's heads, groups
                 and channels; attention's qkv rows by head and proj input columns
    cross-attn   q / kv rows by head, proj input cols; q_norm/k_norm replicated
    FFN          fc1 rows, fc2 input cols
    LoRA         ``<linear>.lora_A`` (r, in) / ``.lora_B`` (out, r) follow their base linear
                 (``adapter_spec``): a column-parallel base splits lora_B's rows segment by segment and
                 keeps lora_A whole; a row-parallel base splits lora_A's columns and keeps lora_B whole
    everything else (embedders, modulation tables, norms, biases of row-parallel layers,
    final layer) is replicated.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from megassm.models.mixers import ShardSpec, mixer_for_symbol

__all__ = ["ShardSpec", "merge_state_dicts", "merge_tensors", "replicated_rows", "shard_spec", "shard_state_dict",
           "shard_tensor"]


_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.(mixer|cross_attn|mlp)\.(.+)$")


def _cross_specs(m) -> dict[str, ShardSpec]:
    d = m.d_model
    return {
        "q.weight": ShardSpec(0, ((d, True),)), "q.bias": ShardSpec(0, ((d, True),)),
        "kv.weight": ShardSpec(0, ((d, True),) * 2), "kv.bias": ShardSpec(0, ((d, True),) * 2),
        "proj.weight": ShardSpec(1, ((d, True),)),
    }


def _mlp_specs(m) -> dict[str, ShardSpec]:
    hidden = int(m.d_model * m.mlp_ratio)
    return {
        "fc1.weight": ShardSpec(0, ((hidden, True),)), "fc1.bias": ShardSpec(0, ((hidden, True),)),
        "fc2.weight": ShardSpec(1, ((hidden, True),)),
    }


def shard_spec(name: str, model_cfg, tp_size: int) -> ShardSpec | None:
    """The TP split of parameter ``name`` (any prefix, e.g. ``module.``), or None if replicated."""
    if name.endswith(ADAPTER_SUFFIXES):
        return adapter_spec(name, model_cfg, tp_size)
    match = _BLOCK.search(name)
    if match is None:
        return None
    block, part, leaf = int(match.group(1)), match.group(2), match.group(3)
    if block >= len(model_cfg.pattern):
        raise KeyError(f"{name}: block {block} but model.pattern={model_cfg.pattern!r} has "
                       f"{len(model_cfg.pattern)} blocks")
    if part == "mixer":
        specs = mixer_for_symbol(model_cfg.pattern[block]).shard_specs(model_cfg, tp_size)
    elif part == "cross_attn":
        specs = _cross_specs(model_cfg)
    else:
        specs = _mlp_specs(model_cfg)
    return specs.get(leaf)


ADAPTER_SUFFIXES = (".lora_A", ".lora_B")  # megassm/lora/layers.py: A (r, in), B (out, r)


def adapter_spec(name: str, model_cfg, tp_size: int) -> ShardSpec | None:
    """The TP split of a LoRA factor ``<linear>.lora_A`` / ``<linear>.lora_B``, read off its base's plan.

    W (out, in) ~ B (out, r) @ A (r, in): the dimension the base splits is B's rows (column-parallel,
    ``dim`` 0, the same segments, e.g. Hydra's z | x | B/C | dt) or A's columns (row-parallel, ``dim`` 1);
    the other factor is replicated.
    """
    module, _, factor = name.rpartition(".")
    base = shard_spec(module + ".weight", model_cfg, tp_size)
    if base is None:
        return None
    return base if (factor == "lora_B") == (base.dim == 0) else None


def replicated_rows(spec: ShardSpec | None, tp_size: int, name: str = "tensor") -> list[tuple[int, int]]:
    """The [start, stop) rows of a TP-split parameter's local shard that every TP rank holds whole: its
    unsplit segments (Hydra's B/C rows of in_proj / conv1d when ngroups is not split, and the lora_B rows
    that follow them), adjacent ones merged. Empty for a replicated (``spec`` None) or fully split tensor.

    The one rule for such rows: each TP rank's gradient of them is partial (this rank's heads' part), so
    ``parallelize_hth`` sums it over TP, and a gradient norm counts them once, not once per TP rank
    (``megassm/train/backends/grad_norm.py``).
    """
    if spec is None or tp_size == 1:
        return []
    runs: list[list[int]] = []
    for start, stop, split in spec.local_segments(tp_size):
        if split or stop == start:
            continue
        if spec.dim != 0:
            raise ValueError(f"{name}: a replicated segment along dim {spec.dim}; only rows (dim 0) of a TP-split "
                             "tensor may be replicated")
        if runs and runs[-1][1] == start:
            runs[-1][1] = stop
        else:
            runs.append([start, stop])
    return [(a, b) for a, b in runs]


def shard_tensor(t: Tensor, spec: ShardSpec, tp_rank: int, tp_size: int, name: str = "tensor") -> Tensor:
    """Rank ``tp_rank``'s piece of ``t``: the tp_rank-th block of each split segment, concatenated."""
    if t.shape[spec.dim] != spec.size:
        raise ValueError(f"{name}: size {t.shape[spec.dim]} along dim {spec.dim}, the model config implies "
                         f"{spec.size} (shape {tuple(t.shape)}); wrong model config for this checkpoint?")
    pieces, start = [], 0
    for n, split in spec.segments:
        if split:
            if n % tp_size:
                raise ValueError(f"{name}: segment of {n} along dim {spec.dim} does not split over tp={tp_size}")
            m = n // tp_size
            pieces.append(t.narrow(spec.dim, start + tp_rank * m, m))
        else:
            pieces.append(t.narrow(spec.dim, start, n))
        start += n
    return torch.cat(pieces, dim=spec.dim).contiguous()


def merge_tensors(shards: Sequence[Tensor], spec: ShardSpec, name: str = "tensor") -> Tensor:
    """Inverse of ``shard_tensor`` over all ranks; replicated segments come from rank 0."""
    tp_size = len(shards)
    local = spec.local_size(tp_size)
    for r, s in enumerate(shards):
        if s.shape[spec.dim] != local:
            raise ValueError(f"{name}: TP shard {r} has size {s.shape[spec.dim]} along dim {spec.dim}, "
                             f"expected {local} for tp={tp_size}")
    pieces = []
    for start, stop, split in spec.local_segments(tp_size):
        if split:
            pieces.extend(s.narrow(spec.dim, start, stop - start) for s in shards)
        else:
            pieces.append(shards[0].narrow(spec.dim, start, stop - start))
    return torch.cat(pieces, dim=spec.dim).contiguous()


def _check_tp(model_cfg, tp_size: int) -> None:
    from megassm.parallel.mesh import ParallelDims

    ParallelDims(world=tp_size, tp=tp_size).check_model(model_cfg)


def shard_state_dict(full_sd: Mapping[str, Tensor], model_cfg, tp_rank: int, tp_size: int) -> dict:
    """The state dict TP rank ``tp_rank`` of ``tp_size`` holds. Replicated tensors are shared, not copied.

    ``full_sd``: an unsharded HTHModel state dict (keys may carry a prefix such as ``module.``).
    Raises ``MeshError`` when tp_size does not divide the heads / groups / FFN width.
    """
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} must be in [0, {tp_size})")
    _check_tp(model_cfg, tp_size)
    out = {}
    for name, t in full_sd.items():
        spec = shard_spec(name, model_cfg, tp_size) if tp_size > 1 else None
        out[name] = t if spec is None else shard_tensor(t, spec, tp_rank, tp_size, name)
    return out


def merge_state_dicts(tp_sds: Sequence[Mapping[str, Tensor]], model_cfg, check_replicated: bool = False) -> dict:
    """Gather the TP shards (list index = TP rank) back into one unsharded state dict.

    Replicated tensors are taken from rank 0; ``check_replicated=True`` raises if another rank's
    copy differs (replicas drift only through non-deterministic reductions).
    """
    tp_size = len(tp_sds)
    if tp_size == 0:
        raise ValueError("merge_state_dicts needs at least one state dict")
    keys = list(tp_sds[0].keys())
    for r, sd in enumerate(tp_sds[1:], 1):
        if set(sd.keys()) != set(keys):
            diff = sorted(set(sd.keys()) ^ set(keys))[:5]
            raise ValueError(f"TP shard {r} has different keys from shard 0, e.g. {diff}")
    _check_tp(model_cfg, tp_size)
    out = {}
    for name in keys:
        shards = [sd[name] for sd in tp_sds]
        spec = shard_spec(name, model_cfg, tp_size) if tp_size > 1 else None
        if spec is None:
            if check_replicated:
                for r, s in enumerate(shards[1:], 1):
                    if not torch.equal(s, shards[0]):
                        raise ValueError(f"{name}: replicated tensor differs between TP rank 0 and rank {r}")
            out[name] = shards[0]
        else:
            out[name] = merge_tensors(shards, spec, name)
    return out
