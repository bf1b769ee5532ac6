"""Names inside a run's ``checkpoints/`` directory, shared by the trainer that writes them
(``megassm/train/checkpoint.py``) and the readers here (``megassm/checkpoint/sources.py``)."""

LATEST = "latest"  # file naming the newest whole checkpoint tag, replaced atomically
COMPLETE = "COMPLETE"  # written last into a tag directory, after every rank finished


def tag_for(step: int) -> str:
    return f"step_{step:08d}"
