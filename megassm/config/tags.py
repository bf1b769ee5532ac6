"""Names inside a run's ``checkpoints/`` directory, shared by the trainer that writes them
(``megassm/train/checkpoint.py``), the readers (``megassm/checkpoint/sources.py``) and the config rule for
``train.resume_from`` (``config/validate.py``), and the order in which its checkpoints were committed.
Standard library only: config/ imports no other package."""

from __future__ import annotations

import json
from pathlib import Path

LATEST = "latest"  # file naming the newest whole checkpoint tag, replaced atomically
COMPLETE = "COMPLETE"  # written last into a tag directory, after every rank finished


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def commit_number(tag_dir: Path) -> int:
    """The commit number COMPLETE records; 0 for one written before COMPLETE recorded it (or unreadable)."""
    try:
        return int(json.loads((tag_dir / COMPLETE).read_text()).get("commit", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def complete_tags(ckpt_dir: Path) -> list[str]:
    """The complete checkpoints, oldest commit first. Commit order, not name order: after ``latest`` was
    rolled back to an older step, the run's next checkpoint has a lower step than the abandoned ones but
    is newer. Checkpoints from before COMPLETE recorded a number come first, by COMPLETE's time."""
    dirs = [p for p in Path(ckpt_dir).glob("step_*") if (p / COMPLETE).is_file()]

    def order(p: Path) -> tuple[int, int, str]:
        try:
            mtime = (p / COMPLETE).stat().st_mtime_ns
        except OSError:
            mtime = 0
        return commit_number(p), mtime, p.name

    return [p.name for p in sorted(dirs, key=order)]
