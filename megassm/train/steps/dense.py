"""``DenseStep``: pp = 1. The whole model on every rank, TP / CP applied by ``parallelize_hth``, the backend's
managed accumulation over ``train.grad_accum`` micro-batches (docs/training.md)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megassm.config.schema import RunConfig
from megassm.diffusion.flow import FlowBatch, step_loss_scale, velocity_loss
from megassm.parallel.apply import parallelize_hth
from megassm.parallel.comm import all_reduce_
from megassm.train.ema import ShardedEMA
from megassm.train.steps import SampleIndices, check_same_bucket, flow_batch, next_batch


def compute_loss(model, b: FlowBatch) -> Tensor:
    """The micro-batch's velocity loss. Module-level so tests can inject faults (e.g. a NaN) into a run."""
    return velocity_loss(model(b.xt, b.t, b.text, b.text_mask), b.target)


class DenseStep:
    reads_data = True
    previews = True

    def __init__(self, cfg: RunConfig, mesh, backend, device: torch.device):
        self.cfg, self.mesh, self.backend, self.device = cfg, mesh, backend, device
        self.micro_batches = cfg.train.grad_accum

    def owns(self, name: str) -> bool:
        return True

    def parallelize(self, model: nn.Module) -> None:
        p = self.cfg.parallel
        if p.tp * p.cp > 1:
            parallelize_hth(model, self.mesh, cp_grad_scale=self.backend.cp_grad_scale(), cp_impl=p.cp_impl)

    def wrap(self, model: nn.Module, load_universal: bool = False) -> nn.Module:
        return self.backend.prepare(model, self.micro_batches, load_universal)

    def build_ema(self, decay: float) -> ShardedEMA:
        b = self.backend
        return ShardedEMA(b.module, decay, group=b.reduction_group(), shards=b.shards())

    def run(self, data_iter, sample_indices: SampleIndices, stop: bool, step: int) -> dict:
        """``backward`` + ``accumulate`` per micro-batch, then one collective decides, on every rank alike,
        whether the update is skipped (a non-finite loss or, where the backend's step does not check,
        gradient anywhere), gives the global-batch loss, and carries a stop signal."""
        b, n = self.backend, self.micro_batches
        module = b.module
        losses, wait, tokens, samples, bucket = [], 0.0, 0, 0, 0.0
        for m in range(n):
            batch, waited = next_batch(data_iter)
            wait += waited
            bucket = float(batch.get("bucket", -1) + 1)  # data.buckets: every rank must train the same one
            B = batch["latents"].shape[0]
            index = batch.get("sample_index") or sample_indices(m, B)  # data.buckets: the data's
            fb, seq_len = flow_batch(batch, module.patch_embed, self.device, b.bf16, self.cfg.diffusion, index,
                                     self.cfg.train.seed)
            samples += B
            tokens += B * seq_len
            loss = compute_loss(b, fb)
            if "step_samples" in batch:  # data.buckets: this micro-batch's share of the step's mean
                slots = self.cfg.train.grad_accum * self.mesh.get_data_parallel_world_size()
                loss = loss * step_loss_scale(B, B * seq_len, batch["step_samples"], batch["step_tokens"], slots,
                                              self.cfg.train.loss_reduction)
            losses.append(loss.detach().float())
            # a non-finite loss still goes through backward: the window is completed, then discarded
            b.backward(loss)
            if m < n - 1:
                b.accumulate()
        local = torch.stack(losses)
        bad = (~torch.isfinite(local)).any() | b.nonfinite_grads()
        # built on the losses' device: stacking them with host scalars failed on CUDA (found by the first
        # `megassm train` on a GPU, benchmarks/gpu_configs.py)
        host = torch.tensor([float(stop), bucket, bucket * bucket], device=local.device)
        flags = torch.cat([torch.stack([bad.float().to(local.device), local.mean()]), host])
        all_reduce_(flags)  # SUM over the world: TP x CP ranks of a replica hold the same loss
        n_bad, loss_sum, n_stop, b_sum, b_sq = flags.tolist()
        check_same_bucket(b_sum, b_sq, dist.get_world_size(), step)
        lr = b.lr()  # the rate this step's update applies
        ok = n_bad == 0
        if ok:
            ok = not b.step().skipped
        else:
            b.skip()
        return {"loss": loss_sum / dist.get_world_size() if ok else float("nan"), "ok": ok, "lr": lr,
                "grad_norm": b.grad_norm(), "tokens": tokens, "samples": samples, "data_wait": wait,
                "seq_len": tokens // max(samples, 1), "stop": n_stop > 0}
