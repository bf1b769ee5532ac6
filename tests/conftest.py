"""Shared test setup: a stable place for DeepSpeed's JIT extensions, and helpers to run the CLI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# DeepSpeed compiles a small CPU extension on first use (~30 s); keep it across test runs.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "megassm_torch_extensions"))
os.environ.setdefault("MEGASSM_DEVICE", "cpu")


# torch.distributed rendezvous variables a child must not inherit (an in-process test may have set them,
# and its process group still holds that port)
DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def run_cli(*args, cwd=None, env=None, timeout=600, check=True) -> subprocess.CompletedProcess:
    """Run ``python -m megassm ARGS`` in a fresh process; returns the completed process."""
    full_env = child_env(**(env or {}))
    proc = subprocess.run([sys.executable, "-m", "megassm", *map(str, args)], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"megassm {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture
def cli():
    return run_cli


SMOKE = "configs/smoke.yaml"  # relative to REPO, the cwd of the processes the tests start

TINY_OVERRIDES = [
    "model.d_model=32", "model.num_heads=2", "model.headdim=16", "model.d_state=8", "model.chunk_size=16",
    "model.text_dim=16", "model.max_text_len=8", "model.in_channels=3", "data.kind=procedural",
    "data.image_size=8", "encoders.vae=builtin:pixels", "encoders.text_encoder=builtin:words",
    "train.micro_batch_size=4", "train.progress_bar=false", "train.log_every=1", "init_from=null",
]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int) -> list[str]:
    """``python -m torch.distributed.run`` for ``nproc`` local ranks. --standalone: the launcher's store binds a port
    the OS picks and holds it (a --master_port from free_port() is free when chosen, and another test running beside
    this one could bind it in the seconds before the launcher does)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def train_cmd(config, *overrides, nproc: int = 1) -> list[str]:
    """Command line for `megassm train` on ``nproc`` local gloo ranks (torchrun for nproc > 1)."""
    if nproc == 1:
        return [sys.executable, "-m", "megassm", "train", str(config), *map(str, overrides)]
    return [*torchrun(nproc), "-m", "megassm", "train", str(config), *map(str, overrides)]


def run_train(config, *overrides, nproc: int = 1, timeout: int = 600, check: bool = True, env: dict | None = None):
    env = child_env(OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run(train_cmd(config, *overrides, nproc=nproc), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(run_dir) -> list[dict]:
    import json

    f = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []


def losses_by_step(run_dir) -> dict[int, float]:
    """Step -> loss; a step logged again after a resume keeps its latest value."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
