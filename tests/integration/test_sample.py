"""`megassm sample` with a tiny random VAE / video VAE / T5 encoder saved to disk: PNG and MP4 outputs of the
right size and format, JSON sidecars, determinism, per-prompt JSONL settings, and clear errors."""

import json

import av
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from megassm.config import to_dict
from megassm.data.testing import make_tiny_text_encoder, make_tiny_vae, make_tiny_video_vae
from megassm.models import build_model
from megassm.run_config import load_config
from tests.conftest import TINY_OVERRIDES

pytestmark = pytest.mark.slow


def _consolidated(path, vae, text_encoder, text_dim=32, seed=0):
    """A consolidated checkpoint (model.safetensors + config.yaml) of a random tiny model."""
    overrides = [o for o in TINY_OVERRIDES if not o.startswith(("model.in_channels", "model.text_dim", "encoders."))]
    cfg = load_config("configs/smoke.yaml", [*overrides, "model.in_channels=4", f"model.text_dim={text_dim}",
                                             "model.pattern=htA", f"encoders.vae={vae}",
                                             f"encoders.text_encoder={text_encoder}", "diffusion.sample_steps=3"])
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():  # open the zero-initialised gates/outputs so samples depend on the prompt
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    return path


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    d = tmp_path_factory.mktemp("enc")
    return {"vae": make_tiny_vae(d / "vae"), "video_vae": make_tiny_video_vae(d / "wan"),
            "t5": make_tiny_text_encoder(d / "t5", d_model=32)}


def test_image_png_sidecar_and_determinism(encoders, tmp_path, cli):
    ck = _consolidated(tmp_path / "ck", encoders["vae"], encoders["t5"])
    for name in ("a", "b"):
        cli("sample", ck, "--prompt", "a red square", "--size", "32x24", "--seed", "5",
            "--out", tmp_path / f"{name}.png")
    a, b = np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png"))
    assert a.shape == (32, 24, 3) and np.array_equal(a, b)
    side = json.loads((tmp_path / "a.json").read_text())
    assert side["latent_size"] == [1, 16, 12] and side["pixels"] == [32, 24] and side["weights"] == "model"
    assert side["text_encoder"] == str(encoders["t5"]) and side["steps"] == 3
    cli("sample", ck, "--prompt", "a blue circle", "--size", "32x24", "--seed", "5", "--out", tmp_path / "c.png")
    assert not np.array_equal(a, np.asarray(Image.open(tmp_path / "c.png")))  # the prompt matters


def test_video_mp4_from_jsonl_prompts(encoders, tmp_path, cli):
    ck = _consolidated(tmp_path / "ck", encoders["video_vae"], encoders["t5"])
    prompts = tmp_path / "prompts.jsonl"
    # frames: output frames, as `preprocess --frames`; latent_frames: the other spelling
    prompts.write_text(json.dumps({"prompt": "waves", "seed": 1, "frames": 5, "size": "32x32"}) + "\n"
                       + json.dumps({"prompt": "a still", "frames": 1, "size": "16x32"}) + "\n"
                       + json.dumps({"prompt": "waves", "seed": 1, "latent_frames": 3, "size": "32x32"}) + "\n")
    cli("sample", ck, "--prompts-file", prompts, "--out", tmp_path / "v.mp4", "--fps", "8")
    with av.open(str(tmp_path / "v_0.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        rate = c.streams.video[0].average_rate
    # 5 frames through a VAE with temporal stride 2 -> 3 latent frames (1 + 2 * 2), spatial stride 4
    assert len(frames) == 5 and frames[0].shape == (32, 32, 3) and rate == 8
    side = json.loads((tmp_path / "v_0.json").read_text())
    assert side["seed"] == 1 and side["latent_size"] == [3, 8, 8] and side["frames"] == 5
    assert np.asarray(Image.open(tmp_path / "v_1.png")).shape == (16, 32, 3)  # frames=1 -> an image
    assert json.loads((tmp_path / "v_2.json").read_text())["latent_size"] == [3, 8, 8]
    proc = cli("sample", ck, "--prompt", "x", "--frames", "4", check=False)
    assert proc.returncode == 2 and "videos have 1 + k*2 frames (e.g. 3 or 5)" in proc.stderr


def test_default_size_and_frames_are_the_training_shape(encoders, tmp_path, cli):
    """Without --size / --frames: the latent shape the model was trained on (here the most common shape in its
    datasets' manifests, 1 x 6 x 10 -> 12 x 20 pixels at the VAE's stride 2), not 256 x 256."""
    from megassm.data.testing import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "data", [(4, 1, 6, 10)] * 3 + [(4, 1, 8, 8)], 8, 4, text_dim=32)
    ck = _consolidated(tmp_path / "ck", encoders["vae"], encoders["t5"])
    stored = yaml.safe_load((ck / "config.yaml").read_text())
    stored["data"].update(kind="shards", paths=[str(tmp_path / "data")])
    (ck / "config.yaml").write_text(yaml.safe_dump(stored))
    proc = cli("sample", ck, "--prompt", "a red square", "--out", tmp_path / "d.png")
    assert np.asarray(Image.open(tmp_path / "d.png")).shape == (12, 20, 3)
    assert "size: 12x20 (latent 6x10, from the most common latent shape of data.paths)" in proc.stdout


def test_bad_inputs_name_the_problem(encoders, tmp_path, cli):
    ck = _consolidated(tmp_path / "ck", encoders["vae"], encoders["t5"], text_dim=16)
    proc = cli("sample", ck, "--prompt", "x", "--size", "32x32", check=False)
    assert proc.returncode == 2 and "text_dim=16" in proc.stderr  # encoder width 32 vs checkpoint 16
    ck2 = _consolidated(tmp_path / "ck2", tmp_path / "no-vae", encoders["t5"])
    proc = cli("sample", ck2, "--prompt", "x", check=False)
    assert proc.returncode == 2 and "not a local directory" in proc.stderr
    ck3 = _consolidated(tmp_path / "ck3", encoders["vae"], encoders["t5"])
    proc = cli("sample", ck3, "--prompt", "x", "--size", "30x32", check=False)
    assert proc.returncode == 2 and "multiple of" in proc.stderr
    (ck3 / "model.safetensors").write_bytes((ck3 / "model.safetensors").read_bytes()[:100])
    proc = cli("sample", ck3, "--prompt", "x", check=False)
    assert proc.returncode == 2 and "truncated or corrupt" in proc.stderr


@pytest.mark.distributed
def test_context_parallel_sampling_equals_one_process(encoders, tmp_path, cli):
    """torchrun with 2 gloo ranks (Ulysses CP = 2) gives the single-process latents for the same seed."""
    import subprocess

    from safetensors.torch import load_file

    from tests.conftest import REPO, child_env, torchrun

    ck = _consolidated(tmp_path / "ck", encoders["vae"], encoders["t5"])
    args = ["sample", str(ck), "--prompt", "a red square", "--prompt", "waves", "--size", "32x32", "--seed", "2",
            "--save-latents"]
    cli(*args, "--out", tmp_path / "one.png")
    env = child_env(OMP_NUM_THREADS="1")
    proc = subprocess.run([*torchrun(2), "-m", "megassm", *args, "--out", str(tmp_path / "cp.png")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for i in range(2):
        one = load_file(str(tmp_path / f"one_{i}.latents.safetensors"))["latents"]
        cp = load_file(str(tmp_path / f"cp_{i}.latents.safetensors"))["latents"]
        # fp32; CP only redistributes tokens/heads (all-to-all), the per-token arithmetic is the same up to
        # summation order inside the scan and attention: agreement to ~1e-6 of the latent scale
        torch.testing.assert_close(cp, one, rtol=1e-5, atol=1e-5)


def test_bf16_sampling_holds_model_text_encoder_and_vae_in_bf16(encoders, tmp_path, monkeypatch, capsys):
    """--precision bf16: the model is filled in bf16 (never a float32 copy: hth-5b 20 GB instead of 10) and T5 and
    the VAE run in bf16 too (T5-XXL in float32 took 19 GB of the GPU beside the model); a timing line is printed."""
    import megassm.sample as sample
    from megassm.cli import main

    ck = _consolidated(tmp_path / "ck", encoders["vae"], encoders["t5"])
    seen = {}
    load = sample.load_model_for_sampling

    def recording_load(*a, **k):
        model, cfg, info = load(*a, **k)
        seen["model"] = {p.dtype for p in model.parameters()}
        return model, cfg, info

    def recorder(cls, key):
        return type(cls.__name__, (cls,), {"__init__": lambda self, *a: (seen.__setitem__(key, a[-1]),
                                                                          cls.__init__(self, *a))[1]})

    monkeypatch.setattr(sample, "load_model_for_sampling", recording_load)
    monkeypatch.setattr(sample, "TextEncoder", recorder(sample.TextEncoder, "text"))
    monkeypatch.setattr(sample, "LatentDecoder", recorder(sample.LatentDecoder, "vae"))
    assert main(["sample", str(ck), "--prompt", "a red square", "--size", "16x16", "--steps", "1", "--device", "cpu",
                 "--precision", "bf16", "--out", str(tmp_path / "x.png")]) == 0
    assert seen == {"model": {torch.bfloat16}, "text": torch.bfloat16, "vae": torch.bfloat16}
    timing = json.loads(next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("timing "))[7:])
    assert set(timing) == {"load_s", "encode_s", "denoise_s", "decode_s"}


def test_the_text_encoder_is_freed_before_the_model_is_loaded(encoders, tmp_path, monkeypatch):
    """Every prompt (two shape groups here) is encoded first and the encoder dropped before the model is loaded:
    T5-XXL's 9.5 GB and hth-5b's 10.2 GB are never on the GPU together, nor T5 beside denoising and decoding.
    Each group still gets its own prompts' encodings."""
    import weakref

    import megassm.sample as sample
    from megassm.cli import main

    ck = _consolidated(tmp_path / "ck", encoders["vae"], encoders["t5"])
    alive, seen, at_load = weakref.WeakSet(), [], []
    cls, denoise, load = sample.TextEncoder, sample.denoise, sample.load_model_for_sampling

    class Tracked(cls):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            alive.add(self)

    def checking_denoise(model, cfg, noise, text, *a, **k):
        seen.append((len(alive), tuple(noise.shape), text.shape[0]))
        return denoise(model, cfg, noise, text, *a, **k)

    def checking_load(*a, **k):
        at_load.append(len(alive))
        return load(*a, **k)

    monkeypatch.setattr(sample, "TextEncoder", Tracked)
    monkeypatch.setattr(sample, "denoise", checking_denoise)
    monkeypatch.setattr(sample, "load_model_for_sampling", checking_load)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in [{"prompt": "a red square", "size": "16x16"},
                                                          {"prompt": "a blue circle", "size": "32x16", "seed": 7},
                                                          {"prompt": "a green line", "size": "16x16"}]))
    assert main(["sample", str(ck), "--prompts-file", str(prompts), "--steps", "1", "--device", "cpu",
                 "--batch-size", "3", "--out", str(tmp_path / "x.png")]) == 0
    assert at_load == [0] and sorted(seen) == [(0, (1, 4, 1, 16, 8), 1), (0, (2, 4, 1, 8, 8), 2)], (at_load, seen)
    one = tmp_path / "one.png"
    assert main(["sample", str(ck), "--prompt", "a blue circle", "--size", "32x16", "--seed", "7", "--steps", "1",
                 "--device", "cpu", "--out", str(one)]) == 0
    assert np.array_equal(np.asarray(Image.open(one)), np.asarray(Image.open(tmp_path / "x_1.png")))
