"""Resume when the checkpoint ``latest`` names is damaged (CPU, one process): the trainer checks the files
first (megassm/checkpoint/verify.py), says which file is damaged and resumes from the newest whole
checkpoint before it; ``train.resume_from=TAG`` picks a checkpoint, and an unknown tag is refused at load
with the valid ones listed."""

import pytest

from megassm.train import checkpoint as ckpt
from tests.conftest import SMOKE, TINY_OVERRIDES, losses_by_step, read_metrics, run_train

pytestmark = pytest.mark.slow
COMMON = [*TINY_OVERRIDES, "train.ckpt_every=2", "train.keep_last=10"]


def test_a_damaged_latest_resumes_from_the_previous_checkpoint_and_resume_from_picks_one(tmp_path):
    run = tmp_path / "run"
    run_train(SMOKE, *COMMON, f"run_dir={run}", "train.steps=4")
    ckpts = run / "checkpoints"
    damaged = sorted((ckpts / "step_00000004").glob("*model_states.pt"))[0]
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # cut off: a lost write

    proc = run_train(SMOKE, *COMMON, f"run_dir={run}", "train.steps=6")
    assert [r["step"] for r in read_metrics(run) if r.get("event") == "resume"] == [2]
    assert f"step_00000004 is damaged: {damaged}: unreadable" in proc.stderr, proc.stderr[-3000:]
    assert "resuming from step_00000002 instead" in proc.stderr
    assert sorted(losses_by_step(run)) == [1, 2, 3, 4, 5, 6] and ckpt.read_latest(ckpts) == "step_00000006"

    # a rollback: back to step 2 although latest names step 6
    proc = run_train(SMOKE, *COMMON, f"run_dir={run}", "train.steps=3", "train.resume_from=step_00000002")
    assert [r["step"] for r in read_metrics(run) if r.get("event") == "resume"] == [2, 2]
    assert "resuming from step_00000002 (train.resume_from), not from step_00000006" in proc.stderr
    assert ckpt.read_latest(ckpts) == "step_00000003"

    proc = run_train(SMOKE, *COMMON, f"run_dir={run}", "train.resume_from=step_00000009", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "train.resume_from=step_00000009" in proc.stderr and "does not exist" in proc.stderr
    assert "step_00000002, step_00000004, step_00000006, step_00000003" in proc.stderr  # commit order
