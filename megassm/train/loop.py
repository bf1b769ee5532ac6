"""The training loop: data -> flow-matching loss -> optimizer step, with logging, checkpoints, signals, EMA,
numerical guards and exact resume.

One ``Trainer`` for every regime. It is given a step strategy (``megassm/train/steps/``: how the regime
builds its model and runs one optimizer step) and a backend (``megassm/train/backends/``: the library that
shards, reduces and updates, DeepSpeed today); it owns what a run has once.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megassm.config.load import to_dict, to_yaml
from megassm.config.schema import ModelConfig, RunConfig
from megassm.data import build_dataloader
from megassm.models.accounting import train_flops
from megassm.parallel.comm import all_reduce_, barrier
from megassm.parallel.mesh import ParallelMesh, init_distributed
from megassm.runtime import default_device
from megassm.train import checkpoint as ckpt
from megassm.train import elastic, signals
from megassm.train.backends import TrainBackend, build_backend
from megassm.train.metrics import MetricsLogger, eval_line, peak_flops, peak_mem_gb, progress_line, skipped_data
from megassm.train.profiling import StepProfiler
from megassm.train.save_resume import SaveResume
from megassm.train.speed import apply_speed
from megassm.train.steps import (  # noqa: F401  (check_same_bucket: re-exported)
    StepStrategy,
    apply_activation_checkpointing,
    check_same_bucket,
    make_step,
)

log = logging.getLogger("megassm.train")


class NonFiniteError(RuntimeError):
    pass


class DataWaitInterrupted(BaseException):
    """A checkpoint signal came while the loop was blocked on the data loader (``Trainer._on_data_wait``).
    A BaseException, like KeyboardInterrupt: no ``except Exception`` of the data path may swallow it."""


# A signal pending when a wait for data begins (it came during the step's compute) gives the loader this
# long to deliver the step's next micro-batch, so that the step can finish and checkpoint; a signal that
# comes during a wait ends it at once.
SIGNAL_DATA_GRACE_S = 10.0


def _fault_kill_step() -> int | None:
    """``MEGASSM_FAULT_SIGKILL_AT_STEP=N``: every rank SIGKILLs itself right after step N is logged -- a
    node failure between checkpoints, for the resume tests; a background save still being written is
    finished first, so the resume point does not depend on write speed. Unset in real runs."""
    v = os.environ.get("MEGASSM_FAULT_SIGKILL_AT_STEP")
    return int(v) if v else None


class _NoData:
    """The data loader of ranks that never read data (pipeline stages after the first); its checkpointed
    data position is empty."""

    def __iter__(self):
        return iter(())

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def hydra_paths(model, device: torch.device | None = None, m: ModelConfig | None = None) -> tuple[str, bool]:
    """Which path each Hydra mixer took in the last forward ("fused" / "reference"), for the log; and whether to
    warn: on CUDA a reference-path mixer the config did not ask for runs the PyTorch scan, slower and with
    (L/chunk) x chunk x chunk intermediates (how compiled blocks once filled an H100 unnoticed)."""
    paths = [mod.path_taken for mod in model.modules() if hasattr(mod, "path_taken")]
    n_ref = paths.count("reference")
    msg = f"Hydra mixers: {paths.count('fused')} fused, {n_ref} reference path"
    asked = m is not None and (m.hydra_path == "reference" or m.ssd_impl == "ref")
    if n_ref and device is not None and device.type == "cuda" and not asked:
        return (msg + " -- on CUDA the reference path is the PyTorch scan: slower and far larger in memory. "
                "mamba-ssm's Triton kernels did not import, or the layer is one the fused kernels do not cover "
                "(d_conv > 9, grouped norm); `python -c \"import megassm.ops.hydra_fused as h; "
                "print(h.fused_available())\"` says which"), True
    return msg, False


class Trainer(SaveResume):
    def __init__(self, cfg: RunConfig, strategy: StepStrategy | None = None, backend: TrainBackend | None = None):
        """``strategy`` / ``backend``: default ``make_step`` (dense for pp = 1, pipeline for pp > 1) over the
        DeepSpeed backend; both are built after the process group and the mesh."""
        self.cfg = cfg
        self.env = init_distributed()
        self.device = default_device()
        self.rank = dist.get_rank()
        self.mesh = ParallelMesh.from_config(cfg.parallel)
        self.backend = backend or build_backend(self.mesh, cfg, self.device)
        self.strategy = strategy or make_step(cfg, self.mesh, self.backend, self.device, self._info)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        # before anything is written: a checkpoint at another layout is bridged or refused here
        self.resume_plan = elastic.plan_resume(cfg, self.ckpt_dir, dist.get_world_size())
        for note in self.resume_plan.notes:  # a damaged latest and the fallback, or train.resume_from
            self._info(note)
        if self.rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        barrier()

        torch.manual_seed(cfg.train.seed)
        model = self._build_model()
        apply_activation_checkpointing(model, cfg.train)
        for line in apply_speed(model, cfg.model, self.device):  # model.fp8 / model.compile
            self._info(line)
        self.model = self.strategy.wrap(model, load_universal=self.resume_plan.elastic)
        self.ema = self.strategy.build_ema(cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None

        dp_rank, dp_size = self.mesh.get_data_parallel_rank(), self.mesh.get_data_parallel_world_size()
        self.data = build_dataloader(cfg.data, batch_size=cfg.train.micro_batch_size, dp_rank=dp_rank,
                                     dp_size=dp_size, seed=cfg.train.seed, text_dim=cfg.model.text_dim,
                                     text_len=cfg.model.max_text_len, schedule=_bucket_schedule(cfg, dp_rank, dp_size),
                                     global_batch=_global_batch(cfg, dist.get_world_size())
                                     ) if self.strategy.reads_data else _NoData()
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.metrics = MetricsLogger(self.run_dir, enabled=self.rank == 0, tb=True, wandb=cfg.logging.wandb,
                                     run_config=to_dict(cfg))
        self._stop: signals.StopSignals | None = None  # set by fit(): the process's (megassm train) or its own
        self.resume()
        self.profiler = StepProfiler(cfg.train.profile, self.run_dir / "profile", self.rank, dist.get_world_size(),
                                     self.device, first_step=self.step + 1)  # after resume: knows the next step

    # -- setup helpers ---------------------------------------------------------------------
    def _info(self, msg: str) -> None:
        if self.rank == 0:
            log.info(msg)

    def _build_model(self):
        """This rank's parallelized model, not yet wrapped by the backend.

        Partitioned construction (``megassm/train/build.py``): built on the meta device, each parameter
        materialised alone (seeded by (seed, name), or read by offset from ``init_from``) and, under ZeRO-3,
        handed to the backend's partitioner at once; a pipeline stage materialises only its own blocks; a
        resume draws nothing (the checkpoint overwrites every value). No rank holds the whole model.
        LoRA fine-tuning attaches its adapters to the meta model before the cut, so the base is read from
        ``init_from`` by slices like any warm start and the adapters are drawn like any parameter.
        """
        cfg = self.cfg
        warm = cfg.init_from if (cfg.init_from and self.resume_plan.tag is None) else None
        parallelize, notes = self.strategy.parallelize, []
        if cfg.finetune.lora is not None:  # LoRA (megassm/lora/): base frozen, only adapters train / enter the EMA
            from megassm.lora import attach_lora

            def parallelize(model):  # on the meta model: adapters attached to the whole base, then cut
                notes.append(attach_lora(model, cfg.finetune.lora))
                self.strategy.parallelize(model)
        from megassm.train.build import build_partitioned

        t0 = time.perf_counter()
        model, report = build_partitioned(cfg, self.mesh, self.device, init_from=warm,
                                          resuming=self.resume_plan.tag is not None, parallelize=parallelize,
                                          owns=self.strategy.owns)
        report = [*report, *notes]
        for line in report:
            self._info(line)
        values = (f"values to come from {self.resume_plan.tag}" if self.resume_plan.tag
                  else "read by slices from init_from" if warm else "seeded draws")
        self._info(f"model built by partitions in {time.perf_counter() - t0:.1f} s ({values})")
        return model

    # -- one optimizer step ----------------------------------------------------------------
    @property
    def micro_batches_per_step(self) -> int:
        return self.strategy.micro_batches

    def sample_indices(self, micro: int, batch_size: int) -> list[int]:
        """Global indices of this rank's samples in micro-batch ``micro`` of the current step.

        The step's global batch is samples [step x G, (step + 1) x G), G = micro_batch x grad_accum x dp;
        micro-batch m of data-parallel rank r holds slice (m x dp + r) of it. A sample's flow-matching
        draws are keyed on its index (``megassm.diffusion.flow.prepare_batch``), so they do not depend
        on micro-batching, accumulation or layout (the procedural data uses the same indices).
        """
        mb, n = self.cfg.train.micro_batch_size, self.micro_batches_per_step
        dp, r = self.mesh.get_data_parallel_world_size(), self.mesh.get_data_parallel_rank()
        first = ((self.step * n + micro) * dp + r) * mb
        return list(range(first, first + batch_size))

    def train_step(self, data_iter) -> dict:
        """One optimizer step (the strategy's ``run``), then the EMA; adds the step's wall time."""
        t0 = time.perf_counter()
        stop = self._stop is not None and self._stop.signum is not None
        out = self.strategy.run(data_iter, self.sample_indices, stop, self.step)
        if out["ok"] and self.ema is not None:
            self.ema.update()
        out["time"] = time.perf_counter() - t0
        return out

    # -- loop ------------------------------------------------------------------------------
    def fit(self) -> int:
        """Train to ``train.steps``; returns the exit status (``signals.py``: 0, or 130 after SIGINT)."""
        cfg = self.cfg.train
        process_wide = signals.process_signals()  # installed at `megassm train`'s entry, before the build
        flag = self._stop = process_wide or signals.StopSignals().install()
        if self._stopped_before_training(flag):
            self.profiler.close()
            self.metrics.close()
            if flag is not process_wide:
                flag.restore()
            return flag.exit_status()
        if hasattr(self.data, "wait_hook"):  # a loader that can block (shards) lets a signal end the wait
            self.data.wait_hook = self._on_data_wait
        data_iter = iter(self.data)
        # train_step reports one data-parallel replica's samples; the pp x tp x cp ranks of a replica
        # share its work, so per-GPU FLOPs divide by that many
        replicas = self.mesh.get_data_parallel_world_size()
        model_parallel = self.cfg.parallel.tp * self.cfg.parallel.cp * self.cfg.parallel.pp
        peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else peak_flops(self.device)
        bar = self.metrics.progress(total=cfg.steps, initial=self.step, enabled=cfg.progress_bar)
        try:
            first = True
            while self.step < cfg.steps:
                out = self.train_step(data_iter)
                self._last_step_s = out["time"]  # the grace formula's t_step, in save_stats.json
                self.step += 1
                self.profiler.step(self.step)
                if first:
                    msg, warn = hydra_paths(self.model, self.device, self.cfg.model)
                    if self.rank == 0:
                        (log.warning if warn else log.info)(msg)
                    first = False
                self._count_nonfinite(out["ok"])
                row = self._metrics_row(out, replicas, model_parallel, peak)
                self._log_step(row)
                bar.update(1, loss=out["loss"], sps=row["samples_per_s"])
                self._periodic_work()
                if out["stop"]:
                    self._save_on_signal(flag.signum)
                    return flag.exit_status()
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                    final = self.step == cfg.steps
                    self.save("final" if final else "periodic", blocking=final or not cfg.async_save)
            self._reap_save(wait=True)
            if self.rank == 0:
                (self.run_dir / "DONE").write_text(str(self.step))
            return 0
        except DataWaitInterrupted as e:
            if getattr(self, "_background_save", None) is not None:
                self._background_save.abandon()  # no commit that waits on ranks blocked elsewhere
            log.warning(f"rank {self.rank}: {e}; no checkpoint written (a save needs every rank at a step "
                        f"boundary); resuming uses the last complete one in {self.ckpt_dir}; exiting")
            return flag.exit_status()
        except BaseException:
            if getattr(self, "_background_save", None) is not None:
                self._background_save.abandon()  # own files finish; no commit that waits on a dead rank
            raise
        finally:
            self.profiler.close()
            bar.close()
            if flag is not process_wide:
                flag.restore()
            self.metrics.close()

    def _log_step(self, row: dict) -> None:
        """The step's row to metrics.jsonl; every train.log_every steps (and the last) also to TensorBoard and
        the text log, with or without the progress bar."""
        cfg = self.cfg.train
        log_now = self.step % cfg.log_every == 0 or self.step == cfg.steps
        self.metrics.step(row, tb=log_now)
        if log_now:
            self._info(progress_line(row, cfg.steps))

    def _periodic_work(self) -> None:
        """After a step's metrics: previews, evaluation, the tests' fault injection, a finished background save."""
        cfg = self.cfg.train
        if cfg.sample_every and self.step % cfg.sample_every == 0:
            self.log_samples()
        if cfg.eval_every and self.step % cfg.eval_every == 0:
            self.evaluate()
        if self.step == _fault_kill_step():  # tests (mid-write: MEGASSM_FAULT_SIGKILL_IN_SAVE_AT_STEP)
            self._reap_save(wait=True)  # the failure comes after the last checkpoint is whole
            os.kill(os.getpid(), signal.SIGKILL)
        self._reap_save(wait=False)

    def _count_nonfinite(self, ok: bool) -> None:
        """Count a skipped (non-finite) step; raises ``NonFiniteError`` after train.max_consecutive_nonfinite."""
        if ok:
            self.nonfinite_run = 0
            return
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        self._info(f"step {self.step}: non-finite loss or gradient, step skipped "
                   f"({self.nonfinite_run} in a row, {self.nonfinite_total} in total)")
        if self.nonfinite_run >= self.cfg.train.max_consecutive_nonfinite:
            raise NonFiniteError(
                f"{self.nonfinite_run} consecutive steps had a non-finite loss or gradient (last at "
                f"step {self.step}); stopping. Lower optim.lr, check the data, or resume from an "
                f"earlier checkpoint in {self.ckpt_dir}")

    def _metrics_row(self, out: dict, replicas: int, model_parallel: int, peak: float) -> dict:
        """The step's metrics from ``train_step``'s report (``out``: one data-parallel replica's samples)."""
        # model FLOPs (3 x forward), as Megatron / torchtitan report MFU: recomputation is not counted
        flops = train_flops(self.cfg.model, out["seq_len"], out["samples"]) / model_parallel
        return {"step": self.step, "loss": out["loss"], "lr": out["lr"],
                "optimizer_steps": self.backend.optimizer_steps,
                "grad_norm": out["grad_norm"], "samples_per_s": out["samples"] * replicas / out["time"],
                "tokens_per_s": out["tokens"] * replicas / out["time"],
                "mfu": flops / out["time"] / peak if peak else float("nan"),
                "step_time_s": out["time"], "data_wait_s": out["data_wait"], "seq_len": out["seq_len"],
                "peak_mem_gb": peak_mem_gb(self.device),
                "skipped_steps": self.nonfinite_total, **skipped_data(self.data)}

    def _stopped_before_training(self, flag: signals.StopSignals) -> bool:
        """A signal during start-up (the build, the resume load), on any rank: every rank exits before the
        first step and writes nothing; ``latest`` still names the checkpoint this run resumed from."""
        signum = self._max_over_ranks(flag.signum or 0)  # one decision for all ranks
        if not signum:
            return False
        self._info(f"{signal.Signals(signum).name} came before training started (step {self.step}); exiting "
                   f"without a checkpoint, {self.ckpt_dir / ckpt.LATEST} still names "
                   f"{self.resume_plan.tag or 'none (a fresh start)'}")
        return True

    def _max_over_ranks(self, value: int) -> int:
        """The largest ``value`` over all ranks (the signal path's one collective)."""
        return int(all_reduce_(torch.tensor([value]), op="max"))

    def _on_data_wait(self, waited: float, reading: str) -> None:
        """The data loader's wait hook (called about every 0.5 s while this rank waits for a batch): a
        checkpoint signal ends the wait -- at once if it came during it, after ``SIGNAL_DATA_GRACE_S`` if it
        was already pending -- instead of leaving the run blocked until SIGKILL."""
        flag = self._stop
        if flag is None or flag.signum is None:
            return
        during = flag.at >= time.monotonic() - waited
        if during or waited >= SIGNAL_DATA_GRACE_S:
            raise DataWaitInterrupted(f"signal {flag.signum} while waiting {waited:.1f} s for the data loader "
                                      f"(step {self.step + 1}, loader reading: {reading})")

    def _save_on_signal(self, signum: int) -> None:
        """SIGUSR1 / SIGTERM / SIGINT: a checkpoint inside the grace window (docs/cluster.md). If a background
        save is in flight, finishing it is the checkpoint: the steps since it are redone after the requeue, and
        the window needs one save, not two. Otherwise a synchronous save of this step."""
        writer = getattr(self, "_background_save", None)
        inflight = writer.in_flight if writer is not None else None
        # one decision for all ranks: a rank whose own part is written may already have reaped the save
        # that another is still writing
        flag = self._max_over_ranks(0 if inflight is None else inflight.step + 1)
        if flag > 0:
            saved = flag - 1  # the step of the save in flight on some rank
            self._reap_save(wait=True)
            self._info(f"checkpoint written on signal at step {saved}; exiting (signal {signum} at step "
                       f"{self.step} came while {ckpt.tag_for(saved)} was being written: that is the checkpoint, "
                       f"steps {saved + 1}-{self.step} are redone on resume)")
            return
        self.save(f"signal {signum}")
        self._info(f"checkpoint written on signal at step {self.step}; exiting")

    def log_samples(self) -> None:
        """Preview images of the EMA weights (the live ones without EMA) to TensorBoard; every rank calls it."""
        from megassm.train.preview import Previews

        if not self.strategy.previews:
            # said at every preview step, so that a log read from any point shows why no images appear
            self._info(f"step {self.step}: no preview samples (train.sample_every={self.cfg.train.sample_every}): "
                       "they need the whole model and are skipped under parallel.pp > 1; sample a checkpoint with "
                       "`megassm sample`")
            return
        if getattr(self, "_previews", None) is None:  # built at the first preview: prompts encoded once
            self._previews = Previews.for_mesh(self.cfg, self.mesh, self.device, self._dtype())
        imgs = self._previews(self.model, self.ema)
        if imgs is not None:
            self.metrics.images("samples", imgs, self.step)

    def evaluate(self) -> None:
        """Held-out loss (and CLIP score / KID when configured) of the EMA weights to TensorBoard; every rank
        calls it (megassm/train/evaluation.py)."""
        from megassm.train.evaluation import TrainingEvaluator

        if getattr(self, "_evaluator", None) is None:
            self._evaluator = TrainingEvaluator(self.cfg, self.mesh, self.device, self._dtype(), self.rank)
        values = self._evaluator(self.model, self.ema)
        self.metrics.scalars("eval", values, self.step)
        if values:
            self._info(eval_line(self.step, values))

    def _dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.backend.bf16 else torch.float32


def _bucket_schedule(cfg: RunConfig, dp_rank: int, dp_size: int):
    """data.buckets laid out for this data-parallel rank (megassm/data/token_budget.py), or None."""
    if not cfg.data.buckets:
        return None
    from megassm.data.token_budget import BucketSchedule, BucketTable

    return BucketSchedule(BucketTable.from_config(cfg.data, cfg.model.patch_size), cfg.train.seed,
                          cfg.train.grad_accum, dp_rank, dp_size)


def _global_batch(cfg: RunConfig, world: int) -> int | None:
    """Samples per optimizer step over all ranks (None with data.buckets: the bucket table's)."""
    g = elastic.layout_of(cfg, world)["global_batch"]
    return g if isinstance(g, int) else None


def train(cfg: RunConfig) -> int:
    """Entry point for ``megassm train``: returns a process exit code."""
    import warnings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # DeepSpeed calls collectives that torch marks deprecated; one warning per step buries the log.
    warnings.filterwarnings("ignore", message=".*is deprecated. Please use.*", category=FutureWarning)
    return Trainer(cfg).fit()

