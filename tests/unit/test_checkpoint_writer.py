"""The pieces of a non-blocking checkpoint without a process group: the host snapshot, the background
writer's markers, commit and error path (megassm/checkpoint/snapshot.py, megassm/train/checkpoint_writer.py)."""

import io
import threading

import pytest
import torch

from megassm.checkpoint.snapshot import FileSink, host_snapshot
from megassm.train import checkpoint as ckpt
from megassm.train.checkpoint_writer import MARKERS, STATS, BackgroundSave, PendingSave


def _state():
    flat = torch.arange(12, dtype=torch.float32)
    master = torch.zeros(3, requires_grad=True)
    master.ds_id = "1_107"  # DeepSpeed tags its fp32 partitions; torch.save keeps such attributes
    return {"flat": [flat], "master": master, "views": [flat[:4], flat[4:].view(2, 4)],
            "empty": [torch.empty(0), torch.empty(0)], "param": torch.nn.Parameter(torch.ones(3)),
            "group": [{"lr": 0.1, "params": [0, 1]}], "step": 7}


def _saved_bytes(obj) -> bytes:
    f = io.BytesIO()
    torch.save(obj, f)
    return f.getvalue()


def test_host_snapshot_is_detached_from_later_updates_and_saves_the_same_bytes():
    state = _state()
    before = _saved_bytes(state)
    snap = host_snapshot(state)
    # the same storages, views, aliasing and Python values: torch.save writes the same file
    assert _saved_bytes(snap) == before
    assert snap["views"][0].untyped_storage().data_ptr() == snap["flat"][0].untyped_storage().data_ptr()
    assert snap["views"][1].storage_offset() == 4 and isinstance(snap["param"], torch.nn.Parameter)
    # what the next optimizer step does in place does not reach the snapshot
    state["flat"][0].add_(100.0)
    state["param"].data.zero_()
    state["group"][0]["lr"] = 0.5
    assert _saved_bytes(snap) == before
    assert snap["flat"][0].untyped_storage().data_ptr() != state["flat"][0].untyped_storage().data_ptr()


def test_file_sink_writes_at_once_unless_deferred(tmp_path):
    calls = []
    FileSink().put(tmp_path / "a", lambda: calls.append("a"))
    deferred = FileSink(deferred=True)
    deferred.put(tmp_path / "b", lambda: calls.append("b"))
    assert calls == ["a"] and [p.name for p, _ in deferred.jobs] == ["b"]


def _writer(rank, world, step=lambda: 10):
    return BackgroundSave(rank, world, lambda d, tag: ckpt.commit(d, tag, keep_last=3), step, poll_s=0.01)


def _pending(ckpt_dir, tag, jobs):
    (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
    return PendingSave(ckpt_dir, tag, 4, jobs, started=0.0, snapshot_s=0.0)


def _file_job(path, text, gate: threading.Event | None = None):
    def write():
        if gate is not None:
            assert gate.wait(10)
        path.write_text(text)
    return path, write


def test_rank0_commits_only_after_every_rank_marked_its_files_durable(tmp_path):
    """Two ranks' writers on one checkpoint (as on a shared file system): rank 1 is held mid-write; rank 0,
    done with its own files, must not write COMPLETE or move ``latest`` until rank 1's marker is there."""
    ckpt_dir = tmp_path / "checkpoints"
    (ckpt_dir / "step_00000002").mkdir(parents=True)
    ckpt.commit(ckpt_dir, "step_00000002", keep_last=3)
    tag = "step_00000004"
    gate = threading.Event()
    w0, w1 = _writer(0, 2), _writer(1, 2)
    w0.start(_pending(ckpt_dir, tag, [_file_job(ckpt_dir / tag / "r0.bin", "zero")]))
    w1.start(_pending(ckpt_dir, tag, [_file_job(ckpt_dir / tag / "r1.bin", "one", gate)]))
    for _ in range(500):  # until rank 0's own part is durable
        if (ckpt_dir / tag / MARKERS / "rank_00000").is_file():
            break
        threading.Event().wait(0.01)
    assert (ckpt_dir / tag / MARKERS / "rank_00000").is_file()
    assert w0.raise_if_failed() is None  # still in flight: it waits for rank 1
    assert not (ckpt_dir / tag / ckpt.COMPLETE).exists()
    assert ckpt.read_latest(ckpt_dir) == "step_00000002"
    gate.set()
    assert w1.wait() == {}
    stats = w0.wait()
    assert ckpt.read_latest(ckpt_dir) == tag and not (ckpt_dir / tag / MARKERS).exists()
    assert stats["tag"] == tag and stats["mode"] == "async" and stats["bytes"] == len("zero") + len("one") + (
        ckpt_dir / tag / ckpt.COMPLETE).stat().st_size
    assert stats["step_at_commit"] == 10 and stats["steps_during_write"] == 6
    assert (ckpt_dir / STATS).is_file()


def test_a_write_error_surfaces_on_the_training_thread_and_latest_stays(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    (ckpt_dir / "step_00000002").mkdir(parents=True)
    ckpt.commit(ckpt_dir, "step_00000002", keep_last=3)
    tag = "step_00000004"

    def full_disk():
        raise OSError(28, "No space left on device")

    # rank 1 fails: rank 0 finishes its own files, then reads rank 1's failure marker instead of committing
    w0, w1 = _writer(0, 2), _writer(1, 2)
    w1.start(_pending(ckpt_dir, tag, [(ckpt_dir / tag / "r1.bin", full_disk)]))
    w0.start(_pending(ckpt_dir, tag, [_file_job(ckpt_dir / tag / "r0.bin", "zero")]))
    with pytest.raises(RuntimeError, match=r"rank 1: the background write of .*step_00000004 failed.*No space left"):
        w1.wait()
    with pytest.raises(RuntimeError, match=r"rank 0: .*rank 1 could not write its part.*No space left.*still names "
                                           r"the previous complete checkpoint"):
        w0.wait()
    assert ckpt.read_latest(ckpt_dir) == "step_00000002"
    assert not (ckpt_dir / tag / ckpt.COMPLETE).exists()
    assert w0.wait() is None  # reaped: nothing in flight any more


def test_snapshot_buffers_are_reused_only_after_release():
    """The pool behind device snapshots (pinned on GPUs; pageable here, the same bookkeeping): a buffer
    in use by a save in flight is never handed out again until that save's files are written."""
    from megassm.checkpoint.snapshot import HostBuffers

    pool = HostBuffers(pin=False)
    state = {"a": torch.arange(4.0), "b": torch.ones(4)}
    first = host_snapshot(state, buffers=pool)
    ptrs = {k: v.untyped_storage().data_ptr() for k, v in first.items()}
    second = host_snapshot(state, buffers=pool)  # not released: fresh buffers
    assert not {v.untyped_storage().data_ptr() for v in second.values()} & set(ptrs.values())
    assert pool.held_bytes == 4 * 16
    pool.release()
    state["a"].add_(1.0)
    third = host_snapshot(state, buffers=pool)
    assert {v.untyped_storage().data_ptr() for v in third.values()} <= set(ptrs.values()) | {
        v.untyped_storage().data_ptr() for v in second.values()}
    assert torch.equal(third["a"], torch.arange(4.0) + 1) and pool.held_bytes == 4 * 16
