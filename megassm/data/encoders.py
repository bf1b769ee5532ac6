"""VAE and text encoder, loaded from local directories only (never downloaded).

``VAEEncoder`` wraps a diffusers autoencoder: image VAEs (AutoencoderKL: (B, 3, H, W)) and
video VAEs (AutoencoderKLWan, AutoencoderKLCogVideoX, ...: (B, 3, T, H, W); an image is one
frame). Its compression factors are measured by encoding a small probe, so any VAE class
with ``encode`` works without a table of architectures.

``TextEncoder`` wraps a transformers encoder + tokenizer (T5EncoderModel and friends, or any
model whose output has ``last_hidden_state``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

# diffusers classes whose encode() takes (B, 3, T, H, W)
VIDEO_VAE_CLASSES = {
    "AutoencoderKLWan", "AutoencoderKLCogVideoX", "AutoencoderKLHunyuanVideo", "AutoencoderKLLTXVideo",
    "AutoencoderKLMochi", "AutoencoderKLAllegro", "AutoencoderKLCosmos", "AutoencoderKLMagvit",
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class EncoderError(ValueError):
    """An encoder directory is missing, incomplete or of an unsupported kind."""


def fingerprint(path: Path) -> str:
    """sha256 of the config files and of the weight files' names and sizes (cheap, not the bytes)."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            rel = str(p.relative_to(path)).encode()
            if p.suffix in (".json", ".txt", ".model"):
                h.update(rel + b"\0" + p.read_bytes())
            else:
                h.update(rel + b"\0" + str(p.stat().st_size).encode())
    return h.hexdigest()[:16]


def _read_config(path: Path, what: str) -> dict:
    cfg = path / "config.json"
    if not path.is_dir():
        raise EncoderError(f"{what} directory {path} does not exist (pass a local save_pretrained directory)")
    if not cfg.is_file():
        raise EncoderError(f"{what} directory {path} has no config.json; expected a diffusers/transformers "
                           "save_pretrained directory (a 'vae' or 'text_encoder' subfolder of a pipeline works)")
    return json.loads(cfg.read_text())


def pick_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda:<local rank> when CUDA is present (srun/torchrun tasks), else cpu."""
    import os

    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


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
        self.latent_scale, self.latent_shift = self._normalisation(cfg, latent_scale, latent_shift)
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

    @staticmethod
    def _normalisation(cfg: dict, scale: float | None, shift: float | None):
        """(scale, shift) with normalised = (latent - shift) * scale; per-channel lists for Wan-style VAEs."""
        if cfg.get("latents_mean") is not None and cfg.get("latents_std") is not None:
            d_scale = [1.0 / float(s) for s in cfg["latents_std"]]
            d_shift = [float(m) for m in cfg["latents_mean"]]
        else:
            d_scale = float(cfg.get("scaling_factor") or 1.0)
            d_shift = float(cfg.get("shift_factor") or 0.0)
        return (d_scale if scale is None else float(scale)), (d_shift if shift is None else float(shift))

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


class TextEncoder:
    """Captions -> hidden states (B, L, D) and mask (B, L), L <= max_length."""

    def __init__(self, path: str | Path, device: torch.device, dtype: torch.dtype, max_length: int = 512,
                 tokenizer_path: str | Path | None = None):
        import transformers

        self.path = Path(path).resolve()
        cfg = _read_config(self.path, "text encoder")
        tok_path = Path(tokenizer_path).resolve() if tokenizer_path else self.path
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(tok_path, local_files_only=True)
        except Exception as e:
            raise EncoderError(f"tokenizer at {tok_path} could not be loaded ({e}); pass --tokenizer DIR "
                               "with the tokenizer's save_pretrained files") from None
        model_type = cfg.get("model_type", "")
        classes = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
        cls = getattr(transformers, classes.get(model_type, "AutoModel"))
        model = cls.from_pretrained(self.path, dtype=dtype, local_files_only=True)
        if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            model = model.get_encoder()
        self.model = model.to(device).eval().requires_grad_(False)
        self.device, self.dtype, self.max_length = device, dtype, int(max_length)
        self.hidden_size = int(getattr(model.config, "d_model", None) or model.config.hidden_size)
        self.identity = {
            "class": type(self.model).__name__, "path": str(self.path),
            "name": cfg.get("_name_or_path") or self.path.name, "fingerprint": fingerprint(self.path),
            "tokenizer": type(self.tokenizer).__name__, "max_length": self.max_length,
            "hidden_size": self.hidden_size, "transformers_version": transformers.__version__,
        }

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """-> hidden (B, L, D) compute dtype, mask (B, L) bool, truncated[i] (caption cut at max_length)."""
        tok = self.tokenizer(captions, padding="longest", truncation=True, max_length=self.max_length,
                             return_tensors="pt", return_overflowing_tokens=False)
        full = self.tokenizer(captions, truncation=False)["input_ids"]
        truncated = [len(ids) > self.max_length for ids in full]
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden, mask.bool(), truncated


def identity_summary(identity: dict[str, Any]) -> dict[str, Any]:
    """The short identity stored in every sample's metadata."""
    return {k: identity[k] for k in ("class", "name", "fingerprint") if k in identity}
