"""Read ``torch.save`` files (DeepSpeed's ``*_model_states.pt`` / ``*_optim_states.pt``) without
executing pickle code and without loading tensor data until asked, one byte range at a time.

Why not ``torch.load``:
- ``torch.load(weights_only=False)`` (what DeepSpeed's ``zero_to_fp32`` uses) runs arbitrary code
  from the file. ``weights_only=True`` refuses DeepSpeed's optimizer files: they pickle
  ``deepspeed.runtime.zero.config.ZeroStageEnum`` and ``deepspeed.runtime.fp16.loss_scaler.LossScaler``
  (and ZeRO-1/2 files ``deepspeed.utils.tensor_fragment.fragment_address``); it works with those
  allow-listed through ``torch.serialization.safe_globals``, and the tests check that this reader
  returns the same tensors as that.
- ``torch.load`` either reads the whole file (a 5B model's ZeRO shards hold 16 bytes/param of
  fp32 master weights + Adam moments) or memory-maps it, and every page touched then stays resident
  in this process until the mapping goes away. Reading exact byte ranges with ``pread`` keeps the
  host memory of a conversion at "one output tensor" whatever the checkpoint's size.

How: a ``torch.save`` file is an uncompressed zip: ``<name>/data.pkl`` (the object tree, tensors
as references to storages) + ``<name>/data/<key>`` (each storage's raw bytes). ``data.pkl`` is
unpickled by ``_RestrictedUnpickler``, which resolves only the globals in ``_ALLOWED`` (containers,
tensor/storage rebuild markers, dtypes and a few DeepSpeed data classes turned into inert values)
and refuses anything else with an error naming it: nothing from the file is ever called. Tensors
come back as ``TensorRef``; ``TorchFile.read`` fetches elements of one by byte offset.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megassm.checkpoint.errors import CheckpointError, read_exact_into

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}


@dataclass(frozen=True)
class StorageRef:
    key: str
    dtype: torch.dtype
    numel: int  # elements of dtype


@dataclass(frozen=True)
class TensorRef:
    """A tensor inside a torch.save file: its storage and (offset, shape, stride) in elements."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def is_contiguous(self) -> bool:
        expected, step = [], 1
        for size in reversed(self.shape):
            expected.append(step)
            step *= size
        return all(s == e for s, e, n in zip(self.stride, reversed(expected), self.shape) if n > 1)


class Opaque:
    """Stand-in for a pickled DeepSpeed object (e.g. LossScaler): keeps its attributes as data."""

    def __repr__(self) -> str:
        return f"Opaque({self.__dict__})"


class _TensorType:
    """Marker for ``torch.Tensor`` / ``torch.nn.Parameter`` as the target type of a rebuild."""


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise CheckpointError(f"malformed torch.save file: tensor over {type(storage).__name__}, not a storage")
    return TensorRef(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_from_type(func, new_type, args, state):
    if new_type is not _TensorType:
        raise CheckpointError(f"torch.save file rebuilds a tensor as {new_type!r}; only plain tensors are read")
    return func(*args)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, state=None):
    return data


_ALLOWED: dict[str, Any] = {
    "collections.OrderedDict": collections.OrderedDict,
    # sets: DeepSpeed <= 0.18 pickles some with protocol 2, which names the builtins module __builtin__
    "builtins.set": set, "__builtin__.set": set, "builtins.frozenset": frozenset, "__builtin__.frozenset": frozenset,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
    "torch.Tensor": _TensorType,
    "torch.nn.parameter.Parameter": _TensorType,
    "torch.Size": lambda *a: tuple(*a),
    "torch.device": lambda *a: ":".join(str(x) for x in a),
    # DeepSpeed's optimizer state: an IntEnum (rebuilt as its int) and the loss scaler (its attributes)
    "deepspeed.runtime.zero.config.ZeroStageEnum": int,
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": Opaque,
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": Opaque,
    "deepspeed.utils.tensor_fragment.fragment_address": Opaque,  # ZeRO-1/2 param_slice_mappings (numel, start)
    **{f"torch.{name}": name for name in _STORAGE_DTYPES},
    **{f"torch.{name}": getattr(torch, name) for name in (
        "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data, path: Path):
        super().__init__(data)
        self.path = path

    def find_class(self, module: str, name: str):
        key = f"{module}.{name}"
        if key not in _ALLOWED:
            raise CheckpointError(
                f"{self.path}: the pickle references {key}, which this reader does not execute. Only tensors, "
                "containers and a few DeepSpeed data classes are read from DeepSpeed files; if this is a "
                "genuine DeepSpeed checkpoint of a newer version, add the class to megassm.checkpoint.torchzip"
            )
        return _ALLOWED[key]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise CheckpointError(f"{self.path}: unknown persistent id {pid!r:.80} in data.pkl")
        _, storage_type, key, _location, numel = pid
        if storage_type not in _STORAGE_DTYPES:
            raise CheckpointError(f"{self.path}: unknown storage type {storage_type!r}")
        key = key.decode() if isinstance(key, bytes) else str(key)
        return StorageRef(key, _STORAGE_DTYPES[storage_type], int(numel))


def read_archive(path: Path) -> tuple[dict[str, tuple[int, int]], bytes]:
    """The structure of a torch.save zip file, checked without unpickling: every storage record's (byte
    offset, nbytes) inside the file, and data.pkl's bytes (its CRC-32 checked by the read). A truncated or
    corrupt archive is a CheckpointError naming the file (the check resume runs, ``checkpoint/verify.py``)."""
    records: dict[str, tuple[int, int]] = {}
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            pkl = next((i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"), None)
            if pkl is None:
                raise CheckpointError(f"{path}: not a torch.save file (no data.pkl inside)")
            prefix = pkl.filename[: -len("data.pkl")]
            data = zf.read(pkl)
            if zf.NameToInfo.get(prefix + "byteorder") and zf.read(prefix + "byteorder").strip() != b"little":
                raise CheckpointError(f"{path}: big-endian torch files are not supported")
        with open(path, "rb") as f:
            for info in infos:
                if info.filename.startswith(prefix + "data/"):
                    records[info.filename[len(prefix) + 5:]] = (_data_offset(path, f, info), info.file_size)
    except zipfile.BadZipFile as e:
        raise CheckpointError(
            f"{path}: unreadable ({e}); the file is truncated or corrupt (a torch.save file is a zip "
            "archive whose directory is at the end, so a cut-off copy loses it)"
        ) from None
    for key, (off, nbytes) in records.items():
        if off + nbytes > size:
            raise CheckpointError(f"{path}: storage {key} ends at byte {off + nbytes} but the file has "
                                  f"{size}; the file is truncated")
    return records, data


def _data_offset(path: Path, f, info: zipfile.ZipInfo) -> int:
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(f"{path}: record {info.filename} is compressed; torch.save never does that")
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path}: bad zip entry header for {info.filename}; the file is corrupt")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


class TorchFile:
    """One torch.save zip file: ``.obj`` is its object tree (tensors as ``TensorRef``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._records, data = read_archive(self.path)  # storage key -> (byte offset, nbytes); data.pkl
        try:
            self.obj = _RestrictedUnpickler(io.BytesIO(data), self.path).load()
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.path}: data.pkl is corrupt ({type(e).__name__}: {e})") from None

    def read(self, ref: TensorRef, start: int = 0, count: int | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements [start, start+count) of ``ref`` flattened (``ref`` must be contiguous) -> 1-D tensor.

        With ``out`` (1-D, contiguous, ``count`` elements of ref's dtype) the bytes land there directly.
        """
        if not ref.is_contiguous():
            raise CheckpointError(f"{self.path}: tensor in storage {ref.storage.key} is not contiguous")
        count = ref.numel - start if count is None else count
        if start < 0 or count < 0 or start + count > ref.numel:
            raise CheckpointError(f"{self.path}: read [{start}, {start + count}) outside a tensor of {ref.numel}")
        if ref.storage.key not in self._records:
            raise CheckpointError(f"{self.path}: storage {ref.storage.key} is missing from the archive")
        base, nbytes = self._records[ref.storage.key]
        item = torch.empty((), dtype=ref.dtype).element_size()
        first = (ref.offset + start) * item
        if first + count * item > nbytes:
            raise CheckpointError(f"{self.path}: storage {ref.storage.key} has {nbytes} bytes, the tensor needs "
                                  f"{first + count * item}; the file is inconsistent")
        if out is None:
            out = torch.empty(count, dtype=ref.dtype)
        elif out.dtype != ref.dtype or out.numel() != count or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {ref.dtype} tensor of {count} elements")
        view = memoryview(out.view(torch.uint8).numpy()) if count else memoryview(b"")
        read_exact_into(self.path, base + first, view, "; the file is truncated")
        return out

    def load(self, ref: TensorRef) -> torch.Tensor:
        """The whole tensor, shaped."""
        return self.read(ref).view(ref.shape)

    def check_crc(self) -> None:
        """Read every record and compare its CRC-32 with the archive's (streams; catches bit rot)."""
        with zipfile.ZipFile(self.path) as zf:
            try:
                bad = zf.testzip()
            except Exception as e:
                raise CheckpointError(f"{self.path}: unreadable while checking CRCs ({e})") from None
        if bad is not None:
            raise CheckpointError(f"{self.path}: record {bad} fails its CRC-32 check; the file is corrupt")


def walk_refs(obj: Any):
    """Yield every TensorRef inside a nested dict/list/tuple tree."""
    if isinstance(obj, TensorRef):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from walk_refs(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from walk_refs(v)
