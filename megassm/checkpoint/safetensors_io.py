"""Streaming safetensors output (optionally sharded, HF-style index), lazy input, atomic directories.

The writer knows every tensor's name, dtype and shape before any data exists (a DeepSpeed checkpoint
lists them in its model states; a consolidated one in its headers), so each shard's header is
written first and tensors are then appended one at a time as they are produced: a conversion holds
one tensor in memory, never a whole shard. Files are standard safetensors (8-byte little-endian
header length, JSON header, raw little-endian data) and load with ``safetensors.safe_open``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from megassm.checkpoint.errors import CheckpointError, read_exact_into

DTYPE_CODES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # HF's default "5GB"


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 1000 -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise CheckpointError(f"size {text!r} is not valid; use e.g. 5GB, 500MB, 2GiB or a number of bytes")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_KMGT".index(m.group(2).upper() or "_"))


def plan_shards(specs: dict[str, TensorSpec], max_bytes: int) -> list[list[str]]:
    """Split names (in order) into consecutive groups of at most ``max_bytes`` (a bigger tensor goes alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, spec in specs.items():
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += spec.nbytes
    return shards


def _header(names: list[str], specs: dict[str, TensorSpec], metadata: dict[str, str]) -> bytes:
    entries: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for n in names:
        s = specs[n]
        entries[n] = {"dtype": DTYPE_CODES[s.dtype], "shape": list(s.shape),
                      "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors(directory: Path, stem: str, specs: dict[str, TensorSpec],
                      produce: Callable[[str], torch.Tensor], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      metadata: dict[str, str] | None = None) -> list[str]:
    """Write ``stem.safetensors`` (or ``stem-0000i-of-0000n.safetensors`` + ``stem.safetensors.index.json``).

    ``produce(name)`` is called once per name, in ``specs`` order, and must return a tensor of that
    spec's shape and dtype. Returns the file names written.
    """
    return write_safetensors_parallel([directory], stem, [specs], lambda n: [produce(n)], max_shard_bytes, metadata)


def write_safetensors_parallel(directories: list[Path], stem: str, specs: list[dict[str, TensorSpec]],
                               produce: Callable[[str], list[torch.Tensor]],
                               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                               metadata: dict[str, str] | None = None) -> list[str]:
    """Like ``write_safetensors`` for several outputs with the same names (e.g. the TP ranks of one
    model): ``produce(name)`` returns one tensor per output, so each source tensor is read once.
    Shard boundaries follow the first output's sizes (TP ranks' sizes are equal)."""
    names = list(specs[0])
    for i, sp in enumerate(specs):
        if list(sp) != names:
            raise CheckpointError(f"output {i} lists different tensors from output 0")
        for n, s in sp.items():
            if s.dtype not in DTYPE_CODES:
                raise CheckpointError(f"tensor {n}: dtype {s.dtype} cannot be stored in safetensors")
    metadata = {"format": "pt", **(metadata or {})}
    shards = plan_shards(specs[0], max_shard_bytes)
    files = ([f"{stem}.safetensors"] if len(shards) == 1 else
             [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for fname, group in zip(files, shards):
        handles = [open(Path(d) / fname, "wb") for d in directories]
        try:
            for h, sp in zip(handles, specs):
                h.write(_header(group, sp, metadata))
            for n in group:
                tensors = produce(n)
                for h, sp, t in zip(handles, specs, tensors, strict=True):
                    _write_tensor(h, n, sp[n], t)
                del tensors
            for h in handles:
                h.flush()
                os.fsync(h.fileno())
        finally:
            for h in handles:
                h.close()
    if len(files) > 1:
        for d, sp in zip(directories, specs):
            index = {"metadata": {"total_size": sum(s.nbytes for s in sp.values())},
                     "weight_map": {n: fname for fname, group in zip(files, shards) for n in group}}
            (Path(d) / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return files


def _write_tensor(f, name: str, spec: TensorSpec, t: torch.Tensor) -> None:
    if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
        raise CheckpointError(f"tensor {name}: produced {tuple(t.shape)} {t.dtype}, expected {spec.shape} {spec.dtype}")
    t = t.detach().cpu().contiguous()
    if t.numel():
        f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


class SafetensorsFile:
    """One safetensors file read with ``pread`` (no mmap: memory stays one tensor), header validated."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else -1
                if n < 2 or n > min(size - 8, 100 * 2**20):
                    raise ValueError(f"header length {n} does not fit a file of {size} bytes")
                header = json.loads(f.read(n))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.path}: unreadable safetensors file ({e}); truncated or corrupt") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.specs: dict[str, TensorSpec] = {}
        self._ranges: dict[str, tuple[int, int]] = {}
        end = 0
        for name, e in header.items():
            try:
                spec = TensorSpec(tuple(int(d) for d in e["shape"]), CODE_DTYPES[e["dtype"]])
                begin, stop = (int(x) for x in e["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                raise CheckpointError(f"{self.path}: bad header entry for {name!r} ({err})") from None
            if stop - begin != spec.nbytes or begin < 0:
                raise CheckpointError(f"{self.path}: {name} spans {stop - begin} bytes, its shape needs {spec.nbytes}")
            self.specs[name], self._ranges[name] = spec, (begin, stop)
            end = max(end, stop)
        if self.data_start + end != size:
            raise CheckpointError(f"{self.path}: header describes {self.data_start + end} bytes, the file has "
                                  f"{size}; it is truncated or corrupt")

    def read(self, name: str, start: int = 0, count: int | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``name`` (shaped), or with ``start``/``count`` its flat elements [start, start+count),
        read straight into ``out`` (1-D, contiguous) when given."""
        spec, begin = self.specs[name], self._ranges[name][0]
        numel = math.prod(spec.shape)
        whole = start == 0 and count is None
        count = numel - start if count is None else count
        if start < 0 or count < 0 or start + count > numel:
            raise CheckpointError(f"{self.path}: read [{start}, {start + count}) outside {name} of {numel} elements")
        if out is None:
            out = torch.empty(spec.shape if whole else (count,), dtype=spec.dtype)
        elif out.dtype != spec.dtype or out.numel() != count or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {spec.dtype} tensor of {count} elements")
        item = torch.empty((), dtype=spec.dtype).element_size()
        if count:
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            read_exact_into(self.path, self.data_start + begin + start * item, view, f"reading {name}")
        return out


class SafetensorsDir:
    """Lazy view of ``stem.safetensors`` or a sharded set with its index, in one directory."""

    def __init__(self, directory: Path, stem: str):
        self.directory, self.stem = Path(directory), stem
        single = self.directory / f"{stem}.safetensors"
        index = self.directory / f"{stem}.safetensors.index.json"
        weight_map = None
        if single.is_file():
            names = [single.name]
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            names = sorted(set(weight_map.values()))
        else:
            raise FileNotFoundError(f"{self.directory}: has neither {single.name} nor {index.name}")
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, SafetensorsFile] = {}
        self.specs: dict[str, TensorSpec] = {}
        self.metadata: dict[str, str] = {}
        for fname in names:
            if not (self.directory / fname).is_file():
                raise CheckpointError(f"{index} names {fname}, which is missing")
            sf = self._files[fname] = SafetensorsFile(self.directory / fname)
            self.metadata.update(sf.metadata)
            for n, spec in sf.specs.items():
                if weight_map is not None and weight_map.get(n) != fname:
                    raise CheckpointError(f"{sf.path}: holds {n}, which {index.name} places in {weight_map.get(n)}")
                self.specs[n], self._where[n] = spec, sf
        if weight_map is not None and set(weight_map) != set(self.specs):
            missing = sorted(set(weight_map) - set(self.specs))
            raise CheckpointError(f"{index} lists {len(missing)} tensors not found in its files: {missing[:5]}")

    @staticmethod
    def exists(directory: Path, stem: str) -> bool:
        d = Path(directory)
        return (d / f"{stem}.safetensors").is_file() or (d / f"{stem}.safetensors.index.json").is_file()

    def read(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"{self.directory}/{self.stem}: no tensor {name!r}")
        return self._where[name].read(name)

    def read_range(self, name: str, start: int, count: int) -> torch.Tensor:
        """Flat elements [start, start + count) of ``name``: one offset read."""
        if name not in self._where:
            raise KeyError(f"{self.directory}/{self.stem}: no tensor {name!r}")
        return self._where[name].read(name, start, count)

    def files(self) -> list[Path]:
        return [f.path for f in self._files.values()]


# -- atomic output directories ------------------------------------------------------------------

def check_output(out: Path, force: bool) -> None:
    """Fail before any work if ``out`` exists and ``force`` is off."""
    out = Path(out)
    if out.exists() and not force:
        raise CheckpointError(f"output {out} already exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise CheckpointError(f"output's parent directory {out.parent} does not exist")


@contextlib.contextmanager
def atomic_directory(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; on success rename it to ``out``, else delete it.

    The rename is atomic on one file system, so ``out`` is either absent (or the old version) or
    complete. With ``force`` an existing ``out`` is moved aside first and deleted afterwards. A killed
    process can leave a hidden ``.<name>.tmp-*`` directory beside ``out``; it is never mistaken for
    a checkpoint and may be deleted.
    """
    out = Path(out)
    check_output(out, force)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_dir(tmp)
        old = None
        if out.exists():
            if not force:
                raise CheckpointError(f"output {out} appeared while converting; pass --force to replace it")
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        os.replace(tmp, out)
        fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_dir(path: Path) -> None:
    """fsync a directory, making the names created or renamed in it durable (skipped if it cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
