"""Pixels -> `megassm preprocess` (tiny random-weight VAE + T5 saved/loaded as real checkpoints) ->
`megassm inspect data` -> `megassm train` from the latent shards, through the real CLI."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    import numpy as np
    import torch
    from PIL import Image

    from megassm.data import testing as T
    from megassm.data.procedural import COLOURS, POSITIONS, caption, render
    from tests.conftest import run_cli

    root = tmp_path_factory.mktemp("pt")
    vae, t5 = T.make_tiny_vae(root / "vae"), T.make_tiny_text_encoder(root / "t5", d_model=32)
    imgs = root / "imgs"
    imgs.mkdir()
    i = 0
    for colour in COLOURS:
        for position in POSITIONS:
            for k in range(2):
                px = render(colour, position, 16, torch.tensor([0, k]))[:, 0]  # (3, 16, 16) in [-1, 1]
                arr = ((px.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
                Image.fromarray(arr).save(imgs / f"{i:03d}.png")
                (imgs / f"{i:03d}.txt").write_text(caption(colour, position))
                i += 1
    (imgs / "broken.png").write_bytes(b"\x89PNG not really")
    (imgs / "broken.txt").write_text("a broken file")
    out = root / "latents"
    run_cli("preprocess", "--input", imgs, "--output", out, "--vae", vae, "--text-encoder", t5,
            "--resolution", "16", "--aspect-ratios", "1:1", "--bucket-multiple", "4", "--samples-per-shard", "8",
            "--num-workers", "0", "--no-progress", "--store-dtype", "bf16")
    return out, i, vae


def test_preprocessed_set_is_complete_and_inspectable(shards, tmp_path, cli):
    out, n, vae = shards
    m = json.loads((out / "manifest.json").read_text())
    assert m["num_samples"] == n and m["shape_histogram"] == {"4x1x8x8": n} and m["text_dim"] == 32
    assert json.loads((out / "skipped.json").read_text())["by_reason"] == {"corrupt_image": 1}
    proc = cli("inspect", "data", out, "--verify", "--vae", vae, "--samples", "2", "--out", tmp_path / "png")
    assert f"verified {n} samples" in proc.stdout and len(list((tmp_path / "png").glob("*.png"))) == 2


def test_train_from_shards(shards, tmp_path):
    import shutil

    from tests.conftest import TINY_OVERRIDES, run_train

    out, n, _ = shards
    run, data = tmp_path / "run", tmp_path / "latents"
    shutil.copytree(out, data)
    (data / "shard-000001.tar").unlink()  # lost after preprocessing: the reader skips it and counts it
    # a config of the user's own that leaves model.in_channels / model.text_dim out: the manifest's (4, 32)
    # replace the defaults (4, 64)
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("stage: mine\noptim: {lr: 1.0e-3}\n")
    tiny = [o for o in TINY_OVERRIDES if not o.startswith(("model.in_channels", "model.text_dim", "data."))]
    proc = run_train(cfg, *tiny, f"run_dir={run}", "data.kind=shards", f"data.paths=[{data}]",
                     "data.shuffle_buffer=16", "data.num_workers=1", "train.steps=6", "train.ckpt_every=3",
                     "train.micro_batch_size=8", "train.sample_every=0", "train.ema_decay=0.0")
    assert "model.text_dim=32 from the manifest" in proc.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert (run / "DONE").read_text() == "6"
    last = [r for r in rows if "loss" in r][-1]
    assert last["data_skipped"] >= 1 and last["data_skipped_by_reason"]["unreadable_shard"] >= 1
    assert "unreadable shards or samples skipped" in proc.stderr
