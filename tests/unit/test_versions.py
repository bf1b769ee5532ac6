"""The installed DeepSpeed is checked at start against the range megassm is proven with."""

from pathlib import Path

import pytest

from megassm.runtime import DEEPSPEED_RANGE, check_deepspeed


def test_deepspeed_outside_the_proven_range_is_named():
    lo, hi = DEEPSPEED_RANGE
    for bad in ("0.15.0", "0.18.9", hi + ".0"):
        with pytest.raises(RuntimeError, match=rf"DeepSpeed {bad} is installed.*deepspeed>={lo},<{hi}"):
            check_deepspeed(bad)
    assert check_deepspeed(lo) == lo and check_deepspeed("0.19.8") == "0.19.8"


def test_the_installed_deepspeed_is_in_range():  # what CI installs (constraints.txt) must pass its own check
    check_deepspeed()


def test_train_refuses_another_deepspeed_before_anything_is_written(tmp_path, monkeypatch, capsys):
    import megassm.runtime
    from megassm.cli import main

    monkeypatch.setattr(megassm.runtime, "DEEPSPEED_RANGE", ("0.1", "0.2"))
    config = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
    code = main(["train", str(config), f"run_dir={tmp_path / 'run'}"])
    assert code == 2 and "megassm is proven with deepspeed>=0.1,<0.2" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
