"""``megassm plan --sample``: predicted GPU memory and time of ``megassm sample`` for a config on one GPU (or split
over ``--gpus`` by CP sampling, ``sample --cp``).

    weights      2P bytes (bf16), whole on every GPU
    encoders     2 bytes per parameter of the text encoder and the VAE (the compute dtype): read from their
                 safetensors headers where encoders.* are local directories, else assumed T5-v1.1-XXL (text_dim
                 4096) and a Wan-sized VAE (plan.py). The VAE stays for the whole run; the text encoder encodes
                 every prompt and is freed before the model is loaded, so the peak is the VAE + the larger of
                 the text encoder and the denoiser (weights + activations)
    activations  branches x L / cp tokens x INFERENCE_SHARE x the largest block's training activation bytes per
                 token (``accounting.activation_bytes_per_token``): no autograd graph, one block at a time, and
                 that block's transient working set is about half of what training keeps for its backward
    step         forward FLOPs of both CFG branches / (cp x peak x INFERENCE_MFU); sample_steps of them
Both constants are measured: full hth-5b on one H100, 2048^2 and 360p x 129 frames, hybrid and all-attention, with
and without CFG (benchmarks/results/full_size_sample_h100.json, the denoiser alone in-process; ``tests/unit/
test_sample_plan.py`` holds the prediction's ``denoiser_gb`` to those eight measurements).
"""

from __future__ import annotations

import math
from pathlib import Path

from megassm.config.schema import RunConfig
from megassm.models.accounting import activation_bytes_per_token, forward_flops, param_counts

GB = 1e9
INFERENCE_SHARE = 0.5  # measured 0.49-0.51 of a block's training activations (module doc)
INFERENCE_MFU = 0.48  # measured 0.47-0.51 of the bf16 datasheet peak per denoising step on an H100
WORKSPACE = 0.25 * GB


def predict_sampling(cfg: RunConfig, seq_len: int, cp: int = 1, peak_tflops: float = 989.0,
                     gpu_mem_gb: float = 80.0) -> dict:
    m, dcfg = cfg.model, cfg.diffusion
    branches = 2 if dcfg.cfg_scale > 1 else 1
    tokens = branches * seq_len / cp
    block = max(activation_bytes_per_token(m, s) for s in set(m.pattern))
    weights = 2 * param_counts(m)["total"]
    activations = tokens * INFERENCE_SHARE * block
    text_params, vae_params, _ = encoder_sizes(cfg)
    text_enc, vae = 2 * text_params, 2 * vae_params
    denoiser = weights + activations + WORKSPACE  # what the denoising steps alone hold (the measured rows)
    total = max(denoiser, text_enc + WORKSPACE) + vae
    step_s = forward_flops(m, seq_len, branches) / cp / (peak_tflops * 1e12 * INFERENCE_MFU)
    return {"seq_len": seq_len, "cp": cp, "cfg_branches": branches, "weights_gb": weights / GB,
            "activations_gb": activations / GB, "text_encoder_gb": text_enc / GB, "vae_gb": vae / GB,
            "encoders_gb": (text_enc + vae) / GB, "denoiser_gb": denoiser / GB, "total_gb": total / GB,
            "fits": total <= 0.9 * gpu_mem_gb * GB,
            "step_s": step_s, "sample_steps": dcfg.sample_steps, "total_s": step_s * dcfg.sample_steps}


# the encoders, when their directories are not on this machine (assumed, not measured); plan.py's previews too
ASSUMED_TEXT_ENCODER_PARAMS = 4.76e9  # the T5-v1.1-XXL encoder (text_dim 4096)
ASSUMED_VAE_PARAMS = 1.27e8  # a Wan-2.1-sized video VAE


def safetensors_params(directory: str) -> float | None:
    """Parameters in a local model directory's *.safetensors files (headers only); None if there are none."""
    files = sorted(Path(directory).glob("**/*.safetensors")) if Path(directory).is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for f in files:
        with safe_open(str(f), "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return float(total)


def encoder_sizes(cfg: RunConfig) -> tuple[float, float, dict[str, str]]:
    """(text encoder parameters, VAE parameters, where each size came from) for ``cfg.encoders``: their
    safetensors headers where they are local directories, else the assumed sizes; builtin ones: 0."""
    enc, source = cfg.encoders, {}
    text = vae = 0.0
    if not enc.text_encoder.startswith("builtin:"):
        found = safetensors_params(enc.text_encoder)
        text = found if found is not None else ASSUMED_TEXT_ENCODER_PARAMS * (cfg.model.text_dim == 4096)
        source["text_encoder"] = enc.text_encoder if found is not None else "assumed T5-v1.1-XXL encoder"
    if not enc.vae.startswith("builtin:"):
        found = safetensors_params(enc.vae)
        vae = found if found is not None else ASSUMED_VAE_PARAMS
        source["vae"] = enc.vae if found is not None else "assumed Wan-2.1-sized VAE"
    return text, vae, source


def print_sampling(p: dict) -> None:
    print(f"\nsampling (megassm sample{' --cp ' + str(p['cp']) if p['cp'] > 1 else ''}), {p['seq_len']:,} tokens, "
          f"{p['cfg_branches']} CFG branch(es): VAE {p['vae_gb']:.2f} GB + the larger of the text encoder "
          f"{p['text_encoder_gb']:.2f} GB (freed before the model loads) and the denoiser: weights "
          f"{p['weights_gb']:.2f} GB + activations {p['activations_gb']:.2f} GB = {p['total_gb']:.2f} GB "
          f"per GPU ({'fits' if p['fits'] else 'DOES NOT FIT'}"
          f"{'' if p['cp'] > 1 or not p['fits'] else ': no CP needed'}); {p['step_s'] * 1e3:.0f} ms per denoising "
          f"step, {p['total_s']:.1f} s for {p['sample_steps']} steps (steady state: with a cold Triton cache the "
          f"first step adds its kernel autotuning, about 35 s at 360p x 129 frames and 7 s at 2048^2 on an H100; "
          f"TRITON_CACHE_DIR, docs/performance.md)")
