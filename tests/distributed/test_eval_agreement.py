"""train.eval_every on several ranks: a held-out loss that fails on one rank stops on every rank, none left
waiting in a ZeRO-3 gather (megassm/eval/heldout.py, megassm/parallel/comm.py failed_ranks).

The case runs in a child process with a deadline: before the agreement, rank 0 went on into its next
forward's gather while rank 1 had left, and the run hung (gloo's own timeout is 30 minutes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, child_env

pytestmark = pytest.mark.distributed
HERE = Path(__file__).parent
CASE = ("import sys, json; sys.path.insert(0, sys.argv[1]); from dist_harness import spawn; import eval_cases; "
        "print(json.dumps(spawn(getattr(eval_cases, sys.argv[3]), 2, sys.argv[2])))")


def _two_ranks(case: str, out_dir: Path) -> tuple[dict, dict]:
    """``eval_cases.<case>`` on 2 gloo ranks in a child process that must finish within 240 s."""
    proc = subprocess.Popen([sys.executable, "-c", CASE, str(HERE), str(out_dir), case], cwd=REPO,
                            env=child_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the case and the ranks it spawned
        proc.communicate()
        pytest.fail(f"{case}: a failure on rank 1 left the ranks hanging (no result in 240 s)")
    assert proc.returncode == 0, err[-3000:]
    r0, r1 = json.loads(out.strip().splitlines()[-1])
    return r0, r1


def test_a_heldout_failure_on_one_rank_stops_every_rank(tmp_path):
    r0, r1 = _two_ranks("heldout_failing_on_one_rank", tmp_path)
    assert r1["outcome"].startswith("KeyError") and "text_mask" in r1["outcome"], r1  # its own error
    assert r0["outcome"] == ("HeldOutError: held-out loss: rank(s) [1] failed before forward 2 of 2; stopped on "
                             "every rank"), r0
    assert r0["after"] == r1["after"] == 3.0  # the next collective pairs up: 1 + 2


def test_a_prompt_encoding_failure_on_one_rank_stops_every_rank(tmp_path):
    """The eval prompts' (and the previews') generation: the text encoder fails on rank 1 only."""
    r0, r1 = _two_ranks("previews_failing_on_one_rank", tmp_path)
    assert r1["outcome"] == "FileNotFoundError: text encoder weights: no such file on this node", r1
    assert r0["outcome"] == ("RuntimeError: previews: encoding the prompts failed on rank(s) [1]; stopped on every "
                             "rank"), r0
    assert r0["after"] == r1["after"] == 3.0
