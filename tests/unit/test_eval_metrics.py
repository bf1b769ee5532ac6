"""Evaluation metrics at known answers (megassm/eval/): FID / KID of a set against itself and under a controlled
shift, FID stable for rank-deficient covariances, the held-out loss as the training loss's own function, CLIP
score ranking a matching caption first, clear errors for missing weights, a failing metric left out."""

import logging

import pytest
import torch

from megassm.config.validate import ConfigError
from megassm.diffusion.flow import flow_matching_loss
from megassm.eval.frechet import fid_from_features, kid_from_features
from megassm.eval.heldout import HeldOutLoss, heldout_batches
from megassm.eval.inception import MissingWeightsError, image_features, load_inception
from megassm.models import build_model
from megassm.run_config import load_config
from tests.conftest import REPO, TINY_OVERRIDES

CPU = torch.device("cpu")


def _features(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("n, d", [(256, 16), (12, 64)])  # 12 < 64: both covariances have rank 11
def test_fid_is_zero_against_itself_and_grows_with_a_shift(n, d):
    x = _features(n, d)
    assert fid_from_features(x, x) == pytest.approx(0.0, abs=1e-8)
    fids = []
    for shift in (0.1, 0.3, 1.0, 3.0):
        y = x + shift  # the same covariance: FID = |mean difference|^2 = d shift^2 exactly
        fids.append(fid_from_features(x, y))
        # relative 1e-6: the square roots of the rank-deficient case's ~1e-13 eigenvalues stay in the trace
        assert fids[-1] == pytest.approx(d * shift**2, rel=1e-6)
    assert fids == sorted(fids)


@pytest.mark.parametrize("n, m, subset, subsets", [(50, 50, 50, 1), (40, 60, 25, 9)])
def test_kid_equals_torchmetrics(n, m, subset, subsets):
    """The standard unbiased estimator (K_xy's diagonal kept) and torchmetrics' std (1/n): the same subsets (its
    draws from the global generator seeded as ours: real's permutation, then fake's) give the same mean and std.
    Relative 1e-9: float64 features, sums in another order."""
    from torchmetrics.image.kid import KernelInceptionDistance

    class Features(torch.nn.Module):  # the features are given: torchmetrics' extractor is the identity
        num_features = 16

        def forward(self, x):
            return x

    a, b = _features(n, 16, seed=1), _features(m, 16, seed=2) * 1.1 + 0.2
    tm = KernelInceptionDistance(feature=Features(), subsets=subsets, subset_size=subset).double()
    tm.update(a, real=True)
    tm.update(b, real=False)
    torch.manual_seed(5)
    want = [float(v) for v in tm.compute()]
    got = kid_from_features(a, b, subset_size=subset, subsets=subsets, seed=5)
    assert got == pytest.approx(want, rel=1e-9)
    assert want[0] > 0


def test_fid_of_differing_covariances_matches_the_closed_form():
    # diagonal covariances: FID = sum (sqrt(a_i) - sqrt(b_i))^2, no mean difference
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 0.0])
    from megassm.eval.frechet import FeatureStats, frechet_distance

    fd = frechet_distance(FeatureStats(torch.zeros(3, dtype=torch.float64), torch.diag(a).double(), 2),
                          FeatureStats(torch.zeros(3, dtype=torch.float64), torch.diag(b).double(), 2))
    assert fd == pytest.approx(float(((a.sqrt() - b.sqrt()) ** 2).sum()), rel=1e-9)


def test_inception_features_and_missing_weights(tmp_path):
    from megassm.eval.testing import save_random_inception

    with pytest.raises(MissingWeightsError, match="pt_inception-2015-12-05") as e:
        load_inception(tmp_path / "nope.pth", CPU)
    assert str(tmp_path / "nope.pth") in str(e.value)
    net = load_inception(save_random_inception(tmp_path / "inception.pth"), CPU)
    imgs = torch.rand(6, 3, 16, 16)
    f = image_features(net, imgs, batch_size=4)
    assert f.shape == (6, 2048) and f.std() > 1e-3  # (FID at 2,048 dimensions: ~10 s of eigh, in the e2e test)
    assert image_features(net, imgs[:2]).equal(f[:2])


def _cfg(*overrides):
    return load_config(REPO / "configs" / "smoke.yaml", [*TINY_OVERRIDES, *overrides])


def test_heldout_loss_is_the_training_loss_of_the_batch():
    cfg = _cfg("eval.samples=6", "eval.batch_size=4")
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batches = heldout_batches(cfg)
    assert [b["index"] for b in batches] == [[0, 1, 2, 3], [4, 5]]
    assert heldout_batches(cfg)[0]["latents"].equal(batches[0]["latents"])  # the same set each time

    def training_loss(b):
        seq = b["latents"][0, 0].numel() // 4  # (T, H, W) over the 1 x 2 x 2 patch
        with torch.no_grad():
            return float(flow_matching_loss(model, b["latents"], b["text"], b["text_mask"], cfg.diffusion, seq,
                                            b["index"], cfg.eval.seed))

    one = HeldOutLoss(batches[:1], cfg.diffusion, cfg.eval.seed, CPU)
    assert one(model) == training_loss(batches[0])  # exactly: the same function, draws and batch
    both = HeldOutLoss(batches, cfg.diffusion, cfg.eval.seed, CPU)(model)
    assert both == pytest.approx((4 * training_loss(batches[0]) + 2 * training_loss(batches[1])) / 6, rel=1e-6)
    # a replica short of batches runs a stand-in: both replicas of two run 1 forward, and only replica 0 counts it
    r1 = HeldOutLoss(batches, cfg.diffusion, cfg.eval.seed, CPU, dp_rank=1, dp_size=2)
    assert r1.forwards == 1 and r1.mine == [1]
    assert HeldOutLoss(batches, cfg.diffusion, cfg.eval.seed, CPU, dp_rank=2, dp_size=3).mine == []


def _train_tiny_clip(path, steps: int = 20):
    """A tiny CLIP taught that red images go with 'red' and blue ones with 'blue' (a few contrastive steps)."""
    from transformers import ByT5Tokenizer

    from megassm.eval.clip_score import OPENAI_MEAN, OPENAI_STD
    from megassm.eval.testing import save_tiny_clip

    model = save_tiny_clip(path)
    tok = ByT5Tokenizer()
    mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        colour = torch.randint(2, (8,), generator=g)
        imgs = 0.3 * torch.rand(8, 3, 16, 16, generator=g)
        imgs[colour == 0, 0] += 0.7  # red
        imgs[colour == 1, 2] += 0.7  # blue
        t = tok([["a red square", "a blue square"][c] for c in colour], padding=True, return_tensors="pt")
        loss = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                     pixel_values=(imgs - mean) / std, return_loss=True).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(path)


def test_clip_score_ranks_the_matching_caption_first(tmp_path):
    from megassm.eval.clip_score import CLIPScorer

    _train_tiny_clip(tmp_path / "clip")
    scorer = CLIPScorer(tmp_path / "clip", CPU)
    red, blue = torch.zeros(1, 3, 12, 12), torch.zeros(1, 3, 12, 12)
    red[:, 0], blue[:, 2] = 0.9, 0.9
    images = torch.cat([red, blue])
    matching = scorer.scores(images, ["a red square", "a blue square"])
    swapped = scorer.scores(images, ["a blue square", "a red square"])
    assert (matching > swapped).all(), (matching, swapped)
    assert 0 <= scorer(images, ["a red square", "a blue square"]) <= 100
    with pytest.raises(MissingWeightsError, match=str(tmp_path / "none")):
        CLIPScorer(tmp_path / "none", CPU)


def test_clip_score_equals_torchmetrics_with_the_saved_processor(tmp_path):
    """A directory whose processor CLIPProcessor.save_pretrained wrote (transformers 5: processor_config.json,
    here with its own mean / std and a shortest-edge resize + centre crop): megassm's CLIP score of non-square
    images equals torchmetrics' CLIPScore over the same model and processor, which clamps the mean, not each
    pair. Tolerance 1e-4 points: float32 embeddings of the same pixel values."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import ByT5Tokenizer, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from megassm.eval.clip_score import CLIPScorer

    _train_tiny_clip(tmp_path, steps=3)
    ip = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                            image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    CLIPProcessor(image_processor=ip, tokenizer=ByT5Tokenizer()).save_pretrained(tmp_path)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 24, 40, generator=g)  # 48 x 80 in the issue, in miniature
    images[0, :, :, :12] = 0.0  # what a squash would keep and a centre crop cuts
    prompts = ["a red square", "a blue square", "a green disc"]
    ours = CLIPScorer(tmp_path, CPU)
    class Features(torch.nn.Module):
        """The CLIP model as torchmetrics 1.9 calls it: transformers 5's get_*_features return an output object
        whose pooler_output is the projected embedding (torchmetrics' documented callable protocol)."""

        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *a, **k):
            return self.model.get_image_features(*a, **k).pooler_output

        def get_text_features(self, *a, **k):
            return self.model.get_text_features(*a, **k).pooler_output

    tm = CLIPScore(model_name_or_path=lambda: (Features(CLIPModel.from_pretrained(tmp_path)),
                                               CLIPProcessor.from_pretrained(tmp_path)))
    tm.update(list((images * 255).round().to(torch.uint8)), prompts)
    assert ours(images, prompts) == pytest.approx(float(tm.compute()), abs=1e-4)
    # a negative mean is clamped as a whole, not pair by pair
    per_pair = ours.scores(images, prompts)
    assert ours(images, prompts) == pytest.approx(max(float(per_pair.mean()), 0.0), abs=1e-6)


def test_a_failing_metric_is_logged_and_left_out(caplog):
    from megassm.eval.suite import compute
    from megassm.train.evaluation import _report

    class Broken:  # FeatureModels whose CLIP cannot load
        @property
        def clip(self):
            raise MissingWeightsError("CLIP model not found at /x")

    with caplog.at_level(logging.ERROR, logger="megassm.eval"):
        out = compute(["clip_score"], Broken(), [torch.rand(1, 3, 8, 8)], ["a"], on_error=_report)
    assert out == {} and "clip_score failed" in caplog.text and "/x" in caplog.text
    with pytest.raises(MissingWeightsError):
        compute(["clip_score"], Broken(), [torch.rand(1, 3, 8, 8)], ["a"])


def test_eval_config_is_checked_at_load(tmp_path):
    with pytest.raises(ConfigError, match="eval.inception='/missing/inception.pth'"):
        _cfg("train.eval_every=5", "eval.inception=/missing/inception.pth", f"eval.reference={tmp_path}")
    with pytest.raises(ConfigError, match="needs both eval.inception"):
        _cfg("train.eval_every=5", f"eval.reference={tmp_path}")
    with pytest.raises(ConfigError, match="eval.samples=0"):
        _cfg("eval.samples=0")
    with pytest.raises(ConfigError, match="eval.paths"):
        _cfg("train.eval_every=5", "data.kind=shards", f"data.paths=[{tmp_path}]")


def test_plan_counts_the_eval_extractors(tmp_path):
    from megassm.eval.testing import save_random_inception
    from megassm.plan import INCEPTION_PARAMS, preview_load

    clip = tmp_path / "clip"
    from megassm.eval.testing import save_tiny_clip

    clip_params = sum(p.numel() for p in save_tiny_clip(clip).parameters())
    save_random_inception(tmp_path / "inc.pth")
    cfg = _cfg("train.eval_every=10", f"eval.clip_model={clip}", f"eval.inception={tmp_path / 'inc.pth'}",
               f"eval.reference={tmp_path}")
    load, sources = preview_load(cfg, 16)
    assert load.eval_extractor_params == pytest.approx(INCEPTION_PARAMS + clip_params, rel=0.01)
    assert sources["clip_model"] == str(clip)
    assert preview_load(_cfg(), 16)[0] is None  # neither previews nor evaluation


class _MeanColourOverTime(torch.nn.Module):
    """A stand-in video network: videos (N, T, 3, H, W) -> (N, 6) mean and spread of each colour over time."""

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        per_frame = videos.mean((3, 4))  # (N, T, 3)
        return torch.cat([per_frame.mean(1), per_frame.std(1)], dim=1)


def test_videos_get_fid_over_frames_and_fvd(tmp_path):
    from megassm.config.schema import EvalConfig
    from megassm.eval.media import load_reference
    from megassm.eval.suite import FeatureModels, fvd, kid, wanted
    from megassm.eval.testing import save_random_inception
    from megassm.sample import save_video

    g = torch.Generator().manual_seed(0)
    ref = tmp_path / "ref"
    ref.mkdir()
    clips = [torch.rand(3, 3, 16, 16, generator=g) * (0.5 + i / 8) for i in range(4)]  # (T, 3, H, W)
    for i, c in enumerate(clips):
        save_video(c, ref / f"{i}.mp4", fps=8)
    assert [tuple(c.shape) for c in load_reference(ref)] == [(3, 3, 16, 16)] * 4
    torch.export.save(torch.export.export(_MeanColourOverTime(), (torch.rand(1, 3, 3, 16, 16),),
                                          dynamic_shapes=None), tmp_path / "video.pt2")
    e = EvalConfig(inception=str(save_random_inception(tmp_path / "inc.pth")), reference=str(ref),
                   video_features=str(tmp_path / "video.pt2"))
    assert wanted(e, videos=True, offline=True) == ["fid", "kid", "fvd"]
    assert wanted(e, videos=True, offline=False) == ["kid"]  # during training: no FID / FVD
    models = FeatureModels(e, CPU)
    near, far = fvd(models, clips), fvd(models, [c * 0.2 for c in clips])
    assert near["generated_videos"] == 4 and 0 <= near["value"] < far["value"]  # H.264 is lossy: not exactly 0
    frames = kid(models, clips[:2])  # over frames like FID (whose 2,048-d eigh takes ~10 s: the e2e test has one)
    assert frames["generated_frames"] == 6 and frames["reference_frames"] == 12 and frames["subset_size"] == 6
    with pytest.raises(MissingWeightsError, match="torch.export"):
        fvd(FeatureModels(EvalConfig(video_features=str(tmp_path / "none.pt"), reference=str(ref)), CPU), clips)


def test_heldout_set_and_reference_from_shards(tmp_path):
    """Validation shards are read once, in order, to eval.samples; the same shards serve as a reference set
    (latents decoded with the run's VAE: builtin:pixels here)."""
    from megassm.data.testing import write_synthetic_dataset
    from megassm.eval.media import load_reference

    write_synthetic_dataset(tmp_path / "val", [(3, 1, 8, 8), (3, 1, 4, 8)], num_samples=10, samples_per_shard=4,
                            text_dim=16, max_text=8)
    cfg = _cfg("eval.samples=7", "eval.batch_size=3", f"eval.paths=[{tmp_path / 'val'}]")
    a, b = heldout_batches(cfg), heldout_batches(cfg)
    assert sum(len(x["index"]) for x in a) == 7
    assert [x["index"] for x in a] == [x["index"] for x in b]
    assert all(x["latents"].equal(y["latents"]) for x, y in zip(a, b))
    assert {tuple(x["latents"].shape[2:]) for x in a} <= {(1, 8, 8), (1, 4, 8)}
    clips = load_reference(tmp_path / "val", cfg, limit=5)
    assert len(clips) == 5 and all(c.shape[:2] == (1, 3) and 0 <= c.min() and c.max() <= 1 for c in clips)
