"""``builtin:words``, the demo's text encoder: a fixed (seeded, untrained) embedding per lower-cased word --
any prompt encodes, known words mean what training showed (the procedural data, ``megassm/data/procedural.py``)."""

from __future__ import annotations

import hashlib
import re

import torch
from torch import Tensor


class WordEmbeddingEncoder:
    """Fixed random embedding per word: "a red square" -> (3, dim). Deterministic across runs."""

    identity = "builtin:words"

    def __init__(self, dim: int, max_len: int):
        self.dim, self.max_len = dim, max_len

    def _word(self, word: str) -> Tensor:
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
        return torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))

    def __call__(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """prompts -> text (B, max_len, dim) float32, mask (B, max_len) bool (True = valid)."""
        text = torch.zeros(len(prompts), self.max_len, self.dim)
        mask = torch.zeros(len(prompts), self.max_len, dtype=torch.bool)
        for i, p in enumerate(prompts):
            words = re.findall(r"[a-z0-9]+", p.lower())[: self.max_len]
            for j, w in enumerate(words):
                text[i, j] = self._word(w)
            mask[i, : len(words)] = True
        return text, mask
