"""Run logging on rank 0: metrics.jsonl (one line per step), TensorBoard scalars/images, optionally
Weights & Biases (the same scalars and images), a progress bar."""

from __future__ import annotations

import json
import math
import secrets
from pathlib import Path

import torch

from megassm.config.schema import WandbConfig

WANDB_RUN_ID = "wandb_run_id"  # in the run directory: a requeued or resumed job continues this W&B run

# Dense bf16 peak (TFLOP/s) by device name, for MFU; datasheet numbers (SXM parts).
_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0, "GH200": 989.0}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tf in _PEAK_TFLOPS.items():
        if key in name:
            return tf * 1e12
    return None


def _num(v, fmt: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def progress_line(row: dict, total: int) -> str:
    """The periodic text log line of a step row, as Megatron / torchtitan print one:
    ``step 10/600 | loss 0.4123 | lr 2.000e-03 | grad norm 0.812 | 51,200 tokens/s | 12.5 samples/s |
    MFU 31.2% | mem 1.23 GiB | 0.41 s/step`` (+ the non-finite steps and the reader's skips so far, if any)."""
    mfu = _num(row.get("mfu"), ".1%")  # n/a without a known peak (CPU, an unlisted GPU: train.peak_tflops)
    parts = [f"step {row['step']}/{total}", f"loss {_num(row.get('loss'), '.4f')}", f"lr {_num(row.get('lr'), '.3e')}",
             f"grad norm {_num(row.get('grad_norm'), '.3f')}", f"{_num(row.get('tokens_per_s'), ',.0f')} tokens/s",
             f"{_num(row.get('samples_per_s'), '.1f')} samples/s", f"MFU {mfu}",
             f"mem {_num(row.get('peak_mem_gb'), '.2f')} GiB", f"{_num(row.get('step_time_s'), '.2f')} s/step"]
    if row.get("skipped_steps"):
        parts.append(f"{row['skipped_steps']} non-finite steps skipped")
    if row.get("data_skipped"):
        parts.append(f"{row['data_skipped']} unreadable shards or samples skipped")
    return " | ".join(parts)


def eval_line(step: int, values: dict[str, float]) -> str:
    """``step 200 | eval/heldout_loss 0.4123 | eval/kid 0.0123``: evaluation results for the text log."""
    return " | ".join([f"step {step}", *(f"eval/{k} {_num(float(v), '.5g')}" for k, v in values.items())])


class _Bar:
    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, n: int, loss: float, sps: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{sps:.1f}", refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class WandbSink:
    """One W&B run per run directory. Its id is kept in ``run_dir/wandb_run_id`` and passed back with
    ``resume="allow"``, so a requeued or resumed job (or, offline, a later ``wandb sync``) continues it."""

    def __init__(self, run_dir: Path, cfg: WandbConfig, run_config: dict | None = None):
        import wandb

        id_file = run_dir / WANDB_RUN_ID
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self.wandb = wandb
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, tags=list(cfg.tags),
                              id=run_id, resume="allow", name=run_dir.name, dir=str(run_dir), config=run_config)
        # after a resume from an earlier checkpoint the trainer logs some steps again, but W&B's own step may
        # only grow: charts use the trainer's step as their x-axis instead
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "step": step})

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        """images: (N, 3, H, W) in [0, 1]."""
        hwc = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        self.run.log({tag: [self.wandb.Image(im) for im in hwc], "step": step})

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, tb: bool = True, wandb: WandbConfig | None = None,
                 run_config: dict | None = None):
        """enabled: this rank logs (rank 0); wandb: also log to Weights & Biases (run_config: its config panel)."""
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.writer = None
        self.jsonl = None
        self.wandb = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(run_dir / "metrics.jsonl", "a")
            if tb:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tb"))
            if wandb is not None:
                self.wandb = WandbSink(run_dir, wandb, run_config)

    def progress(self, total: int, initial: int, enabled: bool) -> _Bar:
        return _Bar(total, initial, enabled and self.enabled)

    def step(self, row: dict, tb: bool) -> None:
        """row: {"step": n, name: value}; every row goes to metrics.jsonl, the dashboards (TensorBoard,
        W&B) get the finite scalars of rows with ``tb`` set (every train.log_every steps)."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                     for k, v in row.items()}) + "\n")
        self.jsonl.flush()
        if not tb:
            return
        scalars = {f"train/{k}": v for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, row["step"])
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.scalars(scalars, row["step"])

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        """``{prefix}/{name}`` scalars at ``step`` (e.g. eval/heldout_loss), to metrics.jsonl and the dashboards."""
        if not self.enabled or not values:
            return
        tagged = {f"{prefix}/{k}": float(v) for k, v in values.items()}
        self.jsonl.write(json.dumps({"step": step, **tagged}) + "\n")
        self.jsonl.flush()
        finite = {k: v for k, v in tagged.items() if math.isfinite(v)}
        if self.writer is not None:
            for k, v in finite.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.scalars(finite, step)

    def event(self, row: dict) -> None:
        """row: {"event": name, "step": n, ...}; TensorBoard and W&B mark it as ``event/<name>`` = 1 at that step
        (TensorBoard also gets the row as text under ``events``)."""
        if self.enabled:
            self.jsonl.write(json.dumps(row) + "\n")
            self.jsonl.flush()
            if self.writer is not None and "step" in row:
                self.writer.add_scalar(f"event/{row['event']}", 1, row["step"])
                self.writer.add_text("events", json.dumps(row), row["step"])
                self.writer.flush()
            if self.wandb is not None and "step" in row:
                self.wandb.scalars({f"event/{row['event']}": 1}, row["step"])

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        """images: (N, 3, H, W) in [0, 1]; also written as PNGs to run_dir/<tag>/step_<step>_<i>.png."""
        if not self.enabled:
            return
        from PIL import Image

        out = self.run_dir / tag
        out.mkdir(parents=True, exist_ok=True)
        hwc = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        for i, im in enumerate(hwc):
            Image.fromarray(im).save(out / f"step_{step:08d}_{i}.png")
        if self.writer is not None:
            self.writer.add_images(tag, images, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.images(tag, images, step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            self.wandb.close()
            self.wandb = None


def skipped_data(data) -> dict:
    """What rank 0's reader skipped so far (an unreadable shard counts once, an unreadable or wrong-shape
    sample once): the total and the count per reason, for metrics.jsonl (the total also to the dashboards);
    {} for the procedural data."""
    stats = getattr(data, "stats", None)
    if stats is None:
        return {}
    by_reason = stats().get("skipped", {})
    return {"data_skipped": sum(by_reason.values()), "data_skipped_by_reason": by_reason}


def peak_mem_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (host RSS)
    except Exception:
        return float("nan")
