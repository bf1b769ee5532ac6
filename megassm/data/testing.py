"""Tiny random-weight encoders and media files for tests, demos and benchmarks.

Everything is built locally and saved with ``save_pretrained`` so that code under test loads
it back through ``from_pretrained(path)`` exactly as it would a real checkpoint.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch


def make_tiny_vae(path: str | Path, latent_channels: int = 4, seed: int = 0) -> Path:
    """diffusers AutoencoderKL, 2 blocks (spatial stride 2), ~40k parameters."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels,
                        norm_num_groups=4, layers_per_block=1, sample_size=32, scaling_factor=0.5,
                        shift_factor=0.1)
    vae.save_pretrained(path)
    return Path(path)


def make_tiny_video_vae(path: str | Path, latent_channels: int = 4, seed: int = 0) -> Path:
    """diffusers AutoencoderKLWan: spatial stride 4, temporal stride 2, per-channel mean/std."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=8, z_dim=latent_channels, dim_mult=[1, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True],
                           latents_mean=[0.1 * i for i in range(latent_channels)],
                           latents_std=[1.0 + 0.5 * i for i in range(latent_channels)])
    vae.save_pretrained(path)
    return Path(path)


def make_tiny_text_encoder(path: str | Path, d_model: int = 32, seed: int = 0) -> Path:
    """transformers T5EncoderModel (2 layers) + ByT5Tokenizer (byte-level: no vocab file)."""
    return make_text_encoder(path, dict(vocab_size=384, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                                        num_heads=4, dropout_rate=0.0), seed=seed)


def make_text_encoder(path: str | Path, t5_config: dict, seed: int = 0, dtype: torch.dtype = torch.float32,
                      device: str = "cpu") -> Path:
    """A random transformers T5EncoderModel of any shape (``t5_config``: T5Config keywords, e.g. T5-v1.1-XXL's),
    built on ``device`` and saved in ``dtype`` (safetensors), + ByT5Tokenizer (byte-level: no vocab file, ids
    below 384, so any vocab_size >= 384 works). Nothing is downloaded."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = T5EncoderModel(T5Config(**t5_config))
    model.to(dtype).save_pretrained(path)
    ByT5Tokenizer().save_pretrained(path)
    return Path(path)


def random_image(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth random RGB image (uint8 HxWx3): gradients + a square, not white noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    img = np.stack([np.sin(6 * (xx * rng.uniform(0.5, 2) + yy * rng.uniform(-1, 1)) + rng.uniform(0, 6))
                    for _ in range(3)], -1)
    img = (img * 0.5 + 0.5) * 255
    y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
    img[y0:y0 + height // 3, x0:x0 + width // 3] = rng.integers(0, 255, 3)
    return img.astype(np.uint8)


def write_image(path: str | Path, height: int, width: int, seed: int, caption: str | None = None) -> Path:
    """PNG / JPEG (by suffix) written by PIL, with an optional sidecar caption .txt."""
    from PIL import Image

    path = Path(path)
    Image.fromarray(random_image(height, width, seed)).save(path, quality=95)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def write_video(path: str | Path, frames: int, fps: int, height: int, width: int, seed: int,
                caption: str | None = None) -> Path:
    """An MP4 (H.264 via PyAV, lossless-ish crf 0) of a moving pattern."""
    import av

    path = Path(path)
    base = random_image(height, width + frames * 2, seed)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv444p"
        s.options = {"crf": "0", "preset": "ultrafast"}
        for i in range(frames):
            fr = av.VideoFrame.from_ndarray(np.ascontiguousarray(base[:, 2 * i:2 * i + width]), format="rgb24")
            for pkt in s.encode(fr):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def corrupt_copy(src: str | Path, dst: str | Path, mode: str) -> Path:
    """'truncate' (first 40% of the bytes) or 'garbage' (random bytes with the same name)."""
    data = Path(src).read_bytes()
    out = data[: int(len(data) * 0.4)] if mode == "truncate" else np.random.default_rng(0).bytes(len(data))
    Path(dst).write_bytes(out)
    return Path(dst)


def image_bytes(height: int, width: int, seed: int, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(random_image(height, width, seed)).save(buf, format=fmt)
    return buf.getvalue()


def write_synthetic_dataset(out: str | Path, shapes: list[tuple[int, int, int, int]], num_samples: int,
                            samples_per_shard: int, text_dim: int = 32, max_text: int = 12, seed: int = 0,
                            dtype: torch.dtype = torch.bfloat16, latent_scale=1.0, latent_shift=0.0,
                            text_tokens: int | None = None) -> dict:
    """Shards + manifest of random latents, no encoders needed (reader tests, benchmarks).

    Sample i has latent shape ``shapes[i % len(shapes)]``, caption ``"sample {i}"``, a text
    embedding of 1..max_text valid tokens (or exactly ``text_tokens``), seeded random values.
    """
    from megassm.data.format import LatentSample, shape_key
    from megassm.data.manifest import PROGRESS_DIR, RUN_INFO, try_finalize
    from megassm.data.writer import LatentShardWriter, atomic_write_json

    out = Path(out)
    (out / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    n_tasks = (num_samples + samples_per_shard - 1) // samples_per_shard
    c = shapes[0][0]
    ident = {"class": "synthetic", "name": "synthetic", "fingerprint": "0" * 16, "path": "",
             "latent_channels": c, "hidden_size": text_dim}
    atomic_write_json(out / PROGRESS_DIR / RUN_INFO, {
        "num_tasks": n_tasks, "settings": {"synthetic": True}, "vae": ident, "text_encoder": ident,
        "latent_scale": latent_scale, "latent_shift": latent_shift,
        "dtype": {"latent": str(dtype), "text": str(dtype)}})
    for t in range(n_tasks):
        w = LatentShardWriter(out / f"shard-{t:06d}.tar")
        for i in range(t * samples_per_shard, min(num_samples, (t + 1) * samples_per_shard)):
            shape = shapes[i % len(shapes)]
            n = text_tokens or 1 + i % max_text
            w.write(LatentSample(f"s{i:07d}", torch.randn(shape, generator=g).to(dtype),
                                 torch.randn(n, text_dim, generator=g).to(dtype), torch.ones(n, dtype=torch.bool),
                                 {"caption": f"sample {i}", "source": f"synthetic/{i}", "shape": shape_key(shape)}))
        entry = w.close()
        atomic_write_json(out / PROGRESS_DIR / f"shard-{t:06d}.json",
                          {"task": t, "shard": entry, "items": entry["samples"], "skipped": []})
    return try_finalize(out)
