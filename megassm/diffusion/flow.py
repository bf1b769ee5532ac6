"""Rectified flow / flow matching: x_t = (1 - t) x0 + t eps, target v = eps - x0 (t = 1 is noise)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from megassm.config.schema import DiffusionConfig


def resolution_shift(cfg: DiffusionConfig, seq_len: int) -> float:
    """Timestep shift s for a token count: the config's value, else sqrt(L / base) (>= 1).

    Longer sequences keep more signal at a given noise level, so training and sampling spend
    more time at high noise (SD3 / Open-Sora style shift).
    """
    if cfg.shift is not None:
        return float(cfg.shift)
    return max(1.0, math.sqrt(seq_len / cfg.shift_base_tokens))


def shift_t(t: Tensor, s: float) -> Tensor:
    return s * t / (1 + (s - 1) * t)


def sample_t(cfg: DiffusionConfig, batch: int, seq_len: int, generator=None, device=None) -> Tensor:
    """Logit-normal t in (0, 1), then the resolution shift. (B,)"""
    u = torch.randn(batch, generator=generator, device=device) * cfg.logit_std + cfg.logit_mean
    return shift_t(torch.sigmoid(u), resolution_shift(cfg, seq_len))


def drop_captions(text_mask: Tensor, p: float, generator=None) -> Tensor:
    """Return a mask whose dropped rows are all False (the model then uses its null caption)."""
    if p <= 0:
        return text_mask
    # drawn on the CPU (the generator's device) so the same seed gives the same drops on any device
    keep = (torch.rand(text_mask.shape[0], generator=generator) >= p).to(text_mask.device)
    return text_mask & keep[:, None]


def flow_matching_loss(
    model: Callable, x0: Tensor, text: Tensor, text_mask: Tensor, cfg: DiffusionConfig,
    seq_len: int, generator: torch.Generator | None = None,
) -> Tensor:
    """Mean squared error between predicted and true velocity. All randomness from ``generator``."""
    B = x0.shape[0]
    t = sample_t(cfg, B, seq_len, generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    mask = drop_captions(text_mask, cfg.caption_dropout, generator)
    tb = t.view(B, *([1] * (x0.dim() - 1))).to(x0.dtype)
    xt = (1 - tb) * x0 + tb * noise
    v = model(xt, t.to(x0.dtype), text, mask)
    return torch.mean((v.float() - (noise - x0).float()) ** 2)


@torch.no_grad()
def euler_sample(
    model: Callable, noise: Tensor, text: Tensor, text_mask: Tensor, steps: int, cfg_scale: float,
    shift: float, neg_text: Tensor | None = None, neg_mask: Tensor | None = None,
    progress: Callable | None = None, model_dtype: torch.dtype | None = None,
) -> Tensor:
    """Integrate dx/dt = v from t = 1 (noise) to 0 with classifier-free guidance; returns x (B, ...) float32.

    The state x and the timesteps stay float32 whatever the model computes in: only x is cast to
    ``model_dtype`` (default: ``text``'s dtype) as the model's input, and t goes in as float32 (the
    timestep embedding computes in fp32). A bf16 state would round every step's update dt * v against
    x, and a bf16 t holds only ~3 significant digits.
    The unconditional branch uses ``neg_text`` if given, else the model's null caption
    (an all-False mask). Both branches run as one batch.
    """
    B = noise.shape[0]
    model_dtype = model_dtype or text.dtype
    ts = shift_t(torch.linspace(1.0, 0.0, steps + 1), shift).tolist()
    if neg_text is None:
        neg_text, neg_mask = torch.zeros_like(text), torch.zeros_like(text_mask)
    use_cfg = cfg_scale != 1.0
    x = noise.float()
    it = range(steps) if progress is None else progress(range(steps))
    for i in it:
        t, t_next = ts[i], ts[i + 1]
        tt = torch.full((B,), t, device=x.device, dtype=torch.float32)
        xin = x.to(model_dtype)
        if use_cfg:
            v = model(torch.cat([xin, xin]), torch.cat([tt, tt]), torch.cat([text, neg_text]),
                      torch.cat([text_mask, neg_mask])).float()
            v_c, v_u = v.chunk(2)
            v = v_u + cfg_scale * (v_c - v_u)
        else:
            v = model(xin, tt, text, text_mask).float()
        x = x + (t_next - t) * v
    return x
