"""Hostile inputs to the shard reader: manifests naming shell syntax or files outside the dataset,
malformed tar headers (fuzzed), a loader that stalls (docs/shard_format.md, "Hostile inputs")."""

from __future__ import annotations

import io
import json
import shutil
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest

from megassm.config.schema import DataConfig
from megassm.data import remote
from megassm.data.format import FormatError, load_tensors
from megassm.data.manifest import load_manifest
from megassm.data.reader import DataStallError, build_shard_loader
from megassm.data.tario import iter_samples
from megassm.data.testing import write_synthetic_dataset


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    write_synthetic_dataset(root / "a", [(4, 1, 8, 8)], num_samples=12, samples_per_shard=4)
    return root / "a"


def _loader(path: str, **kw):
    cfg = DataConfig(kind="shards", paths=[path], resampled=False, shuffle_buffer=4,
                     num_workers=kw.pop("workers", 0), **kw.pop("cfg", {}))
    return build_shard_loader(cfg, batch_size=2, dp_rank=0, dp_size=1, seed=1, text_len=6, return_keys=True, **kw)


# ---------------------------------------------------------------- manifests: shard names reach no shell
@pytest.mark.parametrize("bad", ["shard-000000.tar; touch {marker}", "$(touch {marker})", "`touch {marker}`",
                                 "../outside.tar", "/etc/passwd", "a/../../b.tar", ".hidden.tar", "a//b.tar",
                                 "shard 1.tar", ""])
def test_a_manifest_shard_path_must_be_a_plain_relative_name(ds, tmp_path, bad):
    d = tmp_path / "evil"
    shutil.copytree(ds, d)
    marker = tmp_path / "PWNED"
    m = json.loads((d / "manifest.json").read_text())
    m["shards"][1]["path"] = bad.format(marker=marker)
    (d / "manifest.json").write_text(json.dumps(m))
    for loc in (str(d), f"pipe:cat {d}/{{path}}"):
        with pytest.raises(FormatError, match=r"manifest\.json: shards\[1\]\.path=.* is not a plain relative") as e:
            _loader(loc, epochs=1, drop_last=False)
        assert "letters, digits" in str(e.value)  # says what is allowed
        assert not marker.exists()


def test_pipe_substitutes_a_name_as_one_quoted_word():
    assert remote.join("pipe:cat /d/{path}", "shard-000001.tar") == "pipe:cat /d/shard-000001.tar"
    assert remote.join("pipe:cat /d/{path}", "x;touch y") == "pipe:cat /d/'x;touch y'"
    assert load_manifest  # the manifest check is the first guard (above); quoting is the second


# ---------------------------------------------------------------- malformed tar headers: skipped, never hang
def _pax_header(payload: bytes) -> bytes:
    """A pax extended header block (valid checksum) carrying ``payload`` verbatim, padded to 512 bytes."""
    ti = tarfile.TarInfo("././@PaxHeader")
    ti.type, ti.size = tarfile.XHDTYPE, len(payload)
    return ti.tobuf(format=tarfile.USTAR_FORMAT) + payload + bytes(-len(payload) % 512)


def _header_offsets(data: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return [m.offset for m in tf.getmembers()]


class _Sized(io.BytesIO):
    """Bytes whose size is known up front, as for a local file or an object store (truncation is seen early)."""

    @property
    def size(self) -> int:
        return len(self.getbuffer())


def _parse(data: bytes, sized: bool = False) -> tuple[list, list]:
    """iter_samples over ``data`` (size unknown as for a pipe, or known), under an alarm: a hang fails, not blocks."""
    errors: list = []

    def hung(*_):
        raise TimeoutError("the tar reader did not finish (an endless loop on a malformed header)")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)  # a guard against hanging the suite, not a speed requirement
    try:
        got = list(iter_samples((_Sized if sized else io.BytesIO)(data), 0, "fuzz.tar", errors=errors))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return got, errors


@pytest.mark.parametrize("payload", [b"0 path=x\n", b"abc path=x\n", b"99 path=x\n", b"3 x\n", b" path=x\n",
                                     b"16 path=\xff\xfe.json\n", b"5 a=b\n"])
def test_a_malformed_pax_record_is_a_corrupt_shard_not_a_hang(ds, payload):
    data = (ds / "shard-000000.tar").read_bytes()
    third = _header_offsets(data)[4]  # the third sample's first header
    got, errors = _parse(data[:third] + _pax_header(payload) + data[third:])
    assert len(got) == 2 and [r for r, _ in errors] == ["corrupt_shard"], errors
    assert "pax header" in errors[0][1] or "UTF-8" in errors[0][1]


def test_fuzzed_headers_and_truncations_are_skipped_and_counted(ds):
    """Deterministic fuzz: truncations, random bytes in header fields (checksum then fixed up so the field itself
    is parsed), garbage pax headers, random bytes anywhere (JSON, safetensors headers, tensors), each read with
    the size unknown (pipe) and known (file). Never an exception, never a hang; a lost sample is counted."""
    clean = (ds / "shard-000000.tar").read_bytes()
    n_clean = len(_parse(clean)[0])
    heads = _header_offsets(clean)
    rng = np.random.default_rng(1234)
    for trial in range(400):
        data = bytearray(clean)
        kind = trial % 4
        if kind == 0:
            data = data[:int(rng.integers(0, len(clean)))]
        elif kind == 1:
            h = int(rng.choice(heads))
            for _ in range(int(rng.integers(1, 6))):
                data[h + int(rng.integers(0, 512))] = int(rng.integers(0, 256))
            data[h + 148:h + 156] = b" " * 8
            data[h + 148:h + 156] = b"%06o\0 " % sum(data[h:h + 512])
        elif kind == 2:
            junk = bytes(rng.integers(0, 256, int(rng.integers(1, 40)), dtype=np.uint8))
            h = int(rng.choice(heads))
            data = data[:h] + _pax_header(junk) + data[h:]
        else:
            for _ in range(int(rng.integers(1, 20))):
                data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        for sized in (False, True):
            got, errors = _parse(bytes(data), sized)
            assert len(got) <= n_clean
            for smp in got:  # what passed the reader's checks decodes (the worker's pack would)
                load_tensors(smp.key, smp.st_bytes, "fuzz.tar")
            if len(got) < n_clean:
                assert errors, f"trial {trial}: {n_clean - len(got)} samples lost without a count"


def test_a_shard_with_a_malformed_pax_header_is_skipped_by_the_loader(ds, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(ds, d)
    p = d / "shard-000001.tar"
    data = p.read_bytes()
    p.write_bytes(_pax_header(b"0 path=x\n") + data)
    loader = _loader(str(d), epochs=1, drop_last=False)
    keys = [k for b in loader for k in b["keys"]]
    assert len(keys) == 8 and loader.stats()["skipped"] == {"corrupt_shard": 1}


# ---------------------------------------------------------------- a loader that blocks
def _hanging(ds: Path, shard: str = "shard-000001.tar") -> str:
    """A pipe: dataset whose command for ``shard`` (a glob) hangs, as a stuck download would; the rest is read."""
    return f"pipe:sh -c 'case \"$0\" in {shard}) sleep 30;; esac; exec cat {ds}/\"$0\"' {{path}}"


def _dead_workers_soon(before: set) -> bool:
    import multiprocessing

    new = [p for p in multiprocessing.active_children() if p.pid not in before]
    for p in new:
        p.join(timeout=10)
    return not any(p.is_alive() for p in new)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_stalled_loader_fails_after_the_stall_timeout_naming_the_shard(ds, workers):
    import multiprocessing

    before = {p.pid for p in multiprocessing.active_children()}
    loader = _loader(_hanging(ds), workers=workers, epochs=1, drop_last=False, cfg={"stall_timeout_s": 1.5})
    with pytest.raises(DataStallError, match=r"data\.stall_timeout_s=1\.5.*worker 0: .*shard-000001\.tar"):
        for _ in loader:
            pass
    assert _dead_workers_soon(before)  # the stuck worker is killed, not left to block the exit


def test_a_signal_while_the_trainer_waits_for_data_ends_the_wait(ds):
    """SIGTERM while next(loader) blocks on a hung read: the trainer's wait hook (loop.Trainer._on_data_wait)
    raises within a poll tick instead of waiting for a step boundary that never comes."""
    import multiprocessing
    import os
    import threading
    from types import SimpleNamespace

    from megassm.train import loop
    from megassm.train.signals import StopSignals

    before = {p.pid for p in multiprocessing.active_children()}
    loader = _loader(_hanging(ds, "shard-*"), workers=1, epochs=1, drop_last=False)  # stall limit: 600 s
    trainer = SimpleNamespace(_stop=StopSignals().install(), step=7)
    loader.wait_hook = lambda waited, reading: loop.Trainer._on_data_wait(trainer, waited, reading)
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    try:
        with pytest.raises(loop.DataWaitInterrupted, match=r"signal 15 while waiting .*step 8.*shard-00000"):
            for _ in loader:
                pass
    finally:
        trainer._stop.restore()
    assert _dead_workers_soon(before)


def test_a_signal_pending_before_the_wait_gives_the_loader_a_grace():
    """A signal that came during the step's compute (pending when the wait begins) lets a flowing loader deliver
    the step's next micro-batch (the step then checkpoints at its boundary); only a wait past the grace ends it."""
    import time
    from types import SimpleNamespace

    from megassm.train import loop
    from megassm.train.signals import StopSignals

    flag = StopSignals()
    flag.signum, flag.at = signal.SIGUSR1, time.monotonic() - 60  # a minute before this wait began
    trainer = SimpleNamespace(_stop=flag, step=3)
    loop.Trainer._on_data_wait(trainer, 1.0, "worker 0: x.tar")  # within the grace: keep waiting
    with pytest.raises(loop.DataWaitInterrupted, match=r"signal 10 while waiting 10\.5 s .*step 4.*x\.tar"):
        loop.Trainer._on_data_wait(trainer, loop.SIGNAL_DATA_GRACE_S + 0.5, "worker 0: x.tar")
    loop.Trainer._on_data_wait(SimpleNamespace(_stop=StopSignals(), step=3), 1e6, "")  # no signal: no-op
