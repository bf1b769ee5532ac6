"""Attention: RoPE is a relative encoding, cross-attention ignores padded text, QK-norm optional."""

import math

import pytest
import torch

from megassm.models.attention import CrossAttention, SelfAttention
from megassm.models.embed import _axis_split, apply_rope, rope_axial


def test_rope_scores_depend_only_on_offsets():
    hd = 12
    ang = rope_axial((3, 4, 5), hd)  # (60, 6)
    assert ang.shape == (60, hd // 2)
    q, k = torch.randn(hd), torch.randn(hd)
    Q = apply_rope(q.expand(1, 1, 60, hd), ang)[0, 0]
    K = apply_rope(k.expand(1, 1, 60, hd), ang)[0, 0]
    idx = lambda t, h, w: (t * 4 + h) * 5 + w
    # same (dt, dh, dw) offset, different absolute positions -> same score
    s1 = Q[idx(2, 3, 4)] @ K[idx(1, 1, 2)]
    s2 = Q[idx(1, 2, 2)] @ K[idx(0, 0, 0)]
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)
    # rotation preserves norms
    torch.testing.assert_close(Q.norm(dim=-1), q.norm().expand(60), rtol=1e-5, atol=1e-5)
    assert sum(_axis_split(12, 3)) == 12 and all(p % 2 == 0 for p in _axis_split(12, 3))


def test_image_rope_is_the_first_video_frame():
    img = rope_axial((1, 4, 4), 16)
    vid = rope_axial((3, 4, 4), 16)
    torch.testing.assert_close(img, vid[:16])


@pytest.mark.parametrize("qk_norm", [True, False])
def test_self_attention_matches_manual_softmax(qk_norm):
    torch.manual_seed(0)
    m = SelfAttention(16, 2, qk_norm=qk_norm).double()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    rope = rope_axial((1, 1, 7), 8).double()
    out = m(x, rope)
    q, k, v = m.qkv(x).view(2, 7, 3, 2, 8).permute(2, 0, 3, 1, 4)
    q, k = apply_rope(m.q_norm(q), rope), apply_rope(m.k_norm(k), rope)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    ref = m.proj((att @ v).transpose(1, 2).reshape(2, 7, 16))
    torch.testing.assert_close(out, ref)


def test_cross_attention_ignores_padding():
    torch.manual_seed(0)
    m = CrossAttention(16, 2).double()
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    text = torch.randn(1, 6, 16, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False, False, False]])
    out = m(x, text, mask)
    text2 = text.clone()
    text2[:, 3:] = 1e3 * torch.randn(1, 3, 16, dtype=torch.float64)  # garbage in padded slots
    torch.testing.assert_close(m(x, text2, mask), out)
    torch.testing.assert_close(m(x, text[:, :3]), out)  # same as no padding at all


def test_fa4_ops_reference_matches_sdpa_and_its_registration_checks():
    """``megassm::fa4_fwd`` / ``fa4_bwd`` off CUDA run their PyTorch reference: it is SDPA's maths (out, and lse =
    logsumexp of the scaled scores), its backward is SDPA's gradient, and the ops' fake and autograd registrations
    pass torch's opcheck (what a compiled block relies on). The kernels themselves: tests/gpu/test_block_cuda.py."""
    from megassm.ops.flash4 import fa4_attention, fa4_bwd, fa4_fwd

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 9, 3, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))  # (B, L, h, hd)
    out, lse = fa4_fwd(q, k, v)
    heads_first = [t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*heads_first)
    torch.testing.assert_close(out, ref.transpose(1, 2))
    scores = heads_first[0] @ heads_first[1].transpose(-1, -2) / math.sqrt(8)
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1))
    g = torch.randn_like(out)
    fa4_attention(q, k, v).backward(g)
    ref.backward(g.transpose(1, 2))
    for a, b in zip((q, k, v), heads_first):
        torch.testing.assert_close(a.grad, b.grad.transpose(1, 2))
    small = [torch.randn(1, 5, 2, 4, requires_grad=True) for _ in range(3)]
    torch.library.opcheck(fa4_fwd, small)
    o, lse = fa4_fwd(*small)
    torch.library.opcheck(fa4_bwd, (torch.randn_like(o), *(t.detach() for t in small), o.detach(), lse.detach()))


@pytest.mark.parametrize("cross_heads", [2, 4])
def test_fa4_backend_is_the_sdpa_backend_in_the_tokens_first_layout(cross_heads):
    """``attention_backend: fa4`` takes the qkv projection's tokens-first layout (RoPE broadcast over heads, no
    transposes): the same outputs and gradients as the SDPA path, in float64 (1e-7 relative)."""
    torch.manual_seed(0)
    a = SelfAttention(8 * cross_heads, cross_heads).double()
    b = SelfAttention(8 * cross_heads, cross_heads, backend="fa4").double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 12, 8 * cross_heads, dtype=torch.float64)
    rope = rope_axial((1, 3, 4), 8).double()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa, rope), b(xb, rope)
    torch.testing.assert_close(yb, ya, rtol=1e-7, atol=1e-9)
    g = torch.randn_like(ya)
    ya.backward(g), yb.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-7, atol=1e-9)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-7, atol=1e-9, msg=name)


def test_fa4_is_refused_at_load_on_a_gpu_that_cannot_run_it(monkeypatch):
    """On a GPU machine without flash-attn-4 (or an older GPU), ``model.attention_backend=fa4`` is a config error
    naming the install; on a CPU machine it is accepted (the op's reference runs)."""
    import megassm.ops.flash4 as flash4
    from megassm.config.schema import ModelConfig
    from megassm.config.validate import ConfigError
    from megassm.models.rules import validate_model

    cfg = ModelConfig(d_model=32, pattern="hA", num_heads=4, attention_backend="fa4")
    validate_model(cfg)  # no CUDA here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(flash4, "fa4_available", lambda: False)
    with pytest.raises(ConfigError, match=r"fa4 needs flash-attn-4.*pip install flash-attn-4==.*backend=auto"):
        validate_model(cfg)
    monkeypatch.setattr(flash4, "fa4_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ConfigError, match="needs a Hopper or newer GPU.*sm80"):
        validate_model(cfg)


@pytest.mark.parametrize("backend", ["auto", "fa4"])
def test_compiled_attention_block_is_one_graph(backend):
    """``model.compile: blocks`` traces self-attention's SDPA call (with its kernel priority list) into the block's
    graph; it used to be a compiler-disabled call, one graph break per attention block. FA4 is one custom op in it."""
    import torch._dynamo

    from megassm.config.schema import ModelConfig
    from megassm.models.block import HTHBlock, TokenGrid

    cfg = ModelConfig(d_model=32, pattern="A", num_heads=4, text_dim=16, max_text_len=8, attention_backend=backend)
    torch.manual_seed(0)
    blk = HTHBlock(cfg, "A")
    x, t_mod = torch.randn(1, 32, 32), torch.randn(1, 6 * 32)
    text, mask = torch.randn(1, 8, 32), torch.ones(1, 8, dtype=torch.bool)  # text already d_model wide
    grid = TokenGrid((2, 4, 4), x.device, rope_head_dim=8)
    torch._dynamo.reset()
    ex = torch._dynamo.explain(HTHBlock._forward)(blk, x, t_mod, text, mask, grid)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons
    compiled = torch.compile(HTHBlock._forward, backend="aot_eager", fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(blk, x, t_mod, text, mask, grid), blk(x, t_mod, text, mask, grid))
