"""Whole-model training steps of hth-5b width at reduced depth on one GPU: tokens/s, MFU, peak memory
against the memory plan, and the same with an all-attention stack (speedup_vs_attention).

    python benchmarks/bench_step.py [--seq-lens 16384,29040] [--engine deepspeed|torch] [--profile 29040]
        [--variants today,persist,compile,fp8] [--attention-variants today,fp8]

Each stage runs as its config says (configs/<stage>.yaml: micro-batch, activation checkpointing) at its
full sequence length on one GPU (Ulysses CP would split the same work over cp GPUs, per-GPU FLOPs / cp).
Depth: the most blocks of hth-5b's pattern, in whole units of 4 (3 Hydra : 1 attention, as hth-5b), that
``megassm plan``'s memory model fits into --mem-fraction of the card; the all-attention stack has the same
depth. If no depth fits with the configured checkpointing, every_k and then all are tried (recorded).
engine=deepspeed: DeepSpeed ZeRO-3 (one rank), bf16, fused torch AdamW, as megassm/train/backends/deepspeed.py
builds it;
engine=torch: bf16 weights with a plain torch AdamW (no fp32 master), for when DeepSpeed is not there.
MFU counts model FLOPs (3 x forward, accounting.train_flops); ``hw_mfu`` adds recomputed forwards.
Rows: bench=model_step per (stage, stack, variant). Each case runs in a fresh process.

Variants (``VARIANTS``) are the speed settings a config turns on -- model.compile, model.fp8,
model.attention_backend, parallel.zero_options -- applied by the same code ``megassm train`` runs
(megassm/train/speed.py, the backend's mark_model and deepspeed_config); ``today`` is none of them, and
``speedup_vs_today`` compares each with it from the same call.
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

REPO = Path(__file__).resolve().parents[1]
STAGES = [("stage0_256px", 256), ("stage1_1k", 4096), ("stage2_2k", 16384), ("stage3_video", 29040),
          ("long_65k", 65536)]
DEPTHS = (32, 24, 16, 12, 8, 4)
PERSIST = {"stage3_param_persistence_threshold": 10**12}  # one rank: gather nothing, ever
VARIANTS = {
    "today": {},
    "persist": {"zero_options": PERSIST},
    "compile": {"compile": "blocks"},
    "compile_persist": {"compile": "blocks", "zero_options": PERSIST},
    "fp8": {"compile": "blocks", "fp8": "tensorwise", "zero_options": PERSIST},
    "fp8_rowwise": {"compile": "blocks", "fp8": "rowwise", "zero_options": PERSIST},
    "fp8_eager": {"fp8": "tensorwise", "zero_options": PERSIST},
    "fp8_flash": {"compile": "blocks", "fp8": "tensorwise", "zero_options": PERSIST, "attention_backend": "flash"},
    # memory for speed: the partitioner recomputes cheap ops to save half the bytes; or every 4th block checkpointed
    "fp8_budget": {"compile": "blocks", "fp8": "tensorwise", "zero_options": PERSIST, "memory_budget": 0.5},
    "compile_budget": {"compile": "blocks", "zero_options": PERSIST, "memory_budget": 0.5},
    "fp8_ck4": {"compile": "blocks", "fp8": "tensorwise", "zero_options": PERSIST, "checkpoint_every": 4},
    # the allocator's history on (slower): an OOM's row lists the live memory by allocating site (live_by_site)
    "fp8_memdiag": {"compile": "blocks", "fp8": "tensorwise", "zero_options": PERSIST, "memory_history": True},
    "compile_memdiag": {"compile": "blocks", "zero_options": PERSIST, "memory_history": True},
    "today_memdiag": {"memory_history": True},
    # what ZeRO-3 costs on one rank (copies into its flat partitions, hooks): the same step under ZeRO-2 / 1 / 0
    "zero2": {"zero_stage": 2},
    "zero1": {"zero_stage": 1},
    "zero0": {"zero_stage": 0},
    "fp8_zero0": {"compile": "blocks", "fp8": "tensorwise", "zero_stage": 0},
    # FlashAttention-4's kernels for self-attention (model.attention_backend: fa4) instead of cuDNN's through SDPA
    "fp8_fa4": {"compile": "blocks", "fp8": "tensorwise", "zero_options": PERSIST, "attention_backend": "fa4"},
    "today_fa4": {"attention_backend": "fa4"},
    # Hydra's SSD chunk length (hth-5b: 256), model.chunk_size: the scan kernels' shape on this card
    "fp8_chunk128": {"compile": "blocks", "fp8": "tensorwise", "zero_options": PERSIST, "model": {"chunk_size": 128}},
    "fp8_chunk512": {"compile": "blocks", "fp8": "tensorwise", "zero_options": PERSIST, "model": {"chunk_size": 512}},
}
COLUMNS = ["bench", "stage", "pattern", "variant", "hydra_paths", "activation_checkpointing", "seq_len", "batch", "ms",
           "tokens_per_s_per_gpu", "tflops", "mfu", "hw_mfu", "speedup_vs_today", "speedup_vs_attention", "warmup_s",
           "peak_mem_gb", "predicted_mem_gb", "mem_error"]


def stage_settings(stage: str) -> tuple[int, str, int]:
    """(micro_batch, activation_checkpointing, every_k) from configs/<stage>.yaml; long_65k: (1, none, 2)."""
    path = REPO / "configs" / f"{stage}.yaml"
    if not path.exists():
        return 1, "none", 2
    from megassm.run_config import load_config

    t = load_config(path).train
    return t.micro_batch_size, t.activation_checkpointing, t.checkpoint_every_k


def pick_depth(m, seq_len: int, batch: int, mode: str, every_k: int, budget_gb: float):
    """Largest depth (and the checkpointing mode used) whose hybrid and all-attention stacks both fit."""
    from megassm.plan import Layout, predict_memory

    for ck in dict.fromkeys((mode, "every_k", "all")):
        for n in DEPTHS:
            fits = True
            for pat in (m.pattern[:n], "A" * n):
                cfg = copy.deepcopy(m)
                cfg.pattern = pat
                lay = Layout(gpus=1, micro_batch=batch, checkpointing=ck, every_k=every_k)
                fits &= predict_memory(cfg, seq_len, lay)["total"] / 1e9 <= budget_gb
            if fits:
                return n, ck
    return None, None


def make_engine(model, engine: str, zero_options: dict | None = None, zero_stage: int = 3):
    from megassm.config.schema import RunConfig
    from megassm.train.backends.deepspeed import deepspeed_config, mark_model
    from megassm.train.optim import param_groups

    if engine == "torch":
        model = model.to(torch.bfloat16)
        return model, torch.optim.AdamW(param_groups(model, 0.0), lr=1e-5, fused=True)
    import deepspeed

    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-5, fused=True)
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29511"}.items():
        os.environ.setdefault(k, v)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl")
    cfg = RunConfig()
    cfg.train.micro_batch_size, cfg.train.precision, cfg.parallel.zero_stage = 1, "bf16", zero_stage
    cfg.parallel.zero_options = dict(zero_options or {})
    mark_model(model, zero_stage)  # as DeepSpeedBackend.prepare: Hydra (or, compiled, whole blocks) as ZeRO-3 leaves
    ds = deepspeed_config(cfg.parallel, cfg.train, cfg.optim.grad_clip, torch.device("cuda"), 1, cfg.train.grad_accum)
    eng, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds, dist_init_required=False)
    return eng, None


def one_step(model, opt, batch, probe=None):
    """One optimizer step; ``probe()``, if given, runs between the forward and the backward (the activations' peak)."""
    latents, t, text, mask, target = batch
    out = model(latents, t, text, mask)
    loss = (out.float() - target).square().mean()
    if probe is not None:
        probe()
    if opt is None:  # DeepSpeed engine
        model.backward(loss)
        model.step()
    else:
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss


def run_stack(res: Results, m, pattern: str, stage: str, seq_len: int, batch: int, engine: str, steps: int,
              ck: str = "all", every_k: int = 2, profile_path: str | None = None, variant: str = "today") -> dict:
    """Build the stack, take 2 warm-up and ``steps`` timed optimizer steps; returns the result row."""
    from megassm.train.speed import apply_speed

    cfg = copy.deepcopy(m)
    cfg.pattern = pattern
    v = VARIANTS[variant]
    cfg.compile, cfg.fp8 = v.get("compile", "none"), v.get("fp8", "none")
    cfg.attention_backend = v.get("attention_backend", cfg.attention_backend)
    for key, value in v.get("model", {}).items():  # model config keys the variant changes
        setattr(cfg, key, value)
    if "memory_budget" in v:  # read when a graph is partitioned, i.e. at the first (compiling) step
        from torch._functorch import config as functorch_config

        functorch_config.activation_memory_budget = v["memory_budget"]
    if v.get("memory_history"):
        torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python", compile_context=True)
    if "checkpoint_every" in v:
        ck, every_k = "every_k", v["checkpoint_every"]
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialise on the GPU: a 24-block stack is ~4B parameters
        model = HTHModel(cfg)
    for i, blk in enumerate(model.blocks):
        blk.grad_checkpoint = ck == "all" or (ck == "every_k" and i % every_k == 0)
    speed_notes = apply_speed(model, cfg, torch.device("cuda"))
    model, opt = make_engine(model, engine, v.get("zero_options"), v.get("zero_stage", 3))
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
    t0 = time.perf_counter()
    for _ in range(2):  # a compiled variant compiles here
        one_step(model, opt, data)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    static = torch.cuda.memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = one_step(model, opt, data)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    assert torch.isfinite(loss), f"non-finite loss {loss}"
    # which path each Hydra mixer took in the last forward (megassm train's first-step line): a compiled row on
    # "reference" times the PyTorch scan (how the compile OOMs of 2026-12-06 went unexplained for a day)
    from megassm.train.loop import hydra_paths as hydra_paths_line

    hydra_paths = hydra_paths_line(model)[0].removeprefix("Hydra mixers: ")
    peak = (torch.cuda.max_memory_allocated() - base) / 1e9
    live = live_at_fwd = None
    if v.get("memory_history"):
        live = live_by_site()  # after a step: what stays between steps

        def probe():
            nonlocal live_at_fwd
            torch.cuda.synchronize()
            live_at_fwd = live_by_site()  # what the forward keeps for the backward, by site

        one_step(model, opt, data, probe)
    if profile_path:
        write_profile(lambda: one_step(model, opt, data), profile_path, f"{stage} {pattern} L={seq_len} x{batch}")
    ms = statistics.median(times) * 1e3
    n_ck = sum(blk.grad_checkpoint for blk in (model.module if hasattr(model, "module") else model).blocks)
    flops = train_flops(cfg, seq_len, batch)
    hw_flops = flops + (train_flops(cfg, seq_len, batch, recompute=True) - flops) * n_ck / len(pattern)
    peak_tf = res.info["datasheet_bf16_tflops"] or 989.0
    tok_s = batch * seq_len / (ms * 1e-3)
    row = {"bench": "model_step", "stage": stage, "pattern": pattern, "variant": variant, "settings": v,
           "speed_notes": speed_notes, "hydra_paths": hydra_paths, "warmup_s": warmup_s, "depth": len(pattern),
           "engine": engine,
           "seq_len": seq_len, "batch": batch, "ms": ms, "step_ms_all": [x * 1e3 for x in times],
           "tokens_per_s": tok_s, "tokens_per_s_per_gpu": tok_s, "tflops": flops / (ms * 1e-3) / 1e12,
           "mfu": flops / (ms * 1e-3) / 1e12 / peak_tf, "hw_mfu": hw_flops / (ms * 1e-3) / 1e12 / peak_tf,
           "params": param_counts(cfg)["total"], "activation_checkpointing": ck, "checkpointed_blocks": n_ck,
           "peak_mem_gb": peak, "static_mem_gb": static / 1e9, "leftover_from_earlier_runs_gb": base / 1e9,
           "reserved_gb": torch.cuda.max_memory_reserved() / 1e9, "live_by_site": live,
           "live_at_forward_end_by_site": live_at_fwd}
    from megassm.plan import Layout, predict_memory

    pred = predict_memory(cfg, seq_len, Layout(gpus=1, micro_batch=batch, checkpointing=ck, every_k=every_k),
                          engine=engine)
    row["predicted_mem_gb"] = pred["total"] / 1e9
    row["mem_error"] = row["predicted_mem_gb"] / peak - 1
    row["predicted_breakdown_gb"] = {k: v / 1e9 for k, v in pred.items()}
    return row  # the caller is a one-case child process: its exit frees the engine


def live_by_site(top: int = 25) -> list:
    """The live CUDA allocations now, grouped by where they were made (the innermost frames in megassm, the
    benchmark, torchao, DeepSpeed or Inductor's generated code; and the compiled graph and node when the
    allocator recorded them), largest first: [[site, GB, count], ...]. Needs the allocator's history on."""
    import collections

    keep = ("megassm", "benchmarks", "torchao", "deepspeed", "torchinductor", "_inductor", "runtime_wrappers")
    try:  # FX node names and the model source line they came from, for frames in compiled code (newer torch)
        snap = torch.cuda.memory._snapshot(augment_with_fx_traces=True)
    except TypeError:
        snap = torch.cuda.memory._snapshot()

    def where(f: dict) -> str:
        fx = f" [{f['fx_node_name']}: {str(f.get('fx_original_trace', '')).strip().splitlines()[-1:]}]" \
            if f.get("fx_node_name") else ""
        return f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}{fx}"

    sizes, counts = collections.Counter(), collections.Counter()
    for seg in snap["segments"]:
        for b in seg["blocks"]:
            if b.get("state") != "active_allocated":
                continue
            frames = [f for f in b.get("frames", []) if any(k in f["filename"] for k in keep)]
            site = " < ".join(where(f) for f in frames[:3])
            ctx = b.get("compile_context") or ""
            key = f"{site or '?'}{' | ' + str(ctx)[:160] if ctx else ''}"
            sizes[key] += b["size"]
            counts[key] += 1
    return [[k, round(v / 1e9, 3), counts[k]] for k, v in sizes.most_common(top)]


def write_profile(step, path: str, title: str) -> None:
    """One more step profiled (where the step's time goes): GPU time by kind of kernel, then the top 40 by
    total CUDA time (autograd nodes with their kernels) and the top 60 kernels by their own time."""
    from torch.profiler import ProfilerActivity, profile

    from megassm.train.profiling import kernel_kinds, kinds_table

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        step()
        torch.cuda.synchronize()
    avg = prof.key_averages()
    with open(path, "a") as f:
        f.write(f"==== one training step, {title}\n{kinds_table(kernel_kinds(avg))}\n")
        f.write(avg.table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=80) + "\n")
        f.write(avg.table(sort_by="self_device_time_total", row_limit=60, max_name_column_width=100) + "\n")


def run_isolated(args, case: dict) -> dict:
    """One (stage, stack) in a fresh process: a DeepSpeed engine leaves ~12 GB behind when dropped
    (seen on an H100), which would inflate the next run's memory and OOM the later ones."""
    with tempfile.TemporaryDirectory() as tmp:
        row_path = Path(tmp) / "row.json"
        cmd = [sys.executable, __file__, "--child", json.dumps(case), "--row-out", str(row_path),
               "--engine", args.engine, "--steps", str(args.steps)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout)
        except subprocess.TimeoutExpired:
            return {"bench": "model_step", **case, "engine": args.engine, "error": f"timeout {args.case_timeout}s"}
        if proc.returncode == 0 and row_path.exists():
            return json.loads(row_path.read_text())
        return {"bench": "model_step", **case, "engine": args.engine, "error": proc.stderr[-1500:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", default="deepspeed", choices=["deepspeed", "torch"])
    p.add_argument("--seq-lens", default=None, help="comma-separated, in the order to run")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--mem-fraction", type=float, default=0.85, help="share of the card's memory to plan into")
    p.add_argument("--max-depth", type=int, default=32)
    p.add_argument("--profile", default="", help="comma-separated seq lens whose hybrid step is profiled")
    p.add_argument("--variants", default="today", help=f"hybrid stack's variants, of {', '.join(VARIANTS)}")
    p.add_argument("--attention-variants", default="today", help="the all-attention stack's variants")
    p.add_argument("--case-timeout", type=int, default=300, help="seconds per case (build, compile, steps)")
    p.add_argument("--depth", type=int, default=0, help="force this depth (0: the largest that fits)")
    p.add_argument("--out", default=None)
    p.add_argument("--tag", default="", help="added to the result files' names (step_<engine>_<tag>_<card>)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--row-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    m = hth5b()
    if args.child:  # one case, in this process; the parent collects the row
        c = json.loads(args.child)
        res = Results(Path(tempfile.mkdtemp()), "child", COLUMNS)
        try:
            row = run_stack(res, m, c["pattern"], c["stage"], c["seq_len"], c["batch"], args.engine, args.steps,
                            c["activation_checkpointing"], c["every_k"], c.get("profile_path"), c["variant"])
        except torch.cuda.OutOfMemoryError as e:  # where it ran out, and what was allocated then
            import traceback

            where = [f"{f.filename.split('/')[-1]}:{f.lineno} {f.name}" for f in traceback.extract_tb(e.__traceback__)]
            row = {"bench": "model_step", **c, "engine": args.engine, "error": f"OOM {e}"[:300],
                   "oom_where": where[-8:], "allocated_gb": torch.cuda.memory_allocated() / 1e9,
                   "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
                   "live_by_site": live_by_site() if VARIANTS[c["variant"]].get("memory_history") else None}
        Path(args.row_out).write_text(json.dumps(row))
        return 0
    out = Path(args.out) if args.out else out_dir()
    stem = f"step_{args.engine}{'_' + args.tag if args.tag else ''}"
    res = Results(out, stem, COLUMNS, extra={"model": "hth-5b width, reduced depth"})
    budget = torch.cuda.get_device_properties(0).total_memory / 1e9 * args.mem_fraction
    by_len = {n: st for st, n in STAGES}
    order = [int(x) for x in args.seq_lens.split(",")] if args.seq_lens else list(by_len)
    profiled = {int(x) for x in args.profile.split(",") if x}
    for seq_len in order:
        stage = by_len[seq_len]
        batch, mode, every_k = stage_settings(stage)
        depth, ck = pick_depth(m, seq_len, batch, mode, every_k, budget)
        depth = args.depth or min(depth or 4, args.max_depth)
        rows = {}
        stacks = [(m.pattern[:depth], v) for v in args.variants.split(",") if v]  # empty: the attention stack only
        stacks += [("A" * depth, v) for v in args.attention_variants.split(",") if v]
        for pattern, variant in stacks:
            case = {"stage": stage, "seq_len": seq_len, "batch": batch, "pattern": pattern, "variant": variant,
                    "activation_checkpointing": ck or "all", "configured_checkpointing": mode, "every_k": every_k}
            if seq_len in profiled and pattern != "A" * depth:
                case["profile_path"] = str(out / f"profile_step_{res.json_path.stem.split('_')[-1]}_{variant}.txt")
            rows[pattern, variant] = row = run_isolated(args, case)
            print(json.dumps({k: row.get(k) for k in ("stage", "pattern", "variant", "ms", "mfu", "peak_mem_gb",
                                                         "warmup_s", "error")}), flush=True)
            res.add(row)
        compare(rows, m.pattern[:depth], "A" * depth)
        res.write()
    return 0


def compare(rows: dict, hybrid: str, attention: str) -> None:
    """speedup_vs_today per stack and variant; speedup_vs_attention of each hybrid variant against the
    all-attention stack's same variant (or its best, when that variant was not run)."""
    for (pattern, _), row in rows.items():
        today = rows.get((pattern, "today"), {})
        if "ms" in row and "ms" in today:
            row["speedup_vs_today"] = today["ms"] / row["ms"]
    att = {v: r["ms"] for (p, v), r in rows.items() if p == attention and "ms" in r}
    for (pattern, variant), row in rows.items():
        if pattern == hybrid and "ms" in row and att:
            row["speedup_vs_attention"] = att.get(variant, min(att.values())) / row["ms"]


if __name__ == "__main__":
    sys.exit(main())
