"""The SIGUSR1 grace a job gives its tasks to checkpoint, from the run's measured save rate (docs/cluster.md).

A signal is acted on at the next step boundary; the tasks then write one checkpoint (or, with
``train.async_save``, finish the one being written: ``Trainer._save_on_signal``) and exit:

    grace >= 1.5 x (t_step + S / B)       rounded up to 30 s; 50 % margin for a slower file system
    lead  >= grace + 60 s                 (--signal=B:USR1@<lead>: the requeue must fit before the limit)

S / B is the seconds the last save of this run took (``checkpoints/save_stats.json``: S bytes at B GB/s,
written by the trainer after every save), t_step the step time recorded with it. Before a run has saved
once, the stage script's fallback (``megassm plan``'s value for its config) is used.

``python -m megassm.grace STATS --fallback S --lead S [--explicit S]`` prints ``<seconds>\\t<why>`` for
slurm/common.sh. Standard library only: the batch shell runs it before any training import.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

MARGIN = 1.5  # a loaded file system can be slower than the measured save
REQUEUE_S = 60  # what the requeue itself needs before the time limit
DEFAULT_STEP_S = 60.0  # t_step when the record has none


def grace_seconds(checkpoint_gb: float, write_gbps: float, step_s: float = DEFAULT_STEP_S) -> int:
    """1.5 x (step + size / rate), rounded up to 30 s."""
    return int(math.ceil(MARGIN * (step_s + checkpoint_gb / write_gbps) / 30) * 30)


def grace_from_stats(stats: dict) -> tuple[int, str]:
    """(grace, the inputs in words) from one ``save_stats.json`` record."""
    gb, gbps = stats["bytes"] / 1e9, stats["write_gbps"]
    step_s = stats.get("step_s") or DEFAULT_STEP_S
    grace = grace_seconds(gb, gbps, step_s)
    return grace, (f"{MARGIN} x (t_step {step_s:.1f} s + {gb:.2f} GB / {gbps:.3f} GB/s), measured at "
                   f"{stats['tag']} ({stats['mode']} save)")


def decide(stats_path: Path, fallback: int, lead: int, explicit: int | None = None) -> tuple[int, str]:
    """The grace and a line for the job log saying where it came from, and whether ``lead`` is too short."""
    try:
        grace, why = grace_from_stats(json.loads(Path(stats_path).read_text()))
    except FileNotFoundError:
        grace, why = fallback, f"no save of this run measured yet ({stats_path}): the script's default"
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as e:
        grace, why = fallback, f"unreadable {stats_path} ({e!r}): the script's default"
    if explicit is not None:
        grace, why = explicit, f"MEGASSM_SIGNAL_GRACE (explicit; without it: {grace} s, {why})"
    line = f"SIGUSR1 grace {grace} s: {why}; --signal lead {lead} s"
    if grace + REQUEUE_S > lead:
        line += (f". WARNING: the grace needs a lead of at least {grace + REQUEUE_S} s (grace + {REQUEUE_S} s for "
                 f"the requeue); resubmit with sbatch --signal=B:USR1@{grace + REQUEUE_S} and "
                 f"MEGASSM_SIGNAL_LEAD={grace + REQUEUE_S}, or the checkpoint may not finish before the time limit")
    return grace, line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megassm.grace", description=__doc__.split("\n\n")[0])
    ap.add_argument("stats", type=Path, help="RUN_DIR/checkpoints/save_stats.json (need not exist)")
    ap.add_argument("--fallback", type=int, required=True, help="seconds when no save was measured yet")
    ap.add_argument("--lead", type=int, required=True, help="the --signal lead in seconds")
    ap.add_argument("--explicit", type=int, default=None, help="MEGASSM_SIGNAL_GRACE, when the user set it")
    a = ap.parse_args(argv)
    grace, line = decide(a.stats, a.fallback, a.lead, a.explicit)
    print(f"{grace}\t{line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
