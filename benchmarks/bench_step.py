"""Whole-model training steps of hth-5b width at reduced depth on one GPU: tokens/s, MFU, peak memory,
and the same with an all-attention stack (speedup_vs_attention).

    python benchmarks/bench_step.py [--depth-pattern hvhA] [--engine deepspeed|torch] [--seq-lens ...]

engine=deepspeed: DeepSpeed ZeRO-3 (one rank), bf16, torch AdamW, as megassm.train.engine builds it;
engine=torch: bf16 weights with a plain torch AdamW (no fp32 master), for when DeepSpeed is not there.
Every block is activation-checkpointed. MFU counts model FLOPs (3 x forward, accounting.train_flops);
``hw_mfu`` adds the recomputed forward (4 x). Rows: bench=model_step per (stage, stack).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_layers import GRIDS, hth5b  # noqa: E402
from common import Results, out_dir  # noqa: E402

from megassm.models.accounting import param_counts, train_flops  # noqa: E402
from megassm.models.hth import HTHModel  # noqa: E402

STAGES = [("stage0_256px", 256, 64), ("stage1_1k", 4096, 8), ("stage2_2k", 16384, 1), ("stage3_video", 29040, 1),
          ("long_65k", 65536, 1)]
COLUMNS = ["bench", "stage", "pattern", "engine", "seq_len", "batch", "ms", "tokens_per_s", "tflops", "mfu",
           "hw_mfu", "speedup_vs_attention", "peak_mem_gb", "static_mem_gb", "predicted_mem_gb"]


def make_engine(model, engine: str):
    from megassm.config.schema import RunConfig
    from megassm.train.engine import deepspeed_config, param_groups

    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-5)
    if engine == "torch":
        model = model.to(torch.bfloat16)
        opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-5)
        return model, opt
    import deepspeed

    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29511"}.items():
        os.environ.setdefault(k, v)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl")
    cfg = RunConfig()
    cfg.train.micro_batch_size, cfg.train.precision, cfg.parallel.zero_stage = 1, "bf16", 3
    ds = deepspeed_config(cfg, torch.device("cuda"), 1)
    eng, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds, dist_init_required=False)
    return eng, None


def one_step(model, opt, batch):
    latents, t, text, mask, target = batch
    out = model(latents, t, text, mask)
    loss = (out.float() - target).square().mean()
    if opt is None:  # DeepSpeed engine
        model.backward(loss)
        model.step()
    else:
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss


def run_stack(res: Results, m, pattern: str, stage: str, seq_len: int, batch: int, engine: str, steps: int) -> dict:
    """Build the stack, take 2 warm-up and ``steps`` timed optimizer steps; returns the result row."""
    cfg = copy.deepcopy(m)
    cfg.pattern = pattern
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()  # whatever an earlier engine left behind is not this run's
    torch.manual_seed(0)
    model = HTHModel(cfg).cuda()
    for blk in model.blocks:
        blk.grad_checkpoint = True
    model, opt = make_engine(model, engine)
    T, H, W = GRIDS[seq_len]
    pt, ph, pw = cfg.patch_size
    dev = "cuda"
    latents = torch.randn(batch, cfg.in_channels, T * pt, H * ph, W * pw, device=dev, dtype=torch.bfloat16)
    target = torch.randn(latents.shape, device=dev)
    t = torch.rand(batch, device=dev)
    text = torch.randn(batch, cfg.max_text_len, cfg.text_dim, device=dev, dtype=torch.bfloat16)
    mask = torch.ones(batch, cfg.max_text_len, dtype=torch.bool, device=dev)
    mask[:, 120:] = False
    data = (latents, t, text, mask, target)
    for _ in range(2):
        one_step(model, opt, data)
    torch.cuda.synchronize()
    static = torch.cuda.memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = one_step(model, opt, data)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    assert torch.isfinite(loss), f"non-finite loss {loss}"
    ms = statistics.median(times) * 1e3
    flops = train_flops(cfg, seq_len, batch)
    peak_tf = res.info["datasheet_bf16_tflops"] or 989.0
    row = {"bench": "model_step", "stage": stage, "pattern": pattern, "engine": engine, "seq_len": seq_len,
           "batch": batch, "ms": ms, "step_ms_all": [x * 1e3 for x in times],
           "tokens_per_s": batch * seq_len / (ms * 1e-3), "tflops": flops / (ms * 1e-3) / 1e12,
           "mfu": flops / (ms * 1e-3) / 1e12 / peak_tf,
           "hw_mfu": train_flops(cfg, seq_len, batch, recompute=True) / (ms * 1e-3) / 1e12 / peak_tf,
           "params": param_counts(cfg)["total"], "activation_checkpointing": "all",
           "peak_mem_gb": (torch.cuda.max_memory_allocated() - base) / 1e9, "static_mem_gb": static / 1e9,
           "leftover_from_earlier_runs_gb": base / 1e9,
           "reserved_gb": torch.cuda.max_memory_reserved() / 1e9}
    try:
        from megassm.plan import Layout, predict_memory

        pred = predict_memory(cfg, seq_len, Layout(gpus=1, micro_batch=batch, checkpointing="all"),
                              engine=engine)
        row["predicted_mem_gb"] = pred["total"] / 1e9
        row["predicted_breakdown_gb"] = {k: v / 1e9 for k, v in pred.items()}
    except ImportError:
        pass
    del model, opt, data
    torch.cuda.empty_cache()
    return row


def run_isolated(args, stage: str, seq_len: int, batch: int, pattern: str) -> dict:
    """One (stage, stack) in a fresh process: a DeepSpeed engine leaves ~12 GB behind when dropped
    (seen on an H100), which would inflate the next run's memory and OOM the later ones."""
    with tempfile.TemporaryDirectory() as tmp:
        row_path = Path(tmp) / "row.json"
        cmd = [sys.executable, __file__, "--child", f"{stage},{seq_len},{batch},{pattern}", "--row-out", str(row_path),
               "--engine", args.engine, "--steps", str(args.steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0 and row_path.exists():
            return json.loads(row_path.read_text())
        return {"bench": "model_step", "stage": stage, "pattern": pattern, "seq_len": seq_len, "batch": batch,
                "engine": args.engine, "error": proc.stderr[-600:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth-pattern", default="hvhA", help="reduced-depth layer pattern (hth-5b width)")
    p.add_argument("--engine", default="deepspeed", choices=["deepspeed", "torch"])
    p.add_argument("--seq-lens", default=None, help="comma-separated, in the order to run")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--row-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    m = hth5b()
    if args.child:  # one case, in this process; the parent collects the row
        stage, seq_len, batch, pattern = args.child.split(",")
        res = Results(Path(tempfile.mkdtemp()), "child", COLUMNS)
        try:
            row = run_stack(res, m, pattern, stage, int(seq_len), int(batch), args.engine, args.steps)
        except torch.cuda.OutOfMemoryError as e:
            row = {"bench": "model_step", "stage": stage, "pattern": pattern, "seq_len": int(seq_len),
                   "batch": int(batch), "engine": args.engine, "error": f"OOM {e}"[:300]}
        Path(args.row_out).write_text(json.dumps(row))
        return 0
    res = Results(Path(args.out) if args.out else out_dir(), f"step_{args.engine}", COLUMNS,
                  extra={"model": f"hth-5b width, pattern {args.depth_pattern}"})
    by_len = {s[1]: s for s in STAGES}
    order = [int(s) for s in args.seq_lens.split(",")] if args.seq_lens else list(by_len)
    for stage, seq_len, batch in (by_len[n] for n in order):
        rows = {}
        for pattern in (args.depth_pattern, "A" * len(args.depth_pattern)):
            rows[pattern] = run_isolated(args, stage, seq_len, batch, pattern)
            res.add(rows[pattern])
        hy, at = rows[args.depth_pattern], rows["A" * len(args.depth_pattern)]
        if "ms" in hy and "ms" in at:
            hy["speedup_vs_attention"] = at["ms"] / hy["ms"]
            res.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
