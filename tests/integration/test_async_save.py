"""Non-blocking checkpoints (train.async_save, megassm/train/checkpoint_writer.py) on two gloo ranks under
ZeRO-3 with EMA: training goes on while the files are written, COMPLETE / ``latest`` follow every file, a
SIGKILL mid-write leaves ``latest`` at the previous checkpoint, and async checkpoints hold exactly what
sync ones do -- also after a resume from one.

Three launches shared by the assertions: ``sync`` (the reference, synchronous saves at 2, 4, 6);
``killed`` (async, every background write held until one more step has trained, SIGKILL after the first
file of the step-4 save); ``resumed`` (the killed run resumed, async, to step 6).
"""

import json
import math

import pytest
import torch
from safetensors import safe_open

from tests.conftest import SMOKE, TINY_OVERRIDES, losses_by_step, read_metrics, run_train

pytestmark = pytest.mark.slow
COMMON = [*TINY_OVERRIDES, "train.steps=6", "train.ckpt_every=2", "train.ema_decay=0.5", "parallel.zero_stage=3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("async_save")
    sync, killed = root / "sync", root / "killed"
    run_train(SMOKE, *COMMON, f"run_dir={sync}", nproc=2)
    proc = run_train(SMOKE, *COMMON, f"run_dir={killed}", "train.async_save=true", nproc=2, check=False,
                     env={"MEGASSM_TEST_SAVE_HOLD_STEPS": "1", "MEGASSM_FAULT_SIGKILL_IN_SAVE_AT_STEP": "4"})
    assert proc.returncode != 0, "the SIGKILL hook did not fire"
    ckpts = killed / "checkpoints"
    after_kill = {"latest": (ckpts / "latest").read_text().strip(),
                  "stats": json.loads((ckpts / "save_stats.json").read_text()),
                  "partial": sorted(p.relative_to(ckpts / "step_00000004").as_posix()
                                    for p in (ckpts / "step_00000004").rglob("*") if p.is_file()),
                  "steps": sorted(losses_by_step(killed))}
    resumed = root / "resumed"
    killed.rename(resumed)  # the same run directory, resumed (renamed so both states stay inspectable)
    run_train(SMOKE, *COMMON, f"run_dir={resumed}", "train.async_save=true", nproc=2)
    return {"sync": sync, "resumed": resumed, "after_kill": after_kill}


def _files(tag_dir):
    return {p.relative_to(tag_dir).as_posix(): p for p in sorted(tag_dir.rglob("*")) if p.is_file()}


def _assert_same(a, b, where):
    """Bitwise equal: tensors by dtype, shape and bytes; containers and objects recursively; values by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), where
        _assert_same(vars(a), vars(b), f"{where}.__dict__")  # e.g. DeepSpeed's ds_id on its fp32 partitions
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (where, list(a), list(b))
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__") and not isinstance(a, type):  # e.g. DeepSpeed's loss scaler: by its fields
        assert type(a) is type(b), where
        _assert_same(vars(a), vars(b), where)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, (where, a, b)


# Python's and NumPy's global generators: saved and restored with the trainer state, but seeded by each
# process from OS entropy (megassm draws nothing from them), so two launches differ there, sync or not
UNSEEDED = ("rng.numpy_keys",)


def _trainer_json(path):
    state = json.loads(path.read_text())
    state["rng"] = {k: v for k, v in state["rng"].items() if k not in ("python", "numpy")}
    return state


def _assert_same_checkpoint(got_dir, want_dir):
    got, want = _files(got_dir), _files(want_dir)
    assert sorted(got) == sorted(want)  # no marker files left behind
    for name, path in want.items():
        if name.endswith(".pt"):  # DeepSpeed's files: the same objects, and then the same bytes
            _assert_same(torch.load(got[name], weights_only=False), torch.load(path, weights_only=False),
                         f"{got_dir.name}/{name}")
            assert got[name].read_bytes() == path.read_bytes(), name
        elif name.endswith(".safetensors"):  # the header's key order varies between runs: compare its content
            with safe_open(str(got[name]), "pt") as g, safe_open(str(path), "pt") as w:
                assert g.metadata() == w.metadata() and sorted(g.keys()) == sorted(w.keys()), name
                for k in w.keys():
                    if k not in UNSEEDED:
                        _assert_same(g.get_tensor(k), w.get_tensor(k), f"{name}:{k}")
        elif name.startswith("trainer/"):  # counters, data position, RNG states
            assert _trainer_json(got[name]) == _trainer_json(path), name
        else:  # COMPLETE
            assert got[name].read_bytes() == path.read_bytes(), name


def test_training_goes_on_while_the_periodic_save_is_written(runs):
    """The step-2 save of the killed run: its writer was held until step 3 had trained -- a save that
    held the training thread would have shown 0 steps -- and COMPLETE / latest came after every file."""
    stats = runs["after_kill"]["stats"]
    assert stats["tag"] == "step_00000002" and stats["mode"] == "async"
    assert stats["step_at_commit"] >= 3 and stats["steps_during_write"] >= 1, stats
    assert stats["bytes"] > 0 and stats["write_gbps"] > 0 and stats["snapshot_s"] <= stats["seconds"]
    tag_dir = runs["resumed"] / "checkpoints" / "step_00000002"
    files = _files(tag_dir)
    complete = files.pop("COMPLETE").stat().st_mtime_ns
    assert max(p.stat().st_mtime_ns for p in files.values()) <= complete
    # ``latest`` was replaced by later commits in the resumed run; the one after the kill named step 2
    assert runs["after_kill"]["latest"] == "step_00000002"
    events = [r for r in read_metrics(runs["resumed"]) if r.get("event") == "checkpoint"]
    assert [e["tag"] for e in events][:1] == ["step_00000002"]


def test_a_sigkill_mid_write_leaves_latest_at_the_previous_checkpoint_and_resume_works(runs):
    after = runs["after_kill"]
    assert after["latest"] == "step_00000002"
    assert "COMPLETE" not in after["partial"] and after["partial"], after["partial"]  # killed mid-write
    assert after["steps"][-1] >= 5  # the step-4 write was held until step 5 trained: training went on
    rows = read_metrics(runs["resumed"])
    assert [r["step"] for r in rows if r.get("event") == "resume"] == [2]
    assert (runs["resumed"] / "checkpoints" / "latest").read_text().strip() == "step_00000006"


def test_async_checkpoints_hold_what_sync_ones_do_and_resume_from_them_is_exact(runs):
    sync, resumed = runs["sync"] / "checkpoints", runs["resumed"] / "checkpoints"
    # step 2: written in the background by the killed run; step 4: by the resumed run (async, not held);
    # step 6: the resumed run's final save, after continuing from the async step-2 checkpoint
    for tag in ("step_00000002", "step_00000004", "step_00000006"):
        _assert_same_checkpoint(resumed / tag, sync / tag)
    ref, got = losses_by_step(runs["sync"]), losses_by_step(runs["resumed"])
    assert [got[s] for s in range(1, 7)] == [ref[s] for s in range(1, 7)]


def test_a_signal_during_a_background_write_finishes_that_checkpoint_and_exits(tmp_path, monkeypatch):
    """SIGTERM / SIGUSR1 while the step-2 save is still being written (held until someone waits for it):
    the trainer completes that checkpoint and exits instead of writing a second one, so the grace window
    needs one save (docs/cluster.md). One rank, in this process; the signal flag is set before step 4."""
    import signal

    from megassm.run_config import load_config
    from megassm.train import loop
    from tests.conftest import free_port

    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0", "MEGASSM_TEST_SAVE_HOLD_STEPS": "1000"}.items():
        monkeypatch.setenv(k, v)
    cfg = load_config(SMOKE, [*TINY_OVERRIDES, f"run_dir={tmp_path}", "train.steps=100", "train.ckpt_every=2",
                              "train.async_save=true"])
    trainer = loop.Trainer(cfg)
    step = trainer.train_step

    def signalled_at_4(data_iter):
        if trainer.step == 3:
            trainer._stop.signum = signal.SIGTERM
        return step(data_iter)

    trainer.train_step = signalled_at_4
    assert trainer.fit() == 0
    assert trainer.step == 4 and not (tmp_path / "DONE").exists()
    ckpts = tmp_path / "checkpoints"
    assert ckpt_tags(ckpts) == ["step_00000002"] and (ckpts / "latest").read_text() == "step_00000002"
    stats = json.loads((ckpts / "save_stats.json").read_text())
    assert stats["tag"] == "step_00000002" and stats["step_at_commit"] == 4  # released by the signal's wait


def ckpt_tags(ckpt_dir):
    return sorted(p.name for p in ckpt_dir.glob("step_*"))


def test_a_synchronous_save_makes_its_files_durable_before_complete(tmp_path, monkeypatch):
    """The synchronous path (final and signal saves; every save with train.async_save=false) fsyncs each
    file it wrote -- DeepSpeed's, the EMA's, the trainer state -- before COMPLETE and ``latest`` name the
    checkpoint, as the background writer does. One rank, in this process; fsync calls are recorded."""
    from megassm.checkpoint import snapshot
    from megassm.run_config import load_config
    from megassm.train import loop
    from tests.conftest import free_port

    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    synced, order = [], []
    fsync_tree = snapshot.fsync_tree

    def recording(path):
        synced.append(path)
        order.append(("fsync", (tmp_path / "checkpoints" / "step_00000002" / "COMPLETE").exists()))
        return fsync_tree(path)

    monkeypatch.setattr(snapshot, "fsync_tree", recording)
    cfg = load_config(SMOKE, [*TINY_OVERRIDES, f"run_dir={tmp_path}", "train.steps=2", "train.ckpt_every=2",
                              "train.ema_decay=0.5", "train.async_save=false"])
    assert loop.Trainer(cfg).fit() == 0
    tag_dir = tmp_path / "checkpoints" / "step_00000002"
    files = [p for p in tag_dir.rglob("*") if p.is_file()]
    # written by megassm's atomic writer (fsync + rename) or DeepSpeed's copied recovery script
    own = {"COMPLETE", "zero_to_fp32.py"} | {p.name for p in files if p.suffix == ".json" and "trainer" in p.parts}
    missed = [p for p in files if p.name not in own and not any(p == s or s in p.parents for s in synced)]
    assert not missed and any("ema" in p.parts for p in synced), (missed, synced)
    assert order and not any(complete for _, complete in order)  # every fsync before COMPLETE
