"""The block's compiled elementwise glue and SDPA backend choice against their eager references."""

import pytest
import torch

from megassm.models.attention import SelfAttention, _kernels
from megassm.models.block import EAGER, Elementwise


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, L, d = 2, 24, 32
    x = torch.randn(B, L, d, generator=g, dtype=torch.float64)
    y = torch.randn(B, L, d, generator=g, dtype=torch.float64)
    shift, scale, gate = (torch.randn(B, 1, d, generator=g, dtype=torch.float64) * 0.3 for _ in range(3))
    return [t.requires_grad_() for t in (x, y, shift, scale, gate)]


def _run(ew, tensors):
    x, y, shift, scale, gate = tensors
    a = ew.modulated_norm(x, shift, scale, 1e-6)
    h, b = ew.residual_modulated_norm(x, y, shift, scale, 1e-6)
    out = ew.gated_residual(h, gate, a * b)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * w).sum().backward()
    return [out.detach()] + [t.grad for t in tensors]


def test_compiled_glue_matches_eager_outputs_and_grads():
    """fp64 on CPU through inductor: same math, so agreement to rounding (1e-10)."""
    ref = _run(EAGER, _inputs())
    got = _run(Elementwise(lambda f: torch.compile(f, dynamic=False)), _inputs())
    for name, a, b in zip(["out", "x", "y", "shift", "scale", "gate"], got, ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10), (name, (a - b).abs().max().item())


def test_glue_reference_is_layernorm_modulate():
    x, y, shift, scale, gate = (t.detach() for t in _inputs())
    expect = torch.nn.functional.layer_norm(x + y, (x.shape[-1],), eps=1e-6) * (1 + scale) + shift
    h, got = EAGER.residual_modulated_norm(x, y, shift, scale, 1e-6)
    assert torch.equal(h, x + y) and torch.allclose(got, expect)


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
