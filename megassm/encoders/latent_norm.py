"""Latent normalisation: what the model reads is (vae_latent - shift) * scale, scalar or per channel.

One definition for every place latents cross the VAE boundary: the shard reader normalises what
preprocessing stored (raw VAE latents), sampling / previews / the diffusers pipeline undo it before
decoding. The values come from the VAE's own config (``scaling_factor`` / ``shift_factor``, or
per-channel ``latents_mean`` / ``latents_std`` for Wan-style VAEs) unless given explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LatentNorm:
    """normalised = (latent - shift) * scale; ``scale`` / ``shift``: a float or one float per channel."""

    scale: float | list[float] = 1.0
    shift: float | list[float] = 0.0

    @classmethod
    def from_vae_config(cls, cfg: dict, scale: float | None = None, shift: float | None = None) -> LatentNorm:
        """The VAE config's values (per channel for Wan-style VAEs), each overridden when given."""
        if cfg.get("latents_mean") is not None and cfg.get("latents_std") is not None:
            d_scale: float | list[float] = [1.0 / float(s) for s in cfg["latents_std"]]
            d_shift: float | list[float] = [float(m) for m in cfg["latents_mean"]]
        else:
            d_scale = float(cfg.get("scaling_factor") or 1.0)
            d_shift = float(cfg.get("shift_factor") or 0.0)
        return cls(d_scale if scale is None else float(scale), d_shift if shift is None else float(shift))

    @staticmethod
    def as_tensor(v: float | list[float], device=None) -> Tensor:
        """float32: a scalar tensor, or (C, 1, 1, 1) for per-channel values (broadcasts over (C, T, H, W))."""
        t = torch.as_tensor(v, dtype=torch.float32, device=device)
        return t.view(-1, 1, 1, 1) if t.dim() == 1 else t

    def tensors(self, device=None) -> tuple[Tensor, Tensor]:
        """(scale, shift) as ``as_tensor`` gives them."""
        return self.as_tensor(self.scale, device), self.as_tensor(self.shift, device)

    def normalise_(self, latent: Tensor) -> Tensor:
        """In place: latent (C, T, H, W) or (B, C, T, H, W), float32 -> (latent - shift) * scale."""
        scale, shift = self.tensors(latent.device)
        return latent.sub_(shift).mul_(scale)

    def denormalise(self, z: Tensor) -> Tensor:
        """Model latents (..., C, T, H, W) -> VAE latents z / scale + shift, float32."""
        scale, shift = self.tensors(z.device)
        return z.float() / scale + shift
