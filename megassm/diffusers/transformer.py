"""``HTHTransformerModel``: the HTH backbone as a diffusers model, in diffusers' timestep convention.

diffusers' flow-matching schedulers hand the model ``timestep = sigma * 1000`` (0-1000, 1000 = noise);
megassm's model takes t in [0, 1] and its sinusoidal embedding multiplies by 1000 itself, so the
wrapper divides by 1000 and nothing else changes. The weights are the megassm model's, under ``hth.``.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor

from megassm.config.schema import ModelConfig
from megassm.config.validate import ConfigError
from megassm.models import HTHModel

NUM_TRAIN_TIMESTEPS = 1000  # diffusers' timestep = t * 1000


def model_config_from_dict(hth: dict) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(hth) - known)
    if unknown:
        raise ConfigError(f"transformer config: unknown model keys {unknown}; valid: {sorted(known)}")
    return ModelConfig(**hth)


class HTHTransformerModel(ModelMixin, ConfigMixin):
    """diffusers wrapper of ``megassm.models.HTHModel``. Its config.json holds the ``model:`` section's keys flat,
    as diffusers models do (``HTHTransformerModel(**asdict(model_cfg))``); ``megassm_model`` (the section as
    one dict) is what exports before that wrote, still read."""

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, name: str = "hth-tiny", in_channels: int = 4, patch_size: tuple = (1, 2, 2),
                 d_model: int = 128, pattern: str = "hvAh", d_state: int = 64, d_conv: int = 7, expand: int = 2,
                 headdim: int = 64, ngroups: int = 1, chunk_size: int = 256, num_heads: int = 4,
                 qk_norm: bool = True, rope_theta: float = 10000.0, attention_backend: str = "auto",
                 fuse_elementwise: bool = True, abs_pos_embed: bool = False, mlp_ratio: float = 4.0,
                 text_dim: int = 64, max_text_len: int = 32, ssd_impl: str = "auto", hydra_path: str = "auto",
                 fp8: str = "none", compile: str = "none", megassm_model: dict | None = None):
        # fp8 / compile: training settings (megassm/train/speed.py), kept so that the config round-trips
        given = dict(locals())
        super().__init__()
        flat = {f.name: given[f.name] for f in fields(ModelConfig)}
        flat["patch_size"] = list(flat["patch_size"])
        self.hth = HTHModel(model_config_from_dict(megassm_model or flat))

    @property
    def in_channels(self) -> int:
        return self.hth.cfg.in_channels

    def token_count(self, latent_shape: tuple[int, ...]) -> int:
        """Tokens of a latent of shape (B, C, T, H, W) after patchify."""
        T, H, W = self.hth.patch_embed.grid(tuple(latent_shape))
        return T * H * W

    def forward(self, hidden_states: Tensor, timestep: Tensor | float, encoder_hidden_states: Tensor,
                encoder_attention_mask: Tensor | None = None, return_dict: bool = True):
        """hidden_states (B, C, T, H, W) latents; timestep (B,) or scalar in [0, 1000] (1000 = noise);
        encoder_hidden_states (B, Lt, text_dim); encoder_attention_mask (B, Lt), nonzero = valid token.

        Returns the velocity (noise - data), (B, C, T, H, W), as ``.sample`` (or a 1-tuple).
        """
        assert hidden_states.dim() == 5, f"hidden_states must be (B, C, T, H, W), got {tuple(hidden_states.shape)}"
        B = hidden_states.shape[0]
        t = torch.as_tensor(timestep, device=hidden_states.device, dtype=torch.float32)
        t = t.expand(B) if t.dim() == 0 else t.float()
        mask = None if encoder_attention_mask is None else encoder_attention_mask.bool()
        v = self.hth(hidden_states, t / NUM_TRAIN_TIMESTEPS, encoder_hidden_states, mask)
        return Transformer2DModelOutput(sample=v) if return_dict else (v,)
