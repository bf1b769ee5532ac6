"""Agreement on a local failure before the next collective: every rank learns which ranks failed.

A rank that raises between two collectives (a bad batch, a metric's own error) and leaves would strand the
others in the next one (ZeRO-3's parameter gathers, a loss all-reduce). Calling ``failed_ranks`` on every
rank at such a point -- each saying whether it failed -- lets all of them stop together.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def failed_ranks(failed: bool, device: torch.device, group=None) -> list[int]:
    """Ranks (in ``group``) that passed ``failed=True``; one all-reduce of a world-sized flag vector.

    Every rank of ``group`` must call it at the same point. ``device``: where the group's collectives run
    (``cuda:<local rank>`` under NCCL, CPU under gloo). Without a process group: [0] or []."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [0] if failed else []
    flags = torch.zeros(dist.get_world_size(group), dtype=torch.int32, device=device)
    flags[dist.get_rank(group)] = int(failed)
    dist.all_reduce(flags, group=group)
    return [r for r, f in enumerate(flags.tolist()) if f]
