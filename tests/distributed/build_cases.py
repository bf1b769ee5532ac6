"""Rank functions for test_partitioned_build.py (spawned on gloo by dist_harness.spawn)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megassm.checkpoint.errors import bytes_read
from megassm.parallel.mesh import ParallelMesh
from megassm.parallel.sharding import merge_tensors
from megassm.run_config import load_config
from megassm.train.build import build_partitioned, full_shape


def _consolidate(model, cfg, mesh) -> dict[str, torch.Tensor]:
    """Every parameter whole (ZeRO-3 partitions gathered, TP shards merged) -- test-side only."""
    tp = cfg.parallel.tp
    out = {}
    for name, p in model.named_parameters():
        if hasattr(p, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                local = p.data.detach().clone()
        else:
            local = p.detach().clone()
        shape, spec = full_shape(name, tuple(local.shape), cfg.model, tp)
        if spec is not None:
            pieces = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(pieces, local.contiguous(), group=mesh.group("tp"))
            local = merge_tensors(pieces, spec, name)
        out[name] = local
    return out


def _grads_against_whole_model(model, cfg, mesh, rank: int) -> list[str]:
    """The TP gradient hooks survive the build: a rank-dependent loss, linear in every parameter, gives
    the partitioned model the gradients it gives the whole model parallelized the old way
    (``build_model`` + ``parallelize_hth``): hooked rows summed over TP (3 = 1 + 2), the rest 1 or 2."""
    from megassm.models import build_model
    from megassm.parallel.apply import parallelize_hth

    whole = build_model(cfg.model)
    parallelize_hth(whole, mesh)
    for m in (model, whole):
        sum((p * (rank + 1)).sum() for p in m.parameters()).backward()
    ref = dict(whole.named_parameters())
    return [n for n, p in model.named_parameters() if not torch.equal(p.grad, ref[n].grad)]


def build_and_consolidate(rank: int, world: int, jobs: list[tuple[str, list[str], str | None]], out_dir: str) -> dict:
    """For each job (tag, overrides, init_from): build this rank's model partitioned; rank 0 writes the
    consolidated weights to ``{tag}.safetensors``. Returns per tag what the rank held (elements per
    parameter, any full ZeRO-3 tensor left behind), the checkpoint bytes it read, and its report."""
    # as megassm.parallel.mesh.init_distributed leaves them (DeepSpeed reads them)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    results = {}
    for tag, overrides, init_from in jobs:
        cfg = load_config("configs/smoke.yaml", overrides)
        mesh = ParallelMesh.from_config(cfg.parallel)
        before = bytes_read()
        model, report = build_partitioned(cfg, mesh, torch.device("cpu"), init_from=init_from)
        read = bytes_read() - before
        held, full_left = {}, []
        for name, p in model.named_parameters():
            if hasattr(p, "ds_id"):  # ZeRO-3: this rank keeps ds_tensor, ceil(numel / N) elements
                held[name] = p.ds_tensor.numel()
                if p.data.numel() != 0:
                    full_left.append(name)
            else:
                held[name] = p.numel()
        if cfg.parallel.tp > 1 and cfg.parallel.zero_stage == 0:
            results[tag] = {"grads_differ": _grads_against_whole_model(model, cfg, mesh, rank)}
        sd = _consolidate(model, cfg, mesh)
        if rank == 0:
            save_file(sd, str(Path(out_dir) / f"{tag}.safetensors"))
        results[tag] = {**results.get(tag, {}), "held": held, "full_left": full_left, "bytes_read": read,
                        "report": report}
        dist.barrier()
    return results
