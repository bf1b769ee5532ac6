"""Committing a checkpoint (megassm/train/checkpoint.py): durable renames, pruning by commit order,
``train.keep_last`` validation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from megassm.checkpoint.snapshot import fsync_tree
from megassm.config.validate import ConfigError
from megassm.run_config import load_config
from megassm.train import checkpoint as ckpt


def _record_fsyncs(monkeypatch) -> list[tuple[str, str]]:
    """("replace", destination) and ("fsync", path of the fd) in the order they happen."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        real_replace(src, dst, *a, **k)
        events.append(("replace", str(Path(dst).resolve())))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def _fake_tag(ckpt_dir: Path, step: int, complete: bool = True) -> str:
    tag = ckpt.tag_for(step)
    (ckpt_dir / tag / "trainer").mkdir(parents=True)
    (ckpt_dir / tag / "trainer" / "rank_00000.json").write_text("{}")
    if complete:
        ckpt.commit(ckpt_dir, tag, keep_last=0)
    return tag


def test_commit_fsyncs_the_directory_after_each_rename(tmp_path, monkeypatch):
    """COMPLETE and ``latest`` are renames: each is durable only once its directory is fsync'd."""
    ckpt_dir = tmp_path.resolve() / "checkpoints"
    tag = _fake_tag(ckpt_dir, 2, complete=False)
    events = _record_fsyncs(monkeypatch)
    ckpt.commit(ckpt_dir, tag, keep_last=3)
    for name in (ckpt_dir / tag / ckpt.COMPLETE, ckpt_dir / ckpt.LATEST):
        renamed = events.index(("replace", str(name)))
        assert ("fsync", str(name.parent)) in events[renamed + 1:], (name, events)


def test_fsync_tree_fsyncs_the_directories_that_name_the_files(tmp_path, monkeypatch):
    root = tmp_path.resolve() / "step_00000002"
    (root / "trainer").mkdir(parents=True)
    (root / "trainer" / "rank_00000.json").write_text("{}")
    events = _record_fsyncs(monkeypatch)
    fsync_tree(root)
    assert {("fsync", str(root)), ("fsync", str(root / "trainer"))} <= set(events), events


def test_keep_last_0_keeps_every_checkpoint(tmp_path):
    """torchtitan's keep_latest_k=0 keeps all; megassm's keep_last=0 deleted every one, latest's too."""
    ckpt_dir = tmp_path / "checkpoints"
    tags = []
    for step in (2, 4, 6):
        tags.append(_fake_tag(ckpt_dir, step, complete=False))
        ckpt.commit(ckpt_dir, tags[-1], keep_last=0)
    assert ckpt.complete_tags(ckpt_dir) == tags
    assert ckpt.read_latest(ckpt_dir) == "step_00000006"


def test_pruning_goes_by_commit_order_and_never_removes_latest(tmp_path):
    """``latest`` rolled back from step 200 to step 100; the resumed run saves step 150, which is newer than
    step 200 although its name sorts before it: keep_last=1 keeps step 150, not step 200."""
    ckpt_dir = tmp_path / "checkpoints"
    for step in (100, 200):
        _fake_tag(ckpt_dir, step)
    ckpt.atomic_write_text(ckpt_dir / ckpt.LATEST, "step_00000100")  # the rollback
    new = _fake_tag(ckpt_dir, 150, complete=False)
    ckpt.commit(ckpt_dir, new, keep_last=1)
    assert ckpt.read_latest(ckpt_dir) == new
    assert ckpt.complete_tags(ckpt_dir) == [new]
    # keep_last=2 keeps the two newest commits
    _fake_tag(ckpt_dir, 160)
    _fake_tag(ckpt_dir, 170, complete=False)
    ckpt.commit(ckpt_dir, "step_00000170", keep_last=2)
    assert ckpt.complete_tags(ckpt_dir) == ["step_00000160", "step_00000170"]
    # fewer checkpoints than keep_last: all stay
    _fake_tag(ckpt_dir, 180, complete=False)
    ckpt.commit(ckpt_dir, "step_00000180", keep_last=5)
    assert ckpt.complete_tags(ckpt_dir) == ["step_00000160", "step_00000170", "step_00000180"]


def test_checkpoints_from_before_commit_numbers_sort_first_by_complete_time(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    for i, step in enumerate((30, 10)):  # step 30 committed first, an older megassm's plain COMPLETE
        tag = _fake_tag(ckpt_dir, step, complete=False)
        (ckpt_dir / tag / ckpt.COMPLETE).write_text(tag)
        os.utime(ckpt_dir / tag / ckpt.COMPLETE, ns=(10**18 + i, 10**18 + i))
    _fake_tag(ckpt_dir, 20)
    assert ckpt.complete_tags(ckpt_dir) == ["step_00000030", "step_00000010", "step_00000020"]


@pytest.mark.parametrize("key, value", [("train.keep_last", -1), ("train.ckpt_every", 0)])
def test_checkpoint_keys_are_validated_at_load(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [f"{key}={value}"])
    assert load_config(None, ["train.keep_last=0"]).train.keep_last == 0
