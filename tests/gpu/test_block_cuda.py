"""CUDA-only: the block's fast paths against their references, outputs and gradients.

- SelfAttention with backend auto (cuDNN first on Hopper) / cudnn against flash and math, bf16;
- a whole HTHBlock with the compiled elementwise glue against the eager glue, bf16;
- a compiled SelfAttention runs the SDPA kernels eager runs (the backend's choice survives tracing).
- FlashAttention-4 (backend fa4, megassm/ops/flash4.py) against its ops' reference and against SDPA, eager and compiled.
Norm-relative errors, ||a - b|| / ||b||; the bound 2e-2 is bf16 rounding of a sum over 128-wide heads
(two bf16 implementations of the same attention typically differ by 3-8e-3).
"""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from megassm.config.schema import ModelConfig  # noqa: E402
from megassm.models.attention import SelfAttention  # noqa: E402
from megassm.models.block import HTHBlock, TokenGrid  # noqa: E402

DT = torch.bfloat16


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _fwd_bwd(mod, inputs, grad):
    for p in mod.parameters():
        p.grad = None
    xs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = mod(*xs)
    out.backward(grad)
    return [out] + [x.grad for x in xs if x.grad is not None] + [p.grad for p in mod.parameters()]


def _attention_inputs(B: int, L: int = 2048):
    """(x, rope, grad) for a SelfAttention(1024, 8): B x L tokens, RoPE angles for 64-wide head halves."""
    x = torch.randn(B, L, 1024, device="cuda", dtype=DT)
    return x, torch.rand(L, 64, device="cuda") * 3, torch.randn_like(x)


@pytest.mark.parametrize("backend", ["auto", "cudnn", "efficient"])
def test_attention_backends_agree(backend):
    torch.manual_seed(0)
    ref = SelfAttention(1024, 8, backend="flash").cuda().to(DT)
    if backend == "cudnn" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("cuDNN attention is only preferred on Hopper and newer")
    mod = SelfAttention(1024, 8, backend=backend).cuda().to(DT)
    mod.load_state_dict(ref.state_dict())
    x, rope, g = _attention_inputs(2)
    a, b = _fwd_bwd(mod, (x, rope), g), _fwd_bwd(ref, (x, rope), g)
    errs = [_rel(u, v) for u, v in zip(a, b)]
    assert max(errs) < 2e-2, errs


@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("symbol", ["h", "A"])
def test_block_compiled_glue_matches_eager(symbol, B):
    cfg = ModelConfig(d_model=512, num_heads=4, headdim=64, pattern=symbol, text_dim=512, max_text_len=16)
    torch.manual_seed(0)
    fused = HTHBlock(cfg, symbol).cuda().to(DT)
    with torch.no_grad():
        fused.scale_shift_table.normal_(0.0, 0.3)  # open the gates so every branch carries gradient
    eager = HTHBlock(cfg, symbol).cuda().to(DT)
    eager.load_state_dict(fused.state_dict())
    eager.fuse_elementwise = False
    grid = (1, 32, 48)
    L = grid[1] * grid[2]
    tg = TokenGrid(grid, torch.device("cuda"), rope_head_dim=cfg.d_model // cfg.num_heads)
    x = torch.randn(B, L, cfg.d_model, device="cuda", dtype=DT)
    t_mod = torch.randn(B, 6 * cfg.d_model, device="cuda", dtype=DT) * 0.3
    text = torch.randn(B, 16, cfg.d_model, device="cuda", dtype=DT)
    mask = torch.ones(B, 16, dtype=torch.bool, device="cuda")
    mask[-1, 9:] = False
    g = torch.randn_like(x)

    def run(blk):
        for p in blk.parameters():
            p.grad = None
        xs = [t.detach().clone().requires_grad_() for t in (x, t_mod, text)]
        out = blk(xs[0], xs[1], xs[2], mask, tg)
        out.backward(g)
        return [out] + [t.grad for t in xs] + [p.grad for p in blk.parameters()]

    errs = [_rel(u, v) for u, v in zip(run(fused), run(eager))]
    assert max(errs) < 2e-2, errs


def _attention_kernels(fn) -> set[str]:
    """Which SDPA kernel families one forward + backward of ``fn`` ran, from the CUDA kernel names: cudnn,
    flash (FlashAttention-2), efficient (the memory-efficient fmha) or math (a materialised softmax). Families,
    not names: the same kernel may come in another tile variant for other strides."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    families = set()
    for e in prof.key_averages():
        k = e.key.lower()
        if "cudnn" in k and ("sdpa" in k or "fprop" in k or "dgrad" in k or "attention" in k):
            families.add("cudnn")
        elif "flash" in k:
            families.add("flash")
        elif "fmha" in k or "mem_eff" in k:
            families.add("efficient")
        elif "softmax" in k:
            families.add("math")
    return families


@pytest.mark.parametrize("backend", ["auto", "flash"])
def test_compiled_attention_keeps_the_backends_kernel(backend):
    """A compiled attention block traces SDPA's kernel priority list (no compiler-disabled call): it must run
    the kernels eager runs -- cuDNN's on Hopper for auto -- and agree with eager."""
    torch.manual_seed(0)
    mod = SelfAttention(1024, 8, backend=backend).cuda().to(DT)
    x, rope, g = _attention_inputs(1)
    torch._dynamo.reset()
    compiled = torch.compile(mod, fullgraph=True, dynamic=False)
    eager_k = _attention_kernels(lambda: _fwd_bwd(mod, (x, rope), g))
    compiled_k = _attention_kernels(lambda: _fwd_bwd(compiled, (x, rope), g))
    assert eager_k and compiled_k == eager_k, (eager_k, compiled_k)
    if backend == "auto" and torch.cuda.get_device_capability()[0] >= 9:
        assert "cudnn" in eager_k, eager_k
    errs = [_rel(u, v) for u, v in zip(_fwd_bwd(compiled, (x, rope), g), _fwd_bwd(mod, (x, rope), g))]
    assert max(errs) < 2e-2, errs


def _needs_fa4():
    from megassm.ops.flash4 import fa4_unsupported

    reason = fa4_unsupported(torch.device("cuda"))
    if reason:
        pytest.skip(reason)


def test_fa4_kernels_match_their_reference():
    """megassm::fa4_fwd / fa4_bwd on CUDA (FA4's CuTe kernels) against the ops' PyTorch reference in fp32 on the
    same bf16 inputs: out, lse and the three gradients (lse is fp32 in both: 1e-3)."""
    _needs_fa4()
    from megassm.ops.flash4 import fa4_bwd, fa4_fwd, reference, reference_backward

    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(2, 1536, 4, 128, device="cuda", dtype=DT) for _ in range(4))
    out, lse = fa4_fwd(q, k, v)
    ref_out, ref_lse = reference(q.float(), k.float(), v.float())
    assert _rel(out, ref_out) < 2e-2 and _rel(lse, ref_lse) < 1e-3, (_rel(out, ref_out), _rel(lse, ref_lse))
    grads = fa4_bwd(dout, q, k, v, out, lse)
    ref_grads = reference_backward(dout.float(), q.float(), k.float(), v.float(), ref_out, ref_lse)
    errs = [_rel(a, b) for a, b in zip(grads, ref_grads)]
    assert max(errs) < 2e-2, errs


def test_fa4_backend_agrees_with_sdpa_eager_and_compiled():
    """SelfAttention(backend=fa4) against backend=flash (SDPA's FlashAttention-2), outputs and every gradient,
    eager and under torch.compile (FA4 is one custom op in the graph)."""
    _needs_fa4()
    torch.manual_seed(0)
    ref = SelfAttention(1024, 8, backend="flash").cuda().to(DT)
    mod = SelfAttention(1024, 8, backend="fa4").cuda().to(DT)
    mod.load_state_dict(ref.state_dict())
    x, rope, g = _attention_inputs(2)
    want = _fwd_bwd(ref, (x, rope), g)
    errs = [_rel(u, v) for u, v in zip(_fwd_bwd(mod, (x, rope), g), want)]
    assert max(errs) < 2e-2, errs
    torch._dynamo.reset()
    compiled = torch.compile(mod, fullgraph=True, dynamic=False)
    errs = [_rel(u, v) for u, v in zip(_fwd_bwd(compiled, (x, rope), g), want)]
    assert max(errs) < 2e-2, errs
