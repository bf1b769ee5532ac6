"""Encoders between pixels / captions and what the model reads, loaded from local directories only.

    latent_norm.py  LatentNorm: model latent = (vae_latent - shift) * scale (reader, sampler, diffusers)
    vae.py          VAEEncoder (a diffusers autoencoder), LatentDecoder (model latents -> pixels)
    text.py         TextEncoder (builtin:words or a transformers encoder), TransformersTextModel
    words.py        WordEmbeddingEncoder: builtin:words, the demo's (a fixed embedding per word)
    common.py       EncoderError, fingerprints and identities, device choice
"""

from megassm.encoders.common import DTYPES, EncoderError, fingerprint, identity_summary, pick_device
from megassm.encoders.latent_norm import LatentNorm
from megassm.encoders.text import TextEncoder, TransformersTextModel
from megassm.encoders.vae import VIDEO_VAE_CLASSES, LatentDecoder, VAEEncoder

__all__ = ["DTYPES", "VIDEO_VAE_CLASSES", "EncoderError", "LatentDecoder", "LatentNorm", "TextEncoder",
           "TransformersTextModel", "VAEEncoder", "fingerprint", "identity_summary", "pick_device"]
