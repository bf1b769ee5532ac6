"""``DeepSpeedBackend``: every DeepSpeed-specific thing megassm does, behind ``TrainBackend`` (base.py).

- the engine: ``deepspeed_config`` (ZeRO stage, offload, bf16, batch bookkeeping) and ``deepspeed.initialize``
  around megassm's AdamW + LR schedule (``megassm/train/optim.py``);
- how DeepSpeed sees the mesh: ``mpu()`` is the mesh itself (ZeRO 0/1/2: it reduces over DP x CP dividing
  by dp, i.e. sums over CP: CP gradient scale 1) or, under ZeRO-3 with cp > 1, ``CPFoldedMPU``, CP folded
  into data parallelism (it averages over DP x CP: scale cp). DeepSpeed 0.19.8's ZeRO-3 path for an mpu
  with a sequence-parallel size > 1 hands the optimizer wrong gradients even for a plain data-parallel model
  (tests/distributed/test_deepspeed_cp.py shows it). DeepSpeed's batch bookkeeping then counts dp x cp
  "replicas": train_batch_size = micro_batch x micro_batches x mpu.get_data_parallel_world_size();
- marks on the model before wrapping: Megatron's ``tensor_model_parallel`` / ``partition_dim`` on
  TP-sharded parameters (DeepSpeed's clip norm counts them on every model-parallel rank), the rows of them
  that TP replicates (counted once: ``grad_norm.py``) and ZeRO-3 leaf modules (Hydra reads its submodules'
  weights without calling them: gather all at its entry);
- the EMA's view of the fp32 masters (``DeepSpeedShards``): ZeRO-3 partitions (``safe_get_local_fp32_param``,
  ``ds_tensor``), ZeRO-1/2 fragments (``_hp_mapping``);
- checkpoints: DeepSpeed's ``save_checkpoint`` / ``load_checkpoint``, its universal format for a resume at
  another layout (``ds_to_universal``) and two fixes to what that load does to a torch optimizer.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from megassm.checkpoint.model_only import without_optimizer_moments
from megassm.checkpoint.snapshot import FileSink, fsync_tree
from megassm.config.schema import OptimConfig, ParallelConfig, TrainConfig
from megassm.config.tags import COMPLETE
from megassm.data.writer import fsync_dir
from megassm.runtime import use_bf16
from megassm.train.backends.base import StepResult
from megassm.train.backends.grad_norm import count_replicated_rows_once, mark_replicated_rows
from megassm.train.backends.zero3_leaves import mark_zero3_leaves
from megassm.train.optim import build_optimizer

log = logging.getLogger("megassm.train")
UNIVERSAL_DIR = "universal"  # under checkpoints/: <tag>/ in DeepSpeed's universal format


STALE_LOCK_S = 600  # a DeepSpeed op builds in 1-3 minutes; a lock this old is a build that died


def stale_build_locks(root: str | Path | None = None, older_than_s: float = STALE_LOCK_S) -> list[tuple[Path, float]]:
    """The just-in-time build locks under ``root`` older than ``older_than_s``, with their age in seconds. torch's
    ``FileBaton`` holds ``<root>/<op>/lock`` while it builds an op and removes it after; a build killed half-way
    (Ctrl-C, a job's time limit, SIGKILL) leaves it, and the next process that needs the op waits on it forever,
    printing nothing. ``root``: default where torch builds extensions, $TORCH_EXTENSIONS_DIR, else its cache
    folder, whose subfolders are per Python and CUDA version (``<cache>/py311_cu130/<op>/lock``)."""
    pattern = "*/lock"
    if root is None:
        root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root

        root, pattern = get_default_build_root(), "*/*/lock"
    now, found = time.time(), []
    for lock in sorted(Path(root).glob(pattern)):
        try:
            age = now - lock.stat().st_mtime
        except OSError:  # removed by the build that held it, between the glob and the stat
            continue
        if age > older_than_s:
            found.append((lock, age))
    return found


def warn_stale_build_locks() -> None:
    """Log a warning for each stale build lock (``stale_build_locks``) before DeepSpeed may build an op and hang
    on it."""
    for lock, age in stale_build_locks():
        log.warning(f"DeepSpeed/torch extension build lock {lock} is {age / 60:.0f} min old: a build of "
                    f"'{lock.parent.name}' was killed half-way, and a process that builds that op waits on this "
                    f"lock forever without a message. If no build is running on this machine, remove "
                    f"{lock.parent} (it is rebuilt), or point TORCH_EXTENSIONS_DIR at another folder.")


def deepspeed_config(parallel: ParallelConfig, train: TrainConfig, grad_clip: float, device: torch.device,
                     dp_world: int, micro_batches: int, load_universal: bool = False) -> dict[str, Any]:
    """DeepSpeed's config dict. ``micro_batches``: per optimizer step (train.grad_accum, or the pipeline's
    parallel.micro_batches); ``dp_world``: the data-parallel world size DeepSpeed sees (its mpu's)."""
    p = parallel
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False, contiguous_gradients=True,
                    overlap_comm=device.type == "cuda")
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    zero.update(p.zero_options)  # validated at load (config/validate.py: ZERO_OPTIONS)
    ds = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": micro_batches,
        "train_batch_size": train.micro_batch_size * micro_batches * dp_world,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16(train.precision, device)},
        # a torch.optim.AdamW is passed in: no JIT-compiled FusedAdam, and ZeRO accepts it with this flag
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if load_universal:  # a resume at another layout (megassm/train/elastic.py)
        ds["checkpoint"] = {"load_universal": True}
    if p.pp > 1:  # ZeRO-1's step() then skips non-finite gradients under bf16 too (the pipeline's skip check)
        ds["bf16"]["check_grad_overflow"] = True
    return ds


def host_adamw() -> type:
    """The optimizer of ``parallel.offload_optimizer``: DeepSpeed's CPUAdam (AVX, compiled just in time into
    TORCH_EXTENSIONS_DIR on first use), AdamW mode by default -- the same update as torch's AdamW, over megassm's
    groups and schedule (``build_optimizer``). DeepSpeed refuses a torch optimizer under ZeRO-Offload."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam


class CPFoldedMPU:
    """DeepSpeed's view of a mesh with CP folded into data parallelism: data-parallel group = DP x CP,
    sequence-parallel size 1. Everything else (model-parallel groups and ranks) is the mesh's."""

    def __init__(self, mesh):
        self.mesh = mesh

    def __getattr__(self, name):
        return getattr(self.mesh, name)

    def get_data_parallel_group(self):
        return self.mesh.group("dp", "cp")

    def get_data_parallel_rank(self) -> int:
        return self.mesh.get_sequence_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self.mesh.get_sequence_data_parallel_world_size()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.mesh.ranks("dp", "cp")

    def get_sequence_parallel_group(self):
        return None

    def get_sequence_parallel_rank(self) -> int:
        return 0

    def get_sequence_parallel_world_size(self) -> int:
        return 1


def deepspeed_mpu(mesh, zero_stage: int):
    """The mpu to hand ``deepspeed.initialize`` for ``mesh`` at ``zero_stage`` (module doc)."""
    return CPFoldedMPU(mesh) if zero_stage == 3 and mesh.dims.cp > 1 else mesh


def cp_grad_scale(mesh, zero_stage: int) -> float:
    """The CP gradient scale that matches ``deepspeed_mpu(mesh, zero_stage)``'s reduction."""
    return float(mesh.dims.cp) if deepspeed_mpu(mesh, zero_stage) is not mesh else 1.0


def mark_model(model: nn.Module, zero_stage: int) -> None:
    """DeepSpeed's marks on a model about to be wrapped (module doc): Megatron's TP attributes from the one
    shard plan (``parallel/sharding.py``), and Hydra mixers as ZeRO-3 leaves."""
    ctx = getattr(model, "parallel_context", None)
    if ctx is not None and ctx.tp > 1:
        from megassm.parallel.sharding import replicated_rows, shard_spec

        for name, p in model.named_parameters():
            spec = shard_spec(name, model.cfg, ctx.tp)
            if spec is not None:
                # DeepSpeed counts such parameters on every model-parallel rank in the gradient norm; their
                # replicated rows (B/C of in_proj / conv1d) are left out of it but on TP rank 0 (grad_norm.py)
                p.tensor_model_parallel, p.partition_dim = True, spec.dim
                mark_replicated_rows(p, replicated_rows(spec, ctx.tp, name))
    if zero_stage == 3:
        mark_zero3_leaves(model)  # zero3_leaves.py: Hydra's, and adapter leaves under a frozen base


class DeepSpeedShards:
    """``LocalShards`` (base.py) of a DeepSpeed-wrapped module."""

    def layout(self, p: nn.Parameter) -> str:
        if hasattr(p, "ds_id"):
            return "partitioned"
        if hasattr(p, "_hp_mapping"):  # set (None where this rank owns no fragment) by ZeRO-1/2 and bf16 ZeRO-0
            return "fragment"
        return "whole"

    def master(self, p: nn.Parameter) -> Tensor | None:
        layout = self.layout(p)
        if layout == "partitioned":
            from deepspeed.utils import safe_get_local_fp32_param

            return safe_get_local_fp32_param(p).view(-1)
        if layout == "fragment":
            return None if p._hp_mapping is None else p._hp_mapping.hp_fragment.view(-1)
        return p.data

    def fragment(self, p: nn.Parameter) -> tuple[int, int] | None:
        m = getattr(p, "_hp_mapping", None)
        if m is None:
            return None
        return m.lp_fragment_address.start, m.lp_fragment_address.numel

    def full_shape(self, p: nn.Parameter) -> torch.Size:
        return p.ds_shape if hasattr(p, "ds_shape") else p.shape

    def partition(self, p: nn.Parameter) -> tuple[int, int]:
        import torch.distributed as dist

        return dist.get_rank(p.ds_process_group), dist.get_world_size(p.ds_process_group)

    def local_weights(self, p: nn.Parameter) -> Tensor:
        return p.ds_tensor if hasattr(p, "ds_tensor") else p.data

    def resident(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        return [p for p in params if hasattr(p, "ds_tensor") and p.ds_status == ZeroParamStatus.AVAILABLE]

    def release(self, params: list[nn.Parameter]) -> None:
        if params:
            params[0].partition(params)  # frees the gathered copies; the partitions stay as they are

    def gather(self, params: list[nn.Parameter]) -> None:
        if params:
            params[0].all_gather(params)


class DeepSpeedBackend:
    """``TrainBackend`` over a DeepSpeed engine (module doc). Built before the model; ``prepare`` wraps it."""

    def __init__(self, mesh, parallel: ParallelConfig, train: TrainConfig, optim: OptimConfig, device: torch.device):
        self.mesh, self.parallel, self.train, self.optim, self.device = mesh, parallel, train, optim, device
        self.engine = self.scheduler = None
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # once per node, before DeepSpeed may build an op
            warn_stale_build_locks()

    # -- before the model is wrapped -----------------------------------------------------------
    def mpu(self):
        return deepspeed_mpu(self.mesh, self.parallel.zero_stage)

    def cp_grad_scale(self) -> float:
        return cp_grad_scale(self.mesh, self.parallel.zero_stage)

    def prepare(self, model: nn.Module, micro_batches: int, load_universal: bool = False) -> nn.Module:
        import deepspeed

        t0 = time.perf_counter()
        if self.parallel.offload_optimizer and self.mesh.rank == 0:  # minutes without a line otherwise
            log.info("DeepSpeed engine: optimizer offloaded to the host (CPUAdam, compiled into TORCH_EXTENSIONS_DIR "
                     "on its first use on a machine: about a minute; fp32 masters, Adam moments and gradients in "
                     "host memory, 16 B per parameter of this rank's share: `megassm plan` gives the GB)")
        mark_model(model, self.parallel.zero_stage)
        model = model.to(self.device)
        opt, sched = build_optimizer(model, self.optim, self.train.steps, self.device,
                                     adamw=host_adamw() if self.parallel.offload_optimizer else None)
        # ZeRO shards and gradients reduce over DP x CP (module doc: DeepSpeed counts the mpu's DP world)
        mpu = self.mpu()
        ds_cfg = deepspeed_config(self.parallel, self.train, self.optim.grad_clip, self.device,
                                  mpu.get_data_parallel_world_size(), micro_batches, load_universal)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=ds_cfg, mpu=mpu, dist_init_required=False)
        count_replicated_rows_once(self.engine.optimizer, self.engine.module, self.mesh.coords["tp"])
        if self.mesh.rank == 0:
            log.info(f"DeepSpeed engine ready in {time.perf_counter() - t0:.1f} s (ZeRO-{self.parallel.zero_stage}"
                     f"{', optimizer on the host' if self.parallel.offload_optimizer else ''})")
        return self.engine.module

    # -- one optimizer step --------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        return self.engine.module

    @property
    def bf16(self) -> bool:
        return self.engine.bfloat16_enabled()

    @property
    def optimizer_steps(self) -> int:
        return self.engine.global_steps

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: Tensor, scale_wrt_gas: bool = True) -> None:
        self.engine.backward(loss, scale_wrt_gas=scale_wrt_gas)

    def set_gradient_accumulation_boundary(self, boundary: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(boundary)

    def gradient_accumulation_steps(self) -> int:
        return self.engine.gradient_accumulation_steps()

    def accumulate(self) -> None:
        self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step

    def step(self) -> StepResult:
        skipped_before = self.engine.skipped_steps
        self.engine.step()  # the boundary: reduce, clip, update, LR schedule
        # ZeRO's own overflow check may have skipped it
        return StepResult(self.engine.skipped_steps != skipped_before, self.grad_norm())

    def skip(self) -> None:
        """Every micro-batch went through ``backward`` and all but the last through ``accumulate``; instead
        of the boundary ``step`` this drops the accumulated gradients and counts the micro-step, so the next
        micro-batch opens a new window. The LR schedule and ``global_steps`` do not move."""
        self.engine.optimizer.zero_grad()
        self.engine.micro_steps += 1

    def nonfinite_grads(self) -> Tensor:
        """ZeRO-1..3 optimizers check their own partitions; under ZeRO-0 this checks the module's gradients
        (on their device: the step's one flag all-reduce syncs it with the rest)."""
        if self.parallel.zero_stage != 0:
            return torch.tensor(False)
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return torch.tensor(False)
        return (~torch.isfinite(torch.stack(torch._foreach_norm(grads)))).any()

    def grad_norm(self) -> float:
        g = self.engine.get_global_grad_norm()
        if g is None:
            return float("nan")
        return float(g.item() if torch.is_tensor(g) else g)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def reduction_group(self):
        return getattr(self.engine.optimizer, "dp_process_group", None)

    def shards(self) -> DeepSpeedShards:
        return DeepSpeedShards()

    def gathered(self, params: list[nn.Parameter]):
        if params and hasattr(params[0], "ds_id"):  # ZeRO-3 partitions
            import deepspeed

            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return nullcontext()

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, ckpt_dir: Path, tag: str, client_state: dict, sink: FileSink | None = None,
             optimizer_state: bool = True) -> None:
        """DeepSpeed's ``save_checkpoint`` through ``sink`` (``SnapshotCheckpointEngine``): deferred, its
        files are snapshotted instead of written (the barriers and tag checks still run here, the writes
        later); not deferred, written at once and listed on the sink for its fsync. ``optimizer_state=False``:
        the Adam moments are left out of every file (``megassm/checkpoint/model_only.py``)."""
        if sink is None and optimizer_state:
            self.engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False, client_state=client_state)
            return
        own = self.engine.checkpoint_engine
        self.engine.checkpoint_engine = SnapshotCheckpointEngine(own, sink or FileSink(), optimizer_state)
        try:
            self.engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False, client_state=client_state)
        finally:
            self.engine.checkpoint_engine = own

    def load(self, ckpt_dir: Path, tag: str) -> None:
        load_path, _ = self.engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=True,
                                                   load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {Path(ckpt_dir) / tag}")
        self._reopen_window()

    def load_resharded(self, ckpt_dir: Path, tag: str, is_writer: bool) -> None:
        from megassm.parallel.comm import barrier

        if is_writer:
            log.info(f"converting {Path(ckpt_dir) / tag} to DeepSpeed's universal format")
        root = convert_to_universal(ckpt_dir, tag, is_writer)
        barrier()
        with universal_load_fixes(self.engine):
            load_path, _ = self.engine.load_checkpoint(str(root), tag=tag, load_module_strict=True,
                                                       load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {root / tag}")
        self._reopen_window()

    def _reopen_window(self) -> None:
        # checkpoints are written at step boundaries: the next micro-batch opens an accumulation window
        # (DeepSpeed does not restore its micro-step counter)
        self.engine.micro_steps = self.engine.global_steps * self.engine.gradient_accumulation_steps()


class SnapshotCheckpointEngine:
    """The checkpoint engine DeepSpeed's ``save_checkpoint`` writes through (a synchronous save: at once,
    each file listed on the sink for the fsync before COMPLETE). During a non-blocking save
    (``megassm/train/checkpoint_writer.py``) ``save(state_dict, path)`` copies the state dict to host
    memory (``host_snapshot``: the fp32 partitions, Adam moments and LR state the next step will change in
    place) and queues the engine's own ``save`` of the copy on the ``FileSink``, so the file is what a
    synchronous save writes. Directories are made at once; everything else is the engine's own. DeepSpeed
    0.19.8 routes every file of ``save_checkpoint`` through ``checkpoint_engine.save`` except the small
    ``zero_to_fp32.py`` recovery script, which it copies itself. ``optimizer_state=False`` (a model-only
    checkpoint) drops the Adam moments from each state dict first.
    """

    def __init__(self, own, sink: FileSink, optimizer_state: bool = True):
        self.own, self.sink, self.optimizer_state = own, sink, optimizer_state
        self.name = f"snapshot({getattr(own, 'name', type(own).__name__)})"

    def save(self, state_dict, path: str) -> None:
        if not self.optimizer_state:  # before the snapshot: the moments are neither copied nor written
            state_dict, _ = without_optimizer_moments(state_dict)
        self.sink.put_tensors(Path(path), state_dict, lambda state: self.own.save(state, path))

    def create(self, info) -> None:
        pass

    def commit(self, info) -> bool:
        return True  # megassm's own commit (COMPLETE, latest) follows every rank's durable files

    def is_decoupled(self) -> bool:
        return False

    def __getattr__(self, name):  # makedirs, load, is_data_parallel_writer, preserves_storage_sharing, ...
        return getattr(self.own, name)


def convert_to_universal(ckpt_dir: Path, tag: str, is_writer: bool) -> Path:
    """``checkpoints/universal/<tag>`` in DeepSpeed's universal format (made once, by ``is_writer``, atomically);
    returns ``checkpoints/universal`` -- the directory to pass to ``engine.load_checkpoint``.

    ``ds_to_universal`` turns the saved ZeRO checkpoint into per-parameter fp32 weights and Adam moments
    plus the optimizer step; an engine built with ``checkpoint.load_universal`` re-partitions them over its
    own dp x cp group, and restores ``global_steps`` and the LR schedule from the model-states file."""
    root = Path(ckpt_dir) / UNIVERSAL_DIR
    out = root / tag
    if is_writer and not (out / COMPLETE).exists():
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        tmp = root / f".{tag}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        ds_to_universal(argparse.Namespace(input_folder=str(Path(ckpt_dir) / tag), output_folder=str(tmp),
                                           num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                           strict=True, inject_missing_state=False))
        (tmp / COMPLETE).write_text("")
        fsync_tree(tmp)  # the converted files and their names durable before the rename commits them
        tmp.rename(out)
        fsync_dir(root)
    return root


@contextmanager
def universal_load_fixes(engine):
    """Undo two things DeepSpeed's ZeRO-3 universal load does to a torch optimizer (DeepSpeed 0.19):

    - it gives every parameter group the hyperparameters of group 0, so the no-decay group would get the
      decay group's weight decay: each group's own values (all but the scheduled ``lr``) are put back;
    - it stores one ``step`` tensor object in the state of every parameter group, and torch's AdamW
      increments it in place, once per group per update: the bias correction would then run ahead by the
      number of groups. Each state gets its own copy.
    """
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    own = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in inner.param_groups]
    yield
    for g, h in zip(inner.param_groups, own):
        g.update(h)
    for st in inner.state.values():
        if torch.is_tensor(st.get("step")):
            st["step"] = st["step"].clone()
