"""Write the interchange layouts: consolidated and sharded (TP / PP x TP) directories, atomically,
streaming one tensor at a time.

    consolidated/                          sharded/
      model.safetensors | model-*-of-*      layout.json  {"format", "tp", "pp", "ranks", "pipeline"}
        (+ model.safetensors.index.json)    tp_rank_00/model.safetensors [+ ema.safetensors]   (pp = 1)
      ema.safetensors (if any)              pp_rank_00_tp_rank_00/...                          (pp > 1)
      config.yaml, config.json              config.yaml, config.json
      meta.json                             meta.json

Both are written into a hidden temporary directory beside the output and renamed into place when
complete (``atomic_directory``): an interrupted conversion never leaves a half-written output.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch

from megassm.checkpoint.errors import CheckpointError
from megassm.checkpoint.safetensors_io import (
    DEFAULT_MAX_SHARD_BYTES,
    TensorSpec,
    atomic_directory,
    write_safetensors,
    write_safetensors_parallel,
)
from megassm.checkpoint.sources import EMA, FORMAT, LAYOUT, META, MODEL, SHARDED_FORMAT, WeightSet

log = logging.getLogger("megassm.checkpoint")
FORMAT_VERSION = 1


class _Stats:
    """Counts parameters and non-finite tensors as they stream past."""

    def __init__(self):
        self.numel = 0
        self.nonfinite: list[str] = []

    def see(self, name: str, t: torch.Tensor) -> torch.Tensor:
        self.numel += t.numel()
        if t.is_floating_point() and not torch.isfinite(t).all():
            self.nonfinite.append(name)
        return t


def _cast(specs: dict[str, TensorSpec], dtype: torch.dtype | None) -> dict[str, TensorSpec]:
    if dtype is None:
        return dict(specs)
    return {n: TensorSpec(s.shape, dtype if s.dtype.is_floating_point else s.dtype) for n, s in specs.items()}


def write_config(directory: Path, config: dict) -> None:
    """config.yaml + config.json of a RunConfig dict (validated on the way)."""
    from megassm.config.load import to_dict, to_yaml
    from megassm.run_config import from_dict

    run = from_dict(config)
    (directory / "config.yaml").write_text(to_yaml(run))
    (directory / "config.json").write_text(json.dumps(to_dict(run), indent=1))


def _write_weights(directory: Path, stem: str, ws: WeightSet, dtype, max_shard_bytes: int,
                   transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> _Stats:
    stats = _Stats()
    specs = _cast(ws.specs, dtype)

    def produce(name: str) -> torch.Tensor:
        t = ws.read(name)
        if transform is not None:
            t = transform(name, t)
        return stats.see(name, t.to(specs[name].dtype))

    write_safetensors(directory, stem, specs, produce, max_shard_bytes)
    return stats


def write_consolidated(out: Path, model: WeightSet, ema: WeightSet | None, config: dict, meta: dict, *,
                       dtype: torch.dtype | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                       force: bool = False) -> dict:
    """Write a consolidated directory; returns the meta.json written (with counts)."""
    with atomic_directory(Path(out), force) as tmp:
        write_config(tmp, config)
        stats = _write_weights(tmp, MODEL, model, dtype, max_shard_bytes)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "parameters": stats.numel,
                "tensors": len(model.specs), "dtype": str(dtype or _dominant_dtype(model.specs)).replace("torch.", "")}
        if ema is not None:
            ema_stats = _write_weights(tmp, EMA, ema, dtype, max_shard_bytes)
            meta["ema"] = True
            stats.nonfinite += [f"ema:{n}" for n in ema_stats.nonfinite]
        if stats.nonfinite:
            meta["nonfinite_tensors"] = stats.nonfinite
            log.warning("%d tensors hold NaN/Inf: %s", len(stats.nonfinite), stats.nonfinite[:5])
        (tmp / META).write_text(json.dumps(meta, indent=1))
    return meta


def save_consolidated(out: Path, state_dict: dict[str, torch.Tensor], config: dict, *,
                      ema: dict[str, torch.Tensor] | None = None, meta: dict | None = None, force: bool = False,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict:
    """Write in-memory weights (e.g. ``model.state_dict()``) + a RunConfig dict as a consolidated directory."""
    from megassm.checkpoint.sources import DictWeights

    return write_consolidated(Path(out), DictWeights(state_dict), DictWeights(ema) if ema is not None else None,
                              config, {"source": "state_dict", **(meta or {})}, max_shard_bytes=max_shard_bytes,
                              force=force)


def rank_dir(pp_rank: int, tp_rank: int, pp: int) -> str:
    return f"tp_rank_{tp_rank:02d}" if pp == 1 else f"pp_rank_{pp_rank:02d}_tp_rank_{tp_rank:02d}"


def write_sharded(out: Path, model: WeightSet, ema: WeightSet | None, config: dict, meta: dict, tp: int,
                  pp: int = 1, plan=None, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                  force: bool = False) -> dict:
    """Write one directory per (pp, tp) rank: the stage's tensors (``plan``: a ``PipelinePlan`` of
    ``megassm.parallel.pipeline`` when pp > 1) cut with ``sharding.shard_state_dict`` for its TP rank.
    Every source tensor is read once."""
    from megassm.parallel.mesh import ParallelDims
    from megassm.parallel.sharding import shard_spec, shard_state_dict
    from megassm.run_config import from_dict

    model_cfg = from_dict(config).model
    ParallelDims(world=tp * pp, tp=tp, pp=pp).check_model(model_cfg)  # names the size a degree does not divide
    if pp > 1:
        from megassm.parallel.pipeline_checkpoint import stage_owns

        owner = {n: [r for r in range(pp) if stage_owns(n, plan, r)] for n in model.specs}
        bad = {n: rs for n, rs in owner.items() if len(rs) != 1}
        if bad:
            raise CheckpointError(f"pipeline plan {plan.bounds} places {len(bad)} tensors on 0 or 2+ stages, "
                                  f"e.g. {list(bad.items())[:3]}")
    else:
        owner = {n: [0] for n in model.specs}

    def local_specs(specs: dict[str, TensorSpec], names: list[str]) -> dict[str, TensorSpec]:
        out_specs = {}
        for n in names:
            sp, shape = shard_spec(n, model_cfg, tp) if tp > 1 else None, list(specs[n].shape)
            if sp is not None:
                shape[sp.dim] = sp.local_size(tp)
            out_specs[n] = TensorSpec(tuple(shape), specs[n].dtype)
        return out_specs

    ranks = [rank_dir(r, t, pp) for r in range(pp) for t in range(tp)]  # model-parallel order
    with atomic_directory(Path(out), force) as tmp:
        write_config(tmp, config)
        for d in ranks:
            (tmp / d).mkdir()
        for stem, ws in ((MODEL, model), (EMA, ema)):
            if ws is None:
                continue
            for r in range(pp):
                names = [n for n in ws.specs if owner.get(n) == [r]]
                specs = local_specs(ws.specs, names)

                def produce(name: str, ws=ws) -> list[torch.Tensor]:
                    full = ws.read(name)
                    return [shard_state_dict({name: full}, model_cfg, t, tp)[name] for t in range(tp)]

                write_safetensors_parallel([tmp / d for d in ranks[r * tp:(r + 1) * tp]], stem, [specs] * tp,
                                           produce, max_shard_bytes)
        layout = {"format": SHARDED_FORMAT, "format_version": FORMAT_VERSION, "tp": tp, "pp": pp, "ranks": ranks}
        if plan is not None:
            layout["pipeline"] = {"bounds": [list(b) for b in plan.bounds], "virtual": plan.virtual}
        (tmp / LAYOUT).write_text(json.dumps(layout, indent=1))
        meta = {"format": SHARDED_FORMAT, "format_version": FORMAT_VERSION, **meta,
                "parameters": sum(math.prod(s.shape) for s in model.specs.values()), "tensors": len(model.specs),
                "ema": ema is not None, "tp": tp, "pp": pp}
        (tmp / META).write_text(json.dumps(meta, indent=1))
    return meta


def _dominant_dtype(specs: dict[str, TensorSpec]) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for s in specs.values():
        counts[s.dtype] = counts.get(s.dtype, 0) + math.prod(s.shape)
    if not counts:
        raise CheckpointError("checkpoint holds no tensors")
    return max(counts, key=counts.get)
