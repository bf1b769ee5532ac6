"""Shard format, tar reading by offset, writer atomicity and bucket maths (no encoders needed)."""

from __future__ import annotations

import io
import json
import pickle
import tarfile

import pytest
import torch

from megassm.data.buckets import ResolutionBuckets, ShapeBucketer, cover_crop_box
from megassm.data.format import FormatError, LatentSample, decode_sample, encode_sample, make_key
from megassm.data.tario import iter_samples, read_sample_at
from megassm.data.writer import LatentShardWriter


def _sample(i: int, dtype=torch.bfloat16, shape=(4, 1, 8, 8), n_text=5) -> LatentSample:
    g = torch.Generator().manual_seed(i)
    return LatentSample(f"k{i:04d}", torch.randn(shape, generator=g).to(dtype),
                        torch.randn(n_text, 16, generator=g).to(dtype), torch.ones(n_text, dtype=torch.bool),
                        {"caption": f"c{i}"})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sample_roundtrip_is_lossless(dtype):
    s = _sample(1, dtype)
    back = decode_sample(s.key, encode_sample(s), "mem")
    assert back.latent.dtype == dtype and torch.equal(back.latent, s.latent)
    assert torch.equal(back.text, s.text) and torch.equal(back.text_mask, s.text_mask)
    assert back.meta["latent_shape"] == [4, 1, 8, 8] and back.meta["text_len"] == 5


def test_keys_have_no_dots():
    assert "." not in make_key("dir/a.b.c.jpg", "abcdef0123456789")
    with pytest.raises(FormatError, match="dot"):
        encode_sample(LatentSample("a.b", torch.zeros(1, 1, 1, 1), torch.zeros(1, 1), torch.ones(1, dtype=bool)))


def test_corrupt_safetensors_header_is_rejected():
    members = encode_sample(_sample(2))
    st = bytearray(members["safetensors"])
    st[8:20] = b"not json!!!!"
    with pytest.raises(FormatError, match="not a JSON"):
        decode_sample("k", {**members, "safetensors": bytes(st)}, "mem")
    with pytest.raises(FormatError, match="truncated or corrupt|exceeds"):
        decode_sample("k", {**members, "safetensors": members["safetensors"][:-10]}, "mem")


def test_writer_is_atomic_and_reader_addresses_samples_by_offset(tmp_path):
    path = tmp_path / "shard-000000.tar"
    w = LatentShardWriter(path)
    for i in range(5):
        w.write(_sample(i, shape=(4, 1, 8, 8 + 4 * (i % 2))))
    assert not path.exists() and w.tmp_path.exists()  # only the temporary name until close
    entry = w.close()
    assert path.exists() and not w.tmp_path.exists()
    assert entry["samples"] == 5 and entry["shapes"] == {"4x1x8x8": 3, "4x1x8x12": 2}
    with open(path, "rb") as f:
        samples = list(iter_samples(f, 0, str(path)))
        assert [s.key for s in samples] == [f"k{i:04d}" for i in range(5)]
        again = read_sample_at(f, 0, samples[3].offset, str(path))
        lazy = read_sample_at(f, 0, samples[3].offset, str(path), lazy=True)
    assert again.st_bytes == samples[3].st_bytes and lazy.st_bytes is None and lazy.shape == (4, 1, 8, 12)
    # a standard tar reader (as WebDataset uses) sees the same members
    with tarfile.open(path) as tf:
        assert tf.getnames()[:2] == ["k0000.json", "k0000.safetensors"]


def test_truncated_and_damaged_shards_are_detected(tmp_path):
    path = tmp_path / "s.tar"
    with LatentShardWriter(path) as w:
        for i in range(4):
            w.write(_sample(i))
    data = path.read_bytes()
    with open(path, "rb") as f:
        offs = [s.offset for s in iter_samples(f, 0, "s.tar")]
    (tmp_path / "cut.tar").write_bytes(data[: offs[2] + 1200])  # inside the third sample's tensors
    errors: list = []
    with open(tmp_path / "cut.tar", "rb") as f:
        got = list(iter_samples(f, 0, "cut.tar", errors=errors))
    assert [s.key for s in got] == ["k0000", "k0001"] and errors[0][0] == "truncated_shard"
    # flip a byte in the second sample's JSON header block: checksum mismatch stops the shard
    bad = bytearray(data)
    bad[offs[1] + 10] ^= 0xFF
    (tmp_path / "bad.tar").write_bytes(bytes(bad))
    errors = []
    with open(tmp_path / "bad.tar", "rb") as f:
        got = list(iter_samples(f, 0, "bad.tar", errors=errors))
    assert [s.key for s in got] == ["k0000"] and errors[0][0] == "corrupt_shard"


class _Evil:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path("/tmp/megassm_pickle_ran"),))


def test_pickle_members_are_never_loaded(tmp_path):
    """A .pth member with a code-executing pickle is ignored; the sample lacks tensors -> corrupt."""
    import pathlib

    marker = pathlib.Path("/tmp/megassm_pickle_ran")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in (("x.json", json.dumps({"latent_shape": [1, 1, 1, 1]}).encode()),
                           ("x.pth", pickle.dumps(_Evil()))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    errors: list = []
    with open(path, "rb") as f:
        assert list(iter_samples(f, 0, str(path), errors=errors)) == []
    assert errors[0][0] == "corrupt_sample" and "safetensors" in errors[0][1]
    assert not marker.exists()


def test_resolution_buckets():
    b = ResolutionBuckets.build("256", "1:1,16:9,9:16", multiple=16)
    assert (256, 256) in b.sizes and all(h % 16 == 0 and w % 16 == 0 for h, w in b.sizes)
    assert all(abs(h * w - 256 * 256) / 65536 < 0.1 for h, w in b.sizes)
    assert b.nearest(1080, 1920) == (192, 336)  # 16:9 landscape
    assert b.nearest(1920, 1080) == (336, 192)
    assert b.nearest(500, 510) == (256, 256)
    v = ResolutionBuckets.build("352x640", "1:1", multiple=16)
    assert (352, 640) in v.sizes and v.nearest(360, 640) == (352, 640)
    assert cover_crop_box(100, 200, 50, 50) == (50, 100, 0, 25, 50, 50)
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        ResolutionBuckets.build("big")


def test_shape_bucketer_emits_uniform_batches_and_restores():
    b = ShapeBucketer(2)
    out = [b.add(i, (1, 2 + i % 3)) for i in range(7)]
    assert [o for o in out if o] == [[0, 3], [1, 4], [2, 5]]
    saved = b.pending()
    b2 = ShapeBucketer(2)
    b2.restore(saved)
    assert b2.add(9, (1, 2)) == [6, 9] and list(b.flush()) == [[6]]


def test_zero_copy_tensor_views_equal_safetensors_load():
    from safetensors.torch import load

    from megassm.data.format import load_tensors

    st = encode_sample(_sample(3, n_text=7))["safetensors"]
    ours, ref = load_tensors("k", st, "mem"), load(st)
    assert ours.keys() == ref.keys()
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k])
