"""The one error type of the checkpoint tools (a ValueError, so the CLI prints it without a traceback)."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt, inconsistent with its config, or of a layout this
    build cannot read. The message names the file and what would be valid."""


_BYTES_READ = [0]  # every checkpoint byte the pickle-free readers read, in this process


def bytes_read() -> int:
    """Bytes ``read_exact_into`` has read in this process (tests and benchmarks count a rank's reads)."""
    return _BYTES_READ[0]


def read_exact_into(path, offset: int, view: memoryview, what: str) -> None:
    """Fill ``view`` with the bytes of ``path`` from ``offset``; a short file is a CheckpointError naming ``what``."""
    _BYTES_READ[0] += len(view)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(view):
            got = f.readinto(view[done:])
            if not got:
                raise CheckpointError(f"{path}: unexpected end of file {what}")
            done += got
