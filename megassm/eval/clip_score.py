"""CLIP score: how well images agree with their prompts, with a transformers CLIP model from a local directory.

score(image, prompt) = 100 x max(cos(E_image(image), E_text(prompt)), 0), averaged over the pairs (the
torchmetrics convention; Hessel et al. 2021 scale by 2.5 instead of 100). Images are resized to the model's
``vision_config.image_size`` (bicubic) and normalised with the directory's preprocessor_config.json mean/std,
or OpenAI CLIP's when it has none.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from megassm.eval.inception import MissingWeightsError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _projected(out) -> Tensor:
    """The projected embedding (N, E) float32: transformers < 5 return it, >= 5 an output with it as pooler_output."""
    return (out if torch.is_tensor(out) else out.pooler_output).float()


class CLIPScorer:
    """Loads once (``dtype`` bf16 on GPUs); call with images (N, 3, H, W) in [0, 1] and N prompts."""

    def __init__(self, path: str | Path, device: torch.device, dtype: torch.dtype = torch.float32):
        path = Path(path)
        if not (path / "config.json").is_file():
            raise MissingWeightsError(
                f"CLIP model not found at {path} (nothing is downloaded): give a local directory holding a "
                "transformers CLIPModel and its tokenizer, e.g. CLIPModel.from_pretrained('openai/clip-vit-large-"
                "patch14').save_pretrained(DIR) plus CLIPProcessor...save_pretrained(DIR) on a machine with access")
        from transformers import AutoTokenizer, CLIPModel

        self.model = CLIPModel.from_pretrained(path, local_files_only=True, dtype=dtype).to(device).eval()
        self.model.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.device, self.dtype = device, dtype
        self.image_size = int(self.model.config.vision_config.image_size)
        self.max_len = int(self.model.config.text_config.max_position_embeddings)
        mean, std = OPENAI_MEAN, OPENAI_STD
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            p = json.loads(pre.read_text())
            mean, std = p.get("image_mean", mean), p.get("image_std", std)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    @torch.no_grad()
    def embed_images(self, images: Tensor) -> Tensor:
        """images (N, 3, H, W) in [0, 1] -> unit image embeddings (N, E) float32 on the CPU."""
        assert images.dim() == 4 and images.shape[1] == 3, f"need (N, 3, H, W) images, got {tuple(images.shape)}"
        x = F.interpolate(images.float().cpu(), size=(self.image_size,) * 2, mode="bicubic", align_corners=False,
                          antialias=True).clamp(0, 1)
        x = ((x - self.mean) / self.std).to(self.device, self.dtype)
        return F.normalize(_projected(self.model.get_image_features(pixel_values=x)), dim=-1).cpu()

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> Tensor:
        """N prompts -> unit text embeddings (N, E) float32 on the CPU (truncated to the model's context)."""
        tok = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
        out = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                           attention_mask=tok["attention_mask"].to(self.device))
        return F.normalize(_projected(out), dim=-1).cpu()

    def scores(self, images: Tensor, prompts: list[str]) -> Tensor:
        """(N,) per-pair scores 100 x max(cos, 0) of images (N, 3, H, W) against their N prompts."""
        assert images.shape[0] == len(prompts), (images.shape, len(prompts))
        cos = (self.embed_images(images) * self.embed_texts(prompts)).sum(-1)
        return 100 * cos.clamp_min(0)

    def __call__(self, images: Tensor, prompts: list[str]) -> float:
        return float(self.scores(images, prompts).mean())
