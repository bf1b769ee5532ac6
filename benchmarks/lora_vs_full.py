"""LoRA against full fine-tuning on CPU: memory and step time of one training step of a small HTH.

    python benchmarks/lora_vs_full.py [--d-model 256] [--pattern hvAh] [--size 16] [--batch 4] [--steps 6]

Each mode runs in a fresh child process (so its peak RSS is its own): a model of --d-model width, AdamW on
the trainable parameters, the flow-matching loss on random latents (4 channels, --size^2, patch 2) and
text. Reported per mode: trainable parameters, bytes of gradients + Adam moments (counted from the tensors
after the last step), the child's peak RSS, and the median step time (forward + backward + optimizer)
after one warm-up step. LoRA: rank --rank on every target kind. Prints a table and writes
benchmarks/results/lora_vs_full_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def child(args) -> dict:
    import torch

    from megassm.config.schema import DiffusionConfig, LoRAConfig, ModelConfig
    from megassm.diffusion.flow import flow_matching_loss
    from megassm.lora import attach_lora
    from megassm.models import build_model

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = ModelConfig(d_model=args.d_model, pattern=args.pattern, num_heads=4, headdim=64, d_state=32,
                      chunk_size=64, text_dim=64, max_text_len=16, in_channels=4, ssd_impl="ref",
                      hydra_path="reference", fuse_elementwise=False)
    model = build_model(cfg)
    if args.mode == "lora":
        attach_lora(model, LoRAConfig(rank=args.rank, alpha=args.rank))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x0 = torch.randn(args.batch, 4, 1, args.size, args.size)
    text, mask = torch.randn(args.batch, 16, 64), torch.ones(args.batch, 16, dtype=torch.bool)
    seq = (args.size // 2) ** 2
    times = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        loss = flow_matching_loss(model, x0, text, mask, DiffusionConfig(), seq, range(args.batch), step)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the grads allocated: they are part of the step's memory
        times.append(time.perf_counter() - t0)
    state_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params) + sum(
        v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return {"mode": args.mode, "parameters": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in params), "grad_adam_MiB": state_bytes / 2**20,
            "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "step_s_median": statistics.median(times[1:]), "steps_timed": len(times) - 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["lora", "full"], default=None, help=argparse.SUPPRESS)  # child
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--pattern", default="hvAh")
    ap.add_argument("--size", type=int, default=16, help="latent side")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(child(args)))
        return
    rows = []
    for mode in ("full", "lora"):
        argv = [a for a in sys.argv[1:]]
        out = subprocess.run([sys.executable, __file__, *argv, "--mode", mode], capture_output=True, text=True,
                             check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'mode':<6}{'params':>10}{'trainable':>11}{'grad+Adam MiB':>15}{'peak RSS MiB':>14}{'step s':>9}")
    for r in rows:
        print(f"{r['mode']:<6}{r['parameters']:>10,}{r['trainable']:>11,}{r['grad_adam_MiB']:>15.2f}"
              f"{r['peak_rss_MiB']:>14.0f}{r['step_s_median']:>9.3f}")
    device = f"cpu-{__import__('os').cpu_count()}core"
    out = Path(args.out or Path(__file__).parent / "results" / f"lora_vs_full_{device}.json")
    out.write_text(json.dumps({"device": device, "cpu": platform.processor() or platform.machine(),
                               "settings": {k: v for k, v in vars(args).items() if k not in ("mode", "out")},
                               "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
