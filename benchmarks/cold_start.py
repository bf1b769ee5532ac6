"""Issue 25, item 5: time from process launch to the first training step, Triton autotuning included.

    python benchmarks/cold_start.py --label cold --out DIR     # run with empty cache directories
    python benchmarks/cold_start.py --label warm --out DIR     # again, same TRITON_CACHE_DIR / TORCHINDUCTOR_CACHE_DIR
    python benchmarks/cold_start.py --cpu --label smoke        # tiny model on CPU: a dry run of the code

Each call starts one child process (a fresh interpreter, as a training job is) that imports torch,
DeepSpeed and megassm, builds an HTH model of hth-5b width (--pattern, default 'hvhA': 3 Hydra + 1
attention block, i.e. every kernel kind the model has), wraps it in DeepSpeed ZeRO-3 as bench_step does,
and takes --steps optimizer steps at --seq-len tokens (batch 1). Milestones are seconds since the child's
launch (its process start time). The child runs with TRITON_PRINT_AUTOTUNING=1; the parent counts the
kernels that were autotuned in it and their autotuning seconds (a kernel whose configs carry a pre_hook,
as several of mamba-ssm's backward kernels do, is re-tuned in every process even with
TRITON_CACHE_AUTOTUNING=1: Triton cannot store those results). Rows are appended to cold_start_<card>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path


def _files(d: str | None) -> int:
    if not d or not os.path.isdir(d):
        return 0
    return sum(len(f) for _, _, f in os.walk(d))


def child(args) -> int:
    import psutil

    t_launch = psutil.Process().create_time()
    since = lambda: time.time() - t_launch  # noqa: E731
    marks = {"python_started": since()}
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_layers import GRIDS, hth5b
    from bench_step import make_engine, one_step

    from megassm.models.hth import HTHModel

    dev = "cpu" if args.cpu else "cuda"
    engine = "torch" if args.cpu else args.engine
    if engine == "deepspeed":
        import deepspeed  # noqa: F401
    marks["imports_done"] = since()
    cfg = hth5b()
    cfg.pattern = args.pattern
    if args.cpu:
        cfg.d_model, cfg.num_heads, cfg.text_dim, cfg.max_text_len = 128, 2, 64, 16
    torch.manual_seed(0)
    with torch.device(dev):
        model = HTHModel(cfg)
    if dev == "cuda":
        torch.cuda.synchronize()
    marks["model_built"] = since()
    model, opt = make_engine(model, engine)
    marks["engine_ready"] = since()
    T, H, W = GRIDS[args.seq_len]
    pt, ph, pw = cfg.patch_size
    latents = torch.randn(1, cfg.in_channels, T * pt, H * ph, W * pw, device=dev, dtype=torch.bfloat16)
    data = (latents, torch.rand(1, device=dev),
            torch.randn(1, cfg.max_text_len, cfg.text_dim, device=dev, dtype=torch.bfloat16),
            torch.ones(1, cfg.max_text_len, dtype=torch.bool, device=dev), torch.randn(latents.shape, device=dev))
    steps = []
    for i in range(args.steps):
        t0 = time.time()
        loss = one_step(model, opt, data)
        if dev == "cuda":
            torch.cuda.synchronize()
        steps.append(time.time() - t0)
        marks[f"step{i + 1}_done"] = since()
    row = {"marks_s_since_launch": marks, "step_s": steps, "first_step_s": steps[0],
           "steady_step_s": min(steps[1:]) if len(steps) > 1 else None, "loss_finite": bool(loss.isfinite()),
           "launch_to_first_step_s": marks["step1_done"]}
    print("COLD_START_ROW " + json.dumps(row), flush=True)
    return 0


def parent(args) -> int:
    env = dict(os.environ, TRITON_PRINT_AUTOTUNING="1", PYTHONUNBUFFERED="1")
    tdir, idir = env.get("TRITON_CACHE_DIR"), env.get("TORCHINDUCTOR_CACHE_DIR")
    before = {"triton_cache_files": _files(tdir), "inductor_cache_files": _files(idir)}
    cmd = [sys.executable, __file__, "--child", "--seq-len", str(args.seq_len), "--pattern", args.pattern,
           "--steps", str(args.steps), "--engine", args.engine] + (["--cpu"] if args.cpu else [])
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    row, tuned, name = None, [], None
    for line in proc.stdout:
        if line.startswith("COLD_START_ROW "):
            row = json.loads(line[len("COLD_START_ROW "):])
            continue
        m = re.match(r"Triton autotuning for function (\S+),", line)
        if m:
            name = m.group(1)
        m = re.match(r"finished after ([\d.]+)s", line)
        if m and name:
            tuned.append((name, float(m.group(1))))
            name = None
            continue
        sys.stdout.write(line)
    rc = proc.wait()
    wall = time.time() - t0
    by_kernel: dict[str, float] = {}
    for k, s in tuned:
        by_kernel[k] = by_kernel.get(k, 0.0) + s
    out = {"bench": "cold_start", "label": args.label, "seq_len": args.seq_len, "pattern": args.pattern,
           "engine": "torch" if args.cpu else args.engine, "rc": rc, "child_wall_s": wall,
           "TRITON_CACHE_DIR": tdir, "TORCHINDUCTOR_CACHE_DIR": idir,
           "TRITON_CACHE_AUTOTUNING": env.get("TRITON_CACHE_AUTOTUNING"),
           **{f"{k}_before": v for k, v in before.items()},
           "triton_cache_files_after": _files(tdir), "inductor_cache_files_after": _files(idir),
           "autotuned_kernels": len(tuned), "autotuning_s_total": sum(s for _, s in tuned),
           "autotuning_s_by_kernel": dict(sorted(by_kernel.items(), key=lambda kv: -kv[1])), **(row or {})}
    from common import card_tag  # noqa: E402

    dev_name = "cpu"
    if not args.cpu:
        import torch

        dev_name = torch.cuda.get_device_name(0)
        import triton

        out.update(device=dev_name, torch=torch.__version__, triton=triton.__version__)
    out["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    od = Path(args.out) if args.out else Path(__file__).resolve().parent / "results"
    od.mkdir(parents=True, exist_ok=True)
    path = od / f"cold_start_{card_tag(dev_name)}.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    rows.append(out)
    path.write_text(json.dumps({"rows": rows}, indent=1))
    keys = ("label", "rc", "launch_to_first_step_s", "first_step_s", "steady_step_s", "child_wall_s",
            "autotuned_kernels", "autotuning_s_total", "triton_cache_files_before", "triton_cache_files_after")
    print(" | ".join(f"{k}={out.get(k)}" for k in keys), flush=True)
    return 0 if rc == 0 and row else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", default="run")
    p.add_argument("--seq-len", type=int, default=29040)
    p.add_argument("--pattern", default="hvhA")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--engine", default="deepspeed", choices=["deepspeed", "torch"])
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cpu and args.seq_len == 29040:
        args.seq_len = 256
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    return child(args) if args.child else parent(args)


if __name__ == "__main__":
    sys.exit(main())
