"""``megassm sample`` end to end with the full hth-5b on one GPU, through the real CLI (issue 35 §2).

    python benchmarks/full_size_sample_cli.py --out benchmarks/results/full_size_sample_cli_<card>.json
    python benchmarks/full_size_sample_cli.py --tiny --out /tmp/tiny.json     # miniature, CPU, < 1 min

Nothing is downloaded. Under --work (one disk, about 20 GB at full size; the JSON records it; removed at the end
unless --keep, which also lets a later call with --only reuse it):

1. ``ckpt_stage2_2k_image``: a consolidated checkpoint (``model.safetensors`` shards + config + meta.json, bf16)
   of hth-5b as configs/stage2_2k.yaml sets it, each tensor drawn by the partitioned build's seeded initialiser
   (``megassm.models.init.init_full``) and streamed to disk by ``write_consolidated``: no model in memory;
   ``ckpt_stage3_video_360p_129f``: the same weight files (hard links) under stage3_video's config (its scan pattern);
2. ``t5_xxl``: a transformers T5EncoderModel of T5-v1.1-XXL's shape (random, bf16 safetensors) with a byte-level
   tokenizer (``megassm.data.testing.make_text_encoder``); ``wan_vae``: diffusers ``AutoencoderKLWan()`` defaults;
3. ``python -m megassm sample`` as a user types it, at the stage configs' sampling shapes and sampler settings
   (``diffusion.sample_steps``, ``cfg_scale``): stage2_2k at 2048x2048, stage3_video at 352x640 x 129 frames
   (latent 33 x 44 x 80), with --save-latents. Per run: exit code, wall time, whether the final latents are
   finite, the CLI's own timing line (load / encode / denoise / decode seconds, peak GPU memory allocated by torch),
   the peak of ``nvidia-smi``'s memory.used polled in a side thread, the files written and their sizes, and
   ``megassm plan --sample --json`` for the same config and token count (the weights of all three models and
   the denoiser's activations; not the VAE decode's working set).

One JSON goes to --out, one line per run is printed, and the exit code is 1 if any run failed (or wrote no image /
video, or non-finite latents).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# T5-v1.1-XXL's encoder (google/t5-v1_1-xxl config.json): 24 layers, 4096 wide, 64 heads, gated-GELU FFN
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", dropout_rate=0.0)
T5_TINY = dict(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0)
# run name -> (config, --size, --frames); full size: the stage configs' sampling shapes
RUNS = {"stage2_2k_image": ("configs/stage2_2k.yaml", "2048x2048", 1),
        "stage3_video_360p_129f": ("configs/stage3_video.yaml", "352x640", 129)}
TINY_RUNS = {"stage2_2k_image": ("configs/stage2_2k.yaml", "32x32", 1),
             "stage3_video_360p_129f": ("configs/stage3_video.yaml", "32x32", 5)}
TINY_MODEL = ["model.d_model=64", "model.num_heads=2", "model.headdim=32", "model.d_state=16", "model.text_dim=32",
              "model.max_text_len=32", "model.in_channels=4", "parallel.cp=1"]
TINY_PATTERN = {"configs/stage2_2k.yaml": "model.pattern=hvAh", "configs/stage3_video.yaml": "model.pattern=htAh"}
PROMPTS = {"image": "a lighthouse on a rocky coast at sunset", "video": "waves rolling onto a sandy beach"}


def du_gb(path: Path) -> float:
    """Bytes on disk under ``path`` (hard links once), GB."""
    seen, total = set(), 0
    for f in path.rglob("*"):
        st = f.lstat()
        if f.is_file() and st.st_ino not in seen:
            seen.add(st.st_ino)
            total += st.st_blocks * 512
    return total / 1e9


def stage_config(config: str, work: Path, tiny: bool):
    from megassm.run_config import load_config

    over = [f"encoders.vae={work / 'wan_vae'}", f"encoders.text_encoder={work / 't5_xxl'}", "init_from=null",
            f"run_dir={work / 'runs'}"]
    if tiny:
        over += [*TINY_MODEL, TINY_PATTERN[config]]
    return load_config(str(REPO / config), over)


class SeededWeights:
    """A WeightSet of the model's parameters, each drawn on demand by the partitioned build's initialiser."""

    def __init__(self, model_cfg, seed: int = 0):
        import torch

        from megassm.checkpoint.safetensors_io import TensorSpec
        from megassm.models import build_model

        with torch.device("meta"):
            shapes = {n: tuple(p.shape) for n, p in build_model(model_cfg).named_parameters()}
        self.specs = {n: TensorSpec(s, torch.float32) for n, s in shapes.items()}
        self.cfg, self.seed = model_cfg, seed

    def read(self, name: str):
        from megassm.models.init import init_full

        return init_full(name, tuple(self.specs[name].shape), self.cfg, self.seed)


def write_checkpoints(work: Path, runs: dict, tiny: bool) -> dict:
    """One consolidated bf16 checkpoint per stage config; all share the first one's weight files (hard links)."""
    import torch

    from megassm.checkpoint.writers import write_config, write_consolidated
    from megassm.config.load import to_dict

    out = {}
    # an earlier call's checkpoint under --work (--keep, --only): its weight files are this one's too
    first = next((m.parent for m in sorted(work.glob("ckpt_*/meta.json"))), None)
    for name, (config, _, _) in runs.items():
        cfg, d = stage_config(config, work, tiny), work / f"ckpt_{name}"
        t0 = time.time()
        if not (d / "meta.json").is_file():
            if first is None:
                write_consolidated(d, SeededWeights(cfg.model), None, to_dict(cfg), {"step": 0, "source": "seeded"},
                                   dtype=torch.bfloat16, force=True)
            else:  # same parameter names and shapes (only the scan pattern differs): hard links, no new bytes
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(parents=True)
                for f in first.glob("model*"):
                    os.link(f, d / f.name)
                write_config(d, to_dict(cfg))
                os.link(first / "meta.json", d / "meta.json")  # last: the mark of a complete directory
        first = first or d
        out[name] = {"path": str(d), "seconds": round(time.time() - t0, 1), "disk_gb": round(du_gb(d), 2),
                     "params": json.loads((d / "meta.json").read_text())["parameters"]}
        print(f"checkpoint {d}: {out[name]['params'] / 1e6:,.1f}M parameters in {out[name]['seconds']} s", flush=True)
    return out


def write_encoders(work: Path, tiny: bool, device: str) -> dict:
    """The T5-shaped text encoder (bf16) + tokenizer and the Wan VAE, written once."""
    import torch

    from megassm.data.testing import make_text_encoder, make_tiny_video_vae

    res = {}
    t0 = time.time()
    if not (work / "t5_xxl" / "config.json").is_file():
        make_text_encoder(work / "t5_xxl", T5_TINY if tiny else T5_XXL, dtype=torch.bfloat16, device=device)
        if device == "cuda":  # give the float32 build's 19 GB back: the CLI runs in another process on this GPU
            torch.cuda.empty_cache()
    res["t5"] = {"seconds": round(time.time() - t0, 1), "disk_gb": round(du_gb(work / "t5_xxl"), 2)}
    t0 = time.time()
    if not (work / "wan_vae" / "config.json").is_file():
        if tiny:
            make_tiny_video_vae(work / "wan_vae", latent_channels=4)
        else:
            from diffusers import AutoencoderKLWan

            AutoencoderKLWan().save_pretrained(work / "wan_vae")
    res["vae"] = {"seconds": round(time.time() - t0, 1), "disk_gb": round(du_gb(work / "wan_vae"), 2)}
    return res


def smi_used_mib() -> int | None:
    """``nvidia-smi``'s memory.used of GPU 0 in MiB (None without nvidia-smi or a reading)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10).stdout
        return int(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


class GpuMemoryPoll:
    """Peak of ``smi_used_mib`` while the block runs, polled every 0.5 s, less the reading before it (this
    process's own CUDA context): what the CLI process used. None without nvidia-smi."""

    def __init__(self):
        self.peak_mib, self._stop = None, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            used = smi_used_mib()
            if used is None:
                return
            self.peak_mib = max(self.peak_mib or 0, used - self.baseline)
            self._stop.wait(0.5)

    def __enter__(self):
        self.baseline = smi_used_mib()
        if self.baseline is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def command(cmd: list[str], timeout: int) -> tuple[int, str, float, int | None]:
    """(exit code, stdout + stderr, seconds, nvidia-smi peak MiB) of one CLI process."""
    t0 = time.time()
    with GpuMemoryPoll() as poll:
        try:
            p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
            rc, text = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc, text = 124, f"timed out after {timeout} s: {e.stdout!r}"
    return rc, text, round(time.time() - t0, 1), poll.peak_mib


def predicted(config: str, overrides: list[str], tokens: int) -> dict:
    """``megassm plan CONFIG --gpus 1 --seq-len TOKENS --sample --json``'s sampling prediction."""
    rc, text, _, _ = command([sys.executable, "-m", "megassm", "plan", config, *overrides, "--gpus", "1",
                              "--seq-len", str(tokens), "--sample", "--json"], timeout=300)
    if rc != 0:
        return {"error": f"megassm plan exited {rc}: {text[-500:]}"}
    return json.loads(text[text.index("{"):])["sampling"]


def outputs(out: Path, name: str) -> dict:
    """What one run left in ``out``'s folder: files and sizes, its sidecar, whether its latents are finite."""
    from safetensors.torch import load_file

    files = {f.name: f.stat().st_size for f in sorted(out.parent.glob(f"{name}*"))}
    lat, side = out.with_suffix(".latents.safetensors"), out.with_suffix(".json")
    return {"files": files, "media": [f for f in files if f.endswith((".png", ".mp4"))],
            "finite": bool(load_file(str(lat))["latents"].isfinite().all()) if lat.is_file() else None,
            "side": json.loads(side.read_text()) if side.is_file() else {}}


def sample_run(name: str, spec: tuple, work: Path, args) -> dict:
    """``megassm sample`` of one stage config at its shape, its outputs, and ``megassm plan --sample`` beside it."""
    config, size, frames = spec
    cfg = stage_config(config, work, args.tiny)
    out = work / "out" / f"{name}.{'png' if frames == 1 else 'mp4'}"
    for old in out.parent.glob(f"{name}*"):
        old.unlink()
    prompt = PROMPTS["image" if frames == 1 else "video"]
    cmd = [sys.executable, "-m", "megassm", "sample", str(work / f"ckpt_{name}"), "--prompt", prompt,
           "--size", size, "--frames", str(frames), "--out", str(out), "--vae", str(work / "wan_vae"),
           "--text-encoder", str(work / "t5_xxl"), "--save-latents",
           *(["--steps", str(args.steps)] if args.steps else []), *(["--device", args.device] if args.device else [])]
    rc, text, seconds, smi = command(cmd, args.timeout)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    timing = next((json.loads(ln.split("timing ", 1)[1]) for ln in reversed(lines) if ln.startswith("timing {")), None)
    got = outputs(out, name)
    side = got["side"]
    latent = side.get("latent_size")
    tokens = math.prod(n // p for n, p in zip(latent, cfg.model.patch_size)) if latent else None
    plan_over = [f"encoders.vae={work / 'wan_vae'}", f"encoders.text_encoder={work / 't5_xxl'}", "init_from=null",
                 *(TINY_MODEL + [TINY_PATTERN[config]] if args.tiny else []),
                 *([f"diffusion.sample_steps={args.steps}"] if args.steps else [])]
    ok = rc == 0 and got["media"] and got["finite"]
    plan = predicted(config, plan_over, tokens) if tokens else None
    return {"name": name, "config": config, "rc": 0 if ok else (rc or 1), "cmd": " ".join(cmd[1:]),
            "wall_s": seconds, "size": [int(v) for v in size.split("x")], "frames": frames, "latent": latent,
            "tokens": tokens, "latents_finite": got["finite"], "steps": side.get("steps"),
            "cfg_scale": side.get("cfg_scale"), "shift": side.get("shift"), "cli_timing": timing,
            "nvidia_smi_peak_gib": None if smi is None else round(smi / 1024, 2), "files": got["files"],
            "plan": plan, "vs_plan": vs_plan(timing, plan), "tail": lines[-15:]}


def vs_plan(timing: dict | None, plan: dict | None) -> dict | None:
    """Measured over predicted: denoise seconds, and peak GPU memory (the largest of the encoding, denoise and VAE
    decode peaks: the prediction is the larger of the first two)."""
    if not timing or not plan or "total_s" not in plan:
        return None
    out = {"denoise_s_over_predicted": round(timing["denoise_s"] / plan["total_s"], 3)}
    if "peak_gpu_gib" in timing:
        out["peak_gb_over_predicted"] = round(timing["peak_gpu_gib"] * 2**30 / 1e9 / plan["total_gb"], 3)
    return out


def summary(r: dict) -> str:
    t, p = r["cli_timing"] or {}, r["plan"] or {}
    status = "ok" if r["rc"] == 0 else f"FAILED rc={r['rc']}"
    media = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in r["files"].items() if k.endswith((".png", ".mp4")))
    return (f"== {r['name']}: {status}, wall {r['wall_s']} s; CLI: load {t.get('load_s')} s, encode "
            f"{t.get('encode_s')} s, denoise {t.get('denoise_s')} s ({r['steps']} steps, cfg {r['cfg_scale']}), "
            f"decode {t.get('decode_s')} s, "
            f"peak {t.get('peak_gpu_gib')} GiB (nvidia-smi {r['nvidia_smi_peak_gib']}); plan: "
            f"{p.get('total_gb', float('nan')):.2f} GB, {p.get('total_s', float('nan')):.1f} s; {media or 'no output'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON of the results")
    ap.add_argument("--work", default=None, help="where checkpoints, encoders and outputs go (default: "
                    "/tmp/megassm_full_size_cli, with --tiny /tmp/megassm_full_size_cli_tiny)")
    ap.add_argument("--tiny", action="store_true", help="miniature model, T5 and VAE, 32x32 (CPU, under a minute)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the config's; --tiny: 2)")
    ap.add_argument("--device", default=None, help="megassm sample --device (default: cuda if available)")
    ap.add_argument("--only", default=None, help=f"comma-separated runs of {list(RUNS)}")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per megassm sample")
    ap.add_argument("--keep", action="store_true", help="keep --work afterwards (default: removed at the end)")
    args = ap.parse_args()
    if args.tiny and args.steps is None:
        args.steps = 2
    unknown = set(args.only.split(",")) - set(RUNS) if args.only else set()
    if unknown:
        ap.error(f"--only {args.only}: unknown run(s) {sorted(unknown)}; valid: {', '.join(RUNS)}")
    runs = {k: v for k, v in (TINY_RUNS if args.tiny else RUNS).items() if not args.only or k in args.only.split(",")}
    work = Path(args.work or f"/tmp/megassm_full_size_cli{'_tiny' if args.tiny else ''}")
    (work / "out").mkdir(parents=True, exist_ok=True)
    import torch

    build_device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    res = {"tiny": args.tiny, "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "work": str(work),
           "plan_note": "megassm plan --sample: model + T5 + VAE weights and the denoiser's activations (its "
                        "encoders_gb read from --work's encoder directories), not the VAE decode's working set"}
    t0 = time.time()
    res["encoders"] = write_encoders(work, args.tiny, build_device)
    res["checkpoints"] = write_checkpoints(work, runs, args.tiny)
    res["setup_s"] = round(time.time() - t0, 1)
    res["rows"] = []
    for name, spec in runs.items():
        res["rows"].append(sample_run(name, spec, work, args))
        res["disk_gb"] = round(du_gb(work), 2)
        Path(args.out).write_text(json.dumps(res, indent=1))
        print(summary(res["rows"][-1]), flush=True)
        if res["rows"][-1]["rc"]:
            print("\n".join(res["rows"][-1]["tail"]), flush=True)
    failed = [r["name"] for r in res["rows"] if r["rc"]]
    print(f"== {len(runs) - len(failed)} of {len(runs)} runs ok; disk used {res['disk_gb']} GB under {work}"
          f"{'; failed: ' + ', '.join(failed) if failed else ''}", flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
