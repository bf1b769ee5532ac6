"""Differentiable collectives for TP, Megatron-SP and Ulysses CP (each with its adjoint as backward).

    op                         forward                    backward
    copy_to_group              identity                   all-reduce        (Megatron "f")
    reduce_from_group          all-reduce                 identity          (Megatron "g")
    all_reduce_sum             all-reduce                 all-reduce        (each rank uses the sum differently)
    gather_along               all-gather along dim       reduce-scatter    (SP: before column-parallel)
    reduce_scatter_along       reduce-scatter along dim   all-gather        (SP: after row-parallel)
    all_to_all                 all-to-all (scatter a, gather b)  all-to-all (scatter b, gather a)
    gather_replicated          all-gather along dim       own slice * scale (output consumed by a loss
                                                                             that every rank computes)
    exchange_with_neighbours   send to ranks r-1 / r+1    the same exchange of the gradients
                               (point-to-point, batched)  (state-passing CP: the conv halo, the shift rows)

Every call goes through ``torch.distributed`` at call time (``dist.all_reduce``, ``all_to_all_single``,
``all_gather_single`` / ``reduce_scatter_single`` or their pre-2.13 names, ``batch_isend_irecv``), on flat
contiguous buffers, so tests can count bytes by wrapping those functions. A group of size 1
makes every op the identity without communicating (those groups exist only where TP / CP are on, so a
single-GPU run with tp = cp = 1 never builds these layers: nothing is hidden from it).

The second half is every other collective of megassm -- flags, losses, cursors, warm-start pieces, EMA
fragments, preview latents, pipeline messages, barriers. **No other module calls ``torch.distributed``
collectives** (``tests/unit/test_comm_device.py`` reads the code). These functions know the device a
group communicates on (``group_device``: the current CUDA device under NCCL, the CPU under gloo) and
move a tensor that lives elsewhere there and back -- a CPU tensor handed to an NCCL group fails at run
time (``No backend type associated with device type cpu``) on the cluster only, never in a gloo test.
They run at any group size, one included, so a single-GPU NCCL run takes the same path as a cluster.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Function


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


# -- raw (non-differentiable) collectives along a dimension ---------------------------------------
def _all_gather_flat():  # torch >= 2.13 renamed all_gather_into_tensor (the old name warns)
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _reduce_scatter_flat():
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_reduce(x: Tensor, group) -> Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x: Tensor, group, dim: int) -> Tensor:
    """(…, s, …) on each rank -> (…, n*s, …), rank-major along ``dim``."""
    n, dim = group_size(group), dim % x.dim()
    x = x.contiguous()
    out = x.new_empty((n,) + tuple(x.shape))  # (n, *x.shape)
    _all_gather_flat()(out.view(-1), x.view(-1), group=group)
    return out.movedim(0, dim).flatten(dim, dim + 1)


def _reduce_scatter(x: Tensor, group, dim: int) -> Tensor:
    """(…, n*s, …) summed over ranks, rank r keeps block r along ``dim``: (…, s, …)."""
    n, dim = group_size(group), dim % x.dim()
    if x.shape[dim] % n:
        raise ValueError(f"reduce-scatter: size {x.shape[dim]} along dim {dim} not divisible by group size {n}")
    stacked = x.unflatten(dim, (n, -1)).movedim(dim, 0).contiguous()  # (n, …, s, …)
    out = x.new_empty(stacked.shape[1:])
    _reduce_scatter_flat()(out.view(-1), stacked.view(-1), group=group)
    return out


def _all_to_all(x: Tensor, group, scatter_dim: int, gather_dim: int) -> Tensor:
    """Split ``scatter_dim`` into n blocks, send block j to rank j, concatenate what arrives along
    ``gather_dim`` in rank order: (…, n*a, …, b, …) -> (…, a, …, n*b, …)."""
    n = group_size(group)
    scatter_dim, gather_dim = scatter_dim % x.dim(), gather_dim % x.dim()
    if x.shape[scatter_dim] % n:
        raise ValueError(f"all-to-all: size {x.shape[scatter_dim]} along dim {scatter_dim} not divisible by {n}")
    send = x.unflatten(scatter_dim, (n, -1)).movedim(scatter_dim, 0).contiguous()  # (n, …, a, …)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv.view(-1), send.view(-1), group=group)
    # recv[j] is rank j's block for this rank; its shape is x's with scatter_dim shrunk to a
    return recv.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)


def _own_slice(x: Tensor, group, dim: int) -> Tensor:
    n, r = group_size(group), dist.get_rank(group)
    s = x.shape[dim] // n
    return x.narrow(dim, r * s, s)


# -- autograd functions -------------------------------------------------------------------------
class _CopyToGroup(Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromGroup(Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _AllReduceSum(Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _GatherAlong(Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, ctx.group, ctx.dim), None, None


class _ReduceScatterAlong(Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.group, ctx.dim), None, None


class _AllToAll(Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, g):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(g, ctx.group, gather_dim, scatter_dim), None, None, None


class _GatherReplicated(Function):
    @staticmethod
    def forward(ctx, x, group, dim, grad_scale):
        ctx.group, ctx.dim, ctx.scale = group, dim, grad_scale
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        g = _own_slice(g, ctx.group, ctx.dim)
        return (g * ctx.scale if ctx.scale != 1.0 else g.contiguous()), None, None, None


def _neighbour_exchange(to_prev: Tensor, to_next: Tensor, group) -> tuple[Tensor, Tensor]:
    """Rank r sends ``to_prev`` to r-1 and ``to_next`` to r+1 (group ranks, no wrap-around) and returns
    (what r-1 sent as its to_next, what r+1 sent as its to_prev); zeros at the ends."""
    n, r = group_size(group), dist.get_rank(group)
    to_prev, to_next = to_prev.contiguous(), to_next.contiguous()
    from_prev, from_next = torch.zeros_like(to_next), torch.zeros_like(to_prev)
    sends, recvs = [], []
    if r > 0:
        prev = dist.get_global_rank(group, r - 1)
        sends.append((prev, to_prev))
        recvs.append((prev, from_prev))
    if r < n - 1:
        nxt = dist.get_global_rank(group, r + 1)
        sends.append((nxt, to_next))
        recvs.append((nxt, from_next))
    for work in send_recv(sends, recvs, group):
        work.wait()
    return from_prev, from_next


class _NeighbourExchange(Function):
    @staticmethod
    def forward(ctx, to_prev, to_next, group):
        ctx.group = group
        return _neighbour_exchange(to_prev, to_next, group)

    @staticmethod
    def backward(ctx, g_from_prev, g_from_next):
        # r-1's to_next arrived here as from_prev: its gradient goes back to r-1, and so on
        g_to_prev, g_to_next = _neighbour_exchange(g_from_prev, g_from_next, ctx.group)
        return g_to_prev, g_to_next, None


# -- public wrappers: the identity for a group of one -------------------------------------------
def copy_to_group(x: Tensor, group) -> Tensor:
    """Forward identity, backward all-reduce: a replicated input to a rank-local computation."""
    return x if group_size(group) == 1 else _CopyToGroup.apply(x, group)


def reduce_from_group(x: Tensor, group) -> Tensor:
    """Forward all-reduce, backward identity: partial sums whose total every rank then uses alike."""
    return x if group_size(group) == 1 else _ReduceFromGroup.apply(x, group)


def all_reduce_sum(x: Tensor, group) -> Tensor:
    """Forward and backward all-reduce: a sum that each rank then uses with its own tensors."""
    return x if group_size(group) == 1 else _AllReduceSum.apply(x, group)


def gather_along(x: Tensor, group, dim: int = 1) -> Tensor:
    """All-gather along ``dim`` (rank order); backward reduce-scatters the gradient."""
    return x if group_size(group) == 1 else _GatherAlong.apply(x, group, dim)


def reduce_scatter_along(x: Tensor, group, dim: int = 1) -> Tensor:
    """Sum over ranks and keep this rank's block along ``dim``; backward all-gathers."""
    return x if group_size(group) == 1 else _ReduceScatterAlong.apply(x, group, dim)


def all_to_all(x: Tensor, group, scatter_dim: int, gather_dim: int) -> Tensor:
    """Ulysses re-layout: split ``scatter_dim`` over ranks, concatenate ``gather_dim`` from them."""
    return x if group_size(group) == 1 else _AllToAll.apply(x, group, scatter_dim, gather_dim)


def gather_replicated(x: Tensor, group, dim: int = 1, grad_scale: float = 1.0) -> Tensor:
    """All-gather a result that every rank then feeds to the *same* loss; backward keeps this rank's
    slice of the (identical) gradient, times ``grad_scale`` -- no communication."""
    if group_size(group) == 1:
        return x if grad_scale == 1.0 else _scale_grad(x, grad_scale)
    return _GatherReplicated.apply(x, group, dim, float(grad_scale))


def exchange_with_neighbours(to_prev: Tensor, to_next: Tensor, group) -> tuple[Tensor, Tensor]:
    """Point-to-point along the group's rank order: send ``to_prev`` to rank r-1 and ``to_next`` to r+1;
    returns (from_prev, from_next), rank r-1's ``to_next`` and rank r+1's ``to_prev`` (zeros where there is
    no neighbour). Neighbours' tensors have equal shapes. Backward sends the gradients back the same way."""
    if group_size(group) == 1:
        return torch.zeros_like(to_next), torch.zeros_like(to_prev)
    return _NeighbourExchange.apply(to_prev, to_next, group)


class _ScaleGrad(Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


def _scale_grad(x: Tensor, scale: float) -> Tensor:
    return _ScaleGrad.apply(x, scale)


def sum_grad_hook(group, rows: tuple[int, int] | None = None):
    """A ``Tensor.register_hook`` hook that all-reduces a parameter's gradient over ``group``
    (only ``rows`` [start, stop) of dim 0 when given) before it is accumulated -- so it is summed
    before DeepSpeed's own gradient hooks see it."""

    def hook(g: Tensor) -> Tensor:
        g = g.clone(memory_format=torch.contiguous_format)
        target = g if rows is None else g.narrow(0, rows[0], rows[1] - rows[0])
        dist.all_reduce(target, group=group)  # rows of dim 0 of a contiguous tensor are contiguous
        return g

    return hook


# -- device-aware collectives for everything that is not a differentiable layer op ---------------------
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def group_device(group=None) -> torch.device:
    """Where a collective over ``group`` (None: the world) takes its tensors: the current CUDA device
    under NCCL (``init_distributed`` set it to LOCAL_RANK), the CPU under gloo."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    raise RuntimeError(f"process group backend {backend!r}: megassm knows nccl and gloo; say which device it "
                       "communicates on in megassm.parallel.comm.group_device")


def _on_device(t: Tensor, device: torch.device) -> bool:
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)


def _staged(t: Tensor, group) -> Tensor:
    """``t`` itself if it is contiguous on the group's device, else a contiguous copy there."""
    device = group_device(group)
    return t if _on_device(t, device) and t.is_contiguous() else t.to(device).contiguous()


def all_reduce_(t: Tensor, group=None, op: str = "sum") -> Tensor:
    """In-place all-reduce of ``t`` (any device: staged through the group's device); returns ``t``."""
    buf = _staged(t, group)
    dist.all_reduce(buf, op=_OPS[op], group=group)
    if buf is not t:
        t.copy_(buf)
    return t


def broadcast_(t: Tensor, src: int, group=None) -> Tensor:
    """In-place broadcast of global rank ``src``'s ``t`` to every rank of ``group``; returns ``t``."""
    buf = _staged(t, group)
    dist.broadcast(buf, src=src, group=group)
    if buf is not t:
        t.copy_(buf)
    return t


def all_gather_stacked(t: Tensor, group=None) -> Tensor:
    """(*s) on each rank -> (n, *s) in rank order, **on the group's device** (its consumer, a GPU
    parameter or a reduction, wants it there; ``.cpu()`` it where a host copy is needed)."""
    buf = _staged(t, group)
    out = buf.new_empty((dist.get_world_size(group),) + tuple(t.shape))
    _all_gather_flat()(out.view(-1), buf.view(-1), group=group)
    return out


def barrier(group=None) -> None:
    """A barrier that names its device under NCCL (torch otherwise guesses it, with a warning)."""
    device = group_device(group)
    dist.barrier(group=group, device_ids=[device.index] if device.type == "cuda" else None)


def gather_object(obj, dst: int = 0, group=None) -> list | None:
    """Every rank's picklable ``obj`` on global rank ``dst`` (a list in rank order), None elsewhere. Only
    for objects this job made itself (it unpickles what the other ranks send)."""
    n = dist.get_world_size(group)
    parts = [None] * n if dist.get_rank() == dst else None
    dist.gather_object(obj, parts, dst=dst, group=group)
    return parts


def broadcast_object(obj, src: int = 0, group=None):
    """Global rank ``src``'s picklable ``obj`` on every rank of ``group`` (through the group's device). Only for
    objects this job made itself (every other rank unpickles what ``src`` sends)."""
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=group, device=group_device(group))
    return box[0]


def send_recv(sends: list[tuple[int, Tensor]], recvs: list[tuple[int, Tensor]], group=None) -> list:
    """Post point-to-point ``sends`` (global rank, tensor) and ``recvs`` (global rank, buffer) as one batch
    and return the work handles in that order (a coalescing backend, NCCL, may return fewer). Tensors
    must already be on the group's device: these are activations, and a silent copy would hide a bug."""
    device = group_device(group)
    wrong = [tuple(t.shape) for _, t in [*sends, *recvs] if not _on_device(t, device)]
    if wrong:
        raise RuntimeError(f"pipeline message of shape {wrong[0]} is not on {device}, the device this group "
                           "communicates on; the stage's activations should live there")
    ops = [dist.P2POp(dist.isend, t, r, group) for r, t in sends]
    ops += [dist.P2POp(dist.irecv, t, r, group) for r, t in recvs]
    return dist.batch_isend_irecv(ops) if ops else []


def failed_ranks(failed: bool, group=None) -> list[int]:
    """Agreement on a local failure before the next collective: the ranks of ``group`` that passed ``failed``.

    A rank that raises between two collectives (a bad batch, a metric's own error) and leaves strands the
    others in the next one (ZeRO-3's parameter gathers, a loss all-reduce); every rank calls this at the
    same point so that all stop together. One all-reduce of a world-sized flag vector (also at world 1);
    without a process group: [0] or []."""
    if not dist.is_initialized():
        return [0] if failed else []
    flags = torch.zeros(dist.get_world_size(group), dtype=torch.int32)
    flags[dist.get_rank(group)] = int(failed)
    return [r for r, f in enumerate(all_reduce_(flags, group).tolist()) if f]
