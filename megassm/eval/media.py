"""Reference sets and generated media as lists of clips (T, 3, H, W) in [0, 1] (an image is a 1-frame clip),
and the feature networks applied to them: InceptionV3 over every frame, a video network over whole clips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from megassm.eval.inception import MissingWeightsError, image_features

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv")


def _read_video(path: Path) -> Tensor:
    import av

    with av.open(str(path)) as f:
        frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255  # (T, H, W, 3) -> (T, 3, H, W)


def _read_image(path: Path) -> Tensor:
    from PIL import Image

    arr = np.asarray(Image.open(path).convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 255  # (H, W, 3) -> (1, 3, H, W)


def load_reference(path: str | Path, cfg=None, limit: int | None = None) -> list[Tensor]:
    """The clips (T, 3, H, W) in [0, 1] of a reference set: a directory of images / videos (recursive, sorted by
    name), or a shard dataset written by `megassm preprocess` (its latents decoded with ``cfg.encoders``)."""
    from megassm.data.format import MANIFEST_NAME

    path = Path(path)
    if not path.is_dir():
        raise MissingWeightsError(f"reference set {path} is not a directory of images / videos or a shard dataset")
    if (path / MANIFEST_NAME).is_file():
        from megassm.encoders import LatentDecoder
        from megassm.eval.heldout import heldout_batches

        assert cfg is not None, "a shard reference set needs the run config (its VAE decodes the latents)"
        decoder = LatentDecoder(cfg.encoders, torch.device("cpu"))
        out = []
        for b in heldout_batches(cfg, [str(path)], samples=limit or 10**9, batch_size=8):
            out += list(decoder(b["latents"]))  # (B, T', 3, H, W)
        return out
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES)
    if not files:
        raise MissingWeightsError(f"reference set {path} holds no images ({', '.join(IMAGE_SUFFIXES)}) or videos")
    files = files[:limit] if limit else files
    return [_read_video(f) if f.suffix.lower() in VIDEO_SUFFIXES else _read_image(f) for f in files]


def frame_features(net: torch.nn.Module, clips: list[Tensor]) -> Tensor:
    """Inception features (sum of T_i, D) of every frame of every clip (FID / KID over frames)."""
    return torch.cat([image_features(net, c) for c in clips])


def load_video_features(path: str | Path, device: torch.device) -> torch.nn.Module:
    """A video network: videos (N, T, 3, H, W) in [0, 1] -> features (N, D), resizing and normalising inside
    (e.g. I3D, wrapped), saved with torch.export.save (``.pt2``) or as TorchScript (torch.jit.save)."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"video feature model not found at {path} (nothing is downloaded): give a "
                                  "torch.export (.pt2) or TorchScript file mapping (N, T, 3, H, W) videos in [0, 1] "
                                  "to (N, D) features")
    if path.suffix == ".pt2":
        return torch.export.load(str(path)).module().to(device)
    return torch.jit.load(str(path), map_location=device).eval()


@torch.no_grad()
def clip_features(net: torch.nn.Module, clips: list[Tensor], device: torch.device) -> Tensor:
    """Video features (N, D) float32 of N clips, one clip at a time (they may differ in length and size)."""
    return torch.cat([net(c[None].to(device)).float().cpu() for c in clips])
