"""Flow-matching draws: keyed per sample (layout-independent), t kept in fp32."""

import torch

from megassm.config.schema import DiffusionConfig
from megassm.diffusion.flow import flow_matching_loss, prepare_batch

CFG = DiffusionConfig(caption_dropout=0.5, shift=3.0)


def _batch(n: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, 3, 2, 4, 4, generator=g).to(dtype)
    text = torch.randn(n, 5, 8, generator=g)
    return x0, text, torch.ones(n, 5, dtype=torch.bool)


def test_a_samples_draws_do_not_depend_on_how_the_batch_is_cut():
    x0, text, mask = _batch(6)
    whole = prepare_batch(x0, text, mask, CFG, 32, list(range(10, 16)), seed=7)
    parts = [prepare_batch(x0[i:i + 2], text[i:i + 2], mask[i:i + 2], CFG, 32, list(range(10 + i, 12 + i)), seed=7)
             for i in (0, 2, 4)]
    for field in ("xt", "t", "text_mask", "target"):
        assert torch.equal(getattr(whole, field), torch.cat([getattr(p, field) for p in parts])), field
    other = prepare_batch(x0, text, mask, CFG, 32, list(range(16, 22)), seed=7)
    assert not torch.equal(other.t, whole.t)  # other samples, other draws
    assert not torch.equal(prepare_batch(x0, text, mask, CFG, 32, list(range(10, 16)), seed=8).t, whole.t)
    assert 0 < int((~whole.text_mask.any(1)).sum()) < 6 or 0 < int((~other.text_mask.any(1)).sum()) < 6


def test_t_reaches_the_model_in_fp32_under_bf16():
    """bf16's spacing near t = 1 is 2^-8: after the x1000 of the sinusoidal embedding that is ~4 units,
    so its high frequencies alias. The model must receive t in fp32 whatever the latents' dtype."""
    x0, text, mask = _batch(4, torch.bfloat16)
    seen = {}

    def model(xt, t, text, mask):
        seen["t"], seen["xt"] = t, xt
        return xt * 0

    flow_matching_loss(model, x0, text, mask, CFG, 32, [0, 1, 2, 3], seed=1)
    assert seen["t"].dtype == torch.float32 and seen["xt"].dtype == torch.bfloat16
    assert not torch.equal(seen["t"], seen["t"].bfloat16().float())  # not bf16 values in an fp32 tensor
