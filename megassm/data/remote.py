"""Where datasets live: local directories, fsspec URLs and webdataset-style ``pipe:`` commands.

A dataset location (a ``data.paths`` entry, ``megassm preprocess --output``) is one of

- a local directory, or ``file:///abs/dir`` (read as a local directory);
- an fsspec URL ``s3://bucket/prefix``, ``gs://bucket/prefix``, ``http(s)://host/prefix``;
- ``pipe:CMD`` where CMD contains ``{path}``: the dataset's file ``path`` (``manifest.json``,
  ``shard-000000.tar``) is the standard output of CMD with ``{path}`` replaced, e.g.
  ``pipe:curl -sfL https://host/ds/{path}``. Read only.

Shards are read sequentially from a start byte (``open_shard``): range requests are used
only to begin at that byte, so a saved reader position resumes exactly on every
offset-addressable protocol. ``pipe:`` cannot seek: it resumes by reading and discarding up
to the byte. A read that fails is retried with exponential backoff from the byte where it
broke off; after ``RETRIES`` it raises ``ShardReadError``.

Credentials and endpoints come from each filesystem's own environment and config files
(``AWS_*`` / ``~/.aws`` incl. ``AWS_ENDPOINT_URL`` for s3fs, ``GOOGLE_APPLICATION_CREDENTIALS``
for gcsfs, ``~/.netrc`` for HTTP); megassm stores none.
"""

from __future__ import annotations

import logging
import os
import selectors
import shlex
import subprocess
import sys
import time
from typing import Any

from megassm.data import watch

log = logging.getLogger("megassm.data")

FSSPEC_SCHEMES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp"}
VALID = ("a local directory, file:///dir, s3://bucket/prefix, gs://bucket/prefix, http(s)://host/prefix, "
         "or pipe:CMD with {path} in CMD")
RETRIES, BACKOFF_S = 5, 0.2
STREAM_BLOCK = 8 << 20  # one range request per 8 MiB while streaming a shard
RANDOM_BLOCK = 1 << 20  # random reads (restoring buffered samples)


class ShardReadError(OSError):
    """A shard (or manifest) could not be read, after retries."""


def scheme(loc: str) -> str:
    """'' for local paths, else the URL scheme ('s3', 'https', 'file', 'pipe', ...)."""
    if loc.startswith("pipe:"):
        return "pipe"
    head, sep, _ = loc.partition("://")
    return head.lower() if sep and head.isidentifier() else ""


def is_local(loc: str) -> bool:
    return scheme(loc) in ("", "file")


def local_path(loc: str) -> str:
    return loc[len("file://"):] if scheme(loc) == "file" else loc


def check_location(loc: str, what: str) -> None:
    """Raise ValueError naming ``what`` (e.g. 'data.paths[1]') if ``loc`` is not a usable location."""
    s = scheme(loc)
    if s == "pipe" and "{path}" not in loc:
        raise ValueError(f"{what}={loc!r}: a pipe: dataset needs {{path}} in its command (replaced by "
                         "manifest.json, shard-000000.tar, ...), e.g. 'pipe:curl -sfL https://host/ds/{path}'")
    if s == "file" and not loc.startswith("file:///"):
        raise ValueError(f"{what}={loc!r}: file URLs need an absolute path (file:///abs/dir)")
    if s in ("", "file", "pipe"):
        return
    if s not in FSSPEC_SCHEMES:
        raise ValueError(f"{what}={loc!r}: unsupported scheme {s!r}; valid: {VALID}")
    try:
        import fsspec  # noqa: F401

        __import__(FSSPEC_SCHEMES[s].replace("-", "_"))
    except ImportError:
        raise ValueError(f"{what}={loc!r}: reading {s}:// needs fsspec and {FSSPEC_SCHEMES[s]}; "
                         'pip install "megassm[remote]"' + (" gcsfs" if s in ("gs", "gcs") else "")) from None


def join(loc: str, name: str) -> str:
    """The location of file ``name`` inside dataset ``loc``. pipe: the name is shell-quoted into the user's
    command (manifests hold only plain relative names, ``manifest.check_shard_path``; quoting is the second
    guard: a name is never shell syntax)."""
    if scheme(loc) == "pipe":
        return loc.replace("{path}", shlex.quote(name))
    if is_local(loc):
        return os.path.join(local_path(loc), name)
    return loc.rstrip("/") + "/" + name


def dataset_name(loc: str) -> str:
    base = loc.split("{path}")[0] if scheme(loc) == "pipe" else loc
    return base.rstrip("/").rsplit("/", 1)[-1] or base


# fsspec runs its reads on one asyncio loop per process, in a thread. A forked child (a DataLoader worker, a
# preprocess decoder) inherits that loop with no thread to run it and, through its selector, the parent's epoll
# instance itself. When the child collects an inherited filesystem (they sit in reference cycles), its session's
# transports close and unregister their sockets from that shared epoll -- the parent's pooled connections: the
# parent's next read on one waits with the response in the socket, unread (a unit run hung on a manifest read).
# The child gets a selector of its own for the dead loop; fsspec starts a fresh loop there for its own reads.
_loop_at_fork: list = [None]


def _note_fsspec_loop() -> None:
    asyn = sys.modules.get("fsspec.asyn")
    _loop_at_fork[0] = asyn.loop[0] if asyn is not None else None


def _detach_inherited_fsspec_loop() -> None:
    loop, _loop_at_fork[0] = _loop_at_fork[0], None
    if loop is not None and hasattr(loop, "_selector"):
        loop._selector = selectors.DefaultSelector()


os.register_at_fork(before=_note_fsspec_loop, after_in_child=_detach_inherited_fsspec_loop,
                    after_in_parent=lambda: _loop_at_fork.__setitem__(0, None))


def _fs(url: str):
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def _transient(e: BaseException) -> bool:
    return not isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))


def _retrying(what: str, fn, retries: int = RETRIES):
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:
            if not _transient(e) or attempt == retries:
                raise ShardReadError(f"{what}: {type(e).__name__}: {e}"
                                     + (f" (after {attempt} retries)" if attempt else "")) from e
            delay = BACKOFF_S * 2 ** attempt
            log.warning("%s: %s: %s; retry %d/%d in %.1fs", what, type(e).__name__, e, attempt + 1, retries, delay)
            time.sleep(delay)


class _Pipe:
    """stdout of ``sh -c CMD`` as a readable; a non-zero exit at EOF is an error."""

    def __init__(self, cmd: str):
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL)

    def read(self, n: int) -> bytes:
        data = self.proc.stdout.read(n)
        if not data:
            rc = self.proc.wait()
            if rc != 0:
                err = self.proc.stderr.read().decode(errors="replace").strip()[-300:]
                raise OSError(f"pipe command {self.cmd!r} exited with status {rc}: {err}")
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


def _open_raw(loc: str, offset: int) -> tuple[Any, int | None]:
    """A readable positioned at ``offset`` and the object size (None if unknown)."""
    s = scheme(loc)
    if s == "pipe":
        p = _Pipe(loc[len("pipe:"):])
        left = offset
        while left:  # no seeking through a pipe: read and drop
            chunk = p.read(min(left, 1 << 20))
            if not chunk:
                p.close()
                raise OSError(f"{loc}: ends at byte {offset - left}, before the resume offset {offset}")
            left -= len(chunk)
        return p, None
    fs, path = _fs(loc)
    f = fs.open(path, "rb", block_size=STREAM_BLOCK, cache_type="readahead")
    f.seek(offset)
    return f, f.size


class ShardStream:
    """Sequential, retrying reader of one remote shard from byte ``start``.

    Looks like a file to ``tario``: read / readinto / seek / tell, and ``size``. Bytes since
    the last ``forget(offset)`` stay in memory (one sample), so the tar reader may seek back
    inside the current sample; forward seeks read through. A broken read is retried from the
    byte where it stopped (a range request; for pipe: a fresh command, skipping).
    """

    def __init__(self, loc: str, start: int = 0, retries: int = RETRIES):
        self.loc, self.retries = loc, retries
        self.base, self.pos, self.buf = start, start, bytearray()
        self.raw, self.size = _retrying(loc, lambda: _open_raw(loc, start), retries)

    def _reopen(self) -> None:
        self._close_raw()
        self.raw, _ = _open_raw(self.loc, self.base + len(self.buf))

    def _pull(self, n: int) -> bytes:
        for attempt in range(self.retries + 1):
            try:
                if self.raw is None:
                    self._reopen()
                return self.raw.read(n)
            except Exception as e:
                self._close_raw()
                if not _transient(e) or attempt == self.retries:
                    raise ShardReadError(f"{self.loc} @ byte {self.base + len(self.buf)}: {type(e).__name__}: "
                                         f"{e} (after {attempt} retries)") from e
                delay = BACKOFF_S * 2 ** attempt
                log.warning("%s @ byte %d: %s: %s; retry %d/%d in %.1fs", self.loc, self.base + len(self.buf),
                            type(e).__name__, e, attempt + 1, self.retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _fill(self, end: int) -> None:
        while self.base + len(self.buf) < end:
            chunk = self._pull(max(end - self.base - len(self.buf), 1 << 20))
            if not chunk:
                return
            self.buf += chunk

    def forget(self, offset: int) -> None:
        """Drop buffered bytes before ``offset`` (the reader will not seek back past it)."""
        cut = min(offset, self.pos) - self.base
        if cut > 0:
            del self.buf[:cut]
            self.base += cut

    def advance(self, offset: int) -> None:
        """Move forward to ``offset``, dropping every byte before it (read through in 1 MiB pieces and not
        kept: skipping to a later sample of a shard costs no memory)."""
        if offset < self.base:
            raise ShardReadError(f"{self.loc}: cannot go back to byte {offset} (stream window starts at {self.base})")
        while self.base + len(self.buf) < offset:
            self.base += len(self.buf)
            self.buf = bytearray()
            chunk = self._pull(min(offset - self.base, 1 << 20))
            if not chunk:
                break
            self.buf += chunk
        cut = min(offset, self.base + len(self.buf)) - self.base
        del self.buf[:cut]
        self.base += cut
        self.pos = offset

    def seek(self, offset: int, whence: int = 0) -> int:
        assert whence == 0, "ShardStream seeks by absolute offset only"
        if offset < self.base:
            raise ShardReadError(f"{self.loc}: cannot seek back to byte {offset} (stream window starts at "
                                 f"{self.base})")
        self.pos = offset
        return offset

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        assert n >= 0, "ShardStream.read needs a size"
        self._fill(self.pos + n)
        i = self.pos - self.base
        out = bytes(self.buf[i:i + n])
        self.pos += len(out)
        return out

    def readinto(self, b) -> int:
        n = len(b)
        self._fill(self.pos + n)
        i = self.pos - self.base
        got = min(n, len(self.buf) - i)
        memoryview(b)[:got] = self.buf[i:i + got]
        self.pos += got
        return got

    def _close_raw(self) -> None:
        raw, self.raw = getattr(self, "raw", None), None
        if raw is not None:
            try:
                raw.close()
            except Exception:  # a broken connection may fail to close; it is dropped either way
                pass

    def close(self) -> None:
        self._close_raw()
        self.buf = bytearray()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_shard(loc: str, start: int = 0, buffering: int = 1 << 16):
    """A readable of shard ``loc`` positioned at byte ``start`` (local: a plain file)."""
    watch.reading(loc)
    if is_local(loc):
        f = open(local_path(loc), "rb", buffering=buffering)
        f.seek(start)
        return f
    if scheme(loc) == "pipe" and start > 0:
        log.info("%s: pipe: cannot seek; resuming by reading and discarding %d bytes", loc, start)
    return ShardStream(loc, start)


def open_random(loc: str):
    """A seekable readable for random reads (restore), or None where only streaming works (pipe:)."""
    watch.reading(loc)
    if is_local(loc):
        return open(local_path(loc), "rb")
    if scheme(loc) == "pipe":
        return None
    fs, path = _fs(loc)
    return _retrying(loc, lambda: fs.open(path, "rb", block_size=RANDOM_BLOCK, cache_type="bytes"))


def read_bytes(loc: str) -> bytes:
    """The whole file ``loc`` (retried); FileNotFoundError if it does not exist."""
    if is_local(loc):
        with open(local_path(loc), "rb") as f:
            return f.read()
    try:
        if scheme(loc) == "pipe":
            with ShardStream(loc) as f:
                out = bytearray()
                while chunk := f.read(1 << 20):
                    out += chunk
                    f.forget(f.tell())
                return bytes(out)
        fs, path = _fs(loc)
        return _retrying(loc, lambda: fs.cat_file(path))
    except ShardReadError as e:
        if isinstance(e.__cause__, FileNotFoundError):
            raise FileNotFoundError(str(e)) from None
        raise


def exists(loc: str) -> bool:
    if is_local(loc):
        return os.path.exists(local_path(loc))
    fs, path = _fs(loc)
    return bool(_retrying(loc, lambda: fs.exists(path)))


def upload(local: str, loc: str) -> None:
    """Copy local file to ``loc`` so that ``loc`` appears complete or not at all.

    Object stores (s3, gs) make a single PUT visible atomically; other filesystems get a
    temporary name and a move.
    """
    fs, path = _fs(loc)
    if scheme(loc) in ("s3", "gs", "gcs"):
        _retrying(loc, lambda: fs.put_file(local, path))
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    _retrying(loc, lambda: fs.put_file(local, tmp))
    fs.mv(tmp, path)


def write_bytes(loc: str, data: bytes) -> None:
    fs, path = _fs(loc)
    _retrying(loc, lambda: fs.pipe_file(path, data))
