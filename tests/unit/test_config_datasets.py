"""Load-time data checks (megassm/data/config_checks.py): what a config must agree with in its datasets, named
before any process group, model or run directory exists."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import yaml

from megassm.cli import main
from megassm.config import ConfigError
from megassm.data.testing import write_synthetic_dataset
from megassm.run_config import load_config


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A dataset of 6-channel latents and 32-wide text embeddings (the config defaults: 4 and 64)."""
    d = tmp_path_factory.mktemp("ds") / "lat"
    write_synthetic_dataset(d, [(6, 1, 8, 8)], 6, 3, text_dim=32)
    return d


def _as(src: Path, dst: Path, **idents) -> Path:
    """A copy of dataset ``src`` whose manifest names other encoders ({"vae": {...}, ...})."""
    import shutil

    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    for k, v in idents.items():
        m[k] = {**m[k], **v}
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def _over(data, tmp_path, *extra) -> list[str]:
    return ["data.kind=shards", f"data.paths=[{data}]", f"run_dir={tmp_path / 'run'}", "init_from=null", *extra]


def test_widths_come_from_the_manifest_when_unset_and_a_set_one_must_match(data, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="megassm.config"):
        cfg = load_config(None, _over(data, tmp_path), training=True)
    assert (cfg.model.in_channels, cfg.model.text_dim) == (6, 32)
    assert "model.in_channels=6 from the manifest" in caplog.text and "model.text_dim=32" in caplog.text
    assert cfg.data.encoded_with == {"vae": "0" * 16, "text_encoder": "0" * 16}
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"model": {"in_channels": 16}}))
    with pytest.raises(ConfigError, match=r"model.in_channels=16 but dataset .* has latent_channels=6.*"
                                          r"set model.in_channels=6, or leave model.in_channels out"):
        load_config(f, _over(data, tmp_path), training=True)
    with pytest.raises(ConfigError, match=r"model.text_dim=64 but dataset .* has text_dim=32"):
        load_config(None, _over(data, tmp_path, "model.text_dim=64"), training=True)


def test_missing_or_empty_dataset_fails_at_load_and_leaves_no_run_dir(data, tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["train", "configs/smoke.yaml", *_over(data, tmp_path), f"data.paths=[{data},{tmp_path / 'nope'}]",
               "model.in_channels=6", "model.text_dim=32"])
    err = capsys.readouterr().err
    assert rc == 2 and "data.paths[1]" in err and "no such directory" in err and not run.exists()
    empty = tmp_path / "empty"
    write_synthetic_dataset(empty, [(6, 1, 8, 8)], 0, 3, text_dim=32)
    rc = main(["train", "configs/smoke.yaml", *_over(empty, tmp_path), "model.in_channels=6", "model.text_dim=32"])
    err = capsys.readouterr().err
    assert rc == 2 and "data.paths[0]" in err and "holds no samples" in err and not run.exists()


def test_previews_with_other_encoders_than_the_data_fail_at_load(data, tmp_path):
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text('{"_class_name": "AutoencoderKL", "latent_channels": 6}')
    real = _as(data, tmp_path / "real", vae={"class": "AutoencoderKL", "name": "sd-vae", "fingerprint": "f" * 16,
                                            "path": "/models/sd-vae"})
    prev = ["train.sample_every=5", "train.preview_prompts=[a cat]"]
    with pytest.raises(ConfigError, match=r"encoders.vae='builtin:pixels' but dataset .* AutoencoderKL 'sd-vae'.*"
                                          r"set encoders.vae=/models/sd-vae"):
        load_config(None, _over(real, tmp_path, *prev), training=True)
    with pytest.raises(ConfigError, match=r"encoders.vae=.*vae' \(fingerprint [0-9a-f]{16}\) is not the VAE"):
        load_config(None, _over(real, tmp_path, *prev, f"encoders.vae={vae}"), training=True)
    # no previews, no evaluation: the encoders are not read
    load_config(None, _over(real, tmp_path, f"encoders.vae={vae}"), training=True)


def test_checkpoint_of_other_encoders_or_widths_is_named(data, tmp_path, caplog):
    other = _as(data, tmp_path / "other", vae={"fingerprint": "a" * 16})
    src = tmp_path / "stage0"
    (src / "checkpoints").mkdir(parents=True)
    stored = {"model": {"in_channels": 6, "text_dim": 32}, "data": {"encoded_with": {"vae": "a" * 16}}}
    (src / "config.yaml").write_text(yaml.safe_dump(stored))
    with caplog.at_level(logging.WARNING, logger="megassm.config"):  # a warm start across encoders: said
        load_config(None, [*_over(data, tmp_path), f"init_from={src}"], training=True)
    assert re.search(r"init_from=.*stage0 was trained on latents of another VAE \(fingerprint a{16}\) than "
                     r"data.paths \(fingerprint 0{16}", caplog.text)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megassm.config"):
        load_config(None, [*_over(other, tmp_path), f"init_from={src}"], training=True)
    assert "another VAE" not in caplog.text
    (src / "checkpoints" / "latest").write_text("step_00000001")  # src as this run's own directory: a resume
    with pytest.raises(ConfigError, match=r"checkpoint in run_dir=.*resumed automatically.*another VAE"):
        load_config(None, [*_over(data, tmp_path), f"run_dir={src}"], training=True)
    with pytest.raises(ConfigError, match=r"trained with model.text_dim=32, this config has model.text_dim=16"):
        load_config(None, [f"init_from={src}", f"run_dir={tmp_path / 'r2'}", "model.in_channels=6",
                           "model.text_dim=16"], training=True)
