"""README "Your own images and videos", run in miniature: its config and each of its commands, as written there,
with the sizes shrunk (tiny random encoders, 32 px, a few steps) by the substitutions below."""

import re
import shlex

import pytest

from megassm.data import testing as T
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow

SECTION = "## Your own images and videos"
SMALLER = {  # what the README says -> its miniature
    "--resolution 256": "--resolution 32 --aspect-ratios 1:1 --bucket-multiple 8 --num-workers 0 --no-progress",
    "--frames 17": "--frames 3",
}
TRAIN_TINY = ["model.d_model=32", "model.num_heads=2", "model.headdim=16", "model.d_state=8", "model.chunk_size=16",
              "model.max_text_len=8", "train.steps=4", "train.micro_batch_size=2", "train.ckpt_every=4",
              "train.sample_every=4", "optim.warmup_steps=0", "data.num_workers=0", "data.shuffle_buffer=4",
              "train.progress_bar=false", "diffusion.sample_steps=2"]


def _blocks(kind: str) -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ", 1)]
    return re.search(rf"```{kind}\n(.*?)```", section, re.S).group(1)


def test_readme_walkthrough_from_a_media_folder_to_samples(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mine.yaml").write_text(_blocks("yaml"))
    (tmp_path / "prompts.txt").write_text("a red image\n")
    T.make_tiny_video_vae(tmp_path / "weights" / "vae")  # spatial stride 4, temporal 2
    T.make_tiny_text_encoder(tmp_path / "weights" / "t5")
    media = tmp_path / "my_media"
    media.mkdir()
    for i in range(6):
        T.write_image(media / f"img{i}.png", 32, 32, seed=i, caption=f"an image number {i}")
    T.write_video(media / "clip.mp4", 8, 8, 32, 32, seed=9, caption="a moving pattern")
    commands = [line.split("  #")[0].strip() for line in _blocks("bash").splitlines()
                if line.strip() and not line.startswith("#")]
    assert [c.split()[1] for c in commands] == ["preprocess", "inspect", "plan", "train", "sample"]
    out = {}
    for command in commands:
        for big, small in SMALLER.items():
            command = command.replace(big, small)
        args = shlex.split(command)[1:]
        if args[0] == "train":
            args += TRAIN_TINY
        if args[0] == "sample":
            args += ["--steps", "2"]
        out[args[0]] = run_cli(*args, cwd=tmp_path, timeout=600)
    assert "7 samples" in out["preprocess"].stdout  # 6 images + 1 clip of 3 frames (2 latent frames)
    assert "model.in_channels=4 from the manifest" in out["train"].stderr
    assert re.search(r"step 4/4 \| loss", out["train"].stderr)
    assert list((tmp_path / "runs" / "mine" / "samples").glob("step_00000004_*.png"))
    assert (tmp_path / "cat.png").is_file() and "size: 32x32 (latent 8x8" in out["sample"].stdout
