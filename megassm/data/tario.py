"""Offset-addressable reading of WebDataset tar shards.

Python's ``tarfile`` cannot resume at a byte offset through a public API, and the streaming
reader needs exactly that: its saved position names samples by (shard, byte offset of the
sample's first tar header), so a restore seeks straight to them instead of re-reading the
epoch. This module reads ustar/pax/GNU-longname headers, verifies header checksums and that
every member lies inside the file (a truncated copy is detected, not half-read), and groups
consecutive members into samples the way WebDataset does (key = path up to the first dot of
the basename).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from megassm.data import watch
from megassm.data.format import (
    HEADER_PREFIX_BYTES,
    META_EXT,
    TENSORS_EXT,
    FormatError,
    check_sample_header,
)

_BLOCK = 512
_ZERO = bytes(_BLOCK)
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class TruncatedShard(FormatError):
    """The shard ends inside a member or lacks its end-of-archive marker."""


@dataclass
class TarMember:
    name: str
    offset: int  # first header block of the member (a pax/longname header if any)
    data_offset: int
    size: int


@dataclass
class RawSample:
    """A validated sample whose tensors are still bytes (or not read at all when lazy).

    shard: index of the shard in its dataset's manifest; offset: byte offset of the sample's
    first tar header -- together they address the sample for a saved reader position.
    """

    key: str
    shard: int
    offset: int
    meta: dict
    st_size: int
    st_bytes: bytearray | None = None
    shape: tuple[int, ...] = field(default=())


def _octal(field_: bytes, where: str) -> int:
    if field_[:1] and field_[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field_[1:], "big")
    text = field_.rstrip(b"\0 ").strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise FormatError(f"{where}: tar header number {field_!r} is not octal (corrupt header)") from None


def _check_checksum(block: bytes, where: str) -> None:
    stored = _octal(block[148:156], where)
    actual = sum(block[:148]) + 8 * 32 + sum(block[156:])
    if stored != actual:
        raise FormatError(f"{where}: tar header checksum mismatch (stored {stored}, computed {actual})")


def _pax_path(data: bytes, where: str) -> str | None:
    """The ``path`` of a pax extended header: records "LEN key=value\\n", LEN counting the whole record.

    A record whose length is not a decimal number, is too short to hold its own "LEN " and newline, or
    runs past the header is a ``FormatError`` (a zero length used to loop for ever)."""
    path, pos = None, 0
    while pos < len(data):
        sp = data.find(b" ", pos, pos + 21)
        digits = data[pos:sp] if sp > pos else b""
        length = int(digits) if digits.isdigit() else -1
        if length < sp - pos + 2 or pos + length > len(data) or data[pos + length - 1:pos + length] != b"\n":
            raise FormatError(f"{where}: malformed pax header record at byte {pos} of {len(data)} "
                              f"({data[pos:pos + 24]!r}); expected 'LENGTH key=value\\n' (corrupt header)")
        k, _, v = data[sp + 1:pos + length - 1].partition(b"=")
        if k == b"path":
            path = _utf8(v, where)
        pos += length
    return path


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{where}: member name {raw[:60]!r} is not UTF-8 ({e.reason}; corrupt header)") from None


def _file_size(f: BinaryIO) -> int | None:
    """Size of a local file, or a remote reader's ``size`` (None for a pipe: truncation shows as EOF)."""
    try:
        return os.fstat(f.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        return getattr(f, "size", None)


def iter_members(f: BinaryIO, where: str, start: int = 0) -> Iterator[TarMember]:
    """Regular-file members from byte ``start``; the caller may read/seek between yields."""
    file_size = _file_size(f)
    pos, long_name, member_start = start, None, None
    while True:
        watch.reading(where)  # a stalled read names this shard (data.stall_timeout_s)
        f.seek(pos)
        block = f.read(_BLOCK)
        if not block:
            raise TruncatedShard(f"{where}: ends at byte {pos} without an end-of-archive marker (truncated?)")
        if len(block) < _BLOCK:
            raise TruncatedShard(f"{where}: ends inside a tar header at byte {pos} (truncated)")
        if block == _ZERO:
            return
        here = f"{where} @ byte {pos}"
        _check_checksum(block, here)
        size, kind = _octal(block[124:136], here), block[156:157]
        data_offset = pos + _BLOCK
        if file_size is not None and data_offset + size > file_size:
            raise TruncatedShard(f"{here}: member needs {size} bytes but the file ends at {file_size} (truncated)")
        member_start = pos if member_start is None else member_start
        if kind in (b"x", b"L"):
            data = f.read(size)
            long_name = _pax_path(data, here) if kind == b"x" else _utf8(data.rstrip(b"\0"), here)
        elif kind in (b"0", b"\0", b"7"):
            name = block[:100].rstrip(b"\0").decode("utf-8", "replace")
            if block[257:262] == b"ustar" and block[345:500].strip(b"\0"):
                name = block[345:500].rstrip(b"\0").decode("utf-8", "replace") + "/" + name
            yield TarMember(long_name or name, member_start, data_offset, size)
            long_name, member_start = None, None
        else:  # directories, links, global pax headers: not sample members
            long_name, member_start = None, None
        pos = data_offset + (size + _BLOCK - 1) // _BLOCK * _BLOCK


def split_key(name: str) -> tuple[str, str] | None:
    """"dir/abc.latent.json" -> ("dir/abc", "latent.json"); None for names without an extension."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2)) if m else None


def _read_prefix(f: BinaryIO, m: TarMember) -> bytes:
    f.seek(m.data_offset)
    head = f.read(min(m.size, HEADER_PREFIX_BYTES))
    if len(head) >= 8:
        need = 8 + int.from_bytes(head[:8], "little")
        if len(head) < need <= m.size:
            head += f.read(need - len(head))
    return head


def iter_samples(f: BinaryIO, shard: int, where: str, start: int = 0, lazy: bool = False,
                 errors: list | None = None) -> Iterator[RawSample]:
    """Samples of one shard from byte ``start``.

    lazy=True reads only the JSON member and the safetensors header (for a position
    restore); otherwise tensor bytes are read too. A corrupt sample is skipped and
    ``(reason, message)`` appended to ``errors``; a corrupt or truncated tar stops the shard
    (also reported). Both modes make identical skip decisions.
    """
    errors = errors if errors is not None else []
    group: list[TarMember] = []
    key = None

    def finish() -> RawSample | None:
        exts = {split_key(m.name)[1]: m for m in group}
        try:
            if META_EXT not in exts or TENSORS_EXT not in exts:
                raise FormatError(f"{where}: sample {key!r} has members {sorted(exts)}; needs "
                                  f"'{META_EXT}' and '{TENSORS_EXT}'")
            mj, ms = exts[META_EXT], exts[TENSORS_EXT]
            f.seek(mj.data_offset)
            meta_bytes = f.read(mj.size)
            st = None
            if lazy:
                prefix = _read_prefix(f, ms)
            else:
                f.seek(ms.data_offset)
                # a writable buffer, filled straight from the file: tensors are zero-copy views of it
                st = prefix = bytearray(ms.size)
                if f.readinto(st) != ms.size:
                    raise TruncatedShard(f"{where}: sample {key!r} tensors end early (truncated)")
            meta = check_sample_header(key, meta_bytes, prefix, ms.size, where)
        except FormatError as e:
            errors.append(("corrupt_sample", str(e)))
            return None
        return RawSample(key, shard, group[0].offset, meta, ms.size, st, tuple(meta["latent_shape"]))

    members = iter_members(f, where, start)
    forget = getattr(f, "forget", None)  # a remote stream keeps only the current sample's bytes
    while True:
        try:
            m = next(members, None)
        except FormatError as e:  # the tar breaks off: keep the complete samples before it
            errors.append(("truncated_shard" if isinstance(e, TruncatedShard) else "corrupt_shard", str(e)))
            m = None
        kx = split_key(m.name) if m is not None else None
        if m is not None and kx is None:
            continue
        if group and (m is None or kx[0] != key):
            s = finish()
            if s is not None:
                yield s
            group = []
        if m is None:
            return
        key = kx[0]
        if not group and forget is not None:
            forget(m.offset)
        group.append(m)


def read_sample_at(f: BinaryIO, shard: int, offset: int, where: str, lazy: bool = False) -> RawSample:
    """The sample whose first header is at ``offset`` (as recorded in a reader position)."""
    errors: list = []
    for s in iter_samples(f, shard, where, offset, lazy, errors):
        if s.offset != offset:
            break
        return s
    raise FormatError(f"{where}: no valid sample at byte {offset}"
                      + (f" ({errors[0][1]})" if errors else "") + "; was the shard rewritten?")
