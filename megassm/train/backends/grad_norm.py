"""DeepSpeed's gradient norm under TP, counting the TP-replicated rows of TP-split parameters once.

DeepSpeed sums a ``tensor_model_parallel`` parameter's squared gradient over every model-parallel rank and
any other parameter's on model-parallel rank 0 only. A TP-split parameter can hold rows that every TP rank
holds whole (``parallel/sharding.py: replicated_rows``: Hydra's B/C rows of ``in_proj`` / ``conv1d`` with
ngroups not split, and the LoRA ``lora_B`` rows that follow them); after ``parallelize_hth``'s hooks their
gradient is the full one on every TP rank, so DeepSpeed counts it tp times (a norm of 35.32 for 35.00 in
tests/distributed/test_pipeline.py) and clips by the wrong factor. ``mark_replicated_rows`` puts the rows
on the parameter (``tp_replicated_rows``) and ``count_replicated_rows_once`` hands DeepSpeed's norm, on TP
ranks other than 0, each gradient without those rows (views: nothing is copied or changed).

Covered: ZeRO-1/2/3 (``get_grad_norm_direct`` over this rank's gradient partitions) and the bf16 ZeRO-1
optimizer (``get_grads_for_norm`` over whole gradients). Elsewhere (ZeRO-0, optimizer offload) a warning
says that the norm still counts the rows once per TP rank.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

log = logging.getLogger("megassm.train")
ROWS_ATTR = "tp_replicated_rows"  # [(start, stop), ...] along dim 0 of the local (TP-split) parameter


def mark_replicated_rows(p: nn.Parameter, rows: list[tuple[int, int]]) -> None:
    if rows:
        setattr(p, ROWS_ATTR, list(rows))


def _full_shape(p: nn.Parameter) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def _kept_pieces(g: Tensor, p: nn.Parameter, start: int) -> list[Tensor]:
    """The parts of ``g`` (elements [start, start + numel) of ``p``'s flattened gradient) outside its
    replicated rows, as views."""
    flat = g.reshape(-1)
    row = _full_shape(p)[1:].numel()
    stop = start + flat.numel()
    pieces, at = [], start
    for a, b in getattr(p, ROWS_ATTR):
        a, b = max(a * row, start), min(b * row, stop)
        if a >= b:
            continue
        if a > at:
            pieces.append(flat[at - start : a - start])
        at = b
    if at < stop:
        pieces.append(flat[at - start :])
    return pieces


def _fragment_start(p: nn.Parameter) -> int:
    """Where this rank's gradient partition of ``p`` starts in its flattened gradient."""
    if hasattr(p, "ds_id"):  # ZeRO-3: rank r of the partition group holds [r * n, (r + 1) * n)
        import torch.distributed as dist

        return dist.get_rank(p.ds_process_group) * p.partition_numel()
    mapping = getattr(p, "_hp_mapping", None)  # ZeRO-1/2: this rank's fragment of the flat partition
    return 0 if mapping is None else mapping.lp_fragment_address.start


def _without_replicated_rows(gradients, params) -> tuple[list[Tensor], list[nn.Parameter]]:
    """(gradients, params) for ``get_grad_norm_direct``, each marked parameter's rows left out."""
    grads = [g for g in gradients if not getattr(g, "_zero_padding", False)]  # ZeRO-1/2 padding: zeros
    out_g, out_p = [], []
    for g, p in zip(grads, params):
        if not hasattr(p, ROWS_ATTR):
            out_g.append(g)
            out_p.append(p)
            continue
        for piece in _kept_pieces(g, p, _fragment_start(p)):
            out_g.append(piece)
            out_p.append(p)
    return out_g, out_p


def _wrap_norm_direct(optimizer) -> None:
    own: Callable = optimizer.get_grad_norm_direct

    def get_grad_norm_direct(gradients, params, norm_type=2):
        g, p = _without_replicated_rows(gradients, params)
        if not g:  # every partition empty of kept rows: a zero contribution of the right dtype / device
            g, p = [gradients[0].reshape(-1)[:0]], [params[0]]
        return own(g, p, norm_type)

    optimizer.get_grad_norm_direct = get_grad_norm_direct


def _wrap_grads_for_norm(optimizer) -> None:
    """bf16 ZeRO-1 (``BF16_Optimizer``): whole fp32 gradients, one per parameter."""
    own: Callable = optimizer.get_grads_for_norm
    owner = {id(g): lp for grads, group in zip(optimizer.fp32_groups_gradients, optimizer.bf16_groups)
             for g, lp in zip(grads, group)}

    def get_grads_for_norm(for_clipping=False):
        out = own(for_clipping=for_clipping)
        if for_clipping:
            return out
        grads, experts = out
        kept = []
        for g in grads:
            lp = owner.get(id(g))
            kept.extend(_kept_pieces(g, lp, 0) if lp is not None and hasattr(lp, ROWS_ATTR) else [g])
        return kept, experts

    optimizer.get_grads_for_norm = get_grads_for_norm


def count_replicated_rows_once(optimizer, module: nn.Module, tp_rank: int) -> str | None:
    """Make ``optimizer`` (DeepSpeed's, around ``module``) count the marked rows once in its gradient norm:
    TP rank 0 counts them, the others leave them out. Returns how (None: nothing marked or TP rank 0)."""
    if tp_rank == 0 or not any(hasattr(p, ROWS_ATTR) for p in module.parameters()):
        return None
    if getattr(optimizer, "cpu_offload", False) or getattr(optimizer, "offload_optimizer", False):
        how = None
    elif hasattr(optimizer, "get_grad_norm_direct"):
        _wrap_norm_direct(optimizer)
        how = "get_grad_norm_direct"
    elif hasattr(optimizer, "get_grads_for_norm") and hasattr(optimizer, "fp32_groups_gradients"):
        _wrap_grads_for_norm(optimizer)
        how = "get_grads_for_norm"
    else:
        how = None
    if how is None:
        log.warning(f"{type(optimizer).__name__}: the gradient norm (and clipping) counts the TP-replicated rows "
                    "of TP-split parameters once per TP rank (megassm corrects it for ZeRO-1/2/3 without "
                    "optimizer offload)")
    return how
