"""Random-weight stand-ins for the metric networks, for tests and dry runs (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from megassm.eval.inception import InceptionV3Features, save_inception


def save_random_inception(path: str | Path, input_size: int = 75, seed: int = 0) -> Path:
    """An InceptionV3 with random He-initialised convolutions (features of order 1, not ~1e-8 as with the default
    init), at a small input size so a CPU runs it quickly."""
    torch.manual_seed(seed)
    net = InceptionV3Features(input_size)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    save_inception(net, path)
    return Path(path)


def save_tiny_clip(path: str | Path, seed: int = 0, image_size: int = 16):
    """A 1-layer transformers CLIPModel with a byte-level tokenizer (ByT5: no vocab file); returns the model."""
    from transformers import ByT5Tokenizer, CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config={"vocab_size": 384, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 64, "eos_token_id": 1, "pad_token_id": 0,
                     "bos_token_id": 0},
        vision_config={"image_size": image_size, "patch_size": 4, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=16)
    model = CLIPModel(cfg)
    model.save_pretrained(path)
    ByT5Tokenizer().save_pretrained(path)
    return model
