"""``megassm inspect checkpoint``: what a checkpoint holds and whether it is intact.

Reports the kind, step, stage, stored config, parameter count per component and dtypes; checks
names/shapes against the stored (or given) config and scans every tensor for NaN/Inf, one tensor
at a time. A DeepSpeed checkpoint's files are checked whole (``verify.damaged_files``, what a resume checks);
``crc`` also verifies the CRC-32 of every record of DeepSpeed's zip files.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import torch

from megassm.checkpoint.model_only import saved_optimizer_state
from megassm.checkpoint.model_specs import compare_specs, expected_specs
from megassm.checkpoint.sources import Checkpoint, WeightSet, open_checkpoint
from megassm.models.mixers import is_mixer_symbol, mixer_for_symbol


def component(name: str, pattern: str | None) -> str:
    m = re.match(r"blocks\.(\d+)\.(mixer|cross_attn|mlp)\.", name)
    if not m:
        return "blocks (norms, modulation)" if name.startswith("blocks.") else "embedders, final layer"
    if m.group(2) != "mixer":
        return {"cross_attn": "cross-attention", "mlp": "FFN"}[m.group(2)]
    sym = pattern[int(m.group(1))] if pattern and int(m.group(1)) < len(pattern) else "?"
    return mixer_for_symbol(sym).label if is_mixer_symbol(sym) else "mixers (unknown kind)"


def _scan(ws: WeightSet, label: str) -> list[str]:
    bad = []
    for name in ws.specs:
        t = ws.read(name)
        if t.is_floating_point():
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            if nan or inf:
                bad.append(f"{label}{name}: {nan} NaN, {inf} Inf of {t.numel()}")
    return bad


def inspect_checkpoint(path: str | Path, *, tag: str | None = None, config: dict | None = None, scan: bool = True,
                       crc: bool = False) -> tuple[dict, list[str]]:
    """Returns (summary dict, problems). An unreadable checkpoint raises CheckpointError."""
    ckpt: Checkpoint = open_checkpoint(path, tag=tag, config=config)
    specs = ckpt.model.specs
    cfg = (ckpt.config or {}).get("model") or {}
    pattern = cfg.get("pattern")
    per_component: Counter = Counter()
    for n, s in specs.items():
        per_component[component(n, pattern)] += math.prod(s.shape)
    summary = {
        "path": str(ckpt.path), "kind": ckpt.kind, "step": ckpt.step, "stage": ckpt.meta.get("stage")
        or (ckpt.config or {}).get("stage"), "source": ckpt.meta.get("source"), "model": cfg.get("name"),
        "d_model": cfg.get("d_model"), "pattern": pattern, "tensors": len(specs),
        "parameters": sum(per_component.values()), "per_component": dict(per_component),
        "dtypes": dict(Counter(str(s.dtype).replace("torch.", "") for s in specs.values())),
        "ema": ckpt.ema is not None, "notes": ckpt.notes,
    }
    problems: list[str] = []
    if ckpt.config and "model" in ckpt.config:
        want = _expected(ckpt, summary)
        problems += [f"model: {p}" for p in compare_specs(specs, _present(want, specs))]
        if ckpt.ema is not None:
            problems += [f"ema: {p}" for p in compare_specs(ckpt.ema.specs, _present(want, ckpt.ema.specs))]
    else:
        problems.append("no config stored with the checkpoint: shapes not checked (pass --config)")
    if ckpt.kind == "deepspeed":  # every rank's file whole (the check a resume runs; crc: every record too)
        from megassm.checkpoint.verify import damaged_files

        tag_dir = Path(ckpt.path)
        problems += damaged_files(tag_dir, crc=crc, training=(tag_dir / "trainer").is_dir())
        summary["optimizer_state"] = saved_optimizer_state(tag_dir)
    if scan:
        problems += _scan(ckpt.model, "")
        if ckpt.ema is not None:
            problems += _scan(ckpt.ema, "ema:")
    summary["scanned"] = scan
    return summary, problems


def _expected(ckpt: Checkpoint, summary: dict) -> dict:
    """The config's tensors; a LoRA run's (finetune.lora) with its adapters, noted in the summary."""
    from megassm.run_config import from_dict

    lora = from_dict(ckpt.config).finetune.lora
    if lora is None:
        return expected_specs(ckpt.model_config())
    summary["notes"] = [*summary["notes"], f"LoRA run (rank {lora.rank}, {', '.join(lora.targets)}) over the base "
                        f"init_from={ckpt.config.get('init_from')}; sample / convert it as it is, or its step's "
                        "lora/ directory with --lora / merge-lora"]
    return expected_specs(ckpt.model_config(), lora)


def _present(want: dict, found: dict) -> dict:
    """A LoRA run's checkpoint may hold the adapters alone (ZeRO-1/2 keep the frozen base out): then only they
    are expected."""
    from megassm.checkpoint.model_specs import is_adapter

    if any(map(is_adapter, want)) and all(map(is_adapter, found)):
        return {n: s for n, s in want.items() if is_adapter(n)}
    return want


def format_report(summary: dict, problems: list[str]) -> str:
    lines = [f"checkpoint  {summary['path']}  ({summary['kind']})"]
    lines.append(f"step        {summary['step']}    stage {summary['stage']}")
    if summary.get("source") and summary["source"] != summary["path"]:
        lines.append(f"source      {summary['source']}")
    lines.append(f"model       {summary['model']}: d_model={summary['d_model']}, pattern {summary['pattern']}")
    lines.append(f"parameters  {summary['parameters']:,} in {summary['tensors']} tensors; dtypes "
                 + ", ".join(f"{k} x{v}" for k, v in summary["dtypes"].items()))
    width = max((len(k) for k in summary["per_component"]), default=0)
    for k, v in sorted(summary["per_component"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {k:<{width}}  {v:>15,}  ({v / 1e6:,.2f} M)")
    lines.append(f"ema         {'yes' if summary['ema'] else 'no'}")
    if summary.get("optimizer_state") is False:
        lines.append("optimizer   none: a model-only checkpoint (train.save_optimizer_state=false); a resume "
                     "restarts the optimizer")
    for note in summary["notes"]:
        lines.append(f"note        {note}")
    lines.append("integrity   " + ("shapes vs config" + (", NaN/Inf scan" if summary["scanned"] else "")))
    for p in problems:
        lines.append(f"  PROBLEM   {p}")
    lines.append("result      " + ("OK" if not problems else f"{len(problems)} problem(s)"))
    return "\n".join(lines)
