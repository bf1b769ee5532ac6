"""Every shipped config through the real CLI, in miniature, on whatever device this machine has (issue 35 §1).

    python benchmarks/gpu_configs.py --work /tmp/gpucfg --out benchmarks/results/gpu_configs_<card>.json

One process per command, exactly as a user runs them (``megassm preprocess / train / sample / convert /
eval``), world 1 (an NCCL process group on a GPU, gloo on the CPU), the config's own precision (bf16 on
CUDA), the fused Hydra path and its kernels where CUDA is present:

1. small real-architecture encoders built locally (diffusers AutoencoderKL and AutoencoderKLWan, a
   transformers T5 encoder, a 1-layer CLIP, a random InceptionV3; nothing is downloaded), images and videos
   written to disk, and ``megassm preprocess`` of both into shards;
2. ``megassm train`` for smoke, stage0_256px, stage1_1k, stage2_2k, stage3_video, stage3_video_joint, each
   with the width and depth shrunk, its layout at world 1 (tp = cp = pp = 1), its own accumulation, EMA,
   async save, preview and eval cadence (previews through the VAE, ``train.eval_every`` through CLIP /
   Inception), chained as the stages are (each ``init_from`` the previous);
3. stage 0 SIGKILLed after step 5 (between checkpoints) and started again: the resumed run must log the
   redone steps' losses as the first run did;
4. ``megassm sample`` (an image from stage 2, a clip from stage 3), ``convert zero-to-consolidated`` and
   ``megassm eval`` on the results.

Each command's exit code, wall time and last lines go into the JSON; the script exits non-zero if any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS, CKPT_EVERY, KILL_AT = 6, 2, 5
TINY = ["model.d_model=128", "model.num_heads=2", "model.headdim=32", "model.d_state=16", "model.text_dim=32",
        "model.max_text_len=32", "model.in_channels=4", "train.progress_bar=false", "train.log_every=1",
        f"train.steps={STEPS}", f"train.ckpt_every={CKPT_EVERY}", "train.sample_every=3", "train.eval_every=3",
        "train.keep_last=10", "train.ema_decay=0.8", "optim.warmup_steps=2", "diffusion.sample_steps=2",
        "parallel.tp=1", "parallel.cp=1", "parallel.pp=1", "data.num_workers=1", "data.shuffle_buffer=16",
        "eval.samples=4", "eval.batch_size=2", "eval.kid_subset_size=4", "eval.kid_subsets=2",
        "eval.prompts=[a red square, a blue circle]"]
JOINT_BUCKETS = ("[{name: img8, shape: [1, 8, 8], weight: 0.5}, {name: vid3, shape: [3, 8, 8], weight: 0.5}]")


def run(log: list, name: str, cmd: list[str], env: dict | None = None, timeout: int = 420) -> dict:
    t0 = time.time()
    e = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    try:
        p = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout)
        rc, out = p.returncode, (p.stdout + p.stderr)
    except subprocess.TimeoutExpired as te:
        rc, out = 124, f"timed out after {timeout}s: {(te.stdout or b'')[-2000:]!r}"
    rec = {"name": name, "rc": rc, "seconds": round(time.time() - t0, 1), "cmd": " ".join(cmd[2:]),
           "tail": [ln for ln in out.splitlines() if ln.strip()][-25:]}
    log.append(rec)
    status = "ok" if rc == 0 else f"FAILED rc={rc}"
    print(f"== {name}: {status} in {rec['seconds']} s", flush=True)
    if rc != 0 and name != "stage0_256px killed":
        print("\n".join(rec["tail"]), flush=True)
    return rec


def megassm(*args: str) -> list[str]:
    return [sys.executable, "-m", "megassm", *args]


def setup(work: Path, log: list) -> dict:
    """Encoders, media, metric networks, and the two preprocessed datasets."""
    import torch

    from megassm.data.testing import (
        make_tiny_text_encoder,
        make_tiny_vae,
        make_tiny_video_vae,
        write_image,
        write_synthetic_dataset,
        write_video,
    )
    from megassm.eval.testing import save_random_inception, save_tiny_clip

    p = {k: work / k for k in ("vae", "wan", "t5", "clip", "img", "vid", "ds_img", "ds_vid", "ds_joint")}
    p["inception"] = work / "inception.pt"
    make_tiny_vae(p["vae"], latent_channels=4)
    make_tiny_video_vae(p["wan"], latent_channels=4)
    make_tiny_text_encoder(p["t5"], d_model=32)
    save_tiny_clip(p["clip"])
    save_random_inception(p["inception"])
    p["img"].mkdir(parents=True, exist_ok=True)
    p["vid"].mkdir(parents=True, exist_ok=True)
    colours = ["red", "green", "blue", "yellow"]
    for i in range(32):
        write_image(p["img"] / f"im{i:03d}.png", 32, 32, seed=i, caption=f"a {colours[i % 4]} pattern number {i}")
    for i in range(8):
        write_video(p["vid"] / f"v{i:02d}.mp4", 9, 16, 32, 32, seed=i, caption=f"a moving {colours[i % 4]} pattern")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    common = ["--text-encoder", str(p["t5"]), "--text-max-length", "32", "--samples-per-shard", "8",
              "--num-workers", "1", "--device", device]
    run(log, "preprocess images", megassm("preprocess", "-i", str(p["img"]), "-o", str(p["ds_img"]), "--vae",
                                          str(p["vae"]), "--resolution", "32", *common))
    run(log, "preprocess videos", megassm("preprocess", "-i", str(p["vid"]), "-o", str(p["ds_vid"]), "--vae",
                                          str(p["wan"]), "--resolution", "32", "--frames", "9", *common))
    # the joint stage's images and clips (one latent frame = an image): random latents at its two shapes
    write_synthetic_dataset(p["ds_joint"], [(4, 1, 8, 8), (4, 3, 8, 8)], num_samples=64, samples_per_shard=16,
                            text_dim=32, max_text=8)
    return p


def stage_overrides(name: str, p: dict, prev: str | None) -> list[str]:
    video = name.startswith("stage3")
    data = p["ds_joint"] if name == "stage3_video_joint" else p["ds_vid"] if video else p["ds_img"]
    out = [*TINY, f"run_dir={p['runs'] / name}", f"init_from={prev or 'null'}",
           f"encoders.vae={p['wan'] if video else p['vae']}", f"encoders.text_encoder={p['t5']}",
           f"eval.inception={p['inception']}", f"eval.clip_model={p['clip']}", f"eval.reference={p['img']}",
           f"eval.paths=[{data}]"]
    if name == "smoke":  # procedural squares: its own tiny encoders and data
        return [o for o in out if not o.startswith(("encoders.", "eval.", "model.in_channels", "model.text_dim",
                                                    "model.max_text_len", "train.eval_every", "init_from"))]
    out += [f"data.paths=[{data}]", "data.weights=[1.0]"]
    out.append("model.pattern=htvA" if video else "model.pattern=hvAh")
    if name == "stage3_video_joint":
        out += [f"data.buckets={JOINT_BUCKETS}", "data.tokens_per_step=256", "train.preview_latent_shape=[3, 8, 8]"]
    elif video:
        out.append("train.preview_latent_shape=[5, 8, 8]")
    return out


def losses(run_dir: Path) -> list[tuple[int, float]]:
    f = run_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in f.read_text().splitlines()] if f.is_file() else []
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/megassm_gpu_configs")
    ap.add_argument("--out", default=None, help="JSON of every command's result")
    ap.add_argument("--only", default=None, help="comma-separated stage names (default: all, chained)")
    args = ap.parse_args()
    work = Path(args.work)
    log: list[dict] = []
    p = setup(work, log)
    p["runs"] = work / "runs"
    prev, result = None, {}
    names = ["smoke", "stage0_256px", "stage1_1k", "stage2_2k", "stage3_video", "stage3_video_joint"]
    for name in (args.only.split(",") if args.only else names):
        over = stage_overrides(name, p, prev if name != "smoke" else None)
        cfg = f"configs/{name}.yaml"
        if name == "stage0_256px":  # a node failure between checkpoints, then the requeue
            run(log, f"{name} killed", megassm("train", cfg, *over),
                env={"MEGASSM_FAULT_SIGKILL_AT_STEP": str(KILL_AT)})
            first = dict(losses(p["runs"] / name))
        rec = run(log, name, megassm("train", cfg, *over))
        if name == "stage0_256px":
            again = dict(losses(p["runs"] / name))
            redone = {s: (first.get(s), again.get(s)) for s in range(KILL_AT - KILL_AT % CKPT_EVERY + 1, KILL_AT + 1)}
            result["resume"] = {"redone": redone, "bitwise_equal": all(a == b for a, b in redone.values())}
            print(f"== resume after SIGKILL at step {KILL_AT}: redone steps {redone}", flush=True)
        if rec["rc"] == 0 and name != "smoke":
            prev = str(p["runs"] / name)
    s2, s3 = p["runs"] / "stage2_2k", p["runs"] / "stage3_video"
    run(log, "sample image (stage2)", megassm("sample", str(s2), "--prompt", "a red pattern", "--steps", "4",
                                               "--out", str(work / "s2.png")))
    run(log, "sample clip (stage3)", megassm("sample", str(s3), "--prompt", "a moving blue pattern", "--steps", "4",
                                              "--frames", "5", "--size", "32x32", "--out", str(work / "s3.mp4")))
    run(log, "convert zero-to-consolidated", megassm("convert", "zero-to-consolidated", str(s2), str(work / "cons")))
    (work / "prompts.txt").write_text("a red pattern\na green pattern\n")
    run(log, "eval (stage2)", megassm("eval", str(s2), "--prompts", str(work / "prompts.txt"), "--reference",
                                      str(p["img"]), "--inception", str(p["inception"]), "--clip-model",
                                      str(p["clip"]), "--steps", "2", "--heldout", str(p["ds_img"]), "--samples", "4",
                                      "--out", str(work / "eval")))
    result["commands"] = log
    failed = [r["name"] for r in log if r["rc"] != 0 and r["name"] != "stage0_256px killed"]
    result["failed"] = failed
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"== {len(log) - len(failed)} of {len(log)} commands ok; failed: {failed}", flush=True)
    return 1 if failed or not result.get("resume", {}).get("bitwise_equal") else 0


if __name__ == "__main__":
    sys.exit(main())
