"""benchmarks/full_size_sample_cli.py --tiny end to end on the CPU: the script that runs `megassm sample` with the
full hth-5b on a GPU keeps working (checkpoint + encoders written locally, the real CLI, megassm plan --sample)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_tiny_mode_samples_an_image_and_a_video_through_the_cli(tmp_path):
    out = tmp_path / "res.json"
    p = subprocess.run([sys.executable, "benchmarks/full_size_sample_cli.py", "--tiny", "--work", str(tmp_path / "w"),
                        "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = {r["name"]: r for r in res["rows"]}
    assert set(rows) == {"stage2_2k_image", "stage3_video_360p_129f"}
    for name, suffix, latent in (("stage2_2k_image", ".png", [1, 8, 8]), ("stage3_video_360p_129f", ".mp4", [3, 8, 8])):
        r = rows[name]
        assert r["rc"] == 0 and r["files"][name + suffix] > 0 and r["latent"] == latent and r["latents_finite"]
        assert set(r["cli_timing"]) >= {"load_s", "encode_s", "denoise_s", "decode_s"}
        assert r["plan"]["seq_len"] == r["tokens"] and r["plan"]["sample_steps"] == r["steps"] == 2
    assert res["checkpoints"]["stage2_2k_image"]["params"] == res["checkpoints"]["stage3_video_360p_129f"]["params"]
    assert not (tmp_path / "w").exists()  # removed unless --keep
