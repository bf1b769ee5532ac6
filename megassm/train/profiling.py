"""Profiler traces from the config (``train.profile``).

``torch.profiler`` wraps whole train steps (forward, backward and the DeepSpeed optimizer step, with
their collectives) on the chosen ranks. For each profiled rank, ``run_dir/profile/`` gets

    rank{R}_steps{A}-{B}.pt.trace.json   Chrome / Perfetto trace of steps A..B
    rank{R}_steps{A}-{B}_ops.txt         the profiler's op table, by self time (on GPU after the time by
                                         kind of kernel: GEMM, FP8 GEMM, attention, Hydra, fused, copies)
    rank{R}_steps{A}-{B}_memory.pickle   CUDA memory snapshot (train.profile.memory, GPU only)

and the ``megassm.train`` log a short summary: the top ops (CPU) or kernels (GPU) by self time and an
idle fraction (see ``summarize``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.autograd import DeviceType

from megassm.config.schema import ProfileConfig
from megassm.config.validate import ConfigError

log = logging.getLogger("megassm.train")
TOP_OPS = 8  # ops / kernels named in the log line (the _ops.txt table has more)
MEMORY_HISTORY_ENTRIES = 200_000  # allocation events the CUDA snapshot keeps
STEP_LABEL = "train step"  # trace label of each profiled step: "train step 12"


@dataclass(frozen=True)
class ProfileWindow:
    """Which steps are profiled, as a ``torch.profiler.schedule`` counted from ``first_step``."""

    first: int  # first recorded step (numbered from 1, as in metrics.jsonl)
    last: int  # last recorded step
    wait: int  # steps run before the warm-up, not recorded
    warmup: int  # steps profiled and discarded (the profiler's own start-up cost lands there)

    @property
    def active(self) -> int:
        return self.last - self.first + 1


def profile_window(start_step: int, steps: int, first_step: int) -> ProfileWindow | None:
    """The window of ``steps`` steps from ``start_step`` as seen by a process whose next step is
    ``first_step`` (1 on a fresh run, N + 1 after resuming at step N); None if nothing of it is left."""
    last = start_step + steps - 1
    if steps < 1 or last < first_step:
        return None
    first = max(start_step, first_step)
    warmup = min(1, first - first_step)
    return ProfileWindow(first=first, last=last, wait=first - first_step - warmup, warmup=warmup)


class StepProfiler:
    """Call ``step(n)`` after train step ``n`` has finished and ``close()`` at the end; a no-op on ranks
    that do not profile and once the window is over."""

    def __init__(self, cfg: ProfileConfig, out_dir: Path, rank: int, world: int, device: torch.device,
                 first_step: int):
        if cfg.steps and max(cfg.ranks) >= world:
            raise ConfigError(f"train.profile.ranks={list(cfg.ranks)} names ranks this run does not have "
                              f"(world size {world}: ranks 0..{world - 1})")
        self.out_dir, self.rank, self.memory = out_dir, rank, cfg.memory
        self.cuda = device.type == "cuda"
        self.prof: torch.profiler.profile | None = None
        self._label: torch.profiler.record_function | None = None
        self.window = profile_window(cfg.start_step, cfg.steps, first_step) if rank in cfg.ranks else None
        if self.window is None:
            if cfg.steps and rank in cfg.ranks:
                log.info(f"train.profile: steps {cfg.start_step}..{cfg.start_step + cfg.steps - 1} are before "
                         f"this run's first step {first_step} (resumed); nothing is profiled")
            return
        if cfg.memory and not self.cuda:
            log.info("train.profile.memory on CPU: the trace records allocations; a memory snapshot is CUDA-only")
        w = self.window
        out_dir.mkdir(parents=True, exist_ok=True)
        self.name = f"rank{rank}_steps{w.first}-{w.last}"
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(
            activities=activities, record_shapes=True, profile_memory=cfg.memory, on_trace_ready=self._write,
            schedule=torch.profiler.schedule(wait=w.wait, warmup=w.warmup, active=w.active, repeat=1))
        self.prof.start()
        self._begin(first_step)

    def step(self, step: int) -> None:
        if self.prof is None:
            return
        self._end_label()
        self.prof.step()  # after the window's last step this writes the trace (on_trace_ready)
        if step >= self.window.last:
            self.close()
        else:
            self._begin(step + 1)

    def close(self) -> None:
        """Stop profiling; a window cut short (signal, error) still writes what it recorded."""
        if self.prof is None:
            return
        self._end_label()
        prof, self.prof = self.prof, None
        prof.stop()
        if self.memory and self.cuda:
            torch.cuda.memory._record_memory_history(enabled=None)

    def _begin(self, step: int) -> None:
        """Step ``step`` starts: label it in the trace with the trainer's step number (the profiler's own
        ProfilerStep#k counts from this process's first step), and start recording CUDA allocations at
        the window's first step."""
        if step >= self.window.first - self.window.warmup:
            self._label = torch.profiler.record_function(f"{STEP_LABEL} {step}")
            self._label.__enter__()
        if self.memory and self.cuda and step == self.window.first:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)

    def _end_label(self) -> None:
        if self._label is not None:
            self._label.__exit__(None, None, None)
            self._label = None

    def _write(self, prof: torch.profiler.profile) -> None:
        trace = self.out_dir / f"{self.name}.pt.trace.json"
        prof.export_chrome_trace(str(trace))
        averages = prof.key_averages()
        sort = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        table = averages.table(sort_by=sort, row_limit=40)
        kinds = kernel_kinds(averages) if self.cuda else []
        if kinds:
            table = kinds_table(kinds) + "\n" + table
        (self.out_dir / f"{self.name}_ops.txt").write_text(table)
        if self.memory and self.cuda:
            torch.cuda.memory._dump_snapshot(str(self.out_dir / f"{self.name}_memory.pickle"))
        s = summarize(prof.events(), averages, self.cuda)
        tops = ", ".join(f"{name[:60]} {ms:.3g} ms ({pct:.0f}%)" for name, ms, pct in s["top"])
        log.info(f"profile rank {self.rank} steps {self.window.first}-{self.window.last}: {trace} "
                 f"(open in ui.perfetto.dev); wall {s['wall_ms']:.1f} ms, {s['idle_what']} "
                 f"{100 * s['idle']:.1f}%; top {s['by']}: {tops}"
                 + ("; GPU time by kind: " + ", ".join(f"{k} {pct:.0f}%" for k, _, pct, _ in kinds) if kinds else ""))


def summarize(events: list, averages: list, cuda: bool, top: int = TOP_OPS) -> dict:
    """Top ops by self time and an idle fraction over the recorded steps, from a profiler's ``events()``
    and ``key_averages()``.

    On GPU: the top CUDA kernels by GPU time, and the share of the steps' wall time in which the GPU ran
    no kernel or copy (waiting on the host, the data or the network). On CPU there is no device to be
    idle: the share of wall time in which no profiled op ran on any thread -- Python between ops, the
    trainer's own bookkeeping and the profiler's overhead.
    Returns {"top": [(name, self_ms, percent of all ops' self time)], "by", "wall_ms", "idle", "idle_what"}.
    """
    steps = [e for e in events if e.name.startswith("ProfilerStep") and e.device_type == DeviceType.CPU]
    t0 = min((e.time_range.start for e in steps), default=0.0)
    t1 = max((e.time_range.end for e in steps), default=0.0)
    device = DeviceType.CUDA if cuda else DeviceType.CPU
    busy = [e for e in events if e.device_type == device and _is_op(e, e.name)]
    ops = [a for a in averages if a.device_type == device and _is_op(a, a.key)]
    self_us = [a.self_device_time_total if cuda else a.self_cpu_time_total for a in ops]
    total = sum(self_us) or 1.0
    ranked = sorted(zip(self_us, (a.key for a in ops)), reverse=True)[:top]
    wall = max(t1 - t0, 1e-9)
    covered = _union_length([(e.time_range.start, e.time_range.end) for e in busy], t0, t1)
    return {"top": [(name, us / 1e3, 100 * us / total) for us, name in ranked], "by": "kernels" if cuda else "ops",
            "wall_ms": wall / 1e3, "idle": max(0.0, 1.0 - covered / wall),
            "idle_what": "GPU idle" if cuda else "host outside ops"}


# Where a GPU step's time goes, by kind of kernel: the first kind whose pattern is found in a kernel's name
# (lower case) decides. Order matters: Inductor's fused kernels are "triton_*", mamba-ssm's are Triton kernels too
# but are named after the scan ("_chunk_scan_fwd_kernel"); FP8 GEMMs are cuBLAS's e4m3 kernels or, on Hopper with
# CUDA 13, nvjet kernels whose tile name starts with a "q" (aten::_scaled_mm ran "nvjet_sm90_qrtst_..." / "qqtst"
# on an H100, bf16 aten::mm "nvjet_sm90_tst_...").
KERNEL_KINDS = tuple((kind, re.compile(pattern)) for kind, pattern in (
    ("attention", r"sdpa|fmha|flash|attention|fa4"),
    ("hydra (scan, conv, norm)", r"chunk_scan|chunk_state|state_passing|bmm_chunk|chunk_cumsum|causal_conv|conv_silu"
                                 r"|conv_bwd|out_norm|gated_norm|hydra|ssd"),
    ("gemm fp8", r"e4m3|e5m2|f8f8|fp8|nvjet_sm\d+_q"),
    ("gemm", r"nvjet|gemm|cutlass|xmma|sm90_|ampere_|cublas"),
    ("inductor fused", r"triton_"),
    ("optimizer", r"multi_tensor_apply|adam"),
    ("copy", r"memcpy|memset|copy|cat|unrolled_elementwise_kernel"),
    ("collective", r"nccl"),
    ("elementwise / reduce (eager)", r"elementwise|reduce|vectorized|softmax|norm"),
))


def kernel_kind(name: str) -> str:
    """KERNEL_KINDS' name for a CUDA kernel (or copy), "other" when no pattern matches."""
    low = name.lower()
    return next((kind for kind, pattern in KERNEL_KINDS if pattern.search(low)), "other")


def kernel_kinds(averages: list) -> list[tuple[str, float, float, int]]:
    """GPU time by kind of kernel from a profiler's ``key_averages()``: [(kind, ms, percent, kernels)], largest
    first. Only device-side events count (kernels and copies), so nothing is counted twice."""
    totals: dict[str, list] = {}
    for a in averages:
        if a.device_type != DeviceType.CUDA or not _is_op(a, a.key):
            continue
        t = totals.setdefault(kernel_kind(a.key), [0.0, 0])
        t[0] += a.self_device_time_total
        t[1] += a.count
    total = sum(t[0] for t in totals.values()) or 1.0
    return sorted(((k, us / 1e3, 100 * us / total, n) for k, (us, n) in totals.items()), key=lambda r: -r[1])


def kinds_table(rows: list[tuple[str, float, float, int]]) -> str:
    """kernel_kinds' rows as a fixed-width table."""
    lines = [f"{'kind of kernel':<30} {'GPU ms':>10} {'share':>7} {'kernels':>8}"]
    lines += [f"{k:<30} {ms:>10.2f} {pct:>6.1f}% {n:>8d}" for k, ms, pct, n in rows]
    return "\n".join(lines) + "\n"


def _is_op(event, name: str) -> bool:
    """Not a span over whole steps or a user label: those (and their GPU-side twins) cover the ops."""
    return not (name.startswith(("ProfilerStep", STEP_LABEL)) or getattr(event, "is_user_annotation", False))


def _union_length(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of the union of [start, end) intervals, clipped to [lo, hi)."""
    covered, reach = 0.0, lo
    for a, b in sorted(intervals):
        a, b = max(a, reach), min(b, hi)
        if b > a:
            covered += b - a
            reach = b
    return covered
