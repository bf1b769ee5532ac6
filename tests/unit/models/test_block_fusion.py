"""The block's fused elementwise glue (megassm.ops.modulate) and SDPA backend choice against their
eager references."""

import pytest
import torch

from megassm.models.attention import SelfAttention, _kernels
from megassm.models.block import EAGER
from megassm.ops.modulate import FusedGlue


def _inputs(B=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    L, d = 24, 32
    x = torch.randn(B, L, d, generator=g, dtype=torch.float64)
    y = torch.randn(B, L, d, generator=g, dtype=torch.float64)
    # shift/scale/gate as the block makes them: views of one (B, 6, 1, d) modulation tensor
    mod = torch.randn(B, 6, d, generator=g, dtype=torch.float64) * 0.3
    return [t.to(dtype).requires_grad_() for t in (x, y, mod)]


def _run(ew, tensors):
    x, y, mod = tensors
    shift, scale, gate, shift2, scale2, _ = mod.unsqueeze(2).unbind(1)
    a = ew.modulated_norm(x, shift, scale, 1e-6)
    h, b = ew.residual_modulated_norm(x, y * a, shift2, scale2, 1e-6)
    out = ew.gated_residual(h, gate, a * b)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * w).sum().backward()
    return [out.detach()] + [t.grad for t in tensors]


@pytest.mark.parametrize("B", [1, 2])
def test_handwritten_backward_matches_autograd(B):
    """fp64, no compiler: the written-out backward is the same math as autograd's (to rounding)."""
    ref = _run(EAGER, _inputs(B))
    got = _run(FusedGlue(compiled=False), _inputs(B))
    for name, a, b in zip(["out", "x", "y", "mod"], got, ref):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-10, atol=1e-10), (name, (a - b).abs().max())


def test_compiled_glue_matches_eager():
    """fp64 through inductor on CPU (B = 1: the batch size whose gradient shape AOTAutograd got wrong)."""
    ref = _run(EAGER, _inputs(1))
    got = _run(FusedGlue(compiled=True), _inputs(1))
    for name, a, b in zip(["out", "x", "y", "mod"], got, ref):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-10, atol=1e-10), (name, (a - b).abs().max())


def test_bf16_rounds_once():
    """bf16 in and out, fp32 inside: closer to the fp64 result than the eager bf16 chain."""
    exact = _run(EAGER, _inputs(2))
    fused = _run(FusedGlue(compiled=False), _inputs(2, dtype=torch.bfloat16))
    eager = _run(EAGER, _inputs(2, dtype=torch.bfloat16))

    def err(r):
        return (r[0].double() - exact[0]).norm() / exact[0].norm()

    assert err(fused) <= err(eager) * 1.05 and err(fused) < 1e-2


def test_attention_backend_choice():
    cpu = torch.device("cpu")
    assert _kernels("auto", cpu) is None and _kernels("cudnn", cpu) is None  # CPU: torch's own kernel
    with pytest.raises(ValueError, match="valid: auto, default"):
        SelfAttention(32, 4, backend="fa3")
    torch.manual_seed(0)
    a, b = SelfAttention(32, 4, backend="auto"), SelfAttention(32, 4, backend="math")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 10, 32)
    assert torch.allclose(a(x), b(x), atol=1e-6)
