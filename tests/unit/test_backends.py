"""The backend seam (megassm/train/backends/): the DeepSpeed backend and the plain shards implement every
method of the protocols the Trainer, the step strategies and the EMA call."""

import inspect

from megassm.train.backends.base import LocalShards, PlainShards, TrainBackend
from megassm.train.backends.deepspeed import DeepSpeedBackend, DeepSpeedShards


def _members(protocol) -> set[str]:
    return {n for n, _ in inspect.getmembers(protocol) if not n.startswith("_") or n == "__call__"} - set(dir(object)) \
        | set(getattr(protocol, "__annotations__", {}))


def test_implementations_cover_their_protocols():
    for impl, protocol in ((DeepSpeedBackend, TrainBackend), (DeepSpeedShards, LocalShards),
                           (PlainShards, LocalShards)):
        missing = sorted(n for n in _members(protocol) if not hasattr(impl, n))
        assert not missing, f"{impl.__name__} lacks {missing} of {protocol.__name__}"
    # teeth: the protocol's own members are seen (methods and annotated attributes)
    assert {"step", "skip", "backward", "shards", "module", "__call__"} <= _members(TrainBackend)


def test_a_stale_extension_build_lock_is_named_before_deepspeed_can_hang_on_it(tmp_path, monkeypatch, caplog):
    """A DeepSpeed op build killed half-way leaves <TORCH_EXTENSIONS_DIR>/<op>/lock, and the next build of that
    op waits on it forever without a word (seen between two CI runs sharing a cache). Building the backend
    names an old lock; a fresh one (a build running now on another rank of this node) is left alone."""
    import logging
    import os
    import time

    stale, fresh = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "cpu_adam" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir()
        lock.write_text("")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "0")
    with caplog.at_level(logging.WARNING, logger="megassm.train"):
        DeepSpeedBackend(None, None, None, None, None)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, warned
    assert str(stale) in warned[0] and "60 min old" in warned[0] and "remove" in warned[0]
    assert str(fresh) not in warned[0]
