"""The HTH model: shapes for images and video, zero-init, bad input, registry sizes, accounting."""

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megassm.config import ModelConfig
from megassm.models import build_model
from megassm.models.accounting import forward_flops, param_counts
from megassm.run_config import load_config

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
TINY = dict(in_channels=4, d_model=32, num_heads=2, headdim=16, d_state=8, chunk_size=8, text_dim=16,
            max_text_len=6)


def _inputs(B=2, C=4, T=1, H=8, W=8, Lt=5, text_dim=16):
    return (torch.randn(B, C, T, H, W), torch.rand(B), torch.randn(B, Lt, text_dim),
            torch.ones(B, Lt, dtype=torch.bool))


@pytest.mark.parametrize("pattern", ["hvAh", "tA", "A"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 4, 6), (2, 6, 2)])
def test_forward_shapes_images_and_video(pattern, shape):
    m = build_model(ModelConfig(pattern=pattern, **TINY))
    x, t, y, mask = _inputs(T=shape[0], H=shape[1], W=shape[2])
    out = m(x, t, y, mask)
    assert out.shape == x.shape
    out.square().mean().backward()


def test_zero_init_predicts_zero_and_every_param_gets_gradient_after_opening():
    m = build_model(ModelConfig(pattern="hvA", **TINY))
    x, t, y, mask = _inputs()
    assert m(x, t, y, mask).abs().max() == 0  # output layer and gates start at zero
    with torch.no_grad():
        for p in m.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.1)
    m(x, t, y, mask).square().sum().backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == ["y_null"]  # used only for empty captions


def test_empty_caption_uses_null_embedding():
    m = build_model(ModelConfig(pattern="hA", **TINY))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t, y, _ = _inputs()
    empty = torch.zeros(2, 5, dtype=torch.bool)
    a = m(x, t, y, empty)
    b = m(x, t, torch.randn_like(y), empty)  # text content is irrelevant when nothing is valid
    torch.testing.assert_close(a, b)


def test_bad_inputs_have_clear_errors():
    m = build_model(ModelConfig(**TINY))
    x, t, y, mask = _inputs()
    with pytest.raises(ValueError, match="not divisible by the patch size 2"):
        m(torch.randn(2, 4, 1, 7, 8), t, y, mask)
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(2, 3, 1, 8, 8), t, y, mask)
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        m(torch.randn(2, 4, 8, 8), t, y, mask)
    with pytest.raises(ValueError, match="max_text_len"):
        m(x, t, torch.randn(2, 9, 16), None)
    with pytest.raises(ValueError, match="text_dim"):
        m(x, t, torch.randn(2, 5, 7), mask)


def test_param_count_is_exact():
    for kw in [dict(pattern="hvAt"), dict(pattern="A", qk_norm=False), dict(pattern="hh", ngroups=2)]:
        cfg = ModelConfig(**{**TINY, **kw})
        assert sum(p.numel() for p in build_model(cfg).parameters()) == param_counts(cfg)["total"]


def test_registry_sizes():
    sizes = {}
    for f in sorted((CONFIGS / "model").glob("*.yaml")):
        cfg = load_config(f)
        sizes[cfg.model.name] = param_counts(cfg.model)["total"]
    assert {"hth-tiny", "hth-small", "hth-base", "hth-5b"} <= set(sizes)
    assert abs(sizes["hth-5b"] / 5.0e9 - 1) <= 0.05, sizes["hth-5b"]
    assert sizes["hth-tiny"] < 1e6 < sizes["hth-small"] < sizes["hth-base"] < sizes["hth-5b"]


def _count(m, *inputs):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # the math SDPA backend decomposes into bmm, which the counter sees (fused CPU kernels are not counted)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, depth=None) as fc:
        m(*inputs)
    return fc


def test_flops_match_torch_flop_counter_attention():
    cfg = ModelConfig(**{**TINY, "pattern": "AA", "max_text_len": 5})
    fc = _count(build_model(cfg), *_inputs())
    assert fc.get_total_flops() == forward_flops(cfg, seq_len=16, batch=2, text_len=5)


def test_flops_match_torch_flop_counter_hydra():
    from megassm.models.accounting import HydraDims

    cfg = ModelConfig(**{**TINY, "pattern": "h", "max_text_len": 5, "chunk_size": 16})
    fc = _count(build_model(cfg), *_inputs())
    counts = fc.get_flop_counts()
    mixer = {str(k): v for k, v in counts["HTHModel.blocks.0.mixer"].items()}
    scan = mixer.pop("aten.bmm")
    hd = HydraDims.of(cfg)
    L, B, d = 16, 2, cfg.d_model
    # projections, conv and fc_D are counted exactly
    projections = B * L * (2 * d * hd.d_in_proj + 2 * hd.conv_dim * cfg.d_conv + 2 * hd.d_inner * hd.nheads
                           + 2 * hd.d_inner * d)
    assert sum(mixer.values()) == projections
    # the whole model: everything but the scan is exact
    predicted = forward_flops(cfg, seq_len=L, batch=B, text_len=5)
    from megassm.models.accounting import mixer_flops_per_token

    predicted_scan = B * L * mixer_flops_per_token(cfg, "h", L) - projections
    assert fc.get_total_flops() - scan == predicted - predicted_scan
    # the reference scan (einsums, B/C repeated per head) does at least the kernel's counted work
    assert predicted_scan <= scan <= 4 * predicted_scan, (scan, predicted_scan)
