"""Which checkpoint a run resumes from (megassm/train/checkpoint.py: resume_tag): latest's when whole, the
newest whole one before it when latest's is damaged (checkpoint/verify.py), or train.resume_from."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from megassm.checkpoint.verify import damaged_files
from megassm.config.validate import ConfigError
from megassm.run_config import load_config
from megassm.train import checkpoint as ckpt


def _checkpoint(ckpt_dir, step: int, world: int = 2) -> str:
    """A ZeRO-3-shaped checkpoint of ``world`` ranks (small torch.save files), committed."""
    tag = ckpt.tag_for(step)
    d = ckpt_dir / tag
    (d / "trainer").mkdir(parents=True)
    for r in range(world):
        for kind in ("model", "optim"):
            torch.save({"step": step, "x": torch.arange(64.0)}, d / f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt")
        (d / "trainer" / f"rank_{r:05d}.json").write_text(json.dumps({"step": step, "world": world}))
        rng = {"rng.torch_cpu": torch.zeros(8, dtype=torch.uint8)}
        save_file(rng, str(d / "trainer" / f"rank_{r:05d}.safetensors"))
    ckpt.commit(ckpt_dir, tag, keep_last=0)
    return tag


def _truncate(path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_whole_checkpoints_pass_and_each_kind_of_damage_is_named(tmp_path):
    d = tmp_path / "checkpoints" / _checkpoint(tmp_path / "checkpoints", 2)
    assert damaged_files(d) == []
    _truncate(d / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    (d / "trainer" / "rank_00001.json").write_text('{"step": 2, "wor')
    (d / "trainer" / "rank_00001.safetensors").unlink()
    (d / "zero_pp_rank_0_mp_rank_00_model_states.pt").unlink()
    problems = "\n".join(damaged_files(d))
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt: unreadable" in problems, problems
    assert "rank_00001.json: unreadable trainer state" in problems, problems
    assert "rank_00001.safetensors: missing (the run had 2 ranks)" in problems, problems
    assert "model_states.pt of mp_rank 00 is missing for dp ranks [0]" in problems, problems


def test_a_damaged_latest_falls_back_to_the_newest_whole_checkpoint_before_it(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        _checkpoint(ckpt_dir, step)
    assert ckpt.resume_tag(ckpt_dir) == ("step_00000006", [])
    _truncate(ckpt_dir / "step_00000006" / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    _truncate(ckpt_dir / "step_00000004" / "trainer" / "rank_00001.safetensors", keep=4)
    tag, notes = ckpt.resume_tag(ckpt_dir)
    assert tag == "step_00000002"
    assert "step_00000006 is damaged" in notes[0] and "zero_pp_rank_0_mp_rank_00_model_states.pt" in notes[0]
    assert "step_00000004 is damaged" in notes[1] and "rank_00001.safetensors" in notes[1]
    assert "resuming from step_00000002" in notes[2]
    _truncate(ckpt_dir / "step_00000002" / "zero_pp_rank_1_mp_rank_00_model_states.pt")
    with pytest.raises(ckpt.ResumeError, match="no whole checkpoint to resume from"):
        ckpt.resume_tag(ckpt_dir)


def test_the_fallback_never_takes_a_checkpoint_of_a_line_rolled_back_from(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        _checkpoint(ckpt_dir, step)
    ckpt.atomic_write_text(ckpt_dir / ckpt.LATEST, "step_00000004")  # the user rolled back from step 6
    _truncate(ckpt_dir / "step_00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert ckpt.resume_tag(ckpt_dir)[0] == "step_00000002"


def test_resume_from_picks_a_tag_and_refuses_a_damaged_one(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    for step in (2, 4):
        _checkpoint(ckpt_dir, step)
    tag, notes = ckpt.resume_tag(ckpt_dir, "step_00000002")
    assert tag == "step_00000002" and "not from step_00000004, which latest names" in notes[0]
    _truncate(ckpt_dir / "step_00000002" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(ckpt.ResumeError, match=r"resume_from=step_00000002: the checkpoint is damaged.*step_00000004"):
        ckpt.resume_tag(ckpt_dir, "step_00000002")


def test_resume_from_is_checked_at_load_against_the_run_directory(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    for step in (2, 4):
        _checkpoint(ckpt_dir, step)
    (ckpt_dir / "step_00000006").mkdir()  # a partial save
    cfg = load_config(None, [f"run_dir={tmp_path}", "train.resume_from=step_00000004"])
    assert cfg.train.resume_from == "step_00000004"
    for tag, why in (("step_00000003", "does not exist"), ("step_00000006", "has no COMPLETE file"),
                     ("../x", "not a path")):
        with pytest.raises(ConfigError, match="train.resume_from") as e:
            load_config(None, [f"run_dir={tmp_path}", f"train.resume_from={tag}"])
        assert why in str(e.value)
        if why != "not a path":
            assert "step_00000002, step_00000004" in str(e.value)
