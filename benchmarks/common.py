"""Shared helpers for the GPU benchmarks: device facts, timing, peak memory, result files.

Every result file is JSON with top-level ``device``, ``gpu_count``, ``torch``, ``triton``, ``date``,
``rows`` (one dict per measurement, each with ``bench``, ``seq_len``, ``ms`` where timed), plus a
markdown table beside it. Timings are medians of CUDA-event-timed repetitions after warm-up.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# datasheet dense bf16 peak, TFLOP/s (SXM parts)
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


def ensure_selective_scan_stub() -> None:
    """mamba_ssm/__init__ imports the compiled Mamba-1 extension, which a MAMBA_SKIP_CUDA_BUILD wheel lacks;
    the SSD/Mamba-2 code never calls it (see megassm/ops/ssd.py)."""
    try:
        import selective_scan_cuda  # noqa: F401
    except ImportError:
        sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))


def device_info() -> dict:
    import triton

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)
    return {
        "device": name,
        "gpu_count": torch.cuda.device_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "datasheet_bf16_tflops": peak,
    }


def card_tag(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'."""
    for k in ("H200", "H100", "A100", "B200"):
        if k in name:
            return k.lower()
    return "".join(c for c in name.lower() if c.isalnum())[:16] or "cpu"


def time_ms(fn: Callable[[], object], warmup: int = 2, reps: int | None = None, budget_s: float = 1.5,
            max_reps: int = 50) -> dict:
    """Median / min / max of CUDA-event-timed calls of ``fn`` (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    if reps is None:  # size the repetitions from one timed call
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        one = max(time.perf_counter() - t0, 1e-4)
        reps = int(min(max_reps, max(3, budget_s / one)))
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return {"ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times), "reps": reps}


def peak_mem_gb(fn: Callable[[], object]) -> float:
    """Peak memory above what was allocated before one call of ``fn``, GB (1e9 bytes)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def gemm_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = time_ms(lambda: a @ b, warmup=3, reps=20)
    return 2 * n**3 / (t["ms"] * 1e-3) / 1e12


class Results:
    """Accumulates rows and rewrites the JSON (and markdown) after each one, so a killed run keeps its data."""

    def __init__(self, out_dir: Path, stem: str, columns: list[str], extra: dict | None = None):
        self.info = device_info()
        self.info.update(extra or {})
        self.rows: list[dict] = []
        self.columns = columns
        out_dir.mkdir(parents=True, exist_ok=True)
        tag = card_tag(self.info["device"])
        self.json_path = out_dir / f"{stem}_{tag}.json"
        self.md_path = out_dir / f"{stem}_{tag}.md"

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(" | ".join(f"{k}={_fmt(row.get(k))}" for k in self.columns if k in row), flush=True)
        self.write()

    def write(self) -> None:
        self.json_path.write_text(json.dumps({**self.info, "rows": self.rows}, indent=1))
        head = f"{self.info['device']} x{self.info['gpu_count']}, torch {self.info['torch']}, " \
               f"triton {self.info['triton']}, {self.info['date']}\n\n"
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        for r in self.rows:
            lines.append("| " + " | ".join(_fmt(r.get(c)) for c in self.columns) + " |")
        self.md_path.write_text(head + "\n".join(lines) + "\n")


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def out_dir() -> Path:
    return Path(os.environ.get("OUT") or REPO / "benchmarks" / "results")
