"""The SSD (Mamba-2 state-space duality) scan behind one function.

    y_t = C_t . h_t,   h_t = exp(dt_t * A) h_{t-1} + dt_t * B_t x_t^T      (per head)

``ssd_scan`` dispatches to
  * ``ssd_scan_ref``: chunked pure PyTorch (any device, fp32/bf16/fp64, any length and
    chunk size) -- the reference and the CPU path;
  * mamba-ssm's Triton ``mamba_chunk_scan_combined`` on CUDA when mamba-ssm is installed.
``ssd_naive`` materialises the L x L semiseparable matrix: the test oracle.

Shapes: x (batch, seqlen, nheads, headdim), dt (batch, seqlen, nheads) -- already
positive (softplus applied by the caller), A (nheads,) negative, B and C
(batch, seqlen, ngroups, d_state), initial_states (batch, nheads, headdim, d_state).
"""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F
from torch import Tensor

_TRITON_SCAN = None
_TRITON_IMPORT_ERROR: str | None = None


def first_answer_not_traced(check: str) -> None:
    """An availability check's first answer must come from eager code: traced by Dynamo, the imports behind
    ``triton_available`` / ``fused_available`` came out False on an H100, and compiled Hydra blocks silently ran
    the reference scan (out of memory). Called where such a check would compute its cached answer."""
    if torch.compiler.is_compiling():
        raise RuntimeError(f"{check}() was first asked inside a torch.compile region; call it once before "
                           "compiling (megassm.models.block.compile_blocks does)")


def _load_triton_scan():
    """Import mamba-ssm's SSD kernel, only ever on CUDA.

    Any ``mamba_ssm`` import runs its ``__init__``, which imports triton and the compiled
    Mamba-1 extension ``selective_scan_cuda`` unconditionally. A wheel built with
    MAMBA_SKIP_CUDA_BUILD has no such extension, and the SSD Triton kernels never use it,
    so an empty stand-in module is registered when (and only when) the real one is missing.
    """
    global _TRITON_SCAN, _TRITON_IMPORT_ERROR
    if _TRITON_SCAN is not None or _TRITON_IMPORT_ERROR is not None:
        return _TRITON_SCAN
    first_answer_not_traced("triton_available")
    try:
        try:
            import selective_scan_cuda  # noqa: F401
        except ImportError:
            sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        _TRITON_SCAN = torch.compiler.disable(mamba_chunk_scan_combined)  # its launches run eager in a compiled block
    except Exception as e:  # ImportError, or triton failing to initialise
        _TRITON_IMPORT_ERROR = f"{type(e).__name__}: {e}"
    return _TRITON_SCAN


def triton_available() -> bool:
    return torch.cuda.is_available() and _load_triton_scan() is not None


def _check_shapes(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple[int, ...]:
    assert x.dim() == 4, f"x must be (batch, seqlen, nheads, headdim), got {tuple(x.shape)}"
    b, seqlen, h, p = x.shape
    assert dt.shape == (b, seqlen, h), f"dt must be {(b, seqlen, h)}, got {tuple(dt.shape)}"
    assert A.shape == (h,), f"A must be ({h},), got {tuple(A.shape)}"
    assert B.dim() == 4 and B.shape[:2] == (b, seqlen), f"B must be (b, l, g, n), got {tuple(B.shape)}"
    assert C.shape == B.shape, f"C {tuple(C.shape)} must match B {tuple(B.shape)}"
    g, n = B.shape[2:]
    assert h % g == 0, f"nheads={h} must be a multiple of ngroups={g}"
    return b, seqlen, h, p, g, n


def _segsum(a: Tensor) -> Tensor:
    """(..., T) -> (..., T, T): out[..., i, j] = sum_{k=j+1}^{i} a_k for i >= j, -inf above."""
    T = a.size(-1)
    a = a.unsqueeze(-1).expand(*a.shape, T)  # (..., T, T) with a[..., i, j] = a_i
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    a = a.masked_fill(~lower, 0)
    out = torch.cumsum(a, dim=-2)
    keep = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=0)
    return out.masked_fill(~keep, float("-inf"))


def ssd_scan_ref(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int = 256,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
):
    """Chunked SSD in pure PyTorch. Computes in fp32 (fp64 stays fp64); returns x's dtype."""
    b, seqlen, h, p, g, n = _check_shapes(x, dt, A, B, C)
    out_dtype = x.dtype
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, dt, A, B, C = (t.to(cdt) for t in (x, dt, A, B, C))
    # heads share their group's B/C: (b, l, g, n) -> (b, l, h, n)
    B = B.repeat_interleave(h // g, dim=2)
    C = C.repeat_interleave(h // g, dim=2)
    # zero-pad to a whole number of chunks; dt = 0 there means decay 1 and no input,
    # so outputs and the final state are unchanged.
    pad = (-seqlen) % chunk_size
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    nc = x.shape[1] // chunk_size

    def chunks(t: Tensor) -> Tensor:  # (b, nc*cs, ...) -> (b, nc, cs, ...)
        return t.reshape(b, nc, chunk_size, *t.shape[2:])

    xdt = chunks(x * dt.unsqueeze(-1))  # (b, c, l, h, p)
    B, C = chunks(B), chunks(C)  # (b, c, l, h, n)
    a = chunks(dt * A).permute(0, 3, 1, 2)  # (b, h, c, l): log-decay per step
    a_cum = torch.cumsum(a, dim=-1)

    # 1. within-chunk outputs (the quadratic, attention-like part)
    Lmat = torch.exp(_segsum(a))  # (b, h, c, l, s)
    y = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, Lmat, xdt)

    # 2. each chunk's final state from its own inputs
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, h, c, l)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, xdt)

    # 3. pass states across chunk boundaries
    if initial_states is None:
        initial_states = torch.zeros(b, h, p, n, dtype=cdt, device=x.device)
    states = torch.cat([initial_states.to(cdt).unsqueeze(1), states], dim=1)  # (b, c+1, h, p, n)
    chunk_decay = torch.exp(_segsum(F.pad(a_cum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    states, final_state = states[:, :-1], states[:, -1]

    # 4. contribution of the incoming state to each position
    decay_from_start = torch.exp(a_cum)  # (b, h, c, l)
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, decay_from_start)

    y = y.reshape(b, nc * chunk_size, h, p)[:, :seqlen].to(out_dtype)
    return (y, final_state.to(out_dtype)) if return_final_states else y


def ssd_naive(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, initial_states: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """O(L^2) oracle: y = M x with M[i, j] = C_i . B_j * dt_j * prod_{k=j+1}^{i} exp(dt_k A)."""
    b, seqlen, h, p, g, n = _check_shapes(x, dt, A, B, C)
    B = B.repeat_interleave(h // g, dim=2)
    C = C.repeat_interleave(h // g, dim=2)
    a = (dt * A).transpose(1, 2)  # (b, h, l)
    cum = torch.cumsum(a, dim=-1)
    diff = cum.unsqueeze(-1) - cum.unsqueeze(-2)  # (b, h, i, j) = sum_{k=j+1}^{i} a_k
    causal = torch.tril(torch.ones(seqlen, seqlen, dtype=torch.bool, device=x.device))
    decay = torch.exp(diff.masked_fill(~causal, float("-inf")))
    M = torch.einsum("bihn,bjhn->bhij", C, B) * decay * dt.transpose(1, 2).unsqueeze(-2)
    y = torch.einsum("bhij,bjhp->bihp", M, x)
    # final state h_L = sum_j prod_{k>j} a_k dt_j x_j B_j^T (+ decayed initial state)
    w = torch.exp(cum[..., -1:] - cum) * dt.transpose(1, 2)  # (b, h, l)
    final = torch.einsum("bhj,bjhp,bjhn->bhpn", w, x, B)
    if initial_states is not None:
        y = y + torch.einsum("bihn,bhpn,bhi->bihp", C, initial_states, torch.exp(cum))
        final = final + initial_states * torch.exp(cum[..., -1]).unsqueeze(-1).unsqueeze(-1)
    return y, final


def ssd_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int = 256,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
    impl: str = "auto",
):
    """SSD scan; ``impl`` is "auto" (Triton on CUDA when available), "ref" or "triton"."""
    if impl not in ("auto", "ref", "triton"):
        raise ValueError(f"ssd_scan impl={impl!r}; choose 'auto', 'ref' or 'triton'")
    use_triton = impl == "triton" or (impl == "auto" and x.is_cuda and triton_available())
    if not use_triton:
        return ssd_scan_ref(x, dt, A, B, C, chunk_size, initial_states, return_final_states)
    if not x.is_cuda:
        raise RuntimeError("ssd_scan impl='triton' needs CUDA tensors; use impl='ref' on CPU")
    kernel = _load_triton_scan()
    if kernel is None:
        raise RuntimeError(
            "ssd_scan impl='triton' but mamba-ssm's Triton kernels could not be imported "
            f"({_TRITON_IMPORT_ERROR}). Install with: MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE "
            "pip install --no-build-isolation --no-deps mamba-ssm"
        )
    _check_shapes(x, dt, A, B, C)
    return kernel(
        x, dt, A, B, C, chunk_size=chunk_size, D=None, z=None,
        initial_states=initial_states, return_final_states=return_final_states,
    )
