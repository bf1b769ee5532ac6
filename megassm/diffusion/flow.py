"""Rectified flow / flow matching: x_t = (1 - t) x0 + t eps, target v = eps - x0 (t = 1 is noise)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


def _mix64(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps): distinct inputs give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & (2**63 - 1)


def sample_generator(seed: int, sample_index: int) -> torch.Generator:
    """The CPU generator of one training sample's draws, keyed on (seed, global sample index).

    The global sample index counts samples over the whole run (step x global batch + position in the
    step's global batch), so a sample's t, noise and caption dropout are the same whatever the
    micro-batch size, accumulation, data-parallel degree or resume point.
    """
    return torch.Generator().manual_seed(_mix64(seed, sample_index))


@dataclass
class FlowBatch:
    """One micro-batch prepared for the model: inputs, and the target of the velocity loss."""

    xt: Tensor  # (B, C, T, H, W) noisy latents, x0's dtype
    t: Tensor  # (B,) float32: kept out of bf16, whose spacing (2^-8 near 1) aliases the embedding
    text: Tensor  # (B, Lt, text_dim)
    text_mask: Tensor  # (B, Lt) bool, dropped captions all False
    target: Tensor  # (B, C, T, H, W) the velocity eps - x0


def prepare_batch(x0: Tensor, text: Tensor, text_mask: Tensor, cfg: DiffusionConfig, seq_len: int,
                  sample_index: Sequence[int], seed: int) -> FlowBatch:
    """Draw t (logit-normal + shift), noise and caption dropout per sample, from
    ``sample_generator(seed, sample_index[i])``, and build x_t and the target.

    x0 (B, C, T, H, W); text (B, Lt, D); text_mask (B, Lt); sample_index: B global sample indices.
    Ranks of one TP / CP group pass the same indices and so draw the same values.
    """
    B = x0.shape[0]
    if len(sample_index) != B:
        raise ValueError(f"prepare_batch: {len(sample_index)} sample indices for a batch of {B}")
    shift = resolution_shift(cfg, seq_len)
    u, keep, noise = [], [], []
    for idx in sample_index:  # order of draws per sample: t, caption dropout, noise
        g = sample_generator(seed, idx)
        u.append(torch.randn(1, generator=g))
        keep.append(torch.rand(1, generator=g) >= cfg.caption_dropout)
        noise.append(torch.randn(x0.shape[1:], generator=g))
    t = shift_t(torch.sigmoid(torch.cat(u) * cfg.logit_std + cfg.logit_mean), shift).to(x0.device)  # (B,) fp32
    noise = torch.stack(noise).to(x0.device, x0.dtype)
    mask = text_mask & torch.cat(keep).to(text_mask.device)[:, None] if cfg.caption_dropout > 0 else text_mask
    tb = t.view(B, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return FlowBatch((1 - tb) * x0 + tb * noise, t, text, mask, noise - x0)


def velocity_loss(v: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over every element, in fp32."""
    return torch.mean((v.float() - target.float()) ** 2)


def step_loss_scale(batch_samples: int, batch_tokens: int, step_samples: int, step_tokens: int, slots: int,
                    reduction: str) -> float:
    """The factor that turns a micro-batch's mean loss into its share of the step's loss.

    DeepSpeed's gradient is the mean over the step's ``slots`` = grad_accum x dp micro-batches (each backward
    scaled by 1 / grad_accum, the data-parallel all-reduce averaging), which is the step's mean only when
    every micro-batch holds as many samples (tokens) as the others. Scaled by this factor, micro-batch b
    contributes slots x (its share of the step) x its mean, so the step trains the mean over its
    ``step_samples`` samples (reduction "sample") or its ``step_tokens`` tokens ("token"), however the
    global batch is split. A micro-batch is one latent shape, so its mean over samples is also its mean
    over tokens. ``step_samples`` / ``step_tokens`` count the whole step, every replica's micro-batches.
    """
    if reduction == "sample":
        return slots * batch_samples / step_samples
    if reduction == "token":
        return slots * batch_tokens / step_tokens
    raise ValueError(f"loss reduction {reduction!r}; valid: sample, token")


def flow_matching_loss(model: Callable, x0: Tensor, text: Tensor, text_mask: Tensor, cfg: DiffusionConfig,
                       seq_len: int, sample_index: Sequence[int], seed: int) -> Tensor:
    """Mean squared error between predicted and true velocity; draws as in ``prepare_batch``."""
    b = prepare_batch(x0, text, text_mask, cfg, seq_len, sample_index, seed)
    return velocity_loss(model(b.xt, b.t, b.text, b.text_mask), b.target)


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
