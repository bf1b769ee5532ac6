"""One HTH block: AdaLN-modulated token mixer -> cross-attention -> FFN, each with a residual."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as tcp
from torch import Tensor, nn

from megassm.models.attention import CrossAttention
from megassm.models.embed import rope_axial
from megassm.models.mixers import mixer_for_symbol
from megassm.models.scan import is_identity, scan_permutation, slice_scan_permutation
from megassm.ops.modulate import FusedGlue


@dataclass
class TokenGrid:
    """Per-forward geometry shared by all blocks: grid (T, H, W) and cached perms / RoPE angles."""

    grid: tuple[int, int, int]
    device: torch.device
    rope_head_dim: int = 0
    rope_theta: float = 10000.0
    _perms: dict = field(default_factory=dict)
    _rope: Tensor | None = None

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def perm(self, order: str) -> tuple[Tensor, Tensor] | None:
        """(perm, inverse) for a scan order, or None when the order is the identity here."""
        if is_identity(order, self.grid):
            return None
        if order not in self._perms:
            self._perms[order] = scan_permutation(order, self.grid, self.device)
        return self._perms[order]

    def slice_perm(self, order: str, cp: int, rank: int) -> tuple[Tensor, Tensor] | None:
        """(perm, inverse) putting CP rank ``rank``'s slice of ``cp`` into scan ``order``, or None when it is in
        that order already (``scan.slice_scan_permutation``; only for orders that keep slices contiguous)."""
        key = (order, cp, rank)
        if key not in self._perms:
            perm = None if self.perm(order) is None else slice_scan_permutation(order, self.grid, cp, rank)
            self._perms[key] = None if perm is None else tuple(t.to(self.device) for t in perm)
        return self._perms[key]

    @classmethod
    def for_blocks(cls, grid, device, cfg, blocks) -> TokenGrid:
        """The grid a forward over ``blocks`` (HTHBlocks of a model with config ``cfg``) reads, its caches filled."""
        return cls(tuple(grid), device, rope_head_dim=cfg.d_model // cfg.num_heads,
                   rope_theta=cfg.rope_theta).prepare(blk.scan_order for blk in blocks)

    def prepare(self, scan_orders) -> TokenGrid:
        """Fill, eagerly, every cache that blocks in these scan orders read (a Hydra order's permutation; for
        None, the canonical order, the RoPE angles). A compiled block that filled a cache itself would guard on
        the state it found, and the next block meets another state: stage 3's pattern compiled 7 graphs where
        its 4 kinds of block need 4 (docs/performance.md, "Seventh session")."""
        for order in dict.fromkeys(scan_orders):
            if order is None:
                if self.rope_head_dim:
                    self.rope()
            else:
                self.perm(order)
        return self

    def rope(self) -> Tensor:
        if self._rope is None:
            self._rope = rope_axial(self.grid, self.rope_head_dim, self.rope_theta, self.device)
        return self._rope


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


# The block's memory-bound glue (LayerNorm + AdaLN modulation, gated residuals) as plain autograd ops:
# the reference for megassm.ops.modulate.FusedGlue, which the block uses on CUDA (``fuse_elementwise``).
def modulated_norm(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    return modulate(F.layer_norm(x, x.shape[-1:], eps=eps), shift, scale)


def gated_residual(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    return x + gate * y


def residual_modulated_norm(x: Tensor, y: Tensor, shift: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    h = x + y
    return h, modulated_norm(h, shift, scale, eps)


class EagerGlue:
    modulated_norm = staticmethod(modulated_norm)
    gated_residual = staticmethod(gated_residual)
    residual_modulated_norm = staticmethod(residual_modulated_norm)


EAGER = EagerGlue()
FUSED = FusedGlue(compiled=True)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class HTHBlock(nn.Module):
    """``symbol`` picks the mixer kind and its scan order from the registry (``megassm.models.mixers``):
    'h'/'v'/'t' Hydra with a row/column/temporal-major scan, 'A' attention, or a registered kind."""

    def __init__(self, cfg, symbol: str):
        super().__init__()
        d = cfg.d_model
        spec = mixer_for_symbol(symbol)
        self.symbol, self.kind = symbol, spec.name
        self.scan_order = spec.symbols[symbol]  # None: the mixer sees the canonical order
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mixer = spec.build(cfg)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.cross_attn = CrossAttention(d, cfg.num_heads, cfg.qk_norm)
        self.norm3 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(d, int(d * cfg.mlp_ratio))
        # AdaLN-single: this block's learned offsets to the shared timestep modulation,
        # zero so that every residual branch starts closed.
        self.scale_shift_table = nn.Parameter(torch.zeros(6, d))
        self.grad_checkpoint = False
        self.fuse_elementwise = cfg.fuse_elementwise  # on CUDA only; eager elsewhere
        self.compile_backend: str | None = None  # torch.compile backend of _forward (compile_blocks), None: eager

    def set_scan_order(self, symbol: str) -> None:
        """Switch the scan order among the symbols of this block's mixer kind (e.g. spatial -> temporal-major
        Hydra for video); another kind would need new weights."""
        spec = mixer_for_symbol(symbol) if symbol != self.symbol else None
        if spec is not None and spec.name != self.kind:
            raise ValueError(f"cannot turn block symbol {self.symbol!r} ({self.kind}) into {symbol!r} ({spec.name}) "
                             "without new weights")
        if spec is not None:
            self.symbol, self.scan_order = symbol, spec.symbols[symbol]

    def mix(self, x: Tensor, grid: TokenGrid) -> Tensor:
        """Apply the token mixer in this block's scan order. x: (B, L, d) in canonical order (the parallel
        twins: this rank's sequence shard); every mixer, single-process or parallel, has ``mix``."""
        return self.mixer.mix(x, grid, self.scan_order)

    def _forward(self, x: Tensor, t_mod: Tensor, text: Tensor, text_mask: Tensor, grid: TokenGrid) -> Tensor:
        B, d = x.shape[0], x.shape[-1]
        mod = self.scale_shift_table[None] + t_mod.view(B, 6, d)  # (B, 6, d): shift1 scale1 gate1 shift2 scale2 gate2
        # sliced where used, not unbound up front: under model.compile the eager mixer call splits this function
        # into compiled regions, and the later region then takes ``mod`` itself as input, not six (B, 1, d) views
        # of it (view inputs are where compiled backwards have returned mis-shaped gradients: docs/performance.md)
        # a compiled block leaves the glue to Inductor, which fuses it with its neighbours (norms, FP8 casts)
        ew = FUSED if (self.fuse_elementwise and x.is_cuda and self.compile_backend is None) else EAGER
        mixed = self.mix(ew.modulated_norm(x, mod[:, 0:1], mod[:, 1:2], self.norm1.eps), grid)
        x = ew.gated_residual(x, mod[:, 2:3], mixed)
        x, h = ew.residual_modulated_norm(x, self.cross_attn(self.norm2(x), text, text_mask), mod[:, 3:4],
                                          mod[:, 4:5], self.norm3.eps)
        return ew.gated_residual(x, mod[:, 5:6], self.mlp(h))

    def forward(self, x, t_mod, text, text_mask, grid: TokenGrid) -> Tensor:
        fwd = self._forward
        if self.compile_backend is not None:
            fwd = partial(compiled_block_forward(self.compile_backend), self)
        if self.grad_checkpoint and torch.is_grad_enabled():
            return tcp.checkpoint(fwd, x, t_mod, text, text_mask, grid, use_reentrant=False)
        return fwd(x, t_mod, text, text_mask, grid)


# Regional compilation (``model.compile: blocks``): one compiled ``HTHBlock._forward`` per backend, shared
# by every block (torch.compile specialises per mixer kind, scan order and shape: static shapes, one graph
# per bucket). The uncut fused Hydra mixer is one custom op each way inside it (megassm.ops.hydra_fused: a Hydra
# block is one graph); so is SDPA with its kernel priority list (megassm.models.attention: an attention block is one
# graph). The cut CP/TP parts of Hydra stay compiler-disabled, one break each.
_COMPILED: dict[str, object] = {}
RECOMPILE_LIMIT = 64  # graphs per compiled function: kinds x scan orders x buckets x grad modes


def compiled_block_forward(backend: str = "inductor"):
    if backend not in _COMPILED:
        import torch._dynamo

        cfg = torch._dynamo.config
        for key in ("recompile_limit", "cache_size_limit"):  # the name moved between torch versions
            if hasattr(cfg, key):
                setattr(cfg, key, max(getattr(cfg, key), RECOMPILE_LIMIT))
        _COMPILED[backend] = torch.compile(HTHBlock._forward, backend=backend, dynamic=False)
    return _COMPILED[backend]


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """Turn on regional compilation of every HTHBlock in ``model``; returns how many blocks.

    Which Hydra path runs (the fused kernels, or the PyTorch reference) is decided here, eagerly: the checks
    import mamba-ssm and Triton and cache their answer. Left to the first compiled forward, Dynamo traced the
    imports and on CUDA they came out unavailable, so every compiled Hydra block ran the reference scan, whose
    (L/chunk) x chunk x chunk intermediates filled an H100 (docs/performance.md, "Sixth session").
    """
    from megassm.ops.hydra_fused import fused_available
    from megassm.ops.ssd import triton_available

    fused_available(), triton_available()
    blocks = [m for m in model.modules() if isinstance(m, HTHBlock)]
    for blk in blocks:
        blk.compile_backend = backend
    return len(blocks)
