"""Resume a run at another (dp, cp) layout with the same global batch.

Mechanism: the backend's resharding load for what the backend owns (``TrainBackend.load_resharded``;
DeepSpeed's universal checkpoint, ``megassm/train/backends/deepspeed.py``), megassm's own path for the rest.

- model, fp32 masters, Adam moments, optimizer step and LR schedule: re-partitioned by the backend over
  the new dp x cp group;
- the EMA: each rank reads its own partition of each tensor from the old layout's shards
  (``ShardedEMA.load_sliced``), not the whole EMA.
- the data cursor: the built-in procedural data is a function of the global sample index, so the
  position is ``step x grad_accum`` at the new layout. Shard data in ``data.order=global`` is too
  (``megassm/data/global_order.py``): its saved cursor (global samples consumed, per-dataset counts) is
  the same on every rank and for every layout, and every new rank restores rank 0's -- with data.buckets
  too (the cursor counts every earlier step's whole bucket batch; the bucket table must stay, and
  grad_accum x dp must still fit each bucket's samples). Shard streams in ``data.order=rank`` are per
  data-parallel rank: a change of cp at the same dp keeps each dp rank's stream; a change of dp is refused.
- randomness: every training draw is keyed on (seed, global sample index), so no per-rank generator
  has to carry over.

What cannot be bridged fails in ``plan_resume``, before anything is written: another model, another
tp or pp or ZeRO stage, a layout change of a tp > 1 run (its TP-sliced weights and EMA are not re-sliced),
or another global batch (unless ``train.allow_batch_change``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from megassm.checkpoint.model_only import saved_optimizer_state
from megassm.config.load import to_dict
from megassm.config.schema import RunConfig
from megassm.parallel.comm import broadcast_object
from megassm.train import checkpoint as ckpt


class ElasticResumeError(ValueError):
    pass


def layout_of(cfg: RunConfig, world: int) -> dict:
    """What a checkpoint records of the layout that wrote it."""
    p, t = cfg.parallel, cfg.train
    dp = world // (p.tp * p.cp * p.pp)
    micro = p.micro_batches if p.pp > 1 else t.grad_accum
    return {"world": world, "tp": p.tp, "cp": p.cp, "pp": p.pp, "dp": dp, "zero_stage": p.zero_stage,
            "micro_batch_size": t.micro_batch_size, "micro_batches_per_step": micro,
            "global_batch": _bucket_batches(cfg) or t.micro_batch_size * micro * dp}


def _bucket_batches(cfg: RunConfig) -> str | None:
    """data.buckets: a step's global batch is its drawn bucket's samples (megassm/data/token_budget.py),
    whatever dp, grad_accum or micro_batch_size are; recorded as "name:samples" per bucket."""
    if not cfg.data.buckets:
        return None
    from megassm.data.token_budget import BucketTable

    table = BucketTable.from_config(cfg.data, cfg.model.patch_size)
    return "buckets " + ", ".join(f"{b.name}:{b.samples}" for b in table.buckets)


@dataclass
class ResumePlan:
    tag: str | None = None
    elastic: bool = False
    old: dict | None = None
    new: dict | None = None
    notes: list[str] = field(default_factory=list)  # why this tag (a damaged latest, train.resume_from), logged

    def describe(self) -> str:
        keys = ("world", "dp", "cp", "micro_batch_size", "micro_batches_per_step")
        return ", ".join(f"{k} {self.old[k]} -> {self.new[k]}" for k in keys if self.old[k] != self.new[k])


def read_rank0_state(tag_dir: Path) -> dict:
    f = Path(tag_dir) / "trainer" / "rank_00000.json"
    if not f.is_file():
        raise ElasticResumeError(f"checkpoint {tag_dir} has no trainer state ({f}); it is incomplete")
    return json.loads(f.read_text())


def plan_resume(cfg: RunConfig, ckpt_dir: Path, world: int) -> ResumePlan:
    """Choose the checkpoint to resume (``checkpoint.resume_tag``: latest's if whole, else the newest whole
    one before it, or train.resume_from), compare its layout and model with this run's; raise what cannot be
    bridged. Reads the checkpoint's file structure and JSON; writes nothing."""
    tag, notes = _agreed_resume_tag(ckpt_dir, cfg.train.resume_from)
    plan = _plan_for(cfg, Path(ckpt_dir), tag, world)
    plan.notes = notes
    return plan


def _agreed_resume_tag(ckpt_dir: Path, resume_from: str | None) -> tuple[str | None, list[str]]:
    """``checkpoint.resume_tag`` run once, on global rank 0, and its answer (or its error) given to every rank:
    each rank verifying every file of a checkpoint would read it world-size times over the shared file
    system, and ranks that saw a file differently (a write still landing) would resume different steps.
    Without a process group: here, locally."""
    if not dist.is_initialized():
        return ckpt.resume_tag(ckpt_dir, resume_from)
    answer = None
    if dist.get_rank() == 0:
        try:
            answer = ("ok", *ckpt.resume_tag(ckpt_dir, resume_from))
        except Exception as e:  # noqa: BLE001 -- every rank must learn it, or the others wait in the broadcast
            answer = ("error", type(e).__name__, str(e))
            broadcast_object(answer)
            raise
    answer = broadcast_object(answer)
    if answer[0] == "error":
        error = ckpt.ResumeError if answer[1] == "ResumeError" else RuntimeError
        raise error(f"rank 0, choosing the checkpoint to resume: {answer[1]}: {answer[2]}")
    return answer[1], answer[2]


def _plan_for(cfg: RunConfig, ckpt_dir: Path, tag: str | None, world: int) -> ResumePlan:
    if tag is None:
        return ResumePlan()
    tag_dir = Path(ckpt_dir) / tag
    state = read_rank0_state(tag_dir)
    new = layout_of(cfg, world)
    old = state.get("layout")
    if old is None:  # written before layouts were recorded
        if state.get("world") != world:
            raise ElasticResumeError(
                f"checkpoint {tag_dir} was written by {state.get('world')} ranks and records no layout (an older "
                f"megassm); resume it with {state.get('world')} ranks, or warm-start with init_from")
        return ResumePlan(tag)
    if state.get("model") is not None and state["model"] != to_dict(cfg.model):
        diff = sorted(k for k in set(state["model"]) | set(to_dict(cfg.model))
                      if state["model"].get(k) != to_dict(cfg.model).get(k))
        raise ElasticResumeError(
            f"checkpoint {tag_dir} holds another model (model.{', model.'.join(diff)} differ: "
            f"{ {k: state['model'].get(k) for k in diff} } there, { {k: to_dict(cfg.model).get(k) for k in diff} } "
            "here); resume with the same model, or start a new run with init_from")
    saved = (state.get("data") or {}).get("order", "rank") if state.get("data") else None
    if cfg.data.kind == "shards" and saved is not None and saved != cfg.data.order:
        raise ElasticResumeError(
            f"checkpoint {tag_dir} was written with data.order={saved}; this run has data.order={cfg.data.order}. "
            "Per-rank stream positions and the global cursor do not convert into each other: resume with "
            f"data.order={saved}, or warm-start a new run with init_from")
    if cfg.data.buckets and isinstance(old.get("global_batch"), int):
        # written before bucketed runs recorded their bucket table: the table cannot be compared (as before)
        old = {**old, "global_batch": new["global_batch"]}
    if old == new:
        return ResumePlan(tag, False, old, new)
    fixed = [k for k in ("tp", "pp", "zero_stage") if old[k] != new[k]]
    if fixed:
        raise ElasticResumeError(
            f"checkpoint {tag_dir} was written at {', '.join(f'parallel.{k}={old[k]}' for k in fixed)}; this run has "
            f"{', '.join(f'parallel.{k}={new[k]}' for k in fixed)}. A resume may change dp and cp (and the micro-"
            "batching), not tp, pp or the ZeRO stage: keep them, or convert the checkpoint (`megassm convert`) and "
            "warm-start with init_from")
    if old["tp"] > 1:
        raise ElasticResumeError(
            f"checkpoint {tag_dir} was written at parallel.tp={old['tp']}; a resume at another layout ("
            f"{', '.join(f'{k} {old[k]} -> {new[k]}' for k in ('dp', 'cp', 'world') if old[k] != new[k])}) is "
            "supported only at tp=1 (DeepSpeed's universal checkpoint does not re-slice megassm's tensor-parallel "
            f"weights, nor does the EMA). Resume at the checkpoint's own layout (world {old['world']}, dp "
            f"{old['dp']}, cp {old['cp']}), or warm-start a new run at this layout with init_from={tag_dir} (read at "
            "any tp; the optimizer state and data position start afresh)")
    bucketed = isinstance(old["global_batch"], str) or isinstance(new["global_batch"], str)
    if old["global_batch"] != new["global_batch"] and not cfg.train.allow_batch_change and bucketed:
        raise ElasticResumeError(
            f"checkpoint {tag_dir} trained with a global batch of {old['global_batch']}; this run has "
            f"{new['global_batch']} (with data.buckets a step's batch is its bucket's samples, from data.buckets / "
            "data.tokens_per_step, not from dp or grad_accum). Keep the bucket table, or set "
            "train.allow_batch_change=true to change the batch on purpose")
    if old["global_batch"] != new["global_batch"] and not cfg.train.allow_batch_change:
        raise ElasticResumeError(
            f"checkpoint {tag_dir} trained with a global batch of {old['global_batch']} (micro-batch "
            f"{old['micro_batch_size']} x {old['micro_batches_per_step']} x dp {old['dp']}); this layout gives "
            f"{new['global_batch']} (micro-batch {new['micro_batch_size']} x {new['micro_batches_per_step']} x dp "
            f"{new['dp']}). Set train.grad_accum / train.micro_batch_size to keep {old['global_batch']}, or "
            "train.allow_batch_change=true to change the batch on purpose")
    if old["dp"] != new["dp"] and cfg.data.kind != "procedural":
        _check_shard_cursor(cfg, state, tag_dir, old, new)
    if cfg.parallel.pp > 1:
        raise ElasticResumeError(f"checkpoint {tag_dir}: a pipeline run resumes only at its own layout ({old})")
    if not saved_optimizer_state(tag_dir):  # DeepSpeed's universal conversion needs the Adam moments
        raise ElasticResumeError(
            f"checkpoint {tag_dir} is model-only (saved with train.save_optimizer_state=false): a resume at "
            f"another layout ({ResumePlan(tag, True, old, new).describe()}) needs its optimizer state. Resume at its "
            f"own layout (world {old['world']}, dp {old['dp']}, cp {old['cp']}), or warm-start a new run at this "
            f"layout with init_from={tag_dir} (the optimizer state and data position start afresh)")
    return ResumePlan(tag, True, old, new)


def _check_shard_cursor(cfg: RunConfig, state: dict, tag_dir: Path, old: dict, new: dict) -> None:
    """dp changes with shard data only in data.order=global, on both sides of the switch."""
    dp_old, dp_new = old["dp"], new["dp"]
    keep = f"keep dp={dp_old} (cp may change), or warm-start a new run with init_from"
    if cfg.data.order != "global":
        what = "a bucketed shard run (data.buckets) in " if cfg.data.buckets else ""
        raise ElasticResumeError(
            f"checkpoint {tag_dir}: {what}data.order={cfg.data.order} shard streams are per data-parallel rank, "
            f"so dp cannot change on resume ({dp_old} -> {dp_new}); {keep}. (data.order=global makes the data "
            "cursor layout-independent, with or without data.buckets -- from the start of a run)")
    if cfg.data.buckets:  # the new layout's slots must fit every bucket (the schedule's rule), said here
        from megassm.data.token_budget import BucketError, BucketTable

        try:
            BucketTable.from_config(cfg.data, cfg.model.patch_size).check_slots(cfg.train.grad_accum, dp_new)
        except BucketError as e:
            raise ElasticResumeError(f"checkpoint {tag_dir}: at dp {dp_new}: {e}") from None
    # (the global cursor itself needs no check here: rank 0's is every rank's, and each batch carries the
    # global indices it holds, whatever batch sizes the run had before)


def find_data_state(tag_dir: Path, dp_rank: int) -> dict:
    """The data cursor of the old rank that had data-parallel rank ``dp_rank`` (same dp, other cp)."""
    for f in sorted((Path(tag_dir) / "trainer").glob("rank_*.json")):
        s = json.loads(f.read_text())
        if s.get("dp_rank") == dp_rank:
            return s["data"]
    raise ElasticResumeError(f"checkpoint {tag_dir}: no rank recorded data-parallel rank {dp_rank}")
