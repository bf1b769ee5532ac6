"""Issue 27: host memory and bytes read per rank when a run builds, warm-starts, saves and resumes.

    python benchmarks/bench_init.py --d-model 2048 --blocks 16 --world 2 --phases build_old,build_new
    python benchmarks/bench_init.py --d-model 2048 --blocks 16 --world 1 --phases warm_old,warm_new
    python benchmarks/bench_init.py --d-model 1024 --blocks 8 --world 2 --phases save,resume

Each phase runs in ``--world`` fresh gloo processes on the CPU, so a process's peak RSS (ru_maxrss) is that
phase's; ``base`` is the RSS after the imports, before the phase. Phases (hth-5b's shape otherwise:
expand 2, headdim 64, d_state 64, FFN 3.5x, T5-XXL text width):

  build_old   today's path before #27: torch.manual_seed + build_model (every rank the whole fp32 model)
  build_new   megassm.train.build.build_partitioned under ZeRO-3 (meta build, seeded per parameter,
              each parameter handed to ZeRO-3 at once)
  warm_old    build_model + warm_start_old.warm_start from a consolidated checkpoint (a whole state dict)
  warm_new    build_partitioned(init_from=...): offset reads of this rank's slices
  save        build_partitioned + the DeepSpeed ZeRO-3 engine (AdamW), two steps, then save_checkpoint:
              seconds, bytes written (all ranks), GB/s; then the trainer's non-blocking save of the same
              state (snapshot seconds, a step taken during the background write, seconds to COMPLETE)
  resume      build_partitioned(resuming=True) + engine + load_checkpoint of the ``save`` phase's files
  first_step      the real ``Trainer`` (megassm train's), one step: seconds from the launch (before the
                  imports) to the end of the first optimizer step, and the peak; with its parts
  first_step_old  the same, the Trainer's model built the way it was before #27 (``build_model`` on every
                  rank, then cut by the strategy's ``parallelize``)

Writes JSON (``--out``) with the machine's description; results in benchmarks/results/init_cpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def overrides(d_model: int, blocks: int) -> list[str]:
    pattern = ("hvhA" * blocks)[:blocks]
    return ["model.name=bench", f"model.d_model={d_model}", f"model.pattern={pattern}", "model.d_state=64",
            "model.expand=2", "model.headdim=64", f"model.num_heads={d_model // 128}", "model.mlp_ratio=3.5",
            "model.text_dim=4096", "model.max_text_len=300", "model.in_channels=16", "data.kind=procedural",
            "data.image_size=16", "train.micro_batch_size=1", "train.progress_bar=false", "train.ema_decay=0",
            "init_from=null", "encoders.vae=builtin:pixels", "encoders.text_encoder=builtin:words"]


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _rchar() -> int:
    with open(f"/proc/{os.getpid()}/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def _cfg(args, zero_stage: int = 3):
    from megassm.run_config import load_config

    return load_config(str(REPO / "configs/smoke.yaml"),
                       [*overrides(args.d_model, args.blocks), f"parallel.zero_stage={zero_stage}"])


DEVICE = [torch.device("cpu")]  # the save / resume phases' device (--device)


def _engine(cfg, model, mesh):
    from megassm.train.backends.deepspeed import DeepSpeedBackend

    backend = DeepSpeedBackend(mesh, cfg.parallel, cfg.train, cfg.optim, DEVICE[0])
    backend.prepare(model, cfg.train.grad_accum)
    return backend.engine


def _first_step(cfg, args, rank: int, res: dict) -> None:
    """``first_step`` / ``first_step_old``: a Trainer from its constructor to the end of step 1."""
    from megassm.models import build_model
    from megassm.train import loop

    if args.phase == "first_step_old":
        def whole(self):
            model = build_model(self.cfg.model)
            self.strategy.parallelize(model)
            return model
        loop.Trainer._build_model = whole
    t0 = time.perf_counter()
    trainer = loop.Trainer(cfg)
    res["init_s"] = time.perf_counter() - t0
    res["init_gb"] = _rss_gb()
    trainer.train_step(iter(trainer.data))  # step 1 without fit()'s final save
    res["first_step_s"] = time.perf_counter() - t0 - res["init_s"]
    res["launch_to_first_step_s"] = time.time() - args.launched


def _phase(rank: int, world: int, port: int, args, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if args.device == "cuda":  # --device cuda: the save / resume phases on one GPU per rank, NCCL
        torch.cuda.set_device(rank)
        DEVICE[0] = torch.device("cuda", rank)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=rank, world_size=world)
    import deepspeed  # noqa: F401  (imported before the baseline: every phase pays it)
    from warm_start_old import warm_start

    from megassm.checkpoint.errors import bytes_read
    from megassm.models import build_model
    from megassm.parallel.mesh import ParallelMesh
    from megassm.train.build import build_partitioned

    cfg = _cfg(args)
    mesh = ParallelMesh.from_config(cfg.parallel)
    res = {"base_gb": _rss_gb()}
    t0, b0, r0 = time.perf_counter(), bytes_read(), _rchar()
    p = args.phase
    if p == "build_old":
        torch.manual_seed(0)
        model = build_model(cfg.model)
    elif p == "build_new":
        model, _ = build_partitioned(cfg, mesh, torch.device("cpu"))
    elif p == "warm_old":
        torch.manual_seed(0)
        model = build_model(cfg.model)
        warm_start(model, cfg.model, args.ckpt)
    elif p == "warm_new":
        model, _ = build_partitioned(cfg, mesh, torch.device("cpu"), init_from=args.ckpt)
    elif p.startswith("first_step"):
        import tempfile

        from megassm.run_config import load_config

        run = tempfile.mkdtemp(prefix=f"bench_first_step_{p}_") if rank == 0 else None
        box = [run]
        dist.broadcast_object_list(box)
        cfg = load_config(str(REPO / "configs/smoke.yaml"),
                          [*overrides(args.d_model, args.blocks), "parallel.zero_stage=3", "train.steps=1",
                           "train.ckpt_every=1000", "train.sample_every=0", "train.eval_every=0", f"run_dir={box[0]}",
                           "model.in_channels=3"])  # the procedural data is 3-channel
        _first_step(cfg, args, rank, res)
        model = None
    elif p in ("save", "resume"):
        model, _ = build_partitioned(cfg, mesh, DEVICE[0], resuming=p == "resume")
        engine = _engine(cfg, model, mesh)
        res["engine_gb"] = _rss_gb()
        t0 = time.perf_counter()
        if p == "save":
            _train_step(engine)  # warm-up: allocates the optimizer states
            res["step_s"] = _train_step(engine)  # a step with no write in flight
            res["step_gb"] = _rss_gb()
            t0 = time.perf_counter()
            engine.save_checkpoint(args.ckpt, tag="bench", save_latest=False)
            dist.barrier()
            res["seconds"] = time.perf_counter() - t0
            res["peak_gb"] = _rss_gb()
            from megassm.checkpoint.snapshot import fsync_tree

            t1 = time.perf_counter()  # what the async path does per file, for a like-for-like rate
            for f in sorted(Path(args.ckpt, "bench").glob(f"*rank_{rank}_*")):
                fsync_tree(f)
            dist.barrier()
            res["fsync_s"] = time.perf_counter() - t1
            res.update(_async_save(engine, Path(args.ckpt), rank, world))
            res["async_peak_gb"] = _rss_gb()
            dist.barrier()
            res.update(bytes_read=bytes_read() - b0, rchar=_rchar() - r0, params=None)
            Path(out, f"rank{rank}.json").write_text(json.dumps(res))
            dist.destroy_process_group()
            return
        else:
            engine.load_checkpoint(args.ckpt, tag="bench", load_module_strict=True, load_optimizer_states=True)
            dist.barrier()
    res.update(seconds=time.perf_counter() - t0, peak_gb=_rss_gb(), bytes_read=bytes_read() - b0,
               params=sum(p.numel() for p in model.parameters()) if p.startswith("build_old") else None)
    if p.startswith("first_step"):
        res["seconds"] = res["launch_to_first_step_s"]
    res["rchar"] = _rchar() - r0  # every byte the phase read (DeepSpeed's torch.load too)
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def _train_step(engine) -> float:
    t0 = time.perf_counter()
    dev, dt = DEVICE[0], (torch.bfloat16 if engine.bfloat16_enabled() else torch.float32)
    x = torch.randn(1, 16, 1, 16, 16, device=dev, dtype=dt)
    loss = engine(x, torch.rand(1, device=dev), torch.randn(1, 8, 4096, device=dev, dtype=dt)).float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    return time.perf_counter() - t0


def _async_save(engine, ckpt_dir: Path, rank: int, world: int) -> dict:
    """The trainer's non-blocking save (megassm/train/checkpoint_writer.py) of the same engine: how long the
    training thread is held (the host snapshot), one training step taken while the files are written, and
    the seconds to COMPLETE (rank 0: the job's save; bytes / seconds is the rate save_stats.json records).
    ``deepspeed_s``: ``save_checkpoint`` with an engine that discards the state dicts -- DeepSpeed's own
    share of the hold (building the state dicts, its barriers)."""
    import torch.distributed as dist

    from megassm.checkpoint.snapshot import FileSink
    from megassm.train import checkpoint as ckpt
    from megassm.train.backends.deepspeed import SnapshotCheckpointEngine
    from megassm.train.checkpoint_writer import BackgroundSave, PendingSave

    tag, steps = "bench_async", [0]

    class _Discard(SnapshotCheckpointEngine):  # DeepSpeed's own part of a save: state dicts, barriers
        def save(self, state_dict, path):
            pass

    dist.barrier()
    t0 = time.perf_counter()
    own = engine.checkpoint_engine
    engine.checkpoint_engine = _Discard(own, FileSink(deferred=True))
    try:
        engine.save_checkpoint(str(ckpt_dir / "discard"), tag=tag, save_latest=False)
    finally:
        engine.checkpoint_engine = own
    deepspeed_s = time.perf_counter() - t0
    dist.barrier()
    t0 = time.perf_counter()
    sink = FileSink(deferred=True)
    own = engine.checkpoint_engine
    engine.checkpoint_engine = SnapshotCheckpointEngine(own, sink)
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    finally:
        engine.checkpoint_engine = own
    snapshot_s = time.perf_counter() - t0
    writer = BackgroundSave(rank, world, lambda d, t: ckpt.commit(d, t, keep_last=10), lambda: steps[0])
    writer.start(PendingSave(ckpt_dir, tag, 0, sink.jobs, t0, snapshot_s))
    step_s = _train_step(engine)  # the same step as the sync baseline, with this rank's write in flight
    steps[0] = 1
    wrote_during_step = not writer.done()
    stats = writer.wait() or {}
    return {"async_snapshot_s": snapshot_s, "deepspeed_s": deepspeed_s, "async_step_s": step_s,
            "async_step_overlapped": wrote_during_step,
            "async_seconds": stats.get("seconds"), "async_bytes": stats.get("bytes")}


def write_checkpoint(args) -> Path:
    """A consolidated checkpoint of the bench model, written one seeded tensor at a time."""
    from megassm.checkpoint.safetensors_io import TensorSpec, write_safetensors
    from megassm.config.load import to_yaml
    from megassm.models import build_model
    from megassm.models.init import init_full

    cfg = _cfg(args)
    d = Path(args.ckpt)
    if (d / "model.safetensors").is_file():
        return d
    d.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in build_model(cfg.model).named_parameters()}
    specs = {n: TensorSpec(s, torch.float32) for n, s in shapes.items()}
    write_safetensors(d, "model", specs, lambda n: init_full(n, shapes[n], cfg.model, 1),
                      max_shard_bytes=1 << 62)
    (d / "config.yaml").write_text(to_yaml(cfg))
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--phases", default="build_old,build_new")
    ap.add_argument("--ckpt", default="/tmp/megassm_bench_init/ckpt", help="checkpoint directory (warm / save)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="save / resume phases: cuda puts the model, engine and step on one GPU per rank (NCCL)")
    ap.add_argument("--note", default="2-core CPU shared with other jobs (load average 8-12 during the runs)",
                    help="what the machine was doing, recorded with the results")
    ap.add_argument("--out", default=None, help="append the results to this JSON file")
    args = ap.parse_args()
    from megassm.models.accounting import param_counts

    cfg = _cfg(args)
    rows = []
    for phase in args.phases.split(","):
        args.phase = phase
        if phase.startswith("warm"):
            write_checkpoint(args)
        out = Path(f"/tmp/megassm_bench_init/{phase}-{os.getpid()}")
        out.mkdir(parents=True, exist_ok=True)
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        t0 = time.perf_counter()
        args.launched = time.time()  # first_step: launch -> first step, the interpreter start included
        mp.spawn(_phase, args=(args.world, port, args, str(out)), nprocs=args.world, join=True)
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(args.world)]
        row = {"phase": phase, "world": args.world, "d_model": args.d_model, "blocks": args.blocks,
               "params": param_counts(cfg.model)["total"], "wall_s": time.perf_counter() - t0, "ranks": ranks}
        if phase == "save":
            row["bytes_written"] = sum(f.stat().st_size for f in Path(args.ckpt, "bench").rglob("*") if f.is_file())
            row["write_gbps"] = row["bytes_written"] / 1e9 / max(r["seconds"] for r in ranks)
            row["write_fsync_gbps"] = row["bytes_written"] / 1e9 / max(r["seconds"] + r["fsync_s"] for r in ranks)
            row["async_write_gbps"] = ranks[0]["async_bytes"] / 1e9 / ranks[0]["async_seconds"]
            row["loadavg"] = os.getloadavg()
            import shutil

            shutil.rmtree(Path(args.ckpt, "bench_async"), ignore_errors=True)
            shutil.rmtree(Path(args.ckpt, "discard"), ignore_errors=True)
        rows.append(row)
        r0 = ranks[0]
        print(f"{phase:10s} world {args.world}  {row['params'] / 1e9:.2f}B  base {r0['base_gb']:.2f} GB  peak "
              f"{max(r['peak_gb'] for r in ranks):.2f} GB/rank  {r0['seconds']:.1f} s  read "
              f"{max(r['bytes_read'] for r in ranks) / 1e9:.2f} GB/rank "
              f"(rchar {max(r['rchar'] for r in ranks) / 1e9:.2f})"
              + (f"  wrote {row['bytes_written'] / 1e9:.2f} GB at {row['write_gbps']:.2f} GB/s, "
                 f"{row['write_fsync_gbps']:.2f} GB/s with fsync" if phase == "save" else "")
              + (f"  (Trainer init {r0['init_s']:.1f} s, peak then {r0['init_gb']:.2f} GB; step 1 "
                 f"{r0['first_step_s']:.1f} s)" if phase.startswith("first_step") else ""), flush=True)
        if phase == "save":
            print(f"  async: training held {max(r['async_snapshot_s'] for r in ranks):.2f} s (snapshot; of which "
                  f"{max(r['deepspeed_s'] for r in ranks):.2f} s DeepSpeed's save_checkpoint without writes), a step "
                  f"{max(r['async_step_s'] for r in ranks):.2f} s during the write (without: "
                  f"{max(r['step_s'] for r in ranks):.2f} s), COMPLETE after {ranks[0]['async_seconds']:.2f} s = "
                  f"{row['async_write_gbps']:.3f} GB/s; host peak {max(r['async_peak_gb'] for r in ranks):.2f} GB/rank",
                  flush=True)
    if args.out:
        path = Path(args.out)
        old = json.loads(path.read_text()) if path.is_file() else {"machine": {}, "rows": []}
        old["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "note": args.note,
                          **({"gpu": torch.cuda.get_device_name(0)} if args.device == "cuda" else {}),
                          "torch": torch.__version__}
        old["rows"].extend(rows)
        path.write_text(json.dumps(old, indent=1))


if __name__ == "__main__":
    main()
