"""The VAE: ``VAEEncoder`` wraps a local diffusers autoencoder; ``LatentDecoder`` turns model latents into pixels.

``VAEEncoder`` takes image VAEs (AutoencoderKL: (B, 3, H, W)) and video VAEs (AutoencoderKLWan,
AutoencoderKLCogVideoX, ...: (B, 3, T, H, W); an image is one frame). Its compression factors are
measured by encoding a small probe, so any VAE class with ``encode`` works without a table of
architectures. Its latent normalisation is a ``LatentNorm``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megassm.config.schema import EncoderConfig
from megassm.config.validate import ConfigError
from megassm.encoders.common import EncoderError, _read_config, fingerprint
from megassm.encoders.latent_norm import LatentNorm

# diffusers classes whose encode() takes (B, 3, T, H, W)
VIDEO_VAE_CLASSES = {
    "AutoencoderKLWan", "AutoencoderKLCogVideoX", "AutoencoderKLHunyuanVideo", "AutoencoderKLLTXVideo",
    "AutoencoderKLMochi", "AutoencoderKLAllegro", "AutoencoderKLCosmos", "AutoencoderKLMagvit",
}


class VAEEncoder:
    """A diffusers VAE. pixels in [-1, 1]; latents as the VAE's posterior mean (C, T, H, W)."""

    def __init__(self, path: str | Path, device: torch.device, dtype: torch.dtype,
                 latent_scale: float | None = None, latent_shift: float | None = None, tiling: bool = False):
        import diffusers

        self.path = Path(path).resolve()
        cfg = _read_config(self.path, "VAE")
        self.class_name = cfg.get("_class_name", "")
        cls = getattr(diffusers, self.class_name, None)
        if cls is None or not hasattr(cls, "encode"):
            raise EncoderError(f"VAE {self.path}/config.json: _class_name={self.class_name!r} is not a diffusers "
                               "autoencoder; valid e.g. AutoencoderKL, AutoencoderKLWan, AutoencoderKLCogVideoX")
        self.model = cls.from_pretrained(self.path, torch_dtype=dtype).to(device).eval().requires_grad_(False)
        if tiling and hasattr(self.model, "enable_tiling"):
            self.model.enable_tiling()
        self.device, self.dtype = device, dtype
        self.is_video = self.class_name in VIDEO_VAE_CLASSES
        self.norm = LatentNorm.from_vae_config(cfg, latent_scale, latent_shift)
        self.latent_scale, self.latent_shift = self.norm.scale, self.norm.shift
        self.latent_channels, self.spatial_stride, self.temporal_stride = self._probe()
        if isinstance(self.latent_scale, list) and len(self.latent_scale) != self.latent_channels:
            raise EncoderError(f"VAE {self.path}/config.json: latents_std has {len(self.latent_scale)} entries "
                               f"but the VAE has {self.latent_channels} latent channels; pass "
                               "--latent-scale/--latent-shift")
        self.identity = {
            "class": self.class_name, "path": str(self.path), "name": cfg.get("_name_or_path") or self.path.name,
            "fingerprint": fingerprint(self.path), "latent_channels": self.latent_channels,
            "spatial_stride": self.spatial_stride, "temporal_stride": self.temporal_stride,
            "video": self.is_video, "diffusers_version": diffusers.__version__,
        }

    @torch.no_grad()
    def _probe(self) -> tuple[int, int, int]:
        s = 64
        z = self.encode(torch.zeros(1, 3, 1, s, s))
        c, spatial = z.shape[1], s // z.shape[-1]
        temporal = 1
        if self.is_video:
            zt = self.encode(torch.zeros(1, 3, 9, s, s))
            temporal = 8 // max(1, zt.shape[2] - 1)
        return c, spatial, temporal

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: (B, 3, T, H, W) in [-1, 1] -> latents (B, C, T', H', W') in the compute dtype."""
        assert pixels.dim() == 5 and pixels.shape[1] == 3, f"pixels must be (B, 3, T, H, W), got {pixels.shape}"
        x = pixels.to(self.device, self.dtype)
        if not self.is_video:
            b, _, t, h, w = x.shape
            x = x.transpose(1, 2).reshape(b * t, 3, h, w)  # (B*T, 3, H, W): frames independently
        out = self.model.encode(x)
        z = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latents
        if not self.is_video:
            z = z.reshape(b, t, *z.shape[1:]).transpose(1, 2)  # (B, C, T, H', W')
        return z

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, C, T, H, W) as stored -> pixels (B, 3, T', H, W) in [-1, 1], float32."""
        z = latents.to(self.device, self.dtype)
        if not self.is_video:
            b, c, t, h, w = z.shape
            x = self.model.decode(z.transpose(1, 2).reshape(b * t, c, h, w)).sample
            return x.reshape(b, t, *x.shape[1:]).transpose(1, 2).float()
        return self.model.decode(z).sample.float()


class LatentDecoder:
    """builtin:pixels (latents are pixels in [-1, 1]) or a local diffusers VAE directory.

    Model latents are normalised as in preprocessing (``LatentNorm``), with scale/shift from
    encoders.vae_scale / vae_shift or else the VAE's own config (per channel for Wan-style VAEs).
    """

    def __init__(self, enc: EncoderConfig, device: torch.device, dtype: torch.dtype = torch.float32):
        self.vae = None
        self.factor, self.temporal_factor = 1, 1
        if enc.vae == "builtin:pixels":
            return
        if not Path(enc.vae).is_dir():
            raise ConfigError(f"encoders.vae={enc.vae!r} is not a local directory; give a saved diffusers VAE "
                              "or 'builtin:pixels'")
        self.vae = VAEEncoder(enc.vae, device, dtype, latent_scale=enc.vae_scale, latent_shift=enc.vae_shift,
                              tiling=True)  # tiling keeps 2K / long-video decoding within memory
        self.factor, self.temporal_factor = self.vae.spatial_stride, self.vae.temporal_stride

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, T, h, w) model latents -> (B, T', 3, H, W) pixels in [0, 1] on the CPU."""
        if self.vae is None:
            pix = latents.float()
        else:
            pix = self.vae.decode(self.vae.norm.denormalise(latents))  # (B, 3, T', H, W) in [-1, 1]
        return ((pix.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4).cpu()
