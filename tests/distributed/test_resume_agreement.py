"""Which checkpoint a multi-rank run resumes from is chosen once, on rank 0, and given to every rank
(megassm/train/elastic.py ``_agreed_resume_tag``): each rank verifying every file would read the checkpoint
world-size times over the shared file system, and ranks that saw a file differently would resume different
steps. 2 gloo ranks; rank 1 is made to see the newest checkpoint as damaged, as a rank on a lagging file
system view would."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.distributed


def _choose(rank: int, world: int, run_dir: str) -> dict:
    from pathlib import Path

    from megassm.checkpoint import verify
    from megassm.run_config import load_config
    from megassm.train import checkpoint as ckpt
    from megassm.train import elastic

    checked, damaged = [], {1: {"step_00000004"}, 0: set()}  # rank 1's view of the file system lags

    def check(tag_dir: Path) -> list[str]:
        checked.append(tag_dir.name)
        if tag_dir.name in damaged[rank]:
            return [f"{tag_dir}: zero_pp_rank_1_mp_rank_00_optim_states.pt: unreadable"]
        return verify.damaged_files(tag_dir)

    ckpt.resume_tag.__defaults__ = (None, check)  # (resume_from, check): this process only
    ckpt_dir = Path(run_dir) / "checkpoints"
    plan = elastic.plan_resume(load_config("configs/smoke.yaml"), ckpt_dir, world)
    answer = {"tag": plan.tag, "notes": plan.notes, "checked": list(checked)}
    damaged[0].add("step_00000002")  # rank 0 finds the asked-for checkpoint damaged: every rank must hear it
    asked = load_config("configs/smoke.yaml", [f"run_dir={run_dir}", "train.resume_from=step_00000002"])
    try:
        elastic.plan_resume(asked, ckpt_dir, world)
    except ckpt.ResumeError as e:
        answer["error"] = str(e)
    return answer


def test_every_rank_resumes_the_checkpoint_rank_0_chose(tmp_path):
    import sys
    from pathlib import Path

    from dist_harness import spawn

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
    from test_resume_choice import _checkpoint  # a small committed ZeRO-3-shaped checkpoint

    for step in (2, 4):
        _checkpoint(tmp_path / "checkpoints", step)
    r0, r1 = spawn(_choose, 2, tmp_path, str(tmp_path))
    assert r0["tag"] == r1["tag"] == "step_00000004", (r0, r1)
    assert r0["checked"] == ["step_00000004"] and r1["checked"] == [], "only rank 0 reads the files"
    # rank 0's error reaches every rank, named as rank 0's, instead of leaving them waiting
    assert r0["error"].startswith("train.resume_from=step_00000002: the checkpoint is damaged"), r0
    assert r1["error"].startswith("rank 0, choosing the checkpoint to resume: ResumeError: train.resume_from=")
