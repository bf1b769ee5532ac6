"""``megassm inspect data DIR``: what a latent dataset holds, optionally verified and decoded to PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from megassm.data.format import FormatError, load_tensors
from megassm.data.tario import iter_samples


def _fmt(v: float | list[float]) -> str:
    return f"[{', '.join(f'{x:.6g}' for x in v)}]" if isinstance(v, list) else f"{v:.6g}"


def describe(m: dict[str, Any], path: str) -> str:
    """Human-readable summary of a manifest."""
    gib = m.get("total_bytes", 0) / 2**30
    lines = [f"dataset {path}  (format {m['format']} v{m['format_version']}, {m.get('created_by', '?')})",
             f"  {m['num_samples']} samples in {m['num_shards']} shards, {gib:.3f} GiB",
             "  latent shapes (C x T x H x W):"]
    total = max(1, m["num_samples"])
    for shape, n in m["shape_histogram"].items():
        lines.append(f"    {shape:>18}  {n:>10}  {100 * n / total:5.1f}%")
    v, t = m["vae"], m["text_encoder"]
    lines += [f"  VAE:          {v.get('class')} {v.get('name')} (fingerprint {v.get('fingerprint')}, "
              f"stride {v.get('temporal_stride', 1)}x{v.get('spatial_stride', '?')}x{v.get('spatial_stride', '?')})",
              f"  text encoder: {t.get('class')} {t.get('name')} (fingerprint {t.get('fingerprint')}, "
              f"dim {t.get('hidden_size')}, tokenizer {t.get('tokenizer')}, max length {t.get('max_length')})",
              f"  latent normalisation: (x - {_fmt(m['latent_shift'])}) * {_fmt(m['latent_scale'])}",
              f"  stored dtypes: {m.get('dtype')}"]
    p = m.get("preprocess", {})
    if "buckets" in p:
        lines.append(f"  buckets (HxW): {', '.join(f'{h}x{w}' for h, w in p['buckets'])}; "
                     f"frames {p.get('frames')} @ {p.get('fps')} fps")
    inp = m.get("inputs", {})
    if inp:
        lines.append(f"  inputs seen {inp.get('items_seen')}, skipped {inp.get('skipped') or 'none'}"
                     f" (details in {Path(path) / m.get('skip_report', 'skipped.json')})")
    return "\n".join(lines)


def verify(path: str, m: dict[str, Any]) -> tuple[int, list[str]]:
    """Read and decode every sample; (good samples, problems)."""
    good, problems = 0, []
    for s in m["shards"]:
        shard = Path(path) / s["path"]
        errors: list = []
        n = 0
        try:
            with open(shard, "rb") as f:
                for raw in iter_samples(f, 0, str(shard), errors=errors):
                    try:
                        load_tensors(raw.key, raw.st_bytes, str(shard))
                        n += 1
                    except FormatError as e:
                        problems.append(str(e))
        except OSError as e:
            problems.append(f"{shard}: {e}")
        problems += [f"{reason}: {msg}" for reason, msg in errors]
        if n != s["samples"]:
            problems.append(f"{shard}: {n} readable samples, manifest says {s['samples']}")
        good += n
    return good, problems


def decode_previews(path: str, m: dict[str, Any], vae_path: str, count: int, out: Path,
                    device: str = "auto") -> list[Path]:
    """Decode the first ``count`` samples through the VAE; one PNG each (video: up to 8 frames side by side)."""
    import torch
    from PIL import Image

    from megassm.encoders import VAEEncoder, pick_device

    dev = pick_device(device)
    vae = VAEEncoder(vae_path, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if vae.identity["fingerprint"] != m["vae"].get("fingerprint"):
        print(f"warning: --vae {vae_path} differs from the VAE that wrote {path} ({m['vae'].get('path')}); "
              "previews may be meaningless")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for s in m["shards"]:
        shard = Path(path) / s["path"]
        with open(shard, "rb") as f:
            for raw in iter_samples(f, 0, str(shard)):
                if len(written) >= count:
                    return written
                latent = load_tensors(raw.key, raw.st_bytes, str(shard))["latent"]  # (C, T, H, W) as stored
                px = vae.decode(latent[None].float())[0]  # (3, T, H, W) in [-1, 1]
                frames = px.permute(1, 2, 3, 0).clamp(-1, 1).add(1).mul(127.5).round().byte().cpu().numpy()
                idx = np.linspace(0, len(frames) - 1, min(8, len(frames))).round().astype(int)
                strip = np.concatenate([frames[i] for i in idx], axis=1)  # (H, k*W, 3)
                p = out / f"{len(written):03d}_{raw.key.replace('/', '_')}.png"
                Image.fromarray(strip).save(p)
                written.append(p)
    return written
