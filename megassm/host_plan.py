"""Host memory and checkpoint I/O per rank for ``megassm plan``: construction, warm start, resume, save.

P parameters, P_tp = a TP rank's share (split tensors / tp, replicated ones whole), L = the largest
TP-local parameter, N = ZeRO-3 partitions (gpus / tp: DP x CP), w = bytes per training-dtype element:

    construction   before #27   4P                (every rank the whole fp32 model)
                   now ZeRO-3   w P_tp / N + 8 L  (its partitions + one parameter drawn, then cast)
                   now ZeRO<3   4 P_tp
    warm start     before #27   8P                (the model + a whole state dict), reads 4P
                   now          construction + 4L, reads 4 P_tp / N (ZeRO-3: the rows of its 1/N of each
                                TP slice, by offset; otherwise 4 P_tp, its whole TP slices)
    resume         DeepSpeed's own per-rank files: 12 P_tp / N (fp32 masters + Adam moments) + EMA 4 P_tp / N
    offload        parallel.offload_optimizer: 16 P_tp / N resident, pinned (fp32 masters, Adam m and v, fp32 grads)
    checkpoint     12 P + 4 P (EMA) in all; model-only (train.save_optimizer_state=false: no Adam moments)
                   4 P + 4 P (EMA); seconds = the configured one's size / the job's aggregate write rate

The formulas are compared with measurements at 1.16B parameters on a CPU in benchmarks/results/init_cpu.md.
"""

from __future__ import annotations

from megassm.config.schema import RunConfig
from megassm.grace import grace_seconds
from megassm.models.accounting import param_counts

GB = 1e9


def tp_local_sizes(cfg: RunConfig, tp: int) -> tuple[int, int]:
    """(a TP rank's parameter count, its largest parameter) from the meta-device model and the shard plan."""
    import torch

    from megassm.models import build_model
    from megassm.parallel.sharding import shard_spec

    with torch.device("meta"):
        model = build_model(cfg.model)
    total = largest = 0
    for name, p in model.named_parameters():
        spec = shard_spec(name, cfg.model, tp) if tp > 1 else None
        n = p.numel() if spec is None else p.numel() // spec.size * spec.local_size(tp)
        total, largest = total + n, max(largest, n)
    return total, largest


def predict_host(cfg: RunConfig, gpus: int, write_gbps: float) -> dict:
    """Per-rank host peaks (GB), bytes read per rank (GB) and the checkpoint's size and save seconds."""
    p, t = cfg.parallel, cfg.train
    P = param_counts(cfg.model)["total"]
    P_tp, L = tp_local_sizes(cfg, p.tp)
    N = max(1, gpus // (p.tp * p.pp)) if p.zero_stage == 3 else 1
    w = 2 if t.precision == "bf16" else 4
    build_now = (w * P_tp / N + 8 * L) if p.zero_stage == 3 else 4 * P_tp
    ema = 4 * P if t.ema_decay > 0 else 0
    full, model_only = 12 * P + ema, 4 * P + ema  # fp32 masters + Adam m, v (+ EMA); masters (+ EMA)
    size = full if t.save_optimizer_state else model_only
    return {
        "construction_gb": {"before": 4 * P / GB, "now": build_now / GB},
        "warm_start_gb": {"before": 8 * P / GB, "now": (build_now + 4 * L) / GB},
        "warm_start_read_gb": {"before": 4 * P / GB, "now": 4 * P_tp / N / GB},
        "resume_read_gb": (12 * P_tp + (4 * P_tp if ema else 0)) / N / GB,
        "checkpoint_gb": size / GB,
        "checkpoint_full_gb": full / GB,
        "checkpoint_model_only_gb": model_only / GB,
        "save_optimizer_state": t.save_optimizer_state,
        "save_s": size / GB / write_gbps,
        "write_gbps": write_gbps,
        "largest_param_gb": 4 * L / GB,
        "offload_optimizer_gb": 16 * P_tp / N / GB if p.offload_optimizer else 0.0,
        "grace_s": grace_seconds(size / GB, write_gbps),
    }


def print_host(h: dict) -> None:
    print("\nhost memory per rank (GB) and checkpoint I/O:")
    for key, label in (("construction_gb", "construction"), ("warm_start_gb", "warm start")):
        print(f"  {label:<15} {h[key]['now']:8.2f} GB   (before partitioned construction: {h[key]['before']:.2f})")
    r = h["warm_start_read_gb"]
    print(f"  warm-start read {r['now']:8.2f} GB   (before: {r['before']:.2f});  "
          f"resume read {h['resume_read_gb']:.2f} GB")
    if h.get("offload_optimizer_gb"):
        print(f"  offloaded optimizer {h['offload_optimizer_gb']:8.2f} GB resident, pinned (fp32 masters, Adam, grads)")
    kind = "with optimizer state" if h["save_optimizer_state"] else "model-only"
    other = (f"model-only {h['checkpoint_model_only_gb']:.1f} GB with train.save_optimizer_state=false"
             if h["save_optimizer_state"] else f"{h['checkpoint_full_gb']:.1f} GB with the optimizer state")
    print(f"  checkpoint      {h['checkpoint_gb']:8.1f} GB in all ({kind}; {other}), {h['save_s']:.0f} s at "
          f"{h['write_gbps']:.1f} GB/s -> SIGUSR1 grace >= {h['grace_s']} s")
