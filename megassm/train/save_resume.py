"""The Trainer's checkpoints: save (blocking, or snapshotted and written by a background thread) and
resume (same layout, or elastic: another dp / cp, ``elastic.py``). A mixin of ``loop.Trainer``, which owns the
state it reads (``cfg``, ``mesh``, ``backend``, ``ema``, ``data``, ``metrics``, the step counters)."""

from __future__ import annotations

import logging
import time

import torch.distributed as dist

from megassm.checkpoint.model_only import OPTIMIZER_STATE_KEY, fresh_optimizer_note, saved_optimizer_state
from megassm.checkpoint.snapshot import FileSink
from megassm.config.load import to_dict
from megassm.parallel.comm import barrier
from megassm.train import checkpoint as ckpt
from megassm.train import elastic
from megassm.train.checkpoint_writer import (
    BackgroundSave,
    PendingSave,
    describe_stats,
    save_stats,
    tree_bytes,
    write_stats,
)

log = logging.getLogger("megassm.train")


class SaveResume:
    def save(self, reason: str, blocking: bool = True) -> None:
        """Checkpoint the current step. ``blocking``: written, COMPLETE and ``latest`` before it returns;
        otherwise (``train.async_save``, periodic saves) the state is snapshotted to host memory and a
        background thread writes it and commits (``checkpoint_writer.py``). Either way a save still in
        flight is waited for first (at most one at a time; its write error is raised here)."""
        self._reap_save(wait=True)
        started = time.perf_counter()
        tag = ckpt.tag_for(self.step)
        tag_dir = self.ckpt_dir / tag
        if self.rank == 0 and tag_dir.exists() and tag != self.resume_plan.tag:
            import shutil

            # a partial leftover of an interrupted save at this step, or a checkpoint of a line of training
            # abandoned by a rollback (train.resume_from): new files must not land among its old ones
            shutil.rmtree(tag_dir)
        barrier()
        sink = FileSink(deferred=not blocking)
        with_optimizer = self.cfg.train.save_optimizer_state  # false: a model-only checkpoint (no Adam moments)
        reason += "" if with_optimizer else ", model-only: no optimizer state"
        self.backend.save(self.ckpt_dir, tag, client_state={"megassm_step": self.step}, sink=sink,
                          optimizer_state=with_optimizer)  # the trainer state records which (OPTIMIZER_STATE_KEY)
        if self.ema is not None:
            shard_rank = self.mesh.get_sequence_data_parallel_rank()
            # ZeRO-3: every rank of the DP x CP partition group holds a slice; otherwise one copy per TP rank
            self.ema.save(tag_dir, shard_rank, self.ema.partitioned or shard_rank == 0, *self._mp(), sink=sink)
        if self.cfg.finetune.lora is not None:  # the adapters on their own, peft layout: tag_dir/lora, lora_ema
            from megassm.train.lora_export import export_adapters

            export_adapters(self.model, tag_dir, self.cfg.finetune.lora, str(self.cfg.init_from or ""),
                            is_writer=self.rank == 0, ema=self.ema, gathered=self.backend.gathered, sink=sink)
        state = {"step": self.step, "nonfinite_total": self.nonfinite_total, "nonfinite_run": self.nonfinite_run,
                 "layout": elastic.layout_of(self.cfg, dist.get_world_size()), "model": to_dict(self.cfg.model),
                 "dp_rank": self.mesh.get_data_parallel_rank(),
                 "data": self.data.state_dict(), "world": dist.get_world_size(), OPTIMIZER_STATE_KEY: with_optimizer}
        ckpt.save_trainer_state(tag_dir, self.rank, state, {}, sink=sink)
        pending = PendingSave(self.ckpt_dir, tag, self.step, sink.jobs, started, time.perf_counter() - started,
                              getattr(self, "_last_step_s", None))
        if not blocking:
            self._writer.start(pending)
            self._info(f"checkpoint {tag_dir} ({reason}) at step {self.step}: snapshot in host memory after "
                       f"{pending.snapshot_s:.2f} s, writing in the background")
            return
        sink.fsync()  # this rank's files durable before COMPLETE names them (the background writer does the same)
        ckpt.finalize(self.ckpt_dir, tag, self.cfg.train.keep_last, is_writer=self.rank == 0)
        if self.rank == 0:
            stats = save_stats(pending, "sync", tree_bytes(tag_dir), self.step)
            write_stats(self.ckpt_dir, stats)
            self._info(describe_stats(stats))
        self._info(f"checkpoint {tag_dir} written ({reason}) at step {self.step}")

    @property
    def _writer(self) -> BackgroundSave:
        """The background writer of non-blocking saves, made at first use."""
        if getattr(self, "_background_save", None) is None:
            self._background_save = BackgroundSave(
                self.rank, dist.get_world_size(),
                lambda d, tag: ckpt.commit(d, tag, self.cfg.train.keep_last), lambda: self.step)
        return self._background_save

    def _reap_save(self, wait: bool) -> None:
        """At a step boundary (or, ``wait``, before the next save / exit): a finished background save's
        error is raised here, its completion logged (metrics.jsonl: a ``checkpoint`` event)."""
        writer = getattr(self, "_background_save", None)
        if writer is None:
            return
        tag = writer.in_flight.tag if writer.in_flight is not None else None
        stats = writer.wait() if wait else writer.raise_if_failed()
        if stats:
            self.metrics.event({"event": "checkpoint", "step": self.step, **stats})
        elif stats is not None and tag is not None:
            log.debug(f"rank {self.rank}: its part of {tag} is written")

    def _mp(self) -> tuple[int, int]:
        return self.mesh.get_model_parallel_rank(), self.mesh.get_model_parallel_world_size()

    def resume(self) -> None:
        plan = self.resume_plan
        if plan.tag is None:
            return
        if plan.elastic:
            return self._resume_elastic(plan)
        tag = plan.tag
        tag_dir = self.ckpt_dir / tag
        self.backend.load(self.ckpt_dir, tag)  # a model-only checkpoint: exact weights, a fresh optimizer
        state, _ = ckpt.load_trainer_state(tag_dir, self.rank)
        self._restore_counters(state)
        self.data.load_state_dict(state["data"])
        if self.ema is not None:
            self.ema.load(tag_dir, self.mesh.get_sequence_data_parallel_rank(), *self._mp())
        exact = saved_optimizer_state(tag_dir)
        if not exact and self.rank == 0:
            log.warning(fresh_optimizer_note(tag_dir))
        self._info(f"resumed from step {self.step} ({tag_dir})")
        self.metrics.event({"event": "resume", "step": self.step, **({} if exact else {"optimizer": "fresh"})})

    def _restore_counters(self, state: dict) -> None:
        self.step = state["step"]
        self.nonfinite_total, self.nonfinite_run = state["nonfinite_total"], state["nonfinite_run"]

    def _resume_elastic(self, plan: elastic.ResumePlan) -> None:
        """The latest checkpoint was written at another (dp, cp): megassm/train/elastic.py says how it carries over."""
        tag_dir = self.ckpt_dir / plan.tag
        self._info(f"elastic resume from {tag_dir}: {plan.describe()} (global batch {plan.old['global_batch']} -> "
                   f"{plan.new['global_batch']}); resharding the backend's state")
        self.backend.load_resharded(self.ckpt_dir, plan.tag, is_writer=self.rank == 0)
        state = elastic.read_rank0_state(tag_dir)
        self._restore_counters(state)
        if self.cfg.data.kind == "procedural":  # a function of the global sample index
            self.data.load_state_dict({"position": self.step * self.micro_batches_per_step})
        elif self.cfg.data.order == "global":  # layout-independent (bucketed too): rank 0's cursor
            self.data.load_state_dict(state["data"])
        else:  # same dp (plan_resume checked): this dp rank's stream continues
            self.data.load_state_dict(elastic.find_data_state(tag_dir, self.mesh.get_data_parallel_rank()))
        if self.ema is not None:
            self.ema.load_sliced(tag_dir)  # this rank's part of each tensor only
        self._info(f"resumed from step {self.step} ({tag_dir}) at the new layout")
        self.metrics.event({"event": "resume", "step": self.step, "elastic": plan.describe()})
