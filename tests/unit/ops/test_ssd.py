"""The chunked SSD reference against the O(L^2) semiseparable oracle (fp64, outputs and grads)."""

import pytest
import torch

from megassm.ops.ssd import ssd_naive, ssd_scan, ssd_scan_ref


def _inputs(b, seqlen, h, p, g, n, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    x = r(b, seqlen, h, p)
    dt = torch.nn.functional.softplus(r(b, seqlen, h) - 1.0)
    A = -torch.rand(h, generator=gen, dtype=dtype) * 2 - 0.1
    B, C = r(b, seqlen, g, n), r(b, seqlen, g, n)
    h0 = r(b, h, p, n)
    return x, dt, A, B, C, h0


@pytest.mark.parametrize("seqlen,chunk", [(1, 4), (7, 4), (16, 4), (33, 8), (20, 64), (12, 1)])
@pytest.mark.parametrize("with_init", [False, True])
def test_chunked_matches_naive_fp64(seqlen, chunk, with_init):
    x, dt, A, B, C, h0 = _inputs(2, seqlen, 4, 3, 2, 5)
    h0 = h0 if with_init else None
    y, final = ssd_scan_ref(x, dt, A, B, C, chunk, initial_states=h0, return_final_states=True)
    y_ref, final_ref = ssd_naive(x, dt, A, B, C, initial_states=h0)
    # fp64 on both sides: the two orders of summation agree to rounding.
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seqlen,chunk", [(9, 4), (16, 16)])
def test_chunked_gradients_match_naive(seqlen, chunk):
    tensors = [t.requires_grad_() for t in _inputs(1, seqlen, 2, 3, 1, 4)]
    x, dt, A, B, C, h0 = tensors
    y, f = ssd_scan_ref(x, dt, A, B, C, chunk, initial_states=h0, return_final_states=True)
    w1, w2 = torch.randn_like(y), torch.randn_like(f)
    g = torch.autograd.grad((y * w1).sum() + (f * w2).sum(), tensors)
    y2, f2 = ssd_naive(x, dt, A, B, C, initial_states=h0)
    g2 = torch.autograd.grad((y2 * w1).sum() + (f2 * w2).sum(), tensors)
    for name, a, b in zip("x dt A B C h0".split(), g, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


def test_bf16_close_to_fp64():
    x, dt, A, B, C, _ = _inputs(1, 40, 2, 8, 1, 8)
    y_ref, _ = ssd_naive(x, dt, A, B, C)
    y = ssd_scan_ref(x.bfloat16(), dt.bfloat16(), A.float(), B.bfloat16(), C.bfloat16(), 16)
    assert y.dtype == torch.bfloat16
    # bf16 inputs carry ~3 significant digits; the fp32 accumulation adds little on top.
    err = (y.double() - y_ref).abs().max() / y_ref.abs().max()
    assert err < 3e-2, err


def test_dispatch_ref_on_cpu_and_rejects_bad_impl():
    x, dt, A, B, C, _ = _inputs(1, 8, 2, 3, 1, 4, dtype=torch.float32)
    torch.testing.assert_close(ssd_scan(x, dt, A, B, C, 4), ssd_scan_ref(x, dt, A, B, C, 4))
    with pytest.raises(ValueError, match="impl"):
        ssd_scan(x, dt, A, B, C, 4, impl="cuda")
    with pytest.raises(RuntimeError, match="CUDA"):
        ssd_scan(x, dt, A, B, C, 4, impl="triton")


def test_shape_assertions():
    x, dt, A, B, C, _ = _inputs(1, 8, 2, 3, 1, 4)
    with pytest.raises(AssertionError, match="dt must be"):
        ssd_scan_ref(x, dt[:, :4], A, B, C)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_reference_on_cuda(dtype):
    from megassm.ops.ssd import triton_available

    if not triton_available():
        pytest.skip("mamba-ssm Triton kernels not installed")
    x, dt, A, B, C, h0 = (t.cuda() for t in _inputs(2, 1000, 4, 64, 1, 64, dtype=torch.float32))
    args = (x.to(dtype), dt, A, B.to(dtype), C.to(dtype))
    y_k = ssd_scan(*args, chunk_size=256, impl="triton")
    y_r = ssd_scan(*args, chunk_size=256, impl="ref")
    # fp32: kernels use tf32-free fp32 dots but another summation order -> 1e-3 relative;
    # bf16: inputs/outputs rounded to 8 mantissa bits -> a few % of the output scale.
    tol = 2e-3 if dtype == torch.float32 else 3e-2
    scale = y_r.float().abs().max()
    assert (y_k.float() - y_r.float()).abs().max() / scale < tol
