"""hth-5b at full depth on one GPU: the sampler's cost at the paper's sizes (issue 35 §2), hybrid vs all-attention.

    python benchmarks/full_size_sample.py --out benchmarks/results/full_size_sample_<card>.json

For each model -- hth-5b as the stage configs set it (32 blocks, 5.12B parameters, the stage's scan pattern) and
an all-attention hth-5b of equal depth and width -- built in bf16 on the GPU with random weights (nothing is
downloaded, no checkpoint is written), at the stage configs' sampling shapes:

    2048 x 2048 image   stage2_2k's latent 1 x 256 x 256 (VAE x8), 16,384 tokens
    360p x 129 frames   stage3_video's latent 33 x 44 x 80 (VAE x8 x4), 29,040 tokens

it times ``megassm.sample.denoise`` -- the function ``megassm sample`` runs, Euler with the stage's shift --
per denoising step with classifier-free guidance (both branches as one batch of 2) and without, and reads the
peak GPU memory; the total for the config's ``diffusion.sample_steps`` and ``cfg_scale`` is steps x the
per-step time. Then the full-size Wan VAE (diffusers ``AutoencoderKLWan()`` defaults, random) decodes one
image and one 129-frame clip through ``LatentDecoder`` (tiled), and a T5-XXL-shaped encoder (random, bf16)
encodes 300 tokens: the other two parts of a sample's time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {"image_2048": ("configs/stage2_2k.yaml", (1, 256, 256)), "video_360p_129f": ("configs/stage3_video.yaml",
                                                                                           (33, 44, 80))}


def cuda_ms(fn, reps: int = 1) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def build(cfg, pattern: str | None):
    from megassm.models import build_model

    mcfg = cfg.model if pattern is None else type(cfg.model)(**{**vars(cfg.model), "pattern": pattern})
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    with torch.device("cuda"):
        model = build_model(mcfg)
    model = model.to(torch.bfloat16).eval()
    torch.cuda.synchronize()
    n = sum(p.numel() for p in model.parameters())
    return model, n, time.time() - t0


def time_denoise(model, cfg, latent: tuple[int, int, int], steps: int) -> dict:
    from megassm.sample import denoise

    C = cfg.model.in_channels
    text = torch.randn(1, cfg.model.max_text_len, cfg.model.text_dim, dtype=torch.bfloat16)
    mask = torch.zeros(1, cfg.model.max_text_len, dtype=torch.bool)
    mask[:, :24] = True  # a 24-token caption
    noise = torch.randn(1, C, *latent)
    out = {}
    for name, scale in (("cfg", cfg.diffusion.cfg_scale), ("no_cfg", 1.0)):
        def run(k: int, scale: float = scale) -> torch.Tensor:
            return denoise(model, cfg, noise, text, mask, k, scale, device=torch.device("cuda"), dtype=torch.bfloat16)

        run(1)  # compile / autotune at this shape
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        got = []
        ms = cuda_ms(lambda run=run, got=got: got.append(run(steps))) / steps
        x = got[-1]
        assert torch.isfinite(x).all(), "the sampler produced non-finite latents"
        out[name] = {"ms_per_step": round(ms, 1), "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                     "activation_peak_gb": round((torch.cuda.max_memory_allocated() - base) / 2**30, 2)}
    steps_cfg = cfg.diffusion.sample_steps
    out["config_total_s"] = round(out["cfg" if cfg.diffusion.cfg_scale != 1 else "no_cfg"]["ms_per_step"]
                                  * steps_cfg / 1e3, 1)
    out["config_steps"], out["config_cfg_scale"] = steps_cfg, cfg.diffusion.cfg_scale
    return out


def time_vae(work: Path) -> dict:
    from diffusers import AutoencoderKLWan

    from megassm.config.schema import EncoderConfig
    from megassm.encoders.vae import LatentDecoder

    path = work / "wan_vae"
    if not path.exists():
        AutoencoderKLWan().save_pretrained(path)
    dec = LatentDecoder(EncoderConfig(vae=str(path), text_encoder="unused"), torch.device("cuda"), torch.bfloat16)
    out = {}
    for name, (_, latent) in SHAPES.items():
        z = torch.randn(1, 16, *latent, device="cuda")
        dec(z[:, :, :1, :32, :32])  # warm-up
        torch.cuda.reset_peak_memory_stats()
        got = []
        ms = cuda_ms(lambda z=z, got=got: got.append(dec(z)))
        pix = got[-1]
        out[name] = {"decode_s": round(ms / 1e3, 2), "pixels": list(pix.shape),
                     "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    return out


def time_t5() -> dict:
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                   feed_forward_proj="gated-gelu", dropout_rate=0.0)
    t0 = time.time()
    with torch.device("cuda"):
        enc = T5EncoderModel(cfg).to(torch.bfloat16).eval()
    built = time.time() - t0
    ids = torch.randint(0, 32128, (2, 300), device="cuda")
    with torch.no_grad():
        enc(input_ids=ids)
        ms = cuda_ms(lambda: enc(input_ids=ids), reps=3)
    n = sum(p.numel() for p in enc.parameters())
    return {"params": n, "build_s": round(built, 1), "encode_2x300_ms": round(ms, 1)}


def main() -> int:
    from megassm.run_config import load_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3, help="denoising steps timed per setting")
    ap.add_argument("--work", default="/tmp/megassm_full_size")
    ap.add_argument("--parts", default="models,vae,t5")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}

    def dump():
        Path(args.out).write_text(json.dumps(res, indent=1))

    if "models" in args.parts:
        for shape, (config, latent) in SHAPES.items():
            cfg = load_config(config, ["encoders.vae=unused", "encoders.text_encoder=unused"])
            depth = len(cfg.model.pattern)
            for kind, pattern in (("hybrid", None), ("all_attention", "A" * depth)):
                model, n, build_s = build(cfg, pattern)
                row = {"shape": shape, "model": kind, "pattern": pattern or cfg.model.pattern, "params": n,
                       "tokens": math.prod(model.patch_embed.grid((1, cfg.model.in_channels, *latent))),
                       "build_s": round(build_s, 1), **time_denoise(model, cfg, latent, args.steps)}
                res["rows"].append(row)
                print(json.dumps(row), flush=True)
                del model
                torch.cuda.empty_cache()
                dump()
    if "vae" in args.parts:
        res["wan_vae"] = time_vae(work)
        print("wan_vae", json.dumps(res["wan_vae"]), flush=True)
        dump()
    if "t5" in args.parts:
        res["t5_xxl"] = time_t5()
        print("t5_xxl", json.dumps(res["t5_xxl"]), flush=True)
        dump()
    return 0


if __name__ == "__main__":
    sys.exit(main())
