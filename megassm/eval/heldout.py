"""Held-out flow-matching loss: the training loss on a fixed validation set, at fixed timesteps and noise.

The validation set is the first ``eval.samples`` samples of ``eval.paths`` (shards, read once in order, no
shuffling or resampling) or, for the procedural demo, its data at the held-out seed ``eval.seed``. Sample i
of the set gets t, noise and caption dropout from ``prepare_batch(..., sample_index=[i], seed=eval.seed)``:
the training loss's own function, drawn the same way at every evaluation, so two evaluations differ only
through the weights.

Value: the mean over samples of each sample's velocity MSE (a batch's ``velocity_loss`` weighted by its size;
batches hold one latent shape). Under data parallelism replica r takes batches r, r + dp, ...; every rank runs
the same number of forwards (a replica short of batches runs batch 0 again and drops it), because under
ZeRO-3 each forward gathers weights from all ranks.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

from megassm.config.schema import DiffusionConfig, RunConfig
from megassm.diffusion.flow import FlowBatch, prepare_batch, velocity_loss
from megassm.parallel.comm import all_reduce_, failed_ranks


def _procedural_batches(cfg: RunConfig, n: int, batch_size: int, seed: int) -> list[dict]:
    from megassm.data.procedural import ProceduralShapes

    d = cfg.data
    data = ProceduralShapes(d.image_size, batch_size, cfg.model.text_dim, cfg.model.max_text_len, seed=seed,
                            frames=d.frames)
    return [data.batch(i) for i in range(math.ceil(n / batch_size))]


def _shard_batches(cfg: RunConfig, paths: list[str], n: int, batch_size: int) -> list[dict]:
    from megassm.data.reader import build_shard_loader

    data_cfg = dataclasses.replace(cfg.data, paths=list(paths), weights=[], resampled=False, shuffle_buffer=1,
                                   num_workers=0)
    out, count = [], 0
    loader = build_shard_loader(data_cfg, batch_size=batch_size, dp_rank=0, dp_size=1, seed=0,
                                text_len=cfg.model.max_text_len, epochs=1, drop_last=False)
    for batch in loader:
        out.append(batch)
        count += batch["latents"].shape[0]
        if count >= n:
            break
    return out


def heldout_batches(cfg: RunConfig, paths: list[str] | None = None, samples: int | None = None,
                    batch_size: int | None = None) -> list[dict]:
    """The validation set as batches {"latents" (B, C, T, H, W), "text" (B, L, D), "text_mask" (B, L),
    "index": B sample indices 0..N-1}, N <= ``samples``; ``paths`` default eval.paths (empty: procedural)."""
    e = cfg.eval
    paths = e.paths if paths is None else paths
    n, bs = samples or e.samples, batch_size or e.batch_size
    if paths:
        raw = _shard_batches(cfg, paths, n, bs)
    elif cfg.data.kind == "procedural":
        raw = _procedural_batches(cfg, n, bs, e.seed)
    else:
        raise ValueError(f"held-out loss: data.kind={cfg.data.kind} and no validation datasets; set eval.paths "
                         "(or pass --heldout) to datasets written by `megassm preprocess`")
    out, first = [], 0
    for b in raw:
        k = min(b["latents"].shape[0], n - first)
        if k <= 0:
            break
        out.append({"latents": b["latents"][:k], "text": b["text"][:k].float(), "text_mask": b["text_mask"][:k],
                    "index": list(range(first, first + k))})
        first += k
    if not out:
        raise ValueError(f"held-out loss: the validation datasets {list(paths)} hold no samples")
    return out


class HeldOutLoss:
    """Call with the model on every rank at the same step; returns the same float on every rank."""

    def __init__(self, batches: list[dict], diffusion: DiffusionConfig, seed: int, device: torch.device,
                 dtype: torch.dtype = torch.float32, dp_rank: int = 0, dp_size: int = 1, leader: bool = True):
        """leader: this rank's losses are counted (one rank of each TP x CP group; the others compute the same)."""
        self.batches, self.diffusion, self.seed = batches, diffusion, seed
        self.device, self.dtype, self.leader = device, dtype, leader
        self.mine = list(range(dp_rank, len(batches), dp_size))
        self.forwards = math.ceil(len(batches) / dp_size)  # the same on every rank
        self.samples = sum(len(b["index"]) for b in batches)

    def inputs(self, model: torch.nn.Module, batch: dict) -> FlowBatch:
        """One validation batch on the device with its fixed draws (no collective: may fail on one rank)."""
        x0 = batch["latents"].to(self.device, self.dtype)
        text = batch["text"].to(self.device, self.dtype)
        seq_len = math.prod(model.patch_embed.grid(tuple(x0.shape)))
        return prepare_batch(x0, text, batch["text_mask"].to(self.device), self.diffusion, seq_len, batch["index"],
                             self.seed)

    @torch.no_grad()
    def batch_loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """The training loss (``flow_matching_loss``) of one validation batch, 0-d float32."""
        b = self.inputs(model, batch)
        return velocity_loss(model(b.xt, b.t, b.text, b.text_mask), b.target).float()

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> float:
        """Every forward is a collective under ZeRO-3; what runs between them (a batch's preparation, the
        loss's bookkeeping) may fail on one rank alone, so before each forward and before the sum every
        rank says whether it failed (``failed_ranks``): all of them raise together, the failing rank its own
        error, the others one naming it, and none is left waiting in a gather."""
        total = torch.zeros(2, dtype=torch.float64)  # (sum of loss x samples, samples) of this rank
        error: Exception | None = None
        for k in range(self.forwards):
            own = k < len(self.mine)
            batch = self.batches[self.mine[k] if own else 0]  # a stand-in keeps the ZeRO-3 gathers in step
            try:
                b = self.inputs(model, batch)
            except Exception as exc:  # noqa: BLE001 -- every rank is told below
                error = exc
            self._agree(error, f"forward {k + 1} of {self.forwards}")
            loss = velocity_loss(model(b.xt, b.t, b.text, b.text_mask), b.target).float()
            try:
                if own and self.leader:
                    n = len(batch["index"])
                    total += torch.tensor([float(loss) * n, n], dtype=torch.float64)
            except Exception as exc:  # noqa: BLE001
                error = exc
        self._agree(error, "the loss sum")
        if dist.is_initialized():  # world 1 included: a single-GPU run takes the cluster's path
            all_reduce_(total)
        s, n = total.tolist()
        assert n == self.samples, f"held-out loss counted {n} samples of {self.samples}"
        return s / n

    def _agree(self, error: Exception | None, where: str) -> None:
        """Raise on every rank if any rank failed (collective; the device is the group's)."""
        failed = failed_ranks(error is not None)
        if error is not None:
            raise error
        if failed:
            raise HeldOutError(f"held-out loss: rank(s) {failed} failed before {where}; stopped on every rank")


class HeldOutError(RuntimeError):
    """Another rank's held-out loss failed; this rank stopped with it (its own state is fine)."""
