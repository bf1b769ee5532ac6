"""``megassm plan --sample`` against what full-size sampling measured on an H100 (full_size_sample_h100.json: hth-5b
and an all-attention model of the same depth, 2048^2 and 360p x 129 frames, with and without CFG). The JSON's
``peak_gb`` fields are GiB (torch.cuda.max_memory_allocated / 2**30). Bounds: memory 5 %, time per step 8 %
(the run-to-run spread of a denoising step on one card is a few %)."""

import copy
import json
from pathlib import Path

import pytest

from megassm.cli import main
from megassm.run_config import load_config
from megassm.sample_plan import predict_sampling

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "full_size_sample_h100.json"
STAGE = {"image_2048": "configs/stage2_2k.yaml", "video_360p_129f": "configs/stage3_video.yaml"}


def _cases():
    rows = json.loads(RESULTS.read_text())["rows"]
    return [(r, k) for r in rows for k in ("cfg", "no_cfg")]


@pytest.mark.parametrize("row, mode", _cases(), ids=lambda x: x if isinstance(x, str) else f"{x['shape']}-{x['model']}")
def test_prediction_within_bounds_of_the_h100_measurement(row, mode):
    cfg = copy.deepcopy(load_config(STAGE[row["shape"]]))
    cfg.model.pattern = row["pattern"]
    cfg.diffusion.cfg_scale = cfg.diffusion.cfg_scale if mode == "cfg" else 1.0
    p = predict_sampling(cfg, row["tokens"])
    measured_gb = row[mode]["peak_gb"] * 2**30 / 1e9
    assert p["denoiser_gb"] == pytest.approx(measured_gb, rel=0.05)  # measured: the denoiser alone
    assert p["step_s"] * 1e3 == pytest.approx(row[mode]["ms_per_step"], rel=0.08)
    assert p["fits"] and p["cfg_branches"] == (2 if mode == "cfg" else 1)


def test_cli_prints_the_sampling_prediction(capsys):
    assert main(["plan", "configs/stage3_video.yaml", "--gpus", "1", "--sample"]) == 0
    out = capsys.readouterr().out
    assert "sampling (megassm sample), 29,040 tokens, 2 CFG branch(es)" in out and "no CP needed" in out
    assert "first step adds its kernel autotuning" in out  # the steady-state time leaves out a cold cache's 35 s


def test_text_encoder_and_vae_weights_count_towards_sampling_memory(tmp_path):
    """`megassm sample` holds the VAE throughout and T5 until every prompt is encoded, before the model loads: 2
    bytes per parameter, read from local directories' safetensors headers, else T5-v1.1-XXL (text_dim 4096) and a
    Wan-sized VAE are assumed. The peak is the VAE + the larger of T5 and the denoiser."""
    import torch
    from safetensors.torch import save_file

    from megassm.sample_plan import ASSUMED_TEXT_ENCODER_PARAMS, ASSUMED_VAE_PARAMS

    cfg = load_config("configs/stage2_2k.yaml", ["encoders.vae=/nowhere/vae", "encoders.text_encoder=/nowhere/t5"])
    p = predict_sampling(cfg, 16384)
    assert p["encoders_gb"] == pytest.approx(2 * (ASSUMED_TEXT_ENCODER_PARAMS + ASSUMED_VAE_PARAMS) / 1e9)
    assert p["denoiser_gb"] == pytest.approx(p["weights_gb"] + p["activations_gb"] + 0.25)
    assert p["denoiser_gb"] > p["text_encoder_gb"] + 0.25  # hth-5b (10.2 GB) + activations > T5-XXL (9.5 GB)
    assert p["total_gb"] == pytest.approx(p["denoiser_gb"] + p["vae_gb"])
    small = load_config("configs/stage2_2k.yaml", ["encoders.vae=/nowhere/vae", "encoders.text_encoder=/nowhere/t5",
                                                   "model.pattern=hvhA"])
    q = predict_sampling(small, 16384)  # a small model: T5-XXL is the peak
    assert q["total_gb"] == pytest.approx(q["text_encoder_gb"] + 0.25 + q["vae_gb"])
    (tmp_path / "t5").mkdir()
    (tmp_path / "vae").mkdir()
    save_file({"w": torch.zeros(1000, 10)}, str(tmp_path / "t5" / "model.safetensors"))
    save_file({"w": torch.zeros(500)}, str(tmp_path / "vae" / "model.safetensors"))
    cfg.encoders.text_encoder, cfg.encoders.vae = str(tmp_path / "t5"), str(tmp_path / "vae")
    assert predict_sampling(cfg, 16384)["encoders_gb"] == pytest.approx(2 * 10500 / 1e9)
    cfg.encoders.text_encoder, cfg.encoders.vae = "builtin:words", "builtin:pixels"
    assert predict_sampling(cfg, 16384)["encoders_gb"] == 0.0
