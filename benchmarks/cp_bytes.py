"""Issue 36: bytes each CP rank sends per training step, Ulysses against state passing, from the communication
model (megassm.parallel.comm_model, whose entries tests/distributed/test_state_passing_cp.py and
test_parallel_hth.py count on gloo). No timings: on this CPU machine they would mean nothing.

    python benchmarks/cp_bytes.py [--out benchmarks/results/cp_bytes_cpu.md]

Model: configs/stage3_video.yaml's (hth-5b, pattern hthAvtvA x 4: 8 'h', 8 'v', 8 't' Hydra blocks and 8
attention blocks), bf16, one sample per rank and step, forward + backward without recomputation, tp = 1.
Bytes per rank: ring / pairwise algorithms ((n-1)/n of an all-gather's output, an all-to-all's input, twice
for an all-reduce; a point-to-point message once), for a rank with two CP neighbours. DeepSpeed's gradient
reduction over DP x CP is left out (the same for both).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megassm.models.mixers import mixer_for_symbol  # noqa: E402
from megassm.parallel.comm_model import block_collectives, step_wire_bytes, wire_bytes  # noqa: E402
from megassm.run_config import load_config  # noqa: E402

GiB = 1024**3
CASES = [  # (name, token grid (T', H', W'), cp degrees)
    ("stage 3, 360p 129 frames", (33, 22, 40), (4, 8, 16)),
    ("720p, 16 s", (65, 44, 80), (8, 16, 32)),
]


def _block_gib(m, symbol: str, L: int, cp: int, impl: str) -> float:
    sizes = {"tp": 1, "cp": cp, "tpcp": cp}
    return wire_bytes(block_collectives(m, symbol, 1, L, m.max_text_len, 1, cp, cp_impl=impl), sizes) / GiB


def _caps(m, cp: int) -> str:
    """Which blocks Ulysses can run at this cp (tp * cp must divide their head counts)."""
    heads = {"Hydra": m.expand * m.d_model // m.headdim, "attention": m.num_heads}
    bad = [f"{k} ({h} heads)" for k, h in heads.items() if h % cp]
    return "; Ulysses cannot split " + ", ".join(bad) if bad else ""


def rows(m) -> list[str]:
    out = ["| tokens (grid) | cp | Ulysses | state passing | blocks passing states | 'h' block: Ulysses / "
           "state passing | note |", "|---|---|---|---|---|---|---|"]
    for name, grid, cps in CASES:
        L = math.prod(grid)
        for cp in cps:
            uly, _ = step_wire_bytes(m, L, 1, cp, "ulysses", grid)
            sp, n_sp = step_wire_bytes(m, L, 1, cp, "state_passing", grid)
            T = -(-grid[0] // cp) * cp  # frames padded to a multiple of cp: 'v' cuts between frames
            padded = (T, *grid[1:])
            sp_pad, n_pad = step_wire_bytes(m, math.prod(padded), 1, cp, "state_passing", padded)
            note = (f"padded to {T} frames (+{T / grid[0] - 1:.0%} tokens): {sp_pad / GiB:.2f} GiB, {n_pad} blocks"
                    if T != grid[0] else "frame-aligned")
            out.append(f"| {name}: {L:,} {grid} | {cp} | {uly / GiB:.2f} GiB | {sp / GiB:.2f} GiB | {n_sp} | "
                       f"{_block_gib(m, 'h', L, cp, 'ulysses') * 1024:.1f} / "
                       f"{_block_gib(m, 'h', L, cp, 'state_passing') * 1024:.2f} MiB | {note}{_caps(m, cp)} |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = ap.parse_args()
    m = load_config("configs/stage3_video.yaml", []).model
    hydra = sum(mixer_for_symbol(s).name == "hydra" for s in m.pattern)
    head = [f"# CP bytes per rank and training step (comm_model), {m.name}, pattern {m.pattern} "
            f"({hydra} Hydra blocks), bf16, batch 1, tp 1", ""]
    text = "\n".join(head + rows(m)) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
