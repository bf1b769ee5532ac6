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


def run_cli(*args, cwd=None, env=None, timeout=600, check=True) -> subprocess.CompletedProcess:
    """Run ``python -m megassm ARGS`` in a fresh process; returns the completed process."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "megassm", *map(str, args)], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"megassm {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture
def cli():
    return run_cli
