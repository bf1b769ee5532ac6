"""Run a function on N gloo processes from inside pytest (torch.multiprocessing spawn)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn, world: int, port: int, out_dir: str, args: tuple) -> None:
    torch.set_num_threads(1)
    backend = "gloo"
    if os.environ.get("MEGASSM_TEST_DEVICE") == "cuda":  # the same checks on GPUs over NCCL
        backend = "nccl"
        torch.cuda.set_device(rank)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # true fp32
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False)  # the parent's (spawn): already listening
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, out_dir, *args, env: dict[str, str] | None = None) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` processes; returns each rank's (JSON) result.

    ``fn`` must be importable (module level). An exception on any rank fails the call with its
    traceback. ``env``: variables the children start with (e.g. TRITON_INTERPRET=1, which must be set
    before triton compiles anything); this process's environment is restored afterwards.
    """
    os.environ["OMP_NUM_THREADS"] = "1"  # children inherit it before they import torch
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    # The rendezvous store is this process's, on a port the OS picks and held until the ranks are done: no port
    # is chosen, freed and re-bound later (another test running beside this one could take it in between).
    store = dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False)
    try:
        mp.spawn(_entry, args=(fn, world, store.port, str(out_dir), args), nprocs=world, join=True)
    finally:
        del store
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]


def assert_clean(results: list[dict]) -> None:
    """Every rank's ``{case: {"failures": [...]}}`` (the checks run inside the ranks) has no failure."""
    bad = {f"rank {r} {case}": v["failures"][:4] for r, res in enumerate(results) for case, v in res.items()
           if v["failures"]}
    assert not bad, bad
