"""LoRA inside ``megassm train``: adapters (and their EMA) exported with each checkpoint, consolidated over
ZeRO-3 and TP (peft's layout, ``megassm/lora/adapters.py``). (ZeRO-3 leaves holding adapters under a frozen
base: ``megassm/train/backends/zero3_leaves.py``; the merge into a consolidated checkpoint, ``megassm convert
merge-lora``: ``megassm/sample.py: merge_lora_checkpoint``.)"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch import nn

from megassm.checkpoint.snapshot import FileSink
from megassm.config.schema import LoRAConfig
from megassm.lora.adapters import save_adapters
from megassm.parallel.comm import all_gather_stacked
from megassm.parallel.sharding import ADAPTER_SUFFIXES, merge_tensors, shard_spec

# inside each checkpoints/step_* directory: the trained adapters, and their EMA (train.ema_decay > 0)
ADAPTER_DIR, EMA_ADAPTER_DIR = "lora", "lora_ema"


Gathered = Callable[[list], AbstractContextManager]


def export_adapters(module: nn.Module, tag_dir: Path, cfg: LoRAConfig, base: str, is_writer: bool,
                    ema=None, gathered: Gathered = lambda params: nullcontext(), sink=None) -> None:
    """Write ``tag_dir/lora`` (and ``tag_dir/lora_ema`` from ``ema``, a ShardedEMA of the adapters) from the
    live (backend-wrapped) module, consolidated: whole tensors whatever the ZeRO stage and TP degree, so
    they load at any layout. Every rank must call it (it gathers). ``gathered(params)``: the backend's
    context in which ``params`` are whole on every rank (``TrainBackend.gathered``). ``sink``
    (``megassm.train.checkpoint_writer.FileSink``): deferred, the gathered tensors are copied to host
    memory here and the files written by the background writer.
    """
    sink = sink or FileSink()
    state = consolidate_over_tp(_local_adapters(module, gathered), module)
    shadow = consolidate_over_tp(_local_ema_adapters(ema), module) if ema is not None else None
    if is_writer:
        sink.put_tensors(tag_dir / ADAPTER_DIR, state, lambda t: save_adapters(tag_dir / ADAPTER_DIR, t, cfg, base))
        if shadow is not None:
            sink.put_tensors(tag_dir / EMA_ADAPTER_DIR, shadow,
                             lambda t: save_adapters(tag_dir / EMA_ADAPTER_DIR, t, cfg, base))


def _local_adapters(module: nn.Module, gathered: Gathered) -> dict[str, torch.Tensor]:
    """This TP rank's adapter tensors, whole: under ZeRO-3 each rank holds a slice of every parameter, and
    the adapters (a small fraction of the model) are gathered for the copy; other stages hold them whole."""
    named = [(n, p) for n, p in module.named_parameters() if n.endswith(ADAPTER_SUFFIXES)]
    with gathered([p for _, p in named]):
        return {n: p.detach().clone() for n, p in named}


def _local_ema_adapters(ema) -> dict[str, torch.Tensor]:
    """This TP rank's EMA of the adapters, whole tensors (a collective over the ZeRO partition group)."""
    shadow = ema.full_shadow()  # fragment layout (ZeRO-1/2): already summed into whole tensors
    out = {}
    for n, p in ema.params.items():
        if not n.endswith(ADAPTER_SUFFIXES):
            continue
        t = shadow[n]
        if ema.partitioned:  # ZeRO-3: rank r of the parameter's partition group holds flat [r*k, (r+1)*k)
            parts = all_gather_stacked(t, p.ds_process_group).to(t.device)  # (N, k)
            t = parts.view(-1)[: p.ds_numel].view(p.ds_shape)
        out[n] = t
    return out


def consolidate_over_tp(state: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors of this TP rank -> the unsharded ones (``sharding.merge_tensors`` with the plan's
    ``adapter_spec``); the identity without TP. A collective over the TP group (every rank calls it)."""
    ctx = getattr(module, "parallel_context", None)
    if ctx is None or ctx.tp == 1:
        return state
    out = {}
    for n, t in state.items():
        spec = shard_spec(n, module.cfg, ctx.tp)
        if spec is None:  # replicated over TP: every rank holds the same tensor
            out[n] = t
            continue
        shards = list(all_gather_stacked(t, ctx.tp_group).to(t.device))  # tp x t.shape
        out[n] = merge_tensors(shards, spec, n)
    return out
