"""Patch embedding, timestep embedding and axial rotary position embeddings."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """Latents (B, C, T, H, W) -> tokens (B, L, d), L = T/pt * H/ph * W/pw, row-major (t, h, w).

    A linear map of each flattened (C, pt, ph, pw) patch -- the same function as a strided Conv3d,
    shared by images (T = 1) and video.
    """

    def __init__(self, in_channels: int, patch_size: tuple[int, int, int], d_model: int, abs_pos: bool = False):
        super().__init__()
        self.in_channels, self.patch_size, self.abs_pos = in_channels, tuple(patch_size), abs_pos
        self.proj = nn.Linear(in_channels * math.prod(self.patch_size), d_model)

    def grid(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """Token grid (T', H', W') for a latent of shape (B, C, T, H, W); raises on bad shapes."""
        if len(shape) != 5:
            raise ValueError(f"latents must be (B, C, T, H, W), got shape {tuple(shape)}")
        if shape[1] != self.in_channels:
            raise ValueError(f"latents have {shape[1]} channels, the model expects {self.in_channels}")
        out = []
        for name, size, p in zip("THW", shape[2:], self.patch_size):
            if size % p:
                raise ValueError(
                    f"latent {name}={size} is not divisible by the patch size {p} "
                    f"(patch_size={list(self.patch_size)}); use a multiple of {p}"
                )
            out.append(size // p)
        return tuple(out)

    def forward(self, x: Tensor) -> Tensor:
        B, C = x.shape[:2]
        T, H, W = self.grid(x.shape)
        pt, ph, pw = self.patch_size
        x = x.reshape(B, C, T, pt, H, ph, W, pw)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, T * H * W, C * pt * ph * pw)  # (B, L, C*pt*ph*pw)
        x = self.proj(x)
        if self.abs_pos:
            x = x + sincos_position((T, H, W), x.shape[-1], x.device).to(x.dtype)
        return x


def sincos_position(grid: tuple[int, int, int], dim: int, device=None) -> Tensor:
    """Fixed axial 3D sin-cos embedding of each token's (t, h, w): (L, dim), canonical token order."""
    angles = rope_axial(grid, dim - dim % 2, theta=10000.0, device=device)  # (L, dim // 2)
    return torch.nn.functional.pad(torch.cat([angles.sin(), angles.cos()], dim=-1), (0, dim % 2))


def unpatchify(x: Tensor, grid: tuple[int, int, int], patch_size, channels: int) -> Tensor:
    """(B, L, C*pt*ph*pw) -> (B, C, T, H, W); inverse of PatchEmbed's reshape."""
    B = x.shape[0]
    T, H, W = grid
    pt, ph, pw = patch_size
    x = x.reshape(B, T, H, W, channels, pt, ph, pw)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(B, channels, T * pt, H * ph, W * pw)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000). t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


class TimestepEmbedder(nn.Module):
    def __init__(self, d_model: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, d_model), nn.SiLU(), nn.Linear(d_model, d_model))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


def _axis_split(head_dim: int, n_axes: int) -> list[int]:
    """Split head_dim into n_axes even parts (time gets the remainder first)."""
    base = (head_dim // n_axes) // 2 * 2
    parts = [base] * n_axes
    parts[0] += head_dim - sum(parts)
    return parts


def rope_axial(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0, device=None) -> Tensor:
    """Axial 3D RoPE angles for a (T, H, W) grid in canonical order: (L, head_dim // 2).

    Images (T = 1) get the same spatial frequencies as video frames, so image-stage weights
    carry over to video. Each axis owns an even slice of the head dimension.
    """
    T, H, W = grid
    parts = _axis_split(head_dim, 3)
    coords = torch.stack(
        torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij"), dim=-1
    ).reshape(-1, 3).to(device=device, dtype=torch.float32)  # (L, 3)
    angles = []
    for axis, dim in enumerate(parts):
        if dim == 0:
            continue
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
        angles.append(coords[:, axis : axis + 1] * freqs[None])  # (L, dim/2)
    return torch.cat(angles, dim=-1)  # (L, head_dim/2)


def apply_rope(x: Tensor, angles: Tensor, tokens_first: bool = False) -> Tensor:
    """x: (B, heads, L, hd), or (B, L, heads, hd) with ``tokens_first``; angles: (L, hd/2). Rotates interleaved
    pairs, computed in fp32."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    shape = (1, -1, 1, angles.shape[-1]) if tokens_first else (1, 1, -1, angles.shape[-1])
    cos, sin = angles.cos().view(shape), angles.sin().view(shape)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.reshape_as(x).to(x.dtype)
