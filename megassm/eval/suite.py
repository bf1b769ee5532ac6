"""The metrics of one evaluation, shared by ``megassm eval`` and train.eval_every.

Each metric is a function of generated clips (T, 3, H, W) and returns a JSON-able dict whose "value" is the
number to compare between checkpoints (lower is better for FID / KID / FVD / held-out loss, higher for CLIP).
``FeatureModels`` loads each network once, on the rank that computes the metrics, at first use.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from megassm.config.schema import EvalConfig
from megassm.eval.frechet import fid_from_features, kid_from_features
from megassm.eval.media import clip_features, frame_features, load_reference, load_video_features

log = logging.getLogger("megassm.eval")
LOWER_IS_BETTER = {"heldout_loss": True, "clip_score": False, "fid": True, "kid": True, "fvd": True}


class FeatureModels:
    """CLIP, InceptionV3 and the video network of ``eval``, each loaded at first use (bf16 on GPUs), and the
    reference set's features, computed once."""

    def __init__(self, e: EvalConfig, device: torch.device, run_cfg=None):
        self.e, self.device, self.run_cfg = e, device, run_cfg
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self._clip = self._inception = self._video = None
        self._reference: dict[str, Tensor] = {}

    @property
    def clip(self):
        if self._clip is None:
            from megassm.eval.clip_score import CLIPScorer

            self._clip = CLIPScorer(self.e.clip_model, self.device, self.dtype)
        return self._clip

    @property
    def inception(self):
        if self._inception is None:
            from megassm.eval.inception import load_inception

            self._inception = load_inception(self.e.inception, self.device, self.dtype)
        return self._inception

    @property
    def video(self):
        if self._video is None:
            self._video = load_video_features(self.e.video_features, self.device)
        return self._video

    def reference(self, kind: str) -> Tensor:
        """Features of the reference set: "frames" (Inception, (sum T, 2048)) or "clips" (video network, (N, D))."""
        if kind not in self._reference:
            clips = load_reference(self.e.reference, self.run_cfg)
            self._reference[kind] = (frame_features(self.inception, clips) if kind == "frames"
                                     else clip_features(self.video, clips, self.device))
        return self._reference[kind]


def clip_score(models: FeatureModels, clips: list[Tensor], prompts: list[str]) -> dict:
    """Mean CLIP score of each clip's frames against its prompt."""
    frames = torch.cat(clips)  # (sum T, 3, H, W)
    texts = [p for c, p in zip(clips, prompts) for _ in range(c.shape[0])]
    s = models.clip.scores(frames, texts)  # per frame 100 cos; the score clamps their mean at 0 (torchmetrics)
    return {"value": max(float(s.mean()), 0.0), "std": float(s.std()) if len(s) > 1 else 0.0, "frames": len(s),
            "model": str(models.e.clip_model)}


def fid(models: FeatureModels, clips: list[Tensor]) -> dict:
    gen, ref = frame_features(models.inception, clips), models.reference("frames")
    return {"value": fid_from_features(gen, ref), "generated_frames": len(gen), "reference_frames": len(ref),
            "reference": str(models.e.reference)}


def kid(models: FeatureModels, clips: list[Tensor]) -> dict:
    gen, ref = frame_features(models.inception, clips), models.reference("frames")
    mean, std = kid_from_features(gen, ref, models.e.kid_subset_size, models.e.kid_subsets)
    return {"value": mean, "std": std, "subset_size": min(models.e.kid_subset_size, len(gen), len(ref)),
            "generated_frames": len(gen), "reference_frames": len(ref), "reference": str(models.e.reference)}


def fvd(models: FeatureModels, clips: list[Tensor]) -> dict:
    gen, ref = clip_features(models.video, clips, models.device), models.reference("clips")
    return {"value": fid_from_features(gen, ref), "generated_videos": len(gen), "reference_videos": len(ref),
            "model": str(models.e.video_features)}


def wanted(e: EvalConfig, videos: bool, offline: bool) -> list[str]:
    """The generation metrics ``e`` configures: CLIP score with a CLIP model; KID (and offline FID) with Inception
    and a reference set; FVD (offline, videos) with a video network too."""
    names = ["clip_score"] if e.clip_model else []
    if e.inception and e.reference:
        names += ["fid", "kid"] if offline else ["kid"]
    if offline and videos and e.video_features and e.reference:
        names.append("fvd")
    return names


def compute(names: list[str], models: FeatureModels, clips: list[Tensor], prompts: list[str],
            on_error: Callable[[str, Exception], None] | None = None) -> dict[str, dict]:
    """{name: result} of the named metrics; with ``on_error`` a failing metric is reported and left out."""
    fns = {"clip_score": lambda: clip_score(models, clips, prompts), "fid": lambda: fid(models, clips),
           "kid": lambda: kid(models, clips), "fvd": lambda: fvd(models, clips)}
    out = {}
    for name in names:
        try:
            out[name] = fns[name]()
        except Exception as exc:  # noqa: BLE001 -- reported by the caller's policy
            if on_error is None:
                raise
            on_error(name, exc)
    return out


def table(results: dict[str, dict]) -> str:
    """A printable table: metric, value, (better), details."""
    rows = [("metric", "value", "better", "details")]
    for name, r in results.items():
        extra = ", ".join(f"{k}={v}" for k, v in r.items() if k != "value")
        better = "lower" if LOWER_IS_BETTER.get(name, True) else "higher"
        rows.append((name, f"{r['value']:.6g}", better, extra))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in rows)
