"""Full-parameter training of the full hth-5b on one GPU through ``megassm train`` (issue 35 §3), against
``megassm plan``'s prediction for the same config.

    python benchmarks/full_size_full_param.py --out benchmarks/results/full_size_full_param_<card>.json

For stage 2's shape (16 x 1 x 256 x 256 latents: 16,384 tokens, configs/stage2_2k.yaml) and stage 3's
(16 x 33 x 44 x 80: 29,040 tokens, configs/stage3_video.yaml): random-latent shards with T5-XXL-wide text
(``write_synthetic_dataset``), then ``megassm train`` at world 1 with ZeRO-3, DeepSpeed's optimizer offload
(``parallel.offload_optimizer``: fp32 masters, Adam and fp32 gradients on the host), activation checkpointing
``all``, micro-batch 1, no accumulation, no EMA (a 20 GB fp32 copy the GPU would have to hold), seeded draws.
Per step: time, peak GPU memory (metrics.jsonl); the process's peak host memory (VmHWM).

A whole checkpoint of 5.12B parameters (fp32 masters + Adam moments, 12 B/param: 61.5 GB) leaves no room on
this machine's 64 GB disk, so by default each run is stopped (SIGKILL) once its last step is logged, before the
final save. For the stages in ``--resume-stages`` the run instead saves a model-only checkpoint at its last step
(``train.save_optimizer_state=false``: the fp32 masters without the Adam moments; ``megassm plan`` prints
both sizes) and a second ``megassm train`` resumes from it for 2 more steps: save size, seconds and GB/s
(``save_stats.json``), the resumed run's seconds to its first logged step (start-up, the load and one step),
the fresh-optimizer warning, and the losses on both sides. The checkpoint is deleted afterwards (disk).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHAPES = {"stage2_2k": (16, 1, 256, 256), "stage3_video": (16, 33, 44, 80)}
COMMON = ["parallel.cp=1", "parallel.offload_optimizer=true", "train.activation_checkpointing=all",
          "train.micro_batch_size=1", "train.grad_accum=1", "train.ema_decay=0", "train.sample_every=0",
          "train.eval_every=0", "train.progress_bar=false", "train.log_every=1", "optim.warmup_steps=2",
          "data.num_workers=1", "data.shuffle_buffer=4", "encoders.vae=unused", "encoders.text_encoder=unused",
          "init_from=null"]


def vm_kb(pid: int, key: str) -> int:
    try:
        for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
            if ln.startswith(key + ":"):
                return int(ln.split()[1])
    except OSError:
        pass
    return 0


def train(stage: str, data: Path, run_dir: Path, steps: int, timeout: int, save: bool = False,
          log_name: str = "", extra: tuple[str, ...] = ()) -> dict:
    """One ``megassm train`` to ``steps`` (resuming from run_dir's checkpoint when it has one). ``save``: a
    model-only checkpoint at the last step; otherwise SIGKILLed once the last step is logged, before the final
    save (the disk)."""
    ckpt = ["train.save_optimizer_state=false", f"train.ckpt_every={steps}"] if save else \
        [f"train.ckpt_every={steps + 1}"]
    cmd = [sys.executable, "-m", "megassm", "train", f"configs/{stage}.yaml", f"run_dir={run_dir}",
           f"data.paths=[{data}]", "data.weights=[1.0]", f"train.steps={steps}", *COMMON, *ckpt, *extra]
    t0, hwm = time.time(), 0
    log_path = run_dir.parent / f"{log_name or stage}.log"
    log = open(log_path, "w")
    p = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ,
                                                                                   "PYTHONUNBUFFERED": "1"})
    metrics, rows, killed = run_dir / "metrics.jsonl", [], False
    seen = len(metrics.read_text().splitlines()) if metrics.is_file() else 0  # a resumed run appends
    first_step_s = None
    while p.poll() is None and time.time() - t0 < timeout:
        time.sleep(1.0)
        hwm = max(hwm, vm_kb(p.pid, "VmHWM"))
        if metrics.is_file():
            rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            if first_step_s is None and any("loss" in r for r in rows[seen:]):
                first_step_s = round(time.time() - t0, 1)  # start-up (and a resume's load) + one step
            if not save and any(r.get("step") == steps and "loss" in r for r in rows[seen:]):
                p.send_signal(signal.SIGKILL)  # before the final save (module doc)
                killed = True
    if p.poll() is None:
        p.kill()
    p.wait()
    log.close()
    text = log_path.read_text()
    tail = [ln for ln in text.splitlines() if ln.strip()][-25:]
    stats = run_dir / "checkpoints" / "save_stats.json"
    rows = rows[seen:]
    return {"stage": stage, "cmd": " ".join(cmd[3:]), "seconds": round(time.time() - t0, 1),
            "first_step_s": first_step_s,
            "save_stats": json.loads(stats.read_text()) if save and stats.is_file() else None,
            "fresh_optimizer_warning": "a model-only checkpoint" in text,
            "events": [r for r in rows if r.get("event") in ("resume", "checkpoint")],
            "rc": p.returncode, "stopped_before_final_save": killed, "host_peak_gb": hwm * 1024 / 1e9,
            "steps": [{k: r.get(k) for k in ("step", "loss", "step_time_s", "peak_mem_gb", "tokens_per_s", "mfu")}
                      for r in rows if "loss" in r], "tail": tail}


def planned(stage: str, extra: tuple[str, ...] = ()) -> dict:
    cmd = [sys.executable, "-m", "megassm", "plan", f"configs/{stage}.yaml", *COMMON, *extra, "--gpus", "1", "--json"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if p.returncode:
        return {"error": p.stderr[-800:]}
    res = json.loads(p.stdout[p.stdout.index("{"):])
    c = res["configured"]
    return {"gpu_gb": c["memory_gb"]["total"], "step_s": c["step"]["total_s"],
            "offload_optimizer_s": c["step"].get("offload_optimizer_s", 0.0),
            "host_offload_gb": res["host"].get("offload_optimizer_gb"), "checkpoint_gb": res["host"]["checkpoint_gb"]}


def main() -> int:
    from megassm.data.testing import write_synthetic_dataset

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/megassm_full5b")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--stages", default="stage2_2k,stage3_video")
    ap.add_argument("--timeout", type=int, default=330, help="seconds per training run")
    ap.add_argument("--resume-stages", default="", help="stages that save model-only and resume (module doc)")
    ap.add_argument("--extra", nargs="*", default=(), help="more overrides (a miniature check: a small model.*)")
    args = ap.parse_args()
    work = Path(args.work)
    res: dict = {"runs": []}
    for stage in args.stages.split(","):
        data = work / f"data_{stage}"
        write_synthetic_dataset(data, [SHAPES[stage]], num_samples=8, samples_per_shard=8, text_dim=4096,
                                max_text=300, text_tokens=120)
        save = stage in args.resume_stages.split(",")
        run = train(stage, data, work / f"run_{stage}", args.steps, args.timeout, save=save, extra=args.extra)
        if save and run["rc"] == 0:
            run["resumed"] = train(stage, data, work / f"run_{stage}", args.steps + 2, args.timeout,
                                   log_name=f"{stage}_resumed", extra=args.extra)
            shutil.rmtree(work / f"run_{stage}" / "checkpoints", ignore_errors=True)
        run["plan"] = planned(stage, args.extra)
        steady = [s for s in run["steps"] if s["step"] > 1]
        if steady and "error" not in run["plan"]:
            measured = min(s["step_time_s"] for s in steady)
            predicted = run["plan"]["step_s"] + run["plan"]["offload_optimizer_s"]
            peak = max(s["peak_mem_gb"] or 0 for s in run["steps"]) * 1.073741824  # GiB -> GB
            run["compare"] = {"step_s": measured, "planned_step_s": predicted, "step_error": predicted / measured - 1,
                              "gpu_gb": peak, "planned_gpu_gb": run["plan"]["gpu_gb"],
                              "gpu_error": run["plan"]["gpu_gb"] / peak - 1 if peak else None}
        print(json.dumps({k: run.get(k) for k in ("stage", "rc", "seconds", "host_peak_gb", "steps", "plan",
                                                   "compare", "save_stats")}), flush=True)
        if "resumed" in run:
            print(json.dumps({k: run["resumed"].get(k) for k in ("rc", "seconds", "first_step_s", "steps", "events",
                                                                 "fresh_optimizer_warning")}), flush=True)
        if not run["steps"]:
            print("\n".join(run["tail"]), flush=True)
        res["runs"].append(run)
        Path(args.out).write_text(json.dumps(res, indent=1))
    resumed_ok = all(r["resumed"]["fresh_optimizer_warning"] and r["resumed"]["steps"]
                     and r["resumed"]["steps"][0]["step"] == args.steps + 1 for r in res["runs"] if "resumed" in r)
    return 0 if all(r["steps"] for r in res["runs"]) and resumed_ok else 1


if __name__ == "__main__":
    sys.exit(main())
