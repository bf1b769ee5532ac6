"""The training loop: data -> flow-matching loss -> DeepSpeed step, with logging, checkpoints,
signals, EMA, numerical guards and exact resume."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megassm.config.load import to_yaml
from megassm.config.schema import RunConfig
from megassm.data import build_dataloader
from megassm.diffusion.flow import flow_matching_loss
from megassm.models import build_model
from megassm.models.accounting import train_flops
from megassm.parallel.mesh import ParallelMesh, init_distributed
from megassm.train import checkpoint as ckpt
from megassm.train.ema import ShardedEMA
from megassm.train.engine import build_engine
from megassm.train.metrics import MetricsLogger, peak_flops
from megassm.train.warm_start import warm_start

log = logging.getLogger("megassm.train")


class NonFiniteError(RuntimeError):
    pass


class _SignalFlag:
    """Set by SIGUSR1 / SIGTERM; the loop checkpoints and exits at the next step boundary."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def install(self):
        for s in (signal.SIGUSR1, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def _device() -> torch.device:
    if torch.cuda.is_available() and os.environ.get("MEGASSM_DEVICE", "") != "cpu":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _any_rank(flag: bool, device: torch.device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _grads_finite(engine) -> bool:
    """After backward, for ZeRO-0 (DeepSpeed's ZeRO optimizers check overflow themselves)."""
    for p in engine.module.parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return False
    return True


def _hydra_paths(model) -> str:
    """Which path each Hydra mixer took in the last forward ("fused" / "reference"), for the log."""
    paths = [m.path_taken for m in model.modules() if hasattr(m, "path_taken")]
    return f"Hydra mixers: {paths.count('fused')} fused, {paths.count('reference')} reference path"


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.env = init_distributed()
        self.device = _device()
        self.rank = dist.get_rank()
        self.mesh = ParallelMesh.from_config(cfg.parallel)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if self.rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        dist.barrier()

        torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
        model = build_model(cfg.model)
        if cfg.init_from and ckpt.read_latest(self.ckpt_dir) is None:
            for line in warm_start(model, cfg, cfg.init_from):
                self._info(line)
        self._apply_parallelism(model)
        self._apply_activation_checkpointing(model)
        self.engine, self.scheduler = self._build_engine(model)
        self.model = self.engine.module
        self.ema = ShardedEMA(self.model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None

        dp_rank, dp_size = self.mesh.get_data_parallel_rank(), self.mesh.get_data_parallel_world_size()
        self.data = build_dataloader(cfg.data, batch_size=cfg.train.micro_batch_size, dp_rank=dp_rank,
                                     dp_size=dp_size, seed=cfg.train.seed, text_dim=cfg.model.text_dim,
                                     text_len=cfg.model.max_text_len)
        # all training randomness (t, noise, caption dropout) comes from this generator; TP/CP ranks that
        # share a sample must draw the same values, so it is seeded by the data-parallel rank
        self.gen = torch.Generator().manual_seed(cfg.train.seed * 100003 + dp_rank)
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.metrics = MetricsLogger(self.run_dir, enabled=self.rank == 0, tb=True)
        self.resume()

    # -- setup helpers ---------------------------------------------------------------------
    def _info(self, msg: str) -> None:
        if self.rank == 0:
            log.info(msg)

    def _apply_parallelism(self, model) -> None:
        p = self.cfg.parallel
        if p.tp == 1 and p.cp == 1 and p.pp == 1:
            return
        try:
            from megassm.parallel.apply import parallelize_hth
        except ImportError as e:
            raise NotImplementedError(
                f"parallel.tp={p.tp} cp={p.cp} pp={p.pp}: this build has no parallel layers yet ({e})"
            ) from None
        parallelize_hth(model, self.mesh)

    def _build_engine(self, model):
        """(engine, scheduler); PipelineTrainer overrides it to wrap only this rank's pipeline stage."""
        return build_engine(model.to(self.device), self.cfg, self.device, self.mesh)

    def _apply_activation_checkpointing(self, model) -> None:
        mode, k = self.cfg.train.activation_checkpointing, self.cfg.train.checkpoint_every_k
        for i, blk in enumerate(model.blocks):
            blk.grad_checkpoint = mode == "all" or (mode == "every_k" and i % k == 0)

    # -- checkpoints -----------------------------------------------------------------------
    def save(self, reason: str) -> None:
        tag = ckpt.tag_for(self.step)
        tag_dir = self.ckpt_dir / tag
        if self.rank == 0 and tag_dir.exists() and not (tag_dir / ckpt.COMPLETE).exists():
            import shutil

            shutil.rmtree(tag_dir)  # a partial leftover of an interrupted save at this step
        dist.barrier()
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, save_latest=False,
                                    client_state={"megassm_step": self.step})
        if self.ema is not None:
            shard_rank = self.mesh.get_sequence_data_parallel_rank()
            # ZeRO-3: every rank of the DP x CP partition group holds a slice; otherwise one copy per TP rank
            self.ema.save(tag_dir, shard_rank, self.ema.partitioned or shard_rank == 0, *self._mp())
        state = {"step": self.step, "nonfinite_total": self.nonfinite_total, "nonfinite_run": self.nonfinite_run,
                 "data": self.data.state_dict(), "world": dist.get_world_size()}
        ckpt.save_trainer_state(tag_dir, self.rank, state, {"gen": self.gen.get_state()})
        ckpt.finalize(self.ckpt_dir, tag, self.cfg.train.keep_last, is_writer=self.rank == 0)
        self._info(f"checkpoint {tag_dir} written ({reason}) at step {self.step}")

    def _mp(self) -> tuple[int, int]:
        return self.mesh.get_model_parallel_rank(), self.mesh.get_model_parallel_world_size()

    def resume(self) -> None:
        tag = ckpt.read_latest(self.ckpt_dir)
        if tag is None:
            return
        tag_dir = self.ckpt_dir / tag
        load_path, _ = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag, load_module_strict=True,
                                                   load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
        state, tensors = ckpt.load_trainer_state(tag_dir, self.rank)
        if state.get("world") != dist.get_world_size():
            raise RuntimeError(f"checkpoint {tag_dir} was written by {state.get('world')} ranks, this run has "
                               f"{dist.get_world_size()}; resume with the same layout or use init_from")
        self.step = state["step"]
        self.nonfinite_total, self.nonfinite_run = state["nonfinite_total"], state["nonfinite_run"]
        self.data.load_state_dict(state["data"])
        self.gen.set_state(tensors["gen"])
        if self.ema is not None:
            self.ema.load(tag_dir, self.mesh.get_sequence_data_parallel_rank(), *self._mp())
        self._info(f"resumed from step {self.step} ({tag_dir})")
        self.metrics.event({"event": "resume", "step": self.step})

    # -- one optimizer step ----------------------------------------------------------------
    def _micro_step(self, batch) -> tuple[float | None, bool]:
        """Forward + backward of one micro-batch; returns (loss, ok)."""
        x0 = batch["latents"].to(self.device)
        text = batch["text"].to(self.device)
        mask = batch["text_mask"].to(self.device)
        if self.engine.bfloat16_enabled():
            x0, text = x0.bfloat16(), text.bfloat16()
        seq_len = self.model.patch_embed.grid(x0.shape)
        seq_len = seq_len[0] * seq_len[1] * seq_len[2]
        loss = compute_loss(self.engine, x0, text, mask, self.cfg.diffusion, seq_len, self.gen)
        bad = _any_rank(not torch.isfinite(loss).item(), self.device)
        if bad:
            return None, False
        self.engine.backward(loss)
        return loss.item(), True

    def train_step(self, data_iter) -> dict:
        t0 = time.perf_counter()
        losses, ok, wait = [], True, 0.0
        tokens = samples = 0
        for _ in range(self.cfg.train.grad_accum):
            tw = time.perf_counter()
            batch = next(data_iter)
            wait += time.perf_counter() - tw
            samples += batch["latents"].shape[0]
            g = self.model.patch_embed.grid(batch["latents"].shape)
            tokens += batch["latents"].shape[0] * g[0] * g[1] * g[2]
            loss, good = self._micro_step(batch)
            if not good:
                ok = False
                break
            losses.append(loss)
        skipped_before = self.engine.skipped_steps
        if ok and self.cfg.parallel.zero_stage == 0:
            ok = not _any_rank(not _grads_finite(self.engine), self.device)
        if ok:
            self.engine.step()
            ok = self.engine.skipped_steps == skipped_before  # ZeRO's own overflow check skipped it
        else:
            self.engine.optimizer.zero_grad()
        if ok and self.ema is not None:
            self.ema.update()
        dt = time.perf_counter() - t0
        return {"loss": sum(losses) / len(losses) if ok else float("nan"), "ok": ok, "time": dt,
                "tokens": tokens, "samples": samples, "data_wait": wait, "seq_len": tokens // max(samples, 1)}

    # -- loop ------------------------------------------------------------------------------
    def fit(self) -> int:
        cfg = self.cfg.train
        flag = _SignalFlag().install()
        data_iter = iter(self.data)
        # ranks of one TP x CP group work on the same samples: throughput counts data-parallel replicas
        replicas = self.mesh.get_data_parallel_world_size()
        model_parallel = self.cfg.parallel.tp * self.cfg.parallel.cp
        peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else peak_flops(self.device)
        bar = self.metrics.progress(total=cfg.steps, initial=self.step, enabled=cfg.progress_bar)
        try:
            first = True
            while self.step < cfg.steps:
                out = self.train_step(data_iter)
                self.step += 1
                if first:
                    self._info(_hydra_paths(self.model))
                    first = False
                if out["ok"]:
                    self.nonfinite_run = 0
                else:
                    self.nonfinite_total += 1
                    self.nonfinite_run += 1
                    self._info(f"step {self.step}: non-finite loss or gradient, step skipped "
                               f"({self.nonfinite_run} in a row, {self.nonfinite_total} in total)")
                    if self.nonfinite_run >= cfg.max_consecutive_nonfinite:
                        raise NonFiniteError(
                            f"{self.nonfinite_run} consecutive steps had a non-finite loss or gradient (last at "
                            f"step {self.step}); stopping. Lower optim.lr, check the data, or resume from an "
                            f"earlier checkpoint in {self.ckpt_dir}")
                # model FLOPs (3 x forward), as Megatron / torchtitan report MFU: recomputation is not counted
                flops = train_flops(self.cfg.model, out["seq_len"], out["samples"]) / model_parallel
                row = {"step": self.step, "loss": out["loss"], "lr": self.scheduler.get_last_lr()[0],
                       "grad_norm": _grad_norm(self.engine), "samples_per_s": out["samples"] * replicas / out["time"],
                       "tokens_per_s": out["tokens"] * replicas / out["time"],
                       "mfu": flops / out["time"] / peak if peak else float("nan"),
                       "data_wait_s": out["data_wait"], "peak_mem_gb": _peak_mem_gb(self.device),
                       "skipped_steps": self.nonfinite_total}
                self.metrics.step(row, tb=self.step % cfg.log_every == 0 or self.step == cfg.steps)
                bar.update(1, loss=out["loss"], sps=row["samples_per_s"])
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.log_samples()
                stop = _any_rank(flag.signum is not None, self.device)
                if stop:
                    self.save(f"signal {flag.signum}")
                    self._info(f"checkpoint written on signal at step {self.step}; exiting")
                    return 0
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                    self.save("periodic" if self.step < cfg.steps else "final")
            if self.rank == 0:
                (self.run_dir / "DONE").write_text(str(self.step))
            return 0
        finally:
            bar.close()
            flag.restore()
            self.metrics.close()

    def log_samples(self) -> None:
        from megassm.sample import preview_images

        imgs = preview_images(self)
        if imgs is not None:
            self.metrics.images("samples", imgs, self.step)


def compute_loss(engine, x0, text, mask, diffusion_cfg, seq_len, gen):
    """Module-level so tests can inject faults (e.g. a NaN) into a run."""
    return flow_matching_loss(engine, x0, text, mask, diffusion_cfg, seq_len, gen)


def _grad_norm(engine) -> float:
    g = engine.get_global_grad_norm()
    if g is None:
        return float("nan")
    return float(g.item() if torch.is_tensor(g) else g)


def _peak_mem_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (host RSS)
    except Exception:
        return float("nan")


def train(cfg: RunConfig) -> int:
    """Entry point for ``megassm train``: returns a process exit code."""
    import warnings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # DeepSpeed calls collectives that torch marks deprecated; one warning per step buries the log.
    warnings.filterwarnings("ignore", message=".*is deprecated. Please use.*", category=FutureWarning)
    if cfg.parallel.pp > 1:  # pipeline parallelism: megassm/parallel/pipeline_trainer.py
        from megassm.parallel.pipeline_trainer import PipelineTrainer

        trainer = PipelineTrainer(cfg)
    else:
        trainer = Trainer(cfg)
    code = trainer.fit()
    return code

