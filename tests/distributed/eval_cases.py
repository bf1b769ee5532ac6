"""Multi-process cases for tests/distributed/test_eval_agreement.py (module level: spawned by dist_harness)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megassm.config.schema import DiffusionConfig
from megassm.eval.heldout import HeldOutLoss


class GatheringModel(nn.Module):
    """Stands for a ZeRO-3 model: every forward is a collective (its parameter gathers), here one all-reduce."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.w = nn.Parameter(torch.ones((), device=device))
        self.patch_embed = self

    def grid(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        return shape[2], shape[3] // 2, shape[4] // 2

    def forward(self, xt, t, text, text_mask):
        dist.all_reduce(torch.ones(1, device=self.device))  # the "gather": every rank must be here
        return xt * self.w


def heldout_failing_on_one_rank(rank: int, world: int) -> dict:
    """4 validation batches, 2 forwards per rank; rank 1's copy of its second batch is broken (no text mask).
    Returns what the held-out loss raised on this rank and the value of the next collective (the previews,
    the next training step): every rank must get there, and only once."""
    device = torch.device("cuda", rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    batches = [{"latents": torch.randn(2, 4, 1, 4, 4, generator=g), "text": torch.randn(2, 3, 8, generator=g),
                "text_mask": torch.ones(2, 3, dtype=torch.bool), "index": [2 * i, 2 * i + 1]} for i in range(4)]
    if rank == 1:
        del batches[3]["text_mask"]
    loss = HeldOutLoss(batches, DiffusionConfig(), 0, device, dp_rank=rank, dp_size=world)
    return _outcome_and_next_collective(lambda: loss(GatheringModel(device)), rank, device)


def previews_failing_on_one_rank(rank: int, world: int) -> dict:
    """The prompts' text encoder fails on rank 1 only (a file missing on its node, memory); the sampler's
    forwards are collectives (a pre-hook all-reduce stands for ZeRO-3's gathers). Returns what generation
    raised on this rank and the value of the next collective."""
    from megassm.models import build_model
    from megassm.run_config import load_config
    from megassm.train.preview import Previews
    from tests.conftest import TINY_OVERRIDES

    device = torch.device("cuda", rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    cfg = load_config("configs/smoke.yaml", [*TINY_OVERRIDES, "diffusion.sample_steps=2"], world=world)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    model.register_forward_pre_hook(lambda m, args: dist.all_reduce(torch.ones(1, device=device)))
    previews = Previews(cfg, device, torch.float32, dp_rank=rank, dp_size=world, prompts=["a", "b"])
    if rank == 1:
        def broken():
            raise FileNotFoundError("text encoder weights: no such file on this node")
        previews._encoded = broken
    return _outcome_and_next_collective(lambda: previews.pixels(model), rank, device)


def _outcome_and_next_collective(run, rank: int, device) -> dict:
    """What ``run()`` raised on this rank (or "ok"), and the value of the next collective (the ranks still pair up)."""
    try:
        run()
        outcome = "ok"
    except Exception as exc:  # noqa: BLE001 -- what TrainingEvaluator catches and logs
        outcome = f"{type(exc).__name__}: {exc}"
    after = torch.tensor([rank + 1.0], device=device)
    dist.all_reduce(after)
    return {"outcome": outcome, "after": after.item()}
