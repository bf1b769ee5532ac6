"""Training previews (megassm/train/preview.py): prompts from the config, the stage's latent shape and sampler
settings, the EMA weights (also under ZeRO-3), the text encoder built once, prompts split over data-parallel
replicas and gathered on rank 0, CP-sharded generation."""

import json

import pytest
import torch

from megassm.encoders import LatentDecoder, TextEncoder
from megassm.models import build_model
from megassm.run_config import load_config
from megassm.sample import SampleSpec, generate
from megassm.train import preview
from megassm.train.ema import ShardedEMA
from megassm.train.preview import DEMO_PROMPTS, Previews, preview_latent_shape, preview_prompts
from tests.conftest import REPO, TINY_OVERRIDES

SMOKE = REPO / "configs" / "smoke.yaml"
CPU, FP32 = torch.device("cpu"), torch.float32
FIVE = [*DEMO_PROMPTS, "a red square at the bottom right"]


def _cfg(*overrides):
    return load_config(SMOKE, [*TINY_OVERRIDES, "diffusion.sample_steps=2", *overrides])


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():  # open the zero-initialised gates/outputs so samples depend on the weights
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _reference(model, cfg, prompts):
    """What `megassm sample` makes of prompt i with seed i at the stage's settings: (N, T, 3, H, W) pixels."""
    T, h, w = preview_latent_shape(cfg)
    lat = generate(model, cfg, [SampleSpec(p, seed=i) for i, p in enumerate(prompts)],
                   TextEncoder(cfg.encoders, cfg.model, CPU), cfg.diffusion.sample_steps, cfg.diffusion.cfg_scale,
                   (h, w), T)
    return LatentDecoder(cfg.encoders, CPU)(lat)


def test_prompts_from_a_list_or_a_file(tmp_path):
    cfg = _cfg("train.preview_prompts=[a red square at the top left,a blue square]")
    assert preview_prompts(cfg) == ["a red square at the top left", "a blue square"]
    f = tmp_path / "prompts.txt"
    f.write_text("# previews\na green square at the top right\n\n  a yellow square  \n")
    cfg = _cfg(f"train.preview_prompts_file={f}")
    assert preview_prompts(cfg) == ["a green square at the top right", "a yellow square"]
    imgs = Previews(cfg, CPU, FP32)(_model(cfg))
    assert imgs.shape == (2, 3, 8, 8)
    torch.testing.assert_close(imgs, _reference(_model(cfg), cfg, preview_prompts(cfg))[:, 0])
    assert preview_prompts(_cfg()) == DEMO_PROMPTS  # the demo keeps its coloured squares
    for stage in ("stage0_256px", "stage1_1k", "stage2_2k", "stage3_video"):  # shipped with their own prompts
        assert len(preview_prompts(load_config(REPO / "configs" / f"{stage}.yaml"))) >= 4, stage


@pytest.mark.parametrize("overrides, shape", [
    (["data.image_size=8"], (4, 3, 8, 8)),
    (["data.image_size=16"], (4, 3, 16, 16)),
    (["data.frames=3"], (4, 3, 8, 3 * 8)),  # a video preview: its frames side by side
    (["train.preview_latent_shape=[2,4,6]"], (4, 3, 4, 2 * 6)),
])
def test_the_latent_follows_the_stage_data(overrides, shape):
    cfg = _cfg(*overrides)
    assert Previews(cfg, CPU, FP32)(_model(cfg)).shape == shape


def test_shards_preview_at_their_most_common_latent_shape(tmp_path):
    from megassm.data.format import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME

    paths = []
    for name, hist in (("a", {"16x1x64x64": 10, "16x1x32x32": 3}), ("b", {"16x1x32x32": 9})):
        d = tmp_path / name
        d.mkdir()
        (d / MANIFEST_NAME).write_text(json.dumps({
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "shards": [], "latent_scale": 1.0,
            "latent_shift": 0.0, "vae": {}, "text_encoder": {}, "shape_histogram": hist}))
        paths.append(str(d))
    cfg = _cfg("data.kind=shards", f"data.paths=[{paths[0]},{paths[1]}]", "train.preview_prompts=[x]")
    assert preview_latent_shape(cfg) == (1, 32, 32)  # 12 of 32 x 32 against 10 of 64 x 64


def test_the_text_encoder_is_built_and_run_once(monkeypatch):
    built, calls = [], []

    class Counting(TextEncoder):
        def __init__(self, *a, **k):
            built.append(a)
            super().__init__(*a, **k)

        def __call__(self, prompts):
            calls.append(list(prompts))
            return super().__call__(prompts)

    monkeypatch.setattr(preview, "TextEncoder", Counting)
    cfg = _cfg()
    previews, model = Previews(cfg, CPU, FP32), _model(cfg)
    first, second = previews(model), previews(model)
    assert len(built) == 1 and calls == [DEMO_PROMPTS]
    assert torch.equal(first, second)  # fixed seeds: the same weights give the same previews


def test_previews_use_the_ema_weights_and_restore_the_training_ones():
    cfg = _cfg("train.ema_decay=0.5")
    model, averaged = _model(cfg, seed=0), _model(cfg, seed=1)
    ema = ShardedEMA(model, cfg.train.ema_decay)
    target = dict(averaged.named_parameters())
    for n, t in ema.shadow.items():
        t.copy_(target[n])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = Previews(cfg, CPU, FP32)(model, ema)
    torch.testing.assert_close(got, _reference(averaged, cfg, DEMO_PROMPTS)[:, 0])
    assert not torch.allclose(got, Previews(cfg, CPU, FP32)(model))  # the live weights draw otherwise
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_previews_through_a_vae_and_a_t5_encoder_in_bf16(tmp_path, monkeypatch):
    """A bf16 run: the text encoder is loaded in bf16, the latents decode through a (tiny) VAE on rank 0."""
    from megassm.data.testing import make_tiny_text_encoder, make_tiny_vae

    dtypes = []

    class Spy(TextEncoder):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            dtypes.append(self.hf.model.dtype)

    monkeypatch.setattr(preview, "TextEncoder", Spy)
    vae, t5 = make_tiny_vae(tmp_path / "vae"), make_tiny_text_encoder(tmp_path / "t5", d_model=32)
    tiny = [o for o in TINY_OVERRIDES if not o.startswith(("model.in_channels", "model.text_dim", "encoders."))]
    cfg = load_config(SMOKE, [*tiny, "model.in_channels=4", "model.text_dim=32", f"encoders.vae={vae}",
                              f"encoders.text_encoder={t5}", "diffusion.sample_steps=2",
                              "train.preview_prompts=[a red square,waves]"])
    imgs = Previews(cfg, CPU, torch.bfloat16)(_model(cfg).to(torch.bfloat16))
    assert dtypes == [torch.bfloat16]
    assert imgs.shape == (2, 3, 16, 16) and imgs.dtype == torch.float32  # 8 x 8 latents, VAE stride 2
    assert torch.isfinite(imgs).all() and not torch.equal(imgs[0], imgs[1])


def _resident(params: dict) -> list[str]:
    """The ZeRO-3 parameters whose whole tensor is gathered now."""
    return [n for n, p in params.items() if p.ds_status.name == "AVAILABLE"]


def _zero3_full(params: dict) -> dict:
    """Whole tensors, leaving each parameter gathered or partitioned as it was."""
    import deepspeed

    out = {n: params[n].detach().clone() for n in _resident(params)}
    others = [p for n, p in params.items() if n not in out]
    with deepspeed.zero.GatheredParameters(others, enabled=bool(others)):
        out.update({n: p.detach().clone() for n, p in params.items() if n not in out})
    return out


def _zero3_previews_on_rank(rank: int, world: int, persistence: str, run_dir: str, prompts: list[str]) -> dict:
    """A ZeRO-3 Trainer on 2 data-parallel ranks: 2 steps, then previews with the EMA weights. Rank 0 saves
    the whole EMA weights for the parent's single-process reference."""
    import os

    import torch.distributed as dist
    from safetensors.torch import save_file

    from megassm.train import loop
    from megassm.train.backends import deepspeed as engine

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # DeepSpeed reads them
    if persistence == "none":
        real = engine.deepspeed_config

        def no_persistence(*a, **k):
            ds = real(*a, **k)
            ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
            return ds

        engine.deepspeed_config = no_persistence
    cfg = _cfg(f"run_dir={run_dir}", "train.ema_decay=0.5", "train.ckpt_every=100", "optim.lr=1e-2",
               f"train.preview_prompts=[{','.join(prompts)}]")
    trainer = loop.Trainer(cfg)
    data = iter(trainer.data)
    for _ in range(2):
        assert trainer.train_step(data)["ok"]
    params = trainer.ema.params
    resident = _resident(params)
    live = _zero3_full(params)
    ema = {}
    for n, p in params.items():  # this rank's EMA partitions, gathered in rank order
        parts = [torch.empty_like(trainer.ema.shadow[n]) for _ in range(world)]
        dist.all_gather(parts, trainer.ema.shadow[n])
        ema[n] = torch.cat([t.reshape(-1) for t in parts])[: p.ds_numel].reshape(p.ds_shape)
    previews = Previews.for_mesh(cfg, trainer.mesh, trainer.device, FP32)
    imgs = previews(trainer.model, trainer.ema)
    after = _zero3_full(params)
    restored = all(torch.equal(after[n], live[n]) for n in live) and _resident(params) == resident
    assert trainer.train_step(data)["ok"]  # training goes on from the restored weights
    if rank == 0:
        save_file({n: t.contiguous() for n, t in ema.items()}, f"{run_dir}/ema_full.safetensors")
    return {"mine": previews.mine, "images": None if imgs is None else imgs.tolist(), "restored": restored,
            "ema_differs": any(not torch.allclose(ema[n], live[n]) for n in live), "resident": len(resident),
            "params": len(params)}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("persistence, prompts", [("default", FIVE), ("none", FIVE[:1])])
def test_zero3_previews_use_the_ema_partitions_and_restore_them(tmp_path, persistence, prompts):
    """ZeRO-3 over 2 ranks: the previews equal one process's with the whole EMA weights, and the training weights
    are as before. 'default': the tiny model's parameters all stay gathered between steps (DeepSpeed's
    persistence threshold), so the swap re-gathers them; 'none': every parameter is a partition only. One
    prompt: replica 1 runs a stand-in, as every forward gathers weights from both ranks."""
    from safetensors.torch import load_file

    from tests.distributed.dist_harness import spawn

    r0, r1 = spawn(_zero3_previews_on_rank, 2, tmp_path, persistence, str(tmp_path / "run"), prompts)
    assert r0["restored"] and r1["restored"] and r0["ema_differs"]
    assert r0["resident"] == (r0["params"] if persistence == "default" else 0)
    assert r1["images"] is None and len(r0["mine"]) + len(r1["mine"]) == len(prompts)
    cfg = _cfg(f"train.preview_prompts=[{','.join(prompts)}]")
    reference = build_model(cfg.model)
    reference.load_state_dict(load_file(str(tmp_path / "run" / "ema_full.safetensors")), strict=False)
    # fp32; ZeRO-3 gathers the same values, the batch split over replicas reorders sums: ~1e-6
    torch.testing.assert_close(torch.tensor(r0["images"]), Previews(cfg, CPU, FP32)(reference.eval()),
                               rtol=1e-5, atol=1e-5)


def _preview_on_rank(rank: int, world: int, layout: str) -> dict:
    from megassm.parallel.apply import parallelize_hth
    from megassm.parallel.mesh import ParallelDims, ParallelMesh

    cfg = _cfg(f"train.preview_prompts=[{','.join(FIVE)}]")
    model = _model(cfg)
    dims = ParallelDims(world, cp=2) if layout == "cp2" else ParallelDims(world)
    mesh = ParallelMesh(dims)
    if layout == "cp2":
        parallelize_hth(model, mesh)
    previews = Previews.for_mesh(cfg, mesh, CPU, FP32)
    imgs = previews(model)
    return {"mine": previews.mine, "images": None if imgs is None else imgs.tolist(), "sources": previews.sources}


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["dp2", "cp2"])
def test_replicas_split_the_prompts_and_rank0_gets_them_all(tmp_path, layout):
    """dp2: each replica generates its prompts[r::2] once; cp2: both ranks generate all five together, CP-sharded.
    Rank 0 holds the five previews, equal to one process's."""
    from tests.distributed.dist_harness import spawn

    r0, r1 = spawn(_preview_on_rank, 2, tmp_path, layout)
    if layout == "dp2":
        assert r0["mine"] == [0, 2, 4] and r1["mine"] == [1, 3]
        assert r0["sources"] == {"0": 0, "1": 1, "2": 0, "3": 1, "4": 0}
    else:
        assert r0["mine"] == r1["mine"] == [0, 1, 2, 3, 4]
        assert r0["sources"] == {str(i): 0 for i in range(5)}  # one rank of the CP group sends
    assert r1["images"] is None
    cfg = _cfg(f"train.preview_prompts=[{','.join(FIVE)}]")
    one = Previews(cfg, CPU, FP32)(_model(cfg))
    # fp32; a different batch composition (dp2) or the CP all-to-alls reorder sums: ~1e-6 of the pixel scale
    torch.testing.assert_close(torch.tensor(r0["images"]), one, rtol=1e-5, atol=1e-5)
