"""megassm.diffusers: ``megassm convert to-diffusers`` -> ``HTHPipeline.from_pretrained`` gives the latents of
``megassm sample`` for the same seeds (tiny random T5 + VAE saved with save_pretrained), the transformer takes
diffusers' 0-1000 timesteps, and builtin-encoder checkpoints hand over the transformer alone."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from megassm.data.testing import make_tiny_text_encoder, make_tiny_vae
from megassm.diffusers import HTHPipeline, HTHTransformerModel
from megassm.diffusers.convert import to_diffusers
from tests.conftest import TINY_OVERRIDES
from tests.integration.test_sample import _consolidated

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("diffusers")
    return _consolidated(d / "ck", make_tiny_vae(d / "vae"), make_tiny_text_encoder(d / "t5", d_model=32))


def test_pipeline_matches_megassm_sample(checkpoint, tmp_path, cli):
    to_diffusers(checkpoint, tmp_path / "pipe")  # what `megassm convert to-diffusers` runs, in-process
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    # diffusers' layout for an out-of-tree pipeline: [module file in the directory, class]
    assert index["_class_name"] == ["pipeline_hth", "HTHPipeline"] and index["transformer"][1] == "HTHTransformerModel"
    flat = json.loads((tmp_path / "pipe" / "transformer" / "config.json").read_text())
    assert flat["d_model"] == 32 and flat["pattern"] == "htA" and flat.get("megassm_model") is None  # flat keys
    cli("sample", checkpoint, "--prompt", "a red square", "--prompt", "waves", "--size", "32x24", "--seed", "5",
        "--negative-prompt", "blur", "--save-latents", "--out", tmp_path / "s.png")
    pipe = HTHPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]  # megassm sample: seed + prompt index
    args = dict(prompt=["a red square", "waves"], negative_prompt="blur", height=32, width=24, generator=gens)
    lat = pipe(**args, output_type="latent").images
    for i in range(2):
        ref = load_file(str(tmp_path / f"s_{i}.latents.safetensors"))["latents"]
        # fp32 both ways; the only differences are float32 rounding of the schedule: the scheduler holds
        # sigma and timestep = 1000 sigma in float32 (megassm keeps t in double until the model's input) and
        # dt = sigma_next - sigma in float32. Measured: bit-identical here; 1e-4 leaves room for other step counts.
        torch.testing.assert_close(lat[i], ref, rtol=0, atol=1e-4)
    # no size asked for: the training size recorded in model_index.json (the demo data's 8 x 8), as megassm sample
    assert pipe("waves", num_inference_steps=1, output_type="latent").images.shape[-2:] == (8, 8)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    images = pipe(**{**args, "generator": gens}).images
    for i, img in enumerate(images):  # the same PNG up to one 8-bit level where the rounding flips
        png = np.asarray(Image.open(tmp_path / f"s_{i}.png")).astype(int)
        assert img.size == (24, 32) and np.abs(np.asarray(img).astype(int) - png).max() <= 1


def test_diffusion_pipeline_from_pretrained_in_a_fresh_process(checkpoint, tmp_path):
    """diffusers' own entry point, in a process that imports diffusers and not megassm: the directory's
    pipeline_hth.py brings megassm's pipeline in (trust_remote_code, as for any out-of-tree pipeline); the same
    latents as HTHPipeline's."""
    import subprocess
    import sys

    from tests.conftest import child_env

    to_diffusers(checkpoint, tmp_path / "pipe")
    # the child computes with this process's thread count: another count sums in another order (7e-7 apart,
    # seen when an earlier test of the same worker had left OMP_NUM_THREADS=1 for its children)
    code = (f"import sys, torch\ntorch.set_num_threads({torch.get_num_threads()})\n"
            f"from diffusers import DiffusionPipeline\nassert 'megassm' not in sys.modules\n"
            f"p = DiffusionPipeline.from_pretrained({str(tmp_path / 'pipe')!r}, trust_remote_code=True)\n"
            "print(type(p).__name__)\n"
            "lat = p('waves', height=16, width=16, num_inference_steps=3, output_type='latent',\n"
            "        generator=torch.Generator().manual_seed(1)).images\n"
            f"torch.save(lat, {str(tmp_path / 'lat.pt')!r})\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "HTHPipeline", proc.stderr[-3000:]
    pipe = HTHPipeline.from_pretrained(tmp_path / "pipe")  # no trust_remote_code: its own one-line module
    want = pipe("waves", height=16, width=16, num_inference_steps=3, output_type="latent",
                generator=torch.Generator().manual_seed(1)).images
    torch.testing.assert_close(torch.load(tmp_path / "lat.pt"), want, rtol=0, atol=0)
    (tmp_path / "pipe" / "pipeline_hth.py").write_text("import os\n")  # other code: diffusers' rule applies
    with pytest.raises(ValueError, match="trust_remote_code"):
        HTHPipeline.from_pretrained(tmp_path / "pipe")


def test_transformer_takes_diffusers_timesteps(checkpoint, tmp_path):
    from megassm.sample import load_model_for_sampling

    model, cfg, _ = load_model_for_sampling(checkpoint)
    from dataclasses import asdict

    wrapped = HTHTransformerModel(megassm_model=asdict(cfg.model))
    wrapped.hth.load_state_dict(model.state_dict())
    wrapped.save_pretrained(tmp_path / "t")
    loaded = HTHTransformerModel.from_pretrained(tmp_path / "t").eval()
    x, text = torch.randn(2, 4, 1, 8, 8), torch.randn(2, 5, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    t = torch.tensor([0.25, 0.875])  # exact in binary, so t * 1000 / 1000 == t
    with torch.no_grad():
        ref = model(x, t, text, mask.bool())
        out = loaded(x, t * 1000, encoder_hidden_states=text, encoder_attention_mask=mask).sample
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_builtin_encoders_write_the_transformer_only(tmp_path, cli):
    import yaml
    from safetensors.torch import save_file

    from megassm.config import to_dict
    from megassm.models import build_model
    from megassm.run_config import load_config

    cfg = load_config("configs/smoke.yaml", TINY_OVERRIDES)
    ck = tmp_path / "ck"
    ck.mkdir()
    save_file(build_model(cfg.model).state_dict(), str(ck / "model.safetensors"))
    (ck / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    proc = cli("convert", "to-diffusers", ck, tmp_path / "out")  # the command line, once
    assert "wrote only transformer/" in proc.stderr and not (tmp_path / "out" / "model_index.json").exists()
    t = HTHTransformerModel.from_pretrained(tmp_path / "out", subfolder="transformer")
    assert t.hth.cfg.pattern == cfg.model.pattern and t.in_channels == 3
