"""Partitioned construction: no rank ever holds the whole model.

    meta device     ``HTHModel(cfg)`` built without memory; ``parallelize_hth`` cuts the TP shapes
    per parameter   one at a time, in module order: its TP piece is drawn (``models/init.py``: seeded by
                    (seed, name), so the weights do not depend on world size, rank or order) or read by
                    offset from ``init_from`` (``checkpoint/sliced.py``; under ZeRO-3 each rank reads the
                    rows of its 1/N and one all-gather joins them), put in place of the meta tensor
                    (same Parameter object: attributes stay, TP gradient hooks are installed again), and
                    under ZeRO-3 handed at once to ``deepspeed.zero.Init``, which keeps this rank's 1/N
    resume          values are left uninitialised: DeepSpeed's own per-rank files overwrite them

A rank's peak is its partition of the model plus the largest TP-local parameter (``megassm plan``
reports both), never the full model. The Trainer builds every regime this way (LoRA: adapters attached
to the meta model before the cut, ``Trainer._build_model``). The whole-model path (``build_model`` +
``parallelize_hth``, the checkpoint's tensors loaded whole) is the reference the tests compare with.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from megassm.checkpoint.errors import CheckpointError
from megassm.config.schema import RunConfig
from megassm.models import build_model
from megassm.models.init import init_shard
from megassm.parallel.comm import all_gather_stacked
from megassm.parallel.sharding import shard_spec


def meta_model(cfg: RunConfig, mesh, parallelize: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """The HTHModel on the meta device, parallelized by ``parallelize`` (default: ``parallelize_hth``
    for this mesh's TP / CP), so that its parameters have this rank's shapes."""
    with torch.device("meta"):
        model = build_model(cfg.model)
    if parallelize is not None:
        parallelize(model)
    elif cfg.parallel.tp > 1 or cfg.parallel.cp > 1:
        from megassm.parallel.apply import parallelize_hth

        parallelize_hth(model, mesh, cp_impl=cfg.parallel.cp_impl)
    return model


def full_shape(name: str, local: tuple[int, ...], model_cfg, tp: int) -> tuple[tuple[int, ...], object]:
    """(unsharded shape, shard spec or None) of parameter ``name`` whose TP-local shape is ``local``."""
    spec = shard_spec(name, model_cfg, tp) if tp > 1 else None
    shape = list(local)
    if spec is not None:
        shape[spec.dim] = spec.size
    return tuple(shape), spec


def _swap_in(p: nn.Parameter, values: torch.Tensor) -> None:
    """Give meta parameter ``p`` real ``values``, keeping the object (hooks, attributes, references)."""
    attrs, hooks = dict(p.__dict__), p._backward_hooks
    torch.utils.swap_tensors(p, nn.Parameter(values, requires_grad=p.requires_grad))
    p.__dict__.update(attrs)
    if hooks:
        # the TP grad-sum hooks (parallel/apply.py, lora/parallel.py) live on the autograd meta that
        # swap_tensors hands to the discarded tensor; the Python dict stays: assigning it installs it again
        p._backward_hooks = hooks


class WarmStart:
    """``init_from`` as this rank's slices: offset reads, one tensor at a time; a report of what changed."""

    def __init__(self, path: str, cfg: RunConfig, group=None):
        from megassm.checkpoint.sliced import SlicedWeights
        from megassm.checkpoint.sources import open_checkpoint

        ckpt = open_checkpoint(Path(path))
        self.path, self.cfg, self.ckpt = path, cfg, ckpt
        self.weights = SlicedWeights(ckpt.model)
        self.group = group  # ZeRO-3's partition group: each rank reads 1/N (None: whole TP slices)
        self.used: set[str] = set()
        self.fresh: list[str] = []
        self.other_stages: set[str] = set()  # held (and read) by the other pipeline stages

    def read(self, name: str, shape: tuple[int, ...], local: tuple[int, ...], spec, tp_rank: int,
             tp: int) -> torch.Tensor | None:
        spec_src = self.weights.specs.get(name)
        if spec_src is None:
            self.fresh.append(name)
            return None
        if tuple(spec_src.shape) != tuple(shape):
            raise CheckpointError(f"init_from={self.path}: shapes differ from the model config: {name}: checkpoint "
                                  f"{tuple(spec_src.shape)} vs model {tuple(shape)}")
        self.used.add(name)
        if self.group is None:  # no ZeRO-3 partition group (a group of one still gathers: the cluster's path)
            return self.weights.read_shard(name, spec, tp_rank, tp).float()
        return self._read_partitioned(name, local, spec, tp_rank, tp)

    def _read_partitioned(self, name: str, local: tuple[int, ...], spec, tp_rank: int, tp: int) -> torch.Tensor:
        """Under ZeRO-3 each of the N ranks of the partition group reads only the rows that cover its 1/N of
        the flattened TP piece (ZeRO-3's own split: ceil(numel / N) elements each); one all-gather then
        gives the piece to zero.Init, which keeps the same 1/N. Reads per rank: ~1/N of the TP piece."""
        n_ranks, r = dist.get_world_size(self.group), dist.get_rank(self.group)
        numel = math.prod(local)
        per_rank = math.ceil(numel / n_ranks)
        per_row = math.prod(local[1:]) if len(local) > 1 else 1
        e0, e1 = min(numel, r * per_rank), min(numel, (r + 1) * per_rank)
        mine = torch.zeros(per_rank, dtype=torch.float32)
        if e1 > e0:
            lo, hi = e0 // per_row, -(-e1 // per_row)
            rows = self.weights.read_shard_rows(name, spec, tp_rank, tp, lo, hi).float().reshape(-1)
            mine[:e1 - e0] = rows[e0 - lo * per_row:e1 - lo * per_row]
        parts = all_gather_stacked(mine, self.group)  # (N, per_rank) on the group's device (the GPU under NCCL)
        return parts.view(-1)[:numel].view(local)

    def elsewhere(self, name: str, shape: tuple[int, ...]) -> None:
        """``name`` lives on another pipeline stage, which reads it: checked here for the report only."""
        spec_src = self.weights.specs.get(name)
        if spec_src is None:
            self.fresh.append(name)
        elif tuple(spec_src.shape) != tuple(shape):
            raise CheckpointError(f"init_from={self.path}: shapes differ from the model config: {name}: checkpoint "
                                  f"{tuple(spec_src.shape)} vs model {tuple(shape)}")
        else:
            self.other_stages.add(name)

    def report(self) -> list[str]:
        out = [f"warm start from {self.ckpt.kind}:{self.ckpt.path} (step {self.ckpt.step}), read by slices"]
        src = (self.ckpt.config or {}).get("model", {}).get("pattern")
        if src and src != self.cfg.model.pattern:
            changes = [f"block {i}: '{a}' -> '{b}'" for i, (a, b) in enumerate(zip(src, self.cfg.model.pattern))
                       if a != b]
            out.append(f"layer pattern {src} -> {self.cfg.model.pattern}: " + (", ".join(changes) or "none"))
        if self.fresh:
            out.append(f"{len(self.fresh)} tensors not in the checkpoint, initialised fresh: {sorted(self.fresh)[:6]}")
        loaded = self.used | self.other_stages
        unused = sorted(set(self.weights.specs) - loaded - set(self.fresh))
        if unused:
            out.append(f"{len(unused)} checkpoint tensors unused by this model: {unused[:6]}")
        where = f" ({len(self.other_stages)} of them by the other pipeline stages)" if self.other_stages else ""
        out.append(f"loaded {len(loaded)}/{len(loaded) + len(self.fresh)} tensors{where}")
        return out


def zero3_partitioner(cfg: RunConfig, mesh, device: torch.device) -> Callable[[nn.Parameter], None]:
    """Hand one materialised parameter to ZeRO-3 (``deepspeed.zero.Init(module=...)``): it keeps this
    rank's partition over the mpu's data-parallel group (DP x CP, as the engine's) and frees the rest."""
    import deepspeed

    from megassm.train.backends.deepspeed import deepspeed_config, deepspeed_mpu

    # deepspeed.comm over the process group that exists (its config then counts the mpu's DP world)
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), dist_init_required=False)
    mpu = deepspeed_mpu(mesh, cfg.parallel.zero_stage)
    ds_cfg = deepspeed_config(cfg.parallel, cfg.train, cfg.optim.grad_clip, device,
                              mpu.get_data_parallel_world_size(), cfg.train.grad_accum)
    # zero.Init(module=...) would otherwise patch F.linear for the whole process (its "memory-efficient
    # linear"), which the engine built without zero.Init never does
    ds_cfg["zero_optimization"]["memory_efficient_linear"] = False
    group = mpu.get_data_parallel_group()

    def partition(p: nn.Parameter) -> None:
        holder = nn.Module()
        holder.register_parameter("p", p)
        deepspeed.zero.Init(module=holder, data_parallel_group=group, config_dict_or_path=ds_cfg, mpu=mpu,
                            mem_efficient_linear=False)

    partition.group = group
    return partition


def build_partitioned(cfg: RunConfig, mesh, device: torch.device, *, init_from: str | None = None,
                      resuming: bool = False, parallelize: Callable[[nn.Module], None] | None = None,
                      owns: Callable[[str], bool] | None = None) -> tuple[nn.Module, list[str]]:
    """This rank's model, materialised parameter by parameter (module docstring); returns (model, report).

    ``resuming``: the values are about to be overwritten by a checkpoint, so none are drawn.
    ``owns(name)``: whether this rank holds parameter ``name`` (a pipeline stage: its own blocks); the
    others stay on the meta device, never allocated.
    """
    model = meta_model(cfg, mesh, parallelize)
    tp, tp_rank = cfg.parallel.tp, (mesh.get_tensor_model_parallel_rank() if cfg.parallel.tp > 1 else 0)
    partition = zero3_partitioner(cfg, mesh, device) if cfg.parallel.zero_stage == 3 else None
    # ZeRO-3 keeps a partition that zero.Init(module=...) does not cast: give it the training dtype now (the
    # engine casts unpartitioned modules itself; the fp32 masters are made from these values either way)
    from megassm.runtime import use_bf16

    dtype = torch.bfloat16 if (partition is not None and use_bf16(cfg.train.precision, device)) else None
    group = getattr(partition, "group", None)
    source = WarmStart(init_from, cfg, group) if (init_from and not resuming) else None
    for mod_name, module in model.named_modules():
        for key, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue  # shared, already done
            name = f"{mod_name}.{key}" if mod_name else key
            shape, spec = full_shape(name, tuple(p.shape), cfg.model, tp)
            if owns is not None and not owns(name):
                if source is not None:
                    source.elsewhere(name, shape)
                continue
            values = None
            if resuming:
                values = torch.empty(p.shape, dtype=p.dtype)
            elif source is not None:
                values = source.read(name, shape, tuple(p.shape), spec, tp_rank, tp)
            if values is None:
                values = init_shard(name, shape, cfg.model, cfg.train.seed, spec, tp_rank, tp)
            if tuple(values.shape) != tuple(p.shape):
                raise RuntimeError(f"{name}: materialised {tuple(values.shape)}, the parallel model holds "
                                   f"{tuple(p.shape)} (shard plan and parallel layers disagree)")
            _swap_in(p, values.to(device=device, dtype=dtype or p.dtype))
            if partition is not None:
                partition(p)
    for name, b in model.named_buffers():
        if b.is_meta and (owns is None or owns(name)):
            raise RuntimeError(f"buffer {name} is still on the meta device; partitioned construction "
                               "does not know how to initialise it")
    report = source.report() if source is not None else []
    return model, report
