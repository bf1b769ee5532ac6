"""Run logging on rank 0: metrics.jsonl (one line per step), TensorBoard scalars/images, a progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

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


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, tb: bool = True):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(run_dir / "metrics.jsonl", "a")
            if tb:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tb"))

    def progress(self, total: int, initial: int, enabled: bool) -> _Bar:
        return _Bar(total, initial, enabled and self.enabled)

    def step(self, row: dict, tb: bool) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                     for k, v in row.items()}) + "\n")
        self.jsonl.flush()
        if tb and self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(f"train/{k}", v, row["step"])
            self.writer.flush()

    def event(self, row: dict) -> None:
        if self.enabled:
            self.jsonl.write(json.dumps(row) + "\n")
            self.jsonl.flush()

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        """images: (N, 3, H, W) in [0, 1]."""
        if self.enabled and self.writer is not None:
            self.writer.add_images(tag, images, step)
            self.writer.flush()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
