"""``megassm convert to-diffusers``: any megassm checkpoint -> a diffusers pipeline directory.

    OUT/model_index.json          HTHPipeline + its settings (latent normalisation, timestep shift, defaults)
    OUT/transformer/              HTHTransformerModel: config.json + diffusion_pytorch_model.safetensors
    OUT/vae/, OUT/text_encoder/, OUT/tokenizer/, OUT/scheduler/   the encoders the checkpoint was trained with

With the demo's builtin encoders (builtin:pixels / builtin:words) there is no diffusers VAE or transformers
text encoder to hand over: only ``transformer/`` is written, and a note says so.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from megassm.checkpoint.safetensors_io import atomic_directory
from megassm.sample import load_model_for_sampling, training_latent_shape

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def to_diffusers(source: str | Path, out: str | Path, *, use_ema: bool = True, vae: str | None = None,
                 text_encoder: str | None = None, tokenizer: str | None = None, dtype: str = "fp32",
                 force: bool = False) -> tuple[dict, list[str]]:
    """Write the pipeline directory; returns (meta, notes)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from megassm.diffusers.pipeline import HTHPipeline
    from megassm.diffusers.transformer import HTHTransformerModel
    from megassm.encoders import TextEncoder, VAEEncoder

    model, cfg, info = load_model_for_sampling(source, use_ema=use_ema, merge=True)  # a LoRA run: folded in
    enc = cfg.encoders
    enc.vae, enc.text_encoder, enc.tokenizer = vae or enc.vae, text_encoder or enc.text_encoder, \
        tokenizer or enc.tokenizer
    transformer = HTHTransformerModel(**asdict(cfg.model))
    transformer.hth.load_state_dict(model.state_dict(), strict=True)
    transformer.to(DTYPES[dtype])
    notes = []
    meta = {"parameters": sum(p.numel() for p in transformer.parameters()),
            "tensors": len(transformer.state_dict()), "step": info["step"], "ema": info["weights"] == "ema"}
    builtin = [k for k, v in (("vae", enc.vae), ("text_encoder", enc.text_encoder)) if v.startswith("builtin:")]
    with atomic_directory(Path(out), force=force) as tmp:
        if builtin:
            notes.append(f"{', '.join(builtin)} builtin ({enc.vae}, {enc.text_encoder}): wrote only transformer/; "
                         "pass --vae / --text-encoder with local diffusers / transformers directories for a pipeline")
            transformer.save_pretrained(tmp / "transformer")
            return meta, notes
        cpu = torch.device("cpu")
        trained, _ = training_latent_shape(cfg)
        vae_model = VAEEncoder(enc.vae, cpu, torch.float32).model
        text = TextEncoder(enc, None, cpu, torch.float32, max_length=cfg.model.max_text_len).hf
        pipe = HTHPipeline(transformer, vae_model, text.model, text.tokenizer,
                           FlowMatchEulerDiscreteScheduler(shift=1.0), latent_scale=enc.vae_scale,
                           latent_shift=enc.vae_shift, shift=cfg.diffusion.shift,
                           shift_base_tokens=cfg.diffusion.shift_base_tokens,
                           sample_steps=cfg.diffusion.sample_steps, cfg_scale=cfg.diffusion.cfg_scale,
                           sample_latent_hw=list(trained[1:]) if trained else None)
        pipe.save_pretrained(tmp)
    return meta, notes
