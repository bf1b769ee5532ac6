"""The HTH model: patchify -> N blocks (Hydra or attention mixer, cross-attn, FFN) -> unpatchify.

The model knows nothing of diffusion or parallelism: it maps noisy latents, a timestep and text
embeddings to a velocity of the latents' shape.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from megassm.config.schema import ModelConfig
from megassm.models.block import HTHBlock, TokenGrid, modulate
from megassm.models.embed import PatchEmbed, TimestepEmbedder, unpatchify
from megassm.models.mixers import mixer_for_symbol
from megassm.models.rules import validate_model


class FinalLayer(nn.Module):
    def __init__(self, d_model: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, d_model))
        self.linear = nn.Linear(d_model, out_dim)

    def forward(self, x: Tensor, t_emb: Tensor) -> Tensor:
        shift, scale = (self.scale_shift_table[None] + t_emb[:, None]).unsqueeze(2).unbind(1)  # (B, 1, d)
        return self.linear(modulate(self.norm(x), shift, scale))


class HTHModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_model(cfg)
        self.cfg = cfg
        d = cfg.d_model
        self.patch_embed = PatchEmbed(cfg.in_channels, tuple(cfg.patch_size), d, cfg.abs_pos_embed)
        self.t_embedder = TimestepEmbedder(d)
        # AdaLN-single: one shared projection of the timestep to 6 modulation vectors per block
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.y_embedder = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        # learned "empty caption", used where a sample has no valid text token (CFG / caption dropout)
        self.y_null = nn.Parameter(torch.randn(cfg.max_text_len, cfg.text_dim) * cfg.text_dim**-0.5)
        self.blocks = nn.ModuleList(HTHBlock(cfg, s) for s in cfg.pattern)
        self.final_layer = FinalLayer(d, cfg.in_channels * math.prod(cfg.patch_size))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        keep = {f"blocks.{i}.mixer.{leaf}" for i, s in enumerate(self.cfg.pattern)
                for leaf in mixer_for_symbol(s).keep_init}  # e.g. Hydra's fc_D keeps nn.Linear's init
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and name not in keep:
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # zero-init (adaLN-Zero): every residual gate starts closed and the output layer at zero,
        # so the untrained model is the identity on its residual stream and predicts v = 0.
        nn.init.zeros_(self.t_block[1].weight)
        nn.init.zeros_(self.t_block[1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def token_grid(self, latents: Tensor) -> TokenGrid:
        return TokenGrid.for_blocks(self.patch_embed.grid(latents.shape), latents.device, self.cfg, self.blocks)

    def embed_text(self, text: Tensor, text_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """text (B, Lt, text_dim), mask (B, Lt) -> (B, Lt, d), mask; empty captions become y_null."""
        return embed_text(self.cfg, self.y_null, self.y_embedder, text, text_mask)

    def forward(self, latents: Tensor, t: Tensor, text: Tensor, text_mask: Tensor | None = None) -> Tensor:
        """latents (B, C, T, H, W), t (B,) in [0, 1], text (B, Lt, text_dim), text_mask (B, Lt) bool.

        Returns the predicted velocity, (B, C, T, H, W).
        """
        grid = self.token_grid(latents)
        if t.shape != (latents.shape[0],):
            raise ValueError(f"t must have shape ({latents.shape[0]},), got {tuple(t.shape)}")
        x = self.patch_embed(latents)  # (B, L, d)
        t_emb = self.t_embedder(t)  # (B, d)
        t_mod = self.t_block(t_emb)  # (B, 6d)
        y, y_mask = self.embed_text(text, text_mask)
        for blk in self.blocks:
            x = blk(x, t_mod, y, y_mask, grid)
        x = self.final_layer(x, t_emb)  # (B, L, C*pt*ph*pw)
        return unpatchify(x, grid.grid, self.cfg.patch_size, self.cfg.in_channels)

    def set_pattern(self, pattern: str) -> list[str]:
        """Change scan orders in place (same weights); returns a description of each change."""
        if len(pattern) != len(self.blocks):
            raise ValueError(f"pattern {pattern!r} has {len(pattern)} blocks, the model has {len(self.blocks)}")
        changes = []
        for i, (blk, s) in enumerate(zip(self.blocks, pattern)):
            if blk.symbol != s:
                changes.append(f"block {i}: '{blk.symbol}' -> '{s}'")
                blk.set_scan_order(s)
        self.cfg.pattern = pattern
        return changes


def embed_text(cfg: ModelConfig, y_null: Tensor, y_embedder: nn.Module, text: Tensor,
               text_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """The text path of HTHModel (also run by the first pipeline stage, which holds these two modules).

    text (B, Lt, text_dim), mask (B, Lt) bool or None -> (B, Lt, d), mask; a sample without any valid
    token (a dropped caption) gets the learned null caption ``y_null`` (max_text_len, text_dim).
    """
    B, Lt, Dt = text.shape
    if Dt != cfg.text_dim:
        raise ValueError(f"text embeddings have width {Dt}, the model expects text_dim={cfg.text_dim}")
    if Lt > cfg.max_text_len:
        raise ValueError(f"text has {Lt} tokens, more than model.max_text_len={cfg.max_text_len}")
    if text_mask is None:
        text_mask = torch.ones(B, Lt, dtype=torch.bool, device=text.device)
    text = text.to(y_null.dtype)  # the reader's dtype (bf16 by default) -> the parameters' dtype
    empty = ~text_mask.any(dim=1)  # (B,)
    null = y_null[:Lt].expand(B, Lt, Dt)
    text = torch.where(empty[:, None, None], null, text)
    text_mask = text_mask | empty[:, None]
    return y_embedder(text), text_mask


def build_model(cfg: ModelConfig) -> HTHModel:
    return HTHModel(cfg)
