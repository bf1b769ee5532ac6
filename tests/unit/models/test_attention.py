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


def test_compiled_attention_block_is_one_graph():
    """``model.compile: blocks`` traces self-attention's SDPA call (with its kernel priority list) into the block's
    graph; it used to be a compiler-disabled call, one graph break per attention block."""
    import torch._dynamo

    from megassm.config.schema import ModelConfig
    from megassm.models.block import HTHBlock, TokenGrid

    cfg = ModelConfig(d_model=32, pattern="A", num_heads=4, text_dim=16, max_text_len=8)
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
