"""Captions -> text embeddings: the one ``TextEncoder`` (the demo's builtin:words, or a local transformers
encoder through ``TransformersTextModel``), used by preprocessing, sampling, previews, evaluation and the
diffusers export alike.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megassm.config.schema import EncoderConfig, ModelConfig
from megassm.config.validate import ConfigError
from megassm.encoders.common import EncoderError, _read_config, fingerprint
from megassm.encoders.words import WordEmbeddingEncoder


class TextEncoder:
    """``enc.text_encoder``: 'builtin:words' (a fixed word-embedding table) or a local transformers directory.

    With ``model_cfg`` (sampling, previews): ``__call__`` gives what the model reads, padded to
    ``model_cfg.max_text_len`` and checked against its ``text_dim``. Without (preprocessing): ``max_length``
    tokens at most, and ``encode`` gives the encoder's own output (unpadded, with truncation flags).
    """

    def __init__(self, enc: EncoderConfig, model_cfg: ModelConfig | None, device: torch.device,
                 dtype: torch.dtype = torch.float32, max_length: int | None = None):
        self.max_len = model_cfg.max_text_len if model_cfg is not None else int(max_length or 512)
        self.device = device
        self.builtin, self.hf = None, None
        if enc.text_encoder == "builtin:words":
            if model_cfg is None:
                raise EncoderError("builtin:words has no width of its own: it needs the model config's text_dim")
            self.builtin = WordEmbeddingEncoder(model_cfg.text_dim, model_cfg.max_text_len)
            return
        if model_cfg is not None and not Path(enc.text_encoder).is_dir():
            raise ConfigError(f"encoders.text_encoder={enc.text_encoder!r} is not a local directory (nothing is "
                              "downloaded); give the path of a saved transformers encoder or 'builtin:words'")
        self.hf = TransformersTextModel(enc.text_encoder, device, dtype, max_length=self.max_len,
                                        tokenizer_path=enc.tokenizer)
        if model_cfg is not None and self.hf.hidden_size != model_cfg.text_dim:
            raise ConfigError(f"text encoder {enc.text_encoder} has width {self.hf.hidden_size}, the checkpoint's "
                              f"model expects text_dim={model_cfg.text_dim}")

    @property
    def identity(self) -> dict | str:
        return self.builtin.identity if self.builtin is not None else self.hf.identity

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """The transformers encoder's output: hidden (B, L, D) compute dtype, mask (B, L) bool, truncated[i]."""
        if self.hf is None:
            raise EncoderError("encode() runs a transformers encoder; builtin:words has only __call__")
        return self.hf.encode(captions)

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> text (B, max_len, D) float32 (computed in the encoder's dtype), mask (B, max_len) bool."""
        if self.builtin is not None:
            text, mask = self.builtin(prompts)
        else:
            text, mask, _ = self.hf.encode(prompts)
            pad = self.max_len - text.shape[1]
            text, mask = torch.nn.functional.pad(text.float(), (0, 0, 0, pad)), torch.nn.functional.pad(mask, (0, pad))
        return text.to(self.device), mask.to(self.device)


class TransformersTextModel:
    """A local transformers encoder + tokenizer (T5EncoderModel and friends, or any model whose output has
    ``last_hidden_state``): captions -> hidden states (B, L, D) and mask (B, L), L <= max_length."""

    def __init__(self, path: str | Path, device: torch.device, dtype: torch.dtype, max_length: int = 512,
                 tokenizer_path: str | Path | None = None):
        import transformers

        self.path = Path(path).resolve()
        cfg = _read_config(self.path, "text encoder")
        tok_path = Path(tokenizer_path).resolve() if tokenizer_path else self.path
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(tok_path, local_files_only=True)
        except Exception as e:
            raise EncoderError(f"tokenizer at {tok_path} could not be loaded ({e}); pass --tokenizer DIR "
                               "with the tokenizer's save_pretrained files") from None
        model_type = cfg.get("model_type", "")
        classes = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
        cls = getattr(transformers, classes.get(model_type, "AutoModel"))
        model = cls.from_pretrained(self.path, dtype=dtype, local_files_only=True)
        if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            model = model.get_encoder()
        self.model = model.to(device).eval().requires_grad_(False)
        self.device, self.dtype, self.max_length = device, dtype, int(max_length)
        self.hidden_size = int(getattr(model.config, "d_model", None) or model.config.hidden_size)
        self.identity = {
            "class": type(self.model).__name__, "path": str(self.path),
            "name": cfg.get("_name_or_path") or self.path.name, "fingerprint": fingerprint(self.path),
            "tokenizer": type(self.tokenizer).__name__, "max_length": self.max_length,
            "hidden_size": self.hidden_size, "transformers_version": transformers.__version__,
        }

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """-> hidden (B, L, D) compute dtype, mask (B, L) bool, truncated[i] (caption cut at max_length)."""
        tok = self.tokenizer(captions, padding="longest", truncation=True, max_length=self.max_length,
                             return_tensors="pt", return_overflowing_tokens=False)
        full = self.tokenizer(captions, truncation=False)["input_ids"]
        truncated = [len(ids) > self.max_length for ids in full]
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden, mask.bool(), truncated


