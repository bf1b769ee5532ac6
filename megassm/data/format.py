"""The latent shard sample format (docs/shard_format.md, ``FORMAT_VERSION``).

A sample is two tar members sharing one ``__key__``:

- ``<key>.json``        UTF-8 JSON metadata (``SAMPLE_META_FIELDS``)
- ``<key>.safetensors`` tensors ``latent`` (C, T, H, W), ``text`` (L, D), ``text_mask`` (L,) bool

Tensors are safetensors bytes: loading them never runs pickle, so a shard from elsewhere
cannot execute code. ``.pth`` / ``.pickle`` members are never written and never decoded.
"""

from __future__ import annotations

import json
import re
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import save as st_save

FORMAT_NAME = "megassm.latent-shards"
FORMAT_VERSION = 1
META_EXT = "json"
TENSORS_EXT = "safetensors"
MANIFEST_NAME = "manifest.json"
SKIP_REPORT_NAME = "skipped.json"

# safetensors dtype names accepted by the reader (anything else is a corrupt / foreign sample)
_ST_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "BOOL": 1, "U8": 1, "I32": 4}
_TORCH_TO_ST = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
_ST_TO_TORCH = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "BOOL": torch.bool,
                "U8": torch.uint8, "I32": torch.int32}
STORE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_MAX_HEADER = 1 << 20
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-/]")

SAMPLE_META_FIELDS = (
    "caption", "source", "height", "width", "frames", "fps", "latent_shape", "text_len",
    "vae", "text_encoder", "latent_scale", "latent_shift",
)


class FormatError(ValueError):
    """A shard, sample or manifest does not follow the format; the message says where and why."""


@dataclass
class LatentSample:
    """One decoded sample.

    latent: (C, T, H, W) as stored (fp16/bf16/fp32, not normalised)
    text: (L, D) text-encoder hidden states, L = stored length (padding trimmed by default)
    text_mask: (L,) bool, True = real token
    """

    key: str
    latent: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)


def shape_key(shape: tuple[int, ...] | list[int]) -> str:
    """Histogram / bucket key of a latent shape: (4, 1, 32, 32) -> "4x1x32x32"."""
    return "x".join(str(int(s)) for s in shape)


def parse_shape_key(key: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in key.split("x"))
    except ValueError:
        raise FormatError(f"shape key {key!r} is not of the form CxTxHxW (e.g. 4x1x32x32)") from None


def make_key(name: str, digest: str) -> str:
    """A WebDataset ``__key__``: no dots (WebDataset splits member names at the first dot)."""
    stem = _KEY_BAD.sub("_", name)[-48:].strip("_/") or "sample"
    return f"{stem}-{digest[:12]}"


def encode_sample(sample: LatentSample) -> dict[str, bytes]:
    """Sample -> {member extension: bytes}. Asserts shapes (latent 4-D, text 2-D, mask 1-D)."""
    lat, text, mask = sample.latent, sample.text, sample.text_mask
    assert lat.dim() == 4, f"latent must be (C, T, H, W), got {tuple(lat.shape)}"
    assert text.dim() == 2 and mask.shape == text.shape[:1], (
        f"text must be (L, D) with mask (L,), got {tuple(text.shape)} / {tuple(mask.shape)}")
    if "." in sample.key:
        raise FormatError(f"sample key {sample.key!r} contains a dot; WebDataset would split it")
    tensors = {
        "latent": lat.detach().contiguous().cpu(),
        "text": text.detach().contiguous().cpu(),
        "text_mask": mask.detach().to(torch.bool).contiguous().cpu(),
    }
    meta = dict(sample.meta)
    meta["latent_shape"] = list(lat.shape)
    meta["text_len"] = int(mask.sum())
    return {META_EXT: json.dumps(meta, sort_keys=True).encode(), TENSORS_EXT: st_save(tensors)}


def safetensors_header(prefix: bytes, total_size: int, where: str) -> dict[str, Any]:
    """Parse and validate a safetensors header from the first bytes of a member.

    ``prefix``: at least the 8-byte length and the JSON header; ``total_size``: the member's
    full size. Checks every entry's dtype and that its byte range matches its shape and lies
    inside the member -- without touching tensor data.
    """
    if len(prefix) < 8 or total_size < 8:
        raise FormatError(f"{where}: safetensors member is {total_size} bytes, too short for a header")
    (n,) = struct.unpack("<Q", bytes(prefix[:8]))
    if n > _MAX_HEADER or 8 + n > total_size or 8 + n > len(prefix):
        raise FormatError(f"{where}: safetensors header length {n} exceeds the member ({total_size} bytes)")
    try:
        header = json.loads(bytes(prefix[8:8 + n]))
        assert isinstance(header, dict)
    except (UnicodeDecodeError, json.JSONDecodeError, AssertionError) as e:
        raise FormatError(f"{where}: safetensors header is not a JSON object ({e})") from None
    body = total_size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = entry["dtype"], entry["shape"], entry["data_offsets"]
            numel = 1
            for s in shape:
                numel *= int(s)
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{where}: safetensors entry {name!r} is malformed: {entry!r}") from None
        if dtype not in _ST_DTYPES:
            raise FormatError(f"{where}: tensor {name!r} has dtype {dtype}; valid: {sorted(_ST_DTYPES)}")
        if not (0 <= a <= b <= body) or b - a != numel * _ST_DTYPES[dtype]:
            raise FormatError(f"{where}: tensor {name!r} byte range {a}..{b} does not fit shape {shape} "
                              f"{dtype} in a {body}-byte body (truncated or corrupt)")
    return header


def check_sample_header(key: str, meta_bytes: bytes, st_prefix: bytes, st_size: int, where: str) -> dict:
    """Validate a sample from its JSON and the first bytes of its safetensors member.

    Returns the metadata dict. The streaming reader and position restore both call this
    (and only this) to decide whether a sample is corrupt, so they make the same decisions
    without reading tensor data.
    """
    try:
        meta = json.loads(meta_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{where}: sample {key!r} metadata is not JSON ({e})") from None
    if not isinstance(meta, dict) or "latent_shape" not in meta:
        raise FormatError(f"{where}: sample {key!r} metadata lacks 'latent_shape'")
    header = safetensors_header(st_prefix, st_size, f"{where}: sample {key!r}")
    for name, ndim in (("latent", 4), ("text", 2), ("text_mask", 1)):
        if name not in header or len(header[name]["shape"]) != ndim:
            raise FormatError(f"{where}: sample {key!r} needs a {ndim}-D tensor {name!r} "
                              f"(found {sorted(k for k in header if k != '__metadata__')})")
    if list(header["latent"]["shape"]) != list(meta["latent_shape"]):
        raise FormatError(f"{where}: sample {key!r} latent shape {header['latent']['shape']} != metadata "
                          f"latent_shape {meta['latent_shape']}")
    if header["text"]["shape"][0] != header["text_mask"]["shape"][0]:
        raise FormatError(f"{where}: sample {key!r} text and text_mask lengths differ")
    return meta


HEADER_PREFIX_BYTES = 4096  # enough for our 3-tensor headers; longer headers are read in full


def decode_sample(key: str, members: dict[str, bytes], where: str) -> LatentSample:
    """{extension: bytes} -> LatentSample, validating everything; never unpickles."""
    if META_EXT not in members or TENSORS_EXT not in members:
        raise FormatError(f"{where}: sample {key!r} has members {sorted(members)}; "
                          f"needs '{META_EXT}' and '{TENSORS_EXT}'")
    st = members[TENSORS_EXT]
    meta = check_sample_header(key, members[META_EXT], st, len(st), where)
    t = load_tensors(key, st, where)
    return LatentSample(key, t["latent"], t["text"], t["text_mask"].to(torch.bool), meta)


def load_tensors(key: str, st: bytes | bytearray, where: str) -> dict[str, torch.Tensor]:
    """safetensors bytes -> {name: tensor}, zero-copy views into ``st`` (no pickle).

    Equivalent to ``safetensors.torch.load`` (the test suite checks it) without its copy:
    the reader's hot path moves each sample's bytes once less. Pass a ``bytearray`` (as the
    reader does): for immutable ``bytes`` torch warns, slowly, on every view.
    """
    header = safetensors_header(st, len(st), f"{where}: sample {key!r}")
    base = 8 + struct.unpack("<Q", st[:8])[0]
    out = {}
    with warnings.catch_warnings():
        if isinstance(st, bytes):
            warnings.simplefilter("ignore", UserWarning)  # "non-writable buffer": the views are only read
        for name, e in header.items():
            if name == "__metadata__":
                continue
            dtype, (a, b) = _ST_TO_TORCH[e["dtype"]], e["data_offsets"]
            if b == a:
                out[name] = torch.empty(e["shape"], dtype=dtype)
            else:
                flat = torch.frombuffer(st, dtype=dtype, count=(b - a) // _ST_DTYPES[e["dtype"]], offset=base + a)
                out[name] = flat.view(e["shape"])
    return out


def torch_dtype_name(dtype: torch.dtype) -> str:
    return _TORCH_TO_ST.get(dtype, str(dtype))
