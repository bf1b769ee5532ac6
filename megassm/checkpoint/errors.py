"""The one error type of the checkpoint tools (a ValueError, so the CLI prints it without a traceback)."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt, inconsistent with its config, or of a layout this
    build cannot read. The message names the file and what would be valid."""
