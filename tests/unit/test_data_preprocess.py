"""`megassm preprocess` end to end with tiny random-weight encoders saved/loaded via save/from_pretrained.

Checks shard contents against direct encoding, the skip report, resumption, rank splitting,
manifest inputs, WebDataset tar inputs and the video path (PyAV decode + fps resampling + Wan VAE).
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from megassm.data import testing as T
from megassm.data.buckets import ResolutionBuckets
from megassm.data.preprocess import PreprocessOptions, rank_and_world, run_preprocess
from megassm.data.tario import iter_samples


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    d = tmp_path_factory.mktemp("enc")
    return {"vae": T.make_tiny_vae(d / "vae"), "video_vae": T.make_tiny_video_vae(d / "wan"),
            "text": T.make_tiny_text_encoder(d / "t5")}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """10 good images (PNG 32x32, JPEG 24x48 = exact bucket sizes) and one of each defect."""
    d = tmp_path_factory.mktemp("images")
    for i in range(8):
        T.write_image(d / f"png{i}.png", 32, 32, i, caption=f"a png number {i}")
    (d / "sub").mkdir()
    for i in range(2):
        T.write_image(d / "sub" / f"jpg{i}.jpg", 24, 48, 10 + i, caption=f"a wide jpeg {i}")
    T.corrupt_copy(d / "png0.png", d / "garbage.png", "garbage")
    (d / "garbage.txt").write_text("garbage")
    T.corrupt_copy(d / "sub" / "jpg0.jpg", d / "cut.jpg", "truncate")
    (d / "cut.txt").write_text("cut")
    T.write_image(d / "nocaption.png", 32, 32, 50)
    T.write_image(d / "empty.png", 32, 32, 51, caption="  ")
    T.write_video(d / "clip.mp4", 8, 8, 32, 32, 1, caption="a video")  # image VAE: cannot encode
    return d


def _opts(enc, inputs, out, **kw) -> PreprocessOptions:
    base = dict(inputs=[str(i) for i in inputs], output=str(out), vae=str(enc["vae"]),
                text_encoder=str(enc["text"]), resolution="32", aspect_ratios="1:1,2:1", bucket_multiple=8,
                samples_per_shard=4, batch_size=3, num_workers=0, store_dtype="fp32", progress=False,
                rank=0, world_size=1)
    return PreprocessOptions(**{**base, **kw})


def _read(out: Path) -> dict:
    from safetensors.torch import load

    got = {}
    for shard in sorted(out.glob("shard-*.tar")):
        with open(shard, "rb") as f:
            for s in iter_samples(f, 0, str(shard)):
                got[s.meta["source"]] = (load(bytes(s.st_bytes)), s.meta)
    return got


def _direct(enc, path: Path, caption: str):
    """Encode one image with diffusers/transformers directly (the oracle)."""
    from diffusers import AutoencoderKL
    from PIL import Image
    from transformers import AutoTokenizer, T5EncoderModel

    vae = AutoencoderKL.from_pretrained(enc["vae"])
    x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 127.5 - 1
    lat = vae.encode(x).latent_dist.mode()[0]  # (C, H, W)
    tok = AutoTokenizer.from_pretrained(enc["text"])
    ids = tok([caption], return_tensors="pt")
    hid = T5EncoderModel.from_pretrained(enc["text"])(**ids).last_hidden_state[0]
    return lat, hid


def test_images_to_shards_match_direct_encoding_and_bad_inputs_are_reported(enc, images, tmp_path):
    out = tmp_path / "out"
    res = run_preprocess(_opts(enc, [images], out))
    got = _read(out)
    assert sorted(got) == sorted([f"png{i}.png" for i in range(8)] + ["sub/jpg0.jpg", "sub/jpg1.jpg"])
    for src in ("png3.png", "sub/jpg1.jpg"):
        t, meta = got[src]
        lat, hid = _direct(enc, images / src, meta["caption"])
        torch.testing.assert_close(t["latent"][:, 0], lat, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(t["text"], hid, atol=1e-5, rtol=1e-4)  # padding trimmed: valid tokens only
        assert t["text_mask"].all() and meta["text_len"] == hid.shape[0]
    meta = got["sub/jpg1.jpg"][1]
    assert (meta["height"], meta["width"], meta["bucket"], meta["frames"]) == (24, 48, [24, 48], 1)
    assert meta["vae"]["class"] == "AutoencoderKL" and meta["latent_scale"] == 0.5 and meta["latent_shift"] == 0.1
    m = res["manifest"]
    assert m["num_samples"] == 10 and m["shape_histogram"] == {"4x1x16x16": 8, "4x1x12x24": 2}
    assert m["vae"]["spatial_stride"] == 2 and m["text_encoder"]["tokenizer"] == "ByT5Tokenizer"
    assert sum(s["samples"] for s in m["shards"]) == 10
    report = json.loads((out / "skipped.json").read_text())
    assert report["by_reason"] == {"corrupt_image": 1, "truncated_image": 1, "missing_caption": 1,
                                   "empty_caption": 1, "video_needs_video_vae": 1}
    assert {i["source"] for i in report["items"]} == {"garbage.png", "cut.jpg", "nocaption.png", "empty.png",
                                                      "clip.mp4"}
    assert not list(out.glob(".*.tmp-*"))  # no temporary shard left behind


def test_resume_redoes_only_missing_shards(enc, images, tmp_path):
    out = tmp_path / "out"
    first = run_preprocess(_opts(enc, [images], out, num_workers=2))
    assert first["processed"] == first["tasks"] == 4
    before = {p.name: p.read_bytes() for p in out.glob("shard-*.tar")}
    (out / "shard-000001.tar").unlink()  # lost shard -> its record no longer counts
    (out / ".progress" / "shard-000002.json").unlink()  # crash after the rename, before the record
    (out / "manifest.json").unlink()
    (out / ".shard-000001.tar.tmp-99999").write_bytes(b"partial")  # a killed run's temporary shard
    again = run_preprocess(_opts(enc, [images], out, num_workers=2))
    assert again["processed"] == 2 and again["done_before"] == 2 and again["manifest_written"]
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.tar")} == before  # deterministic
    assert not list(out.glob(".*.tmp-*"))
    assert run_preprocess(_opts(enc, [images], out))["processed"] == 0
    with pytest.raises(ValueError, match=r"was started with other .*settings.resolution: was '32', now '64'") as e:
        run_preprocess(_opts(enc, [images], out, resolution="64"))
    assert "samples_per_shard" not in str(e.value)  # only what changed, not both settings dicts


def test_ranks_split_tasks_and_manifest_waits_for_all(enc, images, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert rank_and_world() == (1, 2)
    out = tmp_path / "out"
    r1 = run_preprocess(_opts(enc, [images], out, rank=None, world_size=None))
    assert r1["processed"] == 2 and not r1["manifest_written"] and not (out / "manifest.json").exists()
    r0 = run_preprocess(_opts(enc, [images], out, rank=0, world_size=2))
    assert r0["processed"] == 2 and r0["manifest_written"]
    assert r0["manifest"]["num_samples"] == 10 and len(_read(out)) == 10


def test_manifest_files_and_tar_inputs(enc, images, tmp_path):
    rows = [{"path": f"png{i}.png", "caption": f"row {i}"} for i in range(3)] + [{"path": "garbage.png",
                                                                                  "caption": "x"}]
    (images / "list.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    res = run_preprocess(_opts(enc, [images / "list.jsonl"], tmp_path / "j"))
    assert res["manifest"]["num_samples"] == 3 and _read(tmp_path / "j")["png1.png"][1]["caption"] == "row 1"
    csv = tmp_path / "list.csv"
    csv.write_text("file,text\n" + "".join(f"{images}/png{i}.png,csv {i}\n" for i in range(2)))
    assert run_preprocess(_opts(enc, [csv], tmp_path / "c"))["manifest"]["num_samples"] == 2
    # WebDataset input shards: jpg + txt, png + json caption, a sample without media, a truncated tar
    tars = tmp_path / "tars"
    tars.mkdir()
    members = [("a.jpg", T.image_bytes(32, 32, 1, "JPEG")), ("a.txt", b"tar caption a"),
               ("b.png", T.image_bytes(24, 48, 2)), ("b.json", json.dumps({"caption": "tar b"}).encode()),
               ("c.txt", b"no media")]
    for name, mem in (("in-0.tar", members), ("in-1.tar", members[:2])):
        with tarfile.open(tars / name, "w") as tf:
            for n, data in mem:
                info = tarfile.TarInfo(n)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    data = (tars / "in-1.tar").read_bytes()
    (tars / "in-1.tar").write_bytes(data[:700])  # breaks inside a.jpg
    res = run_preprocess(_opts(enc, [tars], tmp_path / "t", num_workers=2))
    got = _read(tmp_path / "t")
    assert sorted(got) == ["in-0.tar/a", "in-0.tar/b"] and got["in-0.tar/b"][1]["caption"] == "tar b"
    assert res["manifest"]["inputs"]["skipped"] == {"unsupported_media": 1, "corrupt_input_tar": 1}


def test_video_vae_encodes_resampled_videos_and_images_as_one_frame(enc, tmp_path):
    from diffusers import AutoencoderKLWan

    from megassm.data.media import load_video

    d = tmp_path / "in"
    d.mkdir()
    T.write_video(d / "v.mp4", 16, 8, 32, 64, 1, caption="moving stripes")  # 2 s at 8 fps
    T.write_video(d / "short.mp4", 4, 8, 32, 64, 2, caption="too short")
    T.write_image(d / "still.png", 32, 32, 3, caption="a still")
    T.corrupt_copy(d / "v.mp4", d / "garbage.mp4", "garbage")
    (d / "garbage.txt").write_text("x")
    T.corrupt_copy(d / "v.mp4", d / "cut.mp4", "truncate")
    (d / "cut.txt").write_text("x")
    out = tmp_path / "out"
    # buckets 32x64 (the videos' own size: no resize) and 48x48 (the still, upscaled)
    res = run_preprocess(_opts(enc, [d], out, vae=str(enc["video_vae"]), frames=5, fps=4,
                               resolution="32x64", aspect_ratios="1:1"))
    got = _read(out)
    assert res["manifest"]["shape_histogram"] == {"4x3x8x16": 1, "4x1x12x12": 1}
    assert res["manifest"]["latent_scale"] == [1.0, 1 / 1.5, 0.5, 0.4]  # 1 / latents_std, per channel
    reasons = json.loads((out / "skipped.json").read_text())["by_reason"]
    assert reasons["too_short"] == 1 and reasons.get("corrupt_video", 0) + reasons.get("too_short", 0) == 3
    # fps resampling: 8 -> 4 fps keeps every second frame
    import av

    with av.open(str(d / "v.mp4")) as c:
        src = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    fr = load_video(str(d / "v.mp4"), ResolutionBuckets.build("32x64", "1:1", 8), frames=5, fps=4)
    assert fr.pixels.shape == (5, 3, 32, 64)
    diff = fr.pixels.permute(0, 2, 3, 1).numpy().astype(int) - src[0:10:2].astype(int)
    assert np.abs(diff).max() <= 2
    # shard latent == direct Wan encoding of the same pixels
    wan = AutoencoderKLWan.from_pretrained(enc["video_vae"])
    x = fr.pixels.permute(1, 0, 2, 3)[None].float() / 127.5 - 1  # (1, 3, T, H, W)
    lat = wan.encode(x).latent_dist.mode()[0]
    torch.testing.assert_close(got["v.mp4"][0]["latent"], lat, atol=1e-5, rtol=1e-4)
    assert got["v.mp4"][1]["frames"] == 5 and got["v.mp4"][1]["fps"] == 4


def test_cli_parsers_and_inspect(enc, images, tmp_path, capsys):
    import argparse

    from megassm.data.cli import add_inspect_data_parser, add_preprocess_parser

    parser = argparse.ArgumentParser(prog="megassm")
    sub = parser.add_subparsers(dest="command")
    add_preprocess_parser(sub)
    insp = sub.add_parser("inspect").add_subparsers(dest="what")
    add_inspect_data_parser(insp)
    out = tmp_path / "out"
    args = parser.parse_args(["preprocess", "--input", str(images), "--output", str(out), "--vae", str(enc["vae"]),
                              "--text-encoder", str(enc["text"]), "--resolution", "32", "--aspect-ratios", "1:1,2:1",
                              "--bucket-multiple", "8", "--num-workers", "0", "--no-progress"])
    assert args.func(args) == 0
    assert "10 samples" in capsys.readouterr().out
    pngs = tmp_path / "png"
    args = parser.parse_args(["inspect", "data", str(out), "--vae", str(enc["vae"]), "--samples", "2",
                              "--out", str(pngs), "--verify"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "4x1x16x16" in text and "AutoencoderKL" in text and "verified 10 samples" in text
    assert len(list(pngs.glob("*.png"))) == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["preprocess", "--help"])
    assert "--samples-per-shard" in capsys.readouterr().out
    bad = parser.parse_args(["inspect", "data", str(tmp_path / "nothing")])
    assert bad.func(bad) == 2 and "no manifest.json" in capsys.readouterr().err
    shutil.rmtree(pngs)


def _crashing_decoder(monkeypatch):
    """load_image that segfaults on crash*.png and hangs on hang*.png (the decoders' worst cases)."""
    import os
    import signal
    import time

    from megassm.data import media

    real = media.load_image

    def load_image(src, *args):
        name = Path(src).name if isinstance(src, str) else ""
        if name.startswith("crash"):
            os.kill(os.getpid(), signal.SIGSEGV)
        if name.startswith("hang"):
            time.sleep(3600)
        return real(src, *args)

    monkeypatch.setattr(media, "load_image", load_image)


@pytest.mark.parametrize("workers", [0, 1])
def test_decoder_crash_or_hang_costs_one_file(enc, tmp_path, monkeypatch, workers):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        T.write_image(src / f"ok{i}.png", 32, 32, i, caption=f"ok {i}")
    T.write_image(src / "crash.png", 32, 32, 7, caption="segfaults the decoder")
    T.write_image(src / "hang.png", 32, 32, 8, caption="hangs the decoder")
    _crashing_decoder(monkeypatch)
    r = run_preprocess(_opts(enc, [src], tmp_path / "out", num_workers=workers, decode_timeout=2.0))
    assert r["manifest"]["num_samples"] == 3
    report = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert report["by_reason"] == {"decoder_crashed": 1, "decode_timeout": 1}
    why = {Path(s["source"]).name: s["detail"] for s in report["items"]}
    assert "SIGSEGV" in why["crash.png"] and "2 s" in why["hang.png"]


def test_sandboxed_decode_equals_in_process(images):
    from megassm.data.sandbox import DecodeSandbox, decode_in_process

    b = ResolutionBuckets.build("32", "1:1,2:1", 8)
    box = DecodeSandbox(timeout_s=60)
    try:
        for p in [images / "png1.png", images / "sub" / "jpg0.jpg"]:
            a, ref = box.decode("image", str(p), b, 0), decode_in_process("image", str(p), b, 0)
            assert torch.equal(a.pixels, ref.pixels) and (a.src_height, a.src_width) == (ref.src_height, ref.src_width)
        with pytest.raises(Exception, match="corrupt_image"):
            box.decode("image", str(images / "garbage.png"), b, 0)
        assert box.restarts == 0
    finally:
        box.close()


def test_output_to_s3_uploads_shards_and_resumes(enc, images, tmp_path):
    """--output s3://...: same shard bytes as a local run; a rerun redoes only the task whose upload is missing."""
    pytest.importorskip("moto")
    from megassm.data.manifest import load_manifest
    from megassm.data.servers import s3_server

    local = run_preprocess(_opts(enc, [images], tmp_path / "local"))["manifest"]
    with s3_server("out-bucket") as (_, fs):
        url = "s3://out-bucket/ds"
        r = run_preprocess(_opts(enc, [images], url, staging=str(tmp_path / "stage1")))
        assert r["manifest_written"] and r["processed"] == r["tasks"]
        assert not list((tmp_path / "stage1").glob("shard-*.tar"))  # removed locally once uploaded
        for s in local["shards"]:
            assert fs.cat_file(f"out-bucket/ds/{s['path']}") == (tmp_path / "local" / s["path"]).read_bytes()
        m = load_manifest(url)
        assert m["num_samples"] == local["num_samples"] and m["shards"] == local["shards"]
        fs.rm(["out-bucket/ds/shard-000001.tar", "out-bucket/ds/manifest.json"])  # as if killed mid-upload
        r2 = run_preprocess(_opts(enc, [images], url, staging=str(tmp_path / "stage2")))
        assert (r2["processed"], r2["done_before"]) == (1, r["tasks"] - 1) and r2["manifest_written"]
        assert load_manifest(url)["shards"] == local["shards"]
    with pytest.raises(ValueError, match="read-only"):
        run_preprocess(_opts(enc, [images], "https://host/ds"))


def _cli(argv: list[str]) -> int:
    import argparse

    from megassm.data.cli import add_preprocess_parser

    sub = argparse.ArgumentParser(prog="megassm").add_subparsers(dest="command")
    add_preprocess_parser(sub)
    args = sub._name_parser_map["preprocess"].parse_args(argv)
    return args.func(args)


def test_no_sample_written_exits_nonzero_and_input_is_checked_before_the_encoders(enc, images, tmp_path, capsys):
    """Every input skipped: the run fails (rc 1, the reasons named) instead of "0 samples in 0 shards", rc 0; a
    missing --input is named before any encoder loads (here the VAE does not exist either)."""
    bad = tmp_path / "bad"
    bad.mkdir()
    T.corrupt_copy(images / "png0.png", bad / "garbage.png", "garbage")
    (bad / "garbage.txt").write_text("garbage")
    T.write_image(bad / "nocaption.png", 32, 32, 50)
    common = ["--text-encoder", str(enc["text"]), "--resolution", "32", "--num-workers", "0", "--no-progress"]
    assert _cli(["--input", str(bad), "--output", str(tmp_path / "out"), "--vae", str(enc["vae"]), *common]) == 1
    err = capsys.readouterr().err
    assert "no sample was written" in err and "skipped.json" in err and "missing_caption" in err
    rc = _cli(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o2"), "--vae", str(tmp_path / "novae"),
               *common])
    err = capsys.readouterr().err
    assert rc == 2 and "nope" in err and "novae" not in err


def test_ctrl_c_says_how_to_resume_without_a_traceback(enc, images, tmp_path, monkeypatch, capsys):
    from megassm.data import preprocess

    def interrupted(options):
        raise KeyboardInterrupt

    monkeypatch.setattr(preprocess, "run_preprocess", interrupted)
    rc = _cli(["--input", str(images), "--output", str(tmp_path / "o"), "--vae", str(enc["vae"]), "--text-encoder",
               str(enc["text"])])
    assert rc == 130 and "re-run the same command to resume" in capsys.readouterr().err


def test_videos_under_the_default_one_frame_are_warned_about(enc, images, caplog):
    import logging

    from megassm.data.preprocess import Preprocessor

    with caplog.at_level(logging.WARNING, logger="megassm.preprocess"):
        Preprocessor(_opts(enc, [images], "unused", vae=str(enc["video_vae"])))
    assert "1 inputs are videos and --frames is 1 (the default)" in caplog.text and "--frames 1 + k*2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megassm.preprocess"):
        Preprocessor(_opts(enc, [images], "unused", vae=str(enc["video_vae"]), frames=5))
    assert "videos" not in caplog.text
