"""Low-level checkpoint I/O: the restricted torch.save reader, streaming safetensors, atomic outputs."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file

from megassm.checkpoint.errors import CheckpointError
from megassm.checkpoint.safetensors_io import (
    SafetensorsDir,
    SafetensorsFile,
    TensorSpec,
    atomic_directory,
    parse_size,
    write_safetensors,
)
from megassm.checkpoint.torchzip import TensorRef, TorchFile


def _tree_equal(refs, expected, tf: TorchFile) -> int:
    if torch.is_tensor(expected):
        got = tf.load(refs)
        assert got.dtype == expected.dtype and torch.equal(got, expected)
        return 1
    if isinstance(expected, dict):
        assert set(refs) == set(expected)
        return sum(_tree_equal(refs[k], expected[k], tf) for k in expected)
    if isinstance(expected, (list, tuple)):
        return sum(_tree_equal(a, b, tf) for a, b in zip(refs, expected))
    assert refs == expected
    return 0


def test_torchzip_matches_torch_load(tmp_path):
    base = torch.arange(40, dtype=torch.float32)
    obj = {
        "a": torch.randn(3, 4), "view": base[5:17].view(3, 4), "same_storage": base[20:30],
        "bf16": torch.randn(7).bfloat16(), "ints": torch.arange(5), "param": torch.nn.Parameter(torch.ones(2)),
        "od": OrderedDict(x=torch.zeros(1)), "shape": torch.Size([2, 3]), "scalar": torch.tensor(3.5),
        "nested": [{"k": torch.eye(2)}, (1, "s")], "empty": torch.empty(0),
    }
    path = tmp_path / "f.pt"
    torch.save(obj, path)
    tf = TorchFile(path)
    expected = torch.load(path, weights_only=True)
    expected["param"] = expected["param"].data
    assert _tree_equal(tf.obj, expected, tf) == 10
    assert tf.obj["shape"] == (2, 3)
    # partial reads by element range, into a caller's buffer
    ref: TensorRef = tf.obj["view"]
    out = torch.empty(5)
    tf.read(ref, 3, 5, out=out)
    assert torch.equal(out, base[8:13])


def test_torchzip_reads_sets_of_protocol_2(tmp_path):
    """DeepSpeed 0.18 saves sets with pickle protocol 2, which spells the builtins module ``__builtin__``."""
    path = tmp_path / "f.pt"
    torch.save({"w": torch.ones(2), "groups": {1, 2}, "frozen": frozenset({3})}, path, pickle_protocol=2)
    tf = TorchFile(path)
    assert tf.obj["groups"] == {1, 2} and tf.obj["frozen"] == frozenset({3})


def test_torchzip_never_runs_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": Evil()}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="does not execute"):
        TorchFile(path)
    assert not (tmp_path / "pwned").exists()


def test_torchzip_truncated_file_is_refused(tmp_path):
    path = tmp_path / "f.pt"
    torch.save({"w": torch.randn(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        TorchFile(path)


def test_torchzip_crc_catches_bit_flip(tmp_path):
    path = tmp_path / "f.pt"
    torch.save({"w": torch.zeros(4096)}, path)
    tf = TorchFile(path)
    tf.check_crc()
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("data/0"))
    off = tf._records["0"][0]
    raw = bytearray(path.read_bytes())
    raw[off + 100] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert info.file_size == 4096 * 4
    with pytest.raises(CheckpointError, match="CRC"):
        TorchFile(path).check_crc()


@pytest.mark.parametrize("max_bytes", [10**9, 100])
def test_safetensors_writer_roundtrip(tmp_path, max_bytes):
    tensors = {"a": torch.randn(5, 7), "b.bf16": torch.randn(33).bfloat16(), "c": torch.arange(6).view(2, 3),
               "d": torch.tensor([True, False]), "e": torch.zeros(0, 4)}
    specs = {n: TensorSpec(tuple(t.shape), t.dtype) for n, t in tensors.items()}
    calls = []
    files = write_safetensors(tmp_path, "model", specs, lambda n: calls.append(n) or tensors[n], max_bytes)
    assert calls == list(tensors)  # each tensor produced once, in order
    assert (len(files) > 1) == (max_bytes == 100)
    assert (tmp_path / "model.safetensors.index.json").is_file() == (len(files) > 1)
    d = SafetensorsDir(tmp_path, "model")
    loaded = {}
    for f in files:  # the reference library reads our files
        loaded.update(load_file(str(tmp_path / f)))
    for n, t in tensors.items():
        assert d.specs[n] == specs[n]
        assert torch.equal(d.read(n), t) and torch.equal(loaded[n], t)


def test_safetensors_truncated_and_mismatched(tmp_path):
    t = {"w": torch.randn(100)}
    write_safetensors(tmp_path, "model", {"w": TensorSpec((100,), torch.float32)}, t.__getitem__)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="truncated"):
        SafetensorsFile(f)
    f.write_bytes(b"\x00" * 4)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        SafetensorsFile(f)
    with pytest.raises(CheckpointError, match="produced"):
        write_safetensors(tmp_path, "x", {"w": TensorSpec((3,), torch.float32)}, lambda n: torch.zeros(4))


def test_atomic_directory(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []  # neither the output nor the temporary directory is left
    with atomic_directory(out) as tmp:
        (tmp / "v1").write_text("1")
    with pytest.raises(CheckpointError, match="--force"):
        with atomic_directory(out):
            pass
    with atomic_directory(out, force=True) as tmp:
        (tmp / "v2").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["v2"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("300") == 300
    assert parse_size("1.5MB") == 1_500_000
    with pytest.raises(CheckpointError):
        parse_size("lots")
