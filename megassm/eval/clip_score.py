"""CLIP score: how well images agree with their prompts, with a transformers CLIP model from a local directory.

CLIP score = max(100 x mean over the pairs of cos(E_image(image), E_text(prompt)), 0) -- torchmetrics'
``CLIPScore`` (which clamps the mean, not each pair; Hessel et al. 2021 scale by 2.5 instead of 100).
Images are preprocessed exactly as the directory's saved processor says (``preprocessor_config.json``, or the
``processor_config.json`` that ``CLIPProcessor.save_pretrained`` writes under transformers 5): as uint8
pixels through its image processor, so a non-square image is resized on its shortest edge and centre-cropped
as CLIP was trained. A directory without one gets OpenAI CLIP's processing at the model's image size.
"""

from __future__ import annotations

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
        self.processor = _image_processor(path, self.image_size)

    @torch.no_grad()
    def embed_images(self, images: Tensor) -> Tensor:
        """images (N, 3, H, W) in [0, 1] -> unit image embeddings (N, E) float32 on the CPU."""
        assert images.dim() == 4 and images.shape[1] == 3, f"need (N, 3, H, W) images, got {tuple(images.shape)}"
        pixels = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)  # as an image file holds
        x = self.processor(images=list(pixels), return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        return F.normalize(_projected(self.model.get_image_features(pixel_values=x)), dim=-1).cpu()

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> Tensor:
        """N prompts -> unit text embeddings (N, E) float32 on the CPU (truncated to the model's context)."""
        tok = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
        out = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                           attention_mask=tok["attention_mask"].to(self.device))
        return F.normalize(_projected(out), dim=-1).cpu()

    def scores(self, images: Tensor, prompts: list[str]) -> Tensor:
        """(N,) per-pair 100 x cos of images (N, 3, H, W) against their N prompts (not clamped: the mean is)."""
        assert images.shape[0] == len(prompts), (images.shape, len(prompts))
        return 100 * (self.embed_images(images) * self.embed_texts(prompts)).sum(-1)

    def __call__(self, images: Tensor, prompts: list[str]) -> float:
        """The CLIP score of the pairs, max(mean of ``scores``, 0) as torchmetrics."""
        return max(float(self.scores(images, prompts).mean()), 0.0)


def _image_processor(path: Path, image_size: int):
    """The directory's saved image processor, else OpenAI CLIP's (shortest-edge bicubic resize to the model's
    image size, centre crop, OpenAI mean / std)."""
    from transformers import AutoImageProcessor, CLIPImageProcessor

    if (path / "preprocessor_config.json").is_file() or (path / "processor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(path, local_files_only=True)
    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                              image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD))
