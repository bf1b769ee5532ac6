"""LoRA fine-tuning of the full hth-5b through ``megassm train`` on one GPU (issue 35 §3).

    python benchmarks/full_size_lora.py --out benchmarks/results/full_size_lora_<card>.json

1. a random hth-5b base (32 blocks, 5.12B parameters, bf16) built on the GPU and written as a consolidated
   checkpoint (``model.safetensors`` + ``config.yaml``): the stand-in for a trained stage-0 model;
2. a shard dataset of random latents at stage 1's shape (16 x 1 x 128 x 128: 4,096 tokens; ``--latent``) with 4096-wide
   T5-XXL-sized text embeddings (``write_synthetic_dataset``);
3. ``megassm train configs/stage1_1k.yaml init_from=BASE 'finetune.lora={rank: 16, alpha: 16}'`` at world 1
   (the config's cp 2 at its world-1 equivalent, ZeRO-3, EMA, async saves; ``--micro-batch``): the
   partitioned build reads the base by slices through the NCCL group, adapters are drawn, steps timed;
4. ``megassm convert merge-lora`` of the last checkpoint's adapters into the base.

Step time, MFU and peak GPU memory come from the run's metrics.jsonl; wall times of each command are recorded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_base(path: Path) -> dict:
    from safetensors.torch import save_file

    from megassm.config.load import to_yaml
    from megassm.models import build_model
    from megassm.run_config import load_config

    cfg = load_config("configs/stage0_256px.yaml", ["encoders.vae=unused", "encoders.text_encoder=unused"])
    t0 = time.time()
    with torch.device("cuda"):
        model = build_model(cfg.model).to(torch.bfloat16)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    del model
    torch.cuda.empty_cache()
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"))
    (path / "config.yaml").write_text(to_yaml(cfg))
    return {"params": sum(v.numel() for v in state.values()), "seconds": round(time.time() - t0, 1),
            "bytes": (path / "model.safetensors").stat().st_size}


def run(name: str, cmd: list[str], log: list, timeout: int) -> dict:
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired:
        rc, out = 124, ""
    rec = {"name": name, "rc": rc, "seconds": round(time.time() - t0, 1),
           "tail": [ln for ln in out.splitlines() if ln.strip() and not ln.startswith("[")][-30:]}
    log.append(rec)
    print(f"== {name}: rc {rc} in {rec['seconds']} s", flush=True)
    if rc:
        print("\n".join(rec["tail"]), flush=True)
    return rec


def main() -> int:
    from megassm.data.testing import write_synthetic_dataset

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/megassm_lora5b")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--latent", type=int, default=128, help="latent side: 128 = stage 1's 1K px, 4,096 tokens")
    ap.add_argument("--micro-batch", type=int, default=None, help="default: the config's")
    ap.add_argument("--no-merge", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    res: dict = {"card": torch.cuda.get_device_name(), "commands": []}
    res["base"] = write_base(work / "base")
    print("base", res["base"], flush=True)
    write_synthetic_dataset(work / "data", [(16, 1, args.latent, args.latent)], num_samples=64, samples_per_shard=32,
                            text_dim=4096, max_text=64, text_tokens=64)
    run_dir = work / "run"
    train = [sys.executable, "-m", "megassm", "train", "configs/stage1_1k.yaml", f"init_from={work / 'base'}",
             f"run_dir={run_dir}", f"data.paths=[{work / 'data'}]", "data.weights=[1.0]", "data.num_workers=2",
             "data.shuffle_buffer=16", "finetune.lora={rank: 16, alpha: 16}", "parallel.cp=1",
             f"train.steps={args.steps}", f"train.ckpt_every={args.steps // 2}", "train.sample_every=0",
             "train.eval_every=0", "train.progress_bar=false", "train.log_every=1", "optim.warmup_steps=2",
             "encoders.vae=unused", "encoders.text_encoder=unused",
             *([f"train.micro_batch_size={args.micro_batch}"] if args.micro_batch else [])]
    tokens = (args.latent // 2) ** 2
    run(f"train (LoRA, hth-5b, {tokens} tokens, micro-batch {args.micro_batch or 'config'})", train,
        res["commands"], 420)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (run_dir / "metrics.jsonl").is_file() else []
    res["steps"] = [{k: r.get(k) for k in ("step", "loss", "step_time_s", "mfu", "peak_mem_gb", "tokens_per_s")}
                    for r in rows if "loss" in r]
    for r in res["steps"]:
        print(r, flush=True)
    adapters = sorted(run_dir.glob("checkpoints/step_*/lora"))
    if adapters and not args.no_merge:
        res["adapters"] = {"dir": str(adapters[-1]),
                           "bytes": sum(f.stat().st_size for f in adapters[-1].iterdir())}
        run("convert merge-lora", [sys.executable, "-m", "megassm", "convert", "merge-lora", str(work / "base"),
                                   str(adapters[-1]), str(work / "merged")], res["commands"], 240)
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0 if all(c["rc"] == 0 for c in res["commands"]) else 1


if __name__ == "__main__":
    sys.exit(main())
