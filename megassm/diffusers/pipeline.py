"""``HTHPipeline``: text -> image / video with an HTH transformer, a diffusers VAE and a transformers
text encoder, in the same steps as ``megassm sample``:

prompt -> tokenizer + text encoder (padded to the model's max_text_len) -> noise from each sample's
generator -> Euler flow matching from t = 1 to 0 (FlowMatchEulerDiscreteScheduler on megassm's shifted
sigmas) with CFG against the model's null caption or a negative prompt -> un-normalise -> VAE decode.

The resolution timestep shift (``shift`` or sqrt(tokens / shift_base_tokens)) is computed here and handed
to the scheduler as explicit sigmas, so the scheduler's own ``shift`` must be 1 (as ``to-diffusers`` writes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from megassm.config.schema import DiffusionConfig
from megassm.diffusers.transformer import HTHTransformerModel
from megassm.diffusion.flow import resolution_shift, shift_t
from megassm.encoders import VIDEO_VAE_CLASSES, LatentNorm

DEFAULT_LATENT_HW = 32  # latent side when no size is asked for nor recorded (256 px at VAE x8)


@dataclass
class HTHPipelineOutput(BaseOutput):
    """images: PIL list (one frame each) / np (B, T, H, W, 3) / pt (B, T, 3, H, W) in [0, 1], or latents
    (B, C, T, h, w) for output_type="latent"."""

    images: object


# diffusers' layout for a pipeline class outside diffusers: model_index.json names ["pipeline_hth", "HTHPipeline"]
# and the directory holds pipeline_hth.py; DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True) imports
# it. Ours is one import of this module (megassm must be installed), nothing else.
SHIM_MODULE = "pipeline_hth"
SHIM_SOURCE = ('"""megassm\'s HTHPipeline for DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True); needs '
               '`pip install megassm`."""\n\nfrom megassm.diffusers.pipeline import HTHPipeline  # noqa: F401\n')


class HTHPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """diffusers' save, in the layout of an out-of-tree pipeline (``SHIM_MODULE``)."""
        import json
        from pathlib import Path

        super().save_pretrained(save_directory, *args, **kwargs)
        d = Path(save_directory)
        index = json.loads((d / "model_index.json").read_text())
        index["_class_name"] = [SHIM_MODULE, type(self).__name__]
        (d / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (d / f"{SHIM_MODULE}.py").write_text(SHIM_SOURCE)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """As diffusers'; the directory's ``pipeline_hth.py`` is run without ``trust_remote_code`` only when it is
        megassm's own one-line import (any other content needs trust_remote_code=True, as in diffusers)."""
        from pathlib import Path

        shim = Path(pretrained_model_name_or_path) / f"{SHIM_MODULE}.py"
        if "trust_remote_code" not in kwargs and shim.is_file() and shim.read_text() == SHIM_SOURCE:
            kwargs["trust_remote_code"] = True
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def __init__(self, transformer: HTHTransformerModel, vae, text_encoder, tokenizer,
                 scheduler: FlowMatchEulerDiscreteScheduler, latent_scale: float | list[float] | None = None,
                 latent_shift: float | list[float] | None = None, shift: float | None = None,
                 shift_base_tokens: int = 256, sample_steps: int = 30, cfg_scale: float = 4.0,
                 sample_latent_hw: list[int] | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler)
        # latents fed to the model = (vae_latent - shift) * scale; None: the VAE config's own values;
        # sample_latent_hw: the latent (h, w) the model was trained at, the size when none is asked for
        self.register_to_config(latent_scale=latent_scale, latent_shift=latent_shift, shift=shift,
                                shift_base_tokens=shift_base_tokens, sample_steps=sample_steps, cfg_scale=cfg_scale,
                                sample_latent_hw=sample_latent_hw)
        vc = vae.config
        self.is_video_vae = type(vae).__name__ in VIDEO_VAE_CLASSES
        self.vae_spatial = int(getattr(vc, "scale_factor_spatial", 0) or 2 ** (len(vc.block_out_channels) - 1))
        self.vae_temporal = int(getattr(vc, "scale_factor_temporal", 1) or 1) if self.is_video_vae else 1

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """-> text (B, max_text_len, text_dim) float32, mask (B, max_text_len) bool (as megassm's TextEncoder)."""
        max_len = self.transformer.hth.cfg.max_text_len
        tok = self.tokenizer(prompts, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
        ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
        text = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        pad = max_len - text.shape[1]
        return torch.nn.functional.pad(text, (0, 0, 0, pad)), torch.nn.functional.pad(mask.bool(), (0, pad))

    def latent_norm(self) -> LatentNorm:
        """The configured scale / shift, else the VAE config's own (as preprocessing and ``megassm sample``)."""
        return LatentNorm.from_vae_config(dict(self.vae.config), self.config.latent_scale, self.config.latent_shift)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, T, h, w) model latents -> (B, T', 3, H, W) pixels in [0, 1], float32."""
        z = self.latent_norm().denormalise(latents).to(self.vae.dtype)
        if self.is_video_vae:
            pix = self.vae.decode(z).sample  # (B, 3, T', H, W)
        else:
            b, c, t, h, w = z.shape
            x = self.vae.decode(z.transpose(1, 2).reshape(b * t, c, h, w)).sample  # frames independently
            pix = x.reshape(b, t, *x.shape[1:]).transpose(1, 2)
        return ((pix.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4)

    def _latent_shape(self, batch: int, height: int | None, width: int | None, frames: int) -> tuple[int, ...]:
        cfg = self.transformer.hth.cfg
        if height is None or width is None:  # the training size (as megassm sample), else 32 x 32
            h, w = self.config.get("sample_latent_hw") or (DEFAULT_LATENT_HW, DEFAULT_LATENT_HW)
        else:
            f, (_, ph, pw) = self.vae_spatial, cfg.patch_size
            if height % (f * ph) or width % (f * pw):
                raise ValueError(f"size {height}x{width} is not a multiple of VAE factor x patch = {f * ph}x{f * pw}")
            h, w = height // f, width // f
        tf = self.vae_temporal
        if frames < 1 or (frames - 1) % tf:
            raise ValueError(f"num_frames={frames}: videos have 1 + k*{tf} frames with this VAE (temporal stride {tf})")
        latent_frames = 1 + (frames - 1) // tf
        if latent_frames % cfg.patch_size[0]:
            raise ValueError(f"num_frames={frames} gives {latent_frames} latent frames, not a multiple of the temporal "
                             f"patch {cfg.patch_size[0]}")
        return (batch, cfg.in_channels, latent_frames, h, w)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 height: int | None = None, width: int | None = None, num_frames: int = 1,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True):
        """height / width in pixels; num_frames: output frames (as diffusers' video pipelines and ``megassm sample
        --frames``: 1 + k * the VAE's temporal stride).

        With one generator per prompt, sample i's noise is ``torch.randn`` from generator i, as
        ``megassm sample --seed`` draws it, so the two give the same latents (README states the tolerance).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        B, device = len(prompts), self._execution_device
        steps = num_inference_steps or self.config.sample_steps
        scale = self.config.cfg_scale if guidance_scale is None else guidance_scale
        dtype = self.transformer.dtype
        shape = self._latent_shape(B, height, width, num_frames)
        x = latents.float() if latents is not None else \
            randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32)
        x = x.to(device)
        text, mask = self.encode_prompt(prompts, device)
        if negative_prompt is None:  # the model's null caption: an all-False mask
            neg_text, neg_mask = torch.zeros_like(text), torch.zeros_like(mask)
        else:
            negs = [negative_prompt] * B if isinstance(negative_prompt, str) else list(negative_prompt)
            neg_text, neg_mask = self.encode_prompt([n or "" for n in negs], device)
            neg_mask = neg_mask & torch.tensor([bool(n) for n in negs], device=device)[:, None]
        diffusion = DiffusionConfig(shift=self.config.shift, shift_base_tokens=self.config.shift_base_tokens)
        s = resolution_shift(diffusion, self.transformer.token_count(shape))
        sigmas = shift_t(torch.linspace(1.0, 0.0, steps + 1), s)[:-1].numpy().astype(np.float64)
        self.scheduler.set_timesteps(sigmas=sigmas.tolist(), device=device)
        use_cfg = scale != 1.0
        for t in self.progress_bar(self.scheduler.timesteps):
            xin = x.to(dtype)
            tt = t.expand(B).float()
            if use_cfg:
                v = self.transformer(torch.cat([xin, xin]), torch.cat([tt, tt]), torch.cat([text, neg_text]).to(dtype),
                                     torch.cat([mask, neg_mask])).sample.float()
                v_c, v_u = v.chunk(2)
                v = v_u + scale * (v_c - v_u)
            else:
                v = self.transformer(xin, tt, text.to(dtype), mask).sample.float()
            x = self.scheduler.step(v, t, x).prev_sample.float()
        if output_type == "latent":
            images = x
        else:
            pix = self.decode_latents(x).cpu()  # (B, T, 3, H, W)
            if output_type == "pt":
                images = pix
            elif output_type == "np":
                images = pix.permute(0, 1, 3, 4, 2).numpy()
            elif output_type == "pil":
                from PIL import Image

                arr = (pix[:, 0].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
                images = [Image.fromarray(a) for a in arr]
            else:
                raise ValueError(f"output_type={output_type!r}; valid: pil, np, pt, latent")
        self.maybe_free_model_hooks()
        return HTHPipelineOutput(images=images) if return_dict else (images,)
