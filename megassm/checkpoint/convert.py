"""The converters behind ``megassm convert``: each opens a source lazily, checks it against a config,
and streams it into an output written atomically.

    zero_to_consolidated  DeepSpeed (ZeRO-1/2/3, TP) -> consolidated
    reshard               any -> consolidated (tp=pp=1) or sharded (TP k x PP p)
    stage                 any + target stage config -> consolidated with the target's config
    extract_ema           any with EMA -> consolidated whose model weights are the EMA
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from megassm.checkpoint.errors import CheckpointError
from megassm.checkpoint.model_specs import FreshInit, check_specs, expected_specs
from megassm.checkpoint.safetensors_io import DEFAULT_MAX_SHARD_BYTES, TensorSpec, check_output
from megassm.checkpoint.sources import Checkpoint, open_checkpoint
from megassm.checkpoint.writers import write_consolidated, write_sharded
from megassm.models.mixers import is_mixer_symbol, mixer_for_symbol, pattern_symbols

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _source_meta(ckpt: Checkpoint, command: str) -> dict:
    meta = {k: v for k, v in ckpt.meta.items() if k not in ("format", "format_version", "parameters", "tensors",
                                                              "ema", "dtype", "nonfinite_tensors", "tp", "pp")}
    meta.setdefault("source", str(ckpt.path))
    meta.setdefault("source_format", ckpt.kind)
    meta.setdefault("stage", (ckpt.config or {}).get("stage"))
    meta["converted_by"] = command
    return meta


def _open_checked(src: str | Path, tag: str | None, config: dict | None) -> Checkpoint:
    ckpt = open_checkpoint(src, tag=tag, config=config)
    check_specs(ckpt.model.specs, ckpt.model_config(), f"{ckpt.path} (model)")
    if ckpt.ema is not None:
        check_specs(ckpt.ema.specs, ckpt.model_config(), f"{ckpt.path} (EMA)")
    return ckpt


def zero_to_consolidated(src: str | Path, out: str | Path, *, tag: str | None = None, config: dict | None = None,
                         dtype: str = "fp32", ema: bool = True, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                         force: bool = False) -> tuple[dict, list[str]]:
    """DeepSpeed checkpoint -> consolidated directory. Returns (meta written, notes)."""
    check_output(Path(out), force)
    ckpt = _open_checked(src, tag, config)
    if ckpt.kind != "deepspeed":
        raise CheckpointError(f"{src} is a {ckpt.kind} checkpoint, not a DeepSpeed one; use `megassm convert reshard "
                              f"{src} OUT --tp 1` to rewrite it")
    meta = write_consolidated(Path(out), ckpt.model, ckpt.ema if ema else None, ckpt.config, _source_meta(
        ckpt, "zero-to-consolidated"), dtype=DTYPES[dtype], max_shard_bytes=max_shard_bytes, force=force)
    return meta, ckpt.notes


def pipeline_plan(model_cfg, run_cfg, pp: int, virtual: int = 1, seq_len: int | None = None):
    """The stage plan the pipeline trainer would compute (``partition_blocks`` at the run's sequence length)."""
    from megassm.parallel.pipeline import partition_blocks

    if seq_len is None:
        from megassm.parallel.pipeline import typical_seq_len

        try:
            seq_len = typical_seq_len(run_cfg.model, run_cfg.data)
        except Exception as e:  # shard manifests not reachable from this host
            raise CheckpointError(f"--pp {pp}: cannot derive the tokens per sample from the config's data ({e}); "
                                  "pass --seq-len") from None
    return partition_blocks(model_cfg, pp, seq_len, virtual)


def reshard(src: str | Path, out: str | Path, *, tp: int = 1, pp: int = 1, virtual: int = 1, seq_len: int | None = None,
            tag: str | None = None, config: dict | None = None, ema: bool = True,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, force: bool = False) -> tuple[dict, list[str]]:
    """Any checkpoint -> consolidated (tp = pp = 1) or a sharded layout (TP k, PP p stages by block
    ranges); bit-exact both ways."""
    from megassm.run_config import from_dict

    if tp < 1 or pp < 1:
        raise CheckpointError(f"--tp {tp} / --pp {pp} must be >= 1")
    check_output(Path(out), force)
    ckpt = _open_checked(src, tag, config)
    meta = _source_meta(ckpt, f"reshard --tp {tp} --pp {pp}")
    ema_ws = ckpt.ema if ema else None
    if tp == 1 and pp == 1:
        return write_consolidated(Path(out), ckpt.model, ema_ws, ckpt.config, meta, max_shard_bytes=max_shard_bytes,
                                  force=force), ckpt.notes
    plan = None
    if pp > 1:
        plan = pipeline_plan(ckpt.model_config(), from_dict(ckpt.config), pp, virtual, seq_len)
    return write_sharded(Path(out), ckpt.model, ema_ws, ckpt.config, meta, tp, pp, plan,
                         max_shard_bytes=max_shard_bytes, force=force), ckpt.notes


def extract_ema(src: str | Path, out: str | Path, *, tag: str | None = None, config: dict | None = None,
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, force: bool = False) -> tuple[dict, list[str]]:
    """A consolidated directory whose model weights are the source's EMA weights (no separate EMA)."""
    check_output(Path(out), force)
    ckpt = _open_checked(src, tag, config)
    if ckpt.ema is None:
        raise CheckpointError(f"{ckpt.path} has no EMA weights" + (f" ({ckpt.notes[0]})" if ckpt.notes else ""))
    meta = {**_source_meta(ckpt, "extract-ema"), "weights": "ema"}
    return write_consolidated(Path(out), ckpt.ema, None, ckpt.config, meta, max_shard_bytes=max_shard_bytes,
                              force=force), ckpt.notes


# -- stage: image-stage -> video-stage warm start -------------------------------------------------

@dataclass
class StagePlan:
    copied: list[str]
    fresh: list[str]  # new in the target (initialised as the target's model init does)
    dropped: list[str]  # in the source, not in the target
    report: list[str]


def _describe(sym: str) -> str:
    return f"'{sym}' ({pattern_symbols().get(sym, '?')})"


def _same_kind(a: str, b: str) -> bool:
    """Two pattern symbols of one mixer kind share weights (a change of scan order)."""
    return is_mixer_symbol(a) and is_mixer_symbol(b) and mixer_for_symbol(a).name == mixer_for_symbol(b).name


def plan_stage(src_cfg, dst_cfg, src_specs: dict[str, TensorSpec]) -> StagePlan:
    """Which target tensors come from the source and which are new; what changed and why."""
    dst_specs = expected_specs(dst_cfg)
    bad = [f"{n}: source {src_specs[n].shape}, target {s.shape}" for n, s in dst_specs.items()
           if n in src_specs and src_specs[n].shape != s.shape]
    if bad:
        raise CheckpointError("the target config changes the shapes of existing weights (a warm start keeps every "
                              "width the same; only scan orders, block kinds and block count may change): "
                              + "; ".join(bad[:6]))
    report = []
    sp, dp = src_cfg.pattern, dst_cfg.pattern
    if sp != dp:
        report.append(f"layer pattern {sp} -> {dp}")
    for i in range(max(len(sp), len(dp))):
        a, b = (sp[i] if i < len(sp) else None), (dp[i] if i < len(dp) else None)
        if a == b:
            continue
        if a is None:
            report.append(f"  block {i}: new {_describe(b)} block, initialised fresh")
        elif b is None:
            report.append(f"  block {i}: {_describe(a)} removed, its weights dropped")
        elif _same_kind(a, b):
            report.append(f"  block {i}: scan order {_describe(a)} -> {_describe(b)}, same weights")
        else:
            report.append(f"  block {i}: mixer {_describe(a)} -> {_describe(b)}: new mixer weights, initialised fresh")
    other = {k: (getattr(src_cfg, k), getattr(dst_cfg, k)) for k in vars(dst_cfg)
             if k != "pattern" and getattr(src_cfg, k, None) != getattr(dst_cfg, k)}
    for k, (a, b) in other.items():
        report.append(f"model.{k}: {a!r} -> {b!r}")
    copied = [n for n in dst_specs if n in src_specs]
    fresh = [n for n in dst_specs if n not in src_specs]
    dropped = [n for n in src_specs if n not in dst_specs]
    report.append(f"{len(copied)} tensors copied, {len(fresh)} new (fresh init), {len(dropped)} dropped")
    if fresh:
        report.append(f"  new: {fresh[:6]}{' ...' if len(fresh) > 6 else ''}")
    if dropped:
        report.append(f"  dropped: {dropped[:6]}{' ...' if len(dropped) > 6 else ''}")
    return StagePlan(copied, fresh, dropped, report)


class _StagedWeights:
    """Target-ordered weights: copied from the source where planned, else fresh."""

    def __init__(self, src, plan: StagePlan, fresh: FreshInit, specs: dict[str, TensorSpec]):
        self.src, self.plan, self.fresh, self.specs = src, plan, fresh, specs
        self._copied = set(plan.copied)

    def read(self, name: str) -> torch.Tensor:
        return self.src.read(name).float() if name in self._copied else self.fresh.tensor(name)


def stage(src: str | Path, target: dict, out: str | Path, *, tag: str | None = None, seed: int | None = None,
          ema: bool = True, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
          force: bool = False) -> tuple[dict, list[str]]:
    """Warm-start checkpoint for the ``target`` stage (a RunConfig dict). Returns (meta, report lines)."""
    from megassm.run_config import from_dict

    check_output(Path(out), force)
    ckpt = _open_checked(src, tag, None)
    dst = from_dict(target)
    plan = plan_stage(ckpt.model_config(), dst.model, ckpt.model.specs)
    specs = expected_specs(dst.model)
    fresh = FreshInit(dst.model, dst.train.seed if seed is None else seed)
    model = _StagedWeights(ckpt.model, plan, fresh, specs)
    ema_ws = _StagedWeights(ckpt.ema, plan, fresh, specs) if (ema and ckpt.ema is not None) else None
    meta = {**_source_meta(ckpt, "stage"), "stage": dst.stage, "source_stage": ckpt.meta.get("stage") or
            (ckpt.config or {}).get("stage"), "changes": plan.report, "fresh_tensors": plan.fresh}
    written = write_consolidated(Path(out), model, ema_ws, target, meta, max_shard_bytes=max_shard_bytes, force=force)
    return written, plan.report + ckpt.notes
