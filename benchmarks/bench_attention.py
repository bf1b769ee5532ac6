"""Self-attention forward + backward through SDPA's kernels at the stage shapes (hth-5b: 24 heads x 128).

    python benchmarks/bench_attention.py [--seq-lens 16384,29040] [--out DIR]

Per kernel (SDPA's cudnn, flash, efficient; FlashAttention-4 as ``fa4``): median ms of forward and of
forward + backward, bf16, batch 1, and the backward / forward ratio (FlashAttention-3-class kernels are near 2x
on Hopper). A kernel that cannot run the shape is recorded with its error. ``model.attention_backend`` picks
among them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, out_dir, time_ms  # noqa: E402

from megassm.models.attention import self_attention  # noqa: E402
from megassm.ops.flash4 import fa4_attention  # noqa: E402

COLUMNS = ["bench", "seq_len", "backend", "fwd_ms", "fwd_bwd_ms", "bwd_over_fwd", "fwd_tflops", "fwd_bwd_tflops"]


def bench(seq_len: int, backend: str, heads: int = 24, hd: int = 128) -> dict:
    # SDPA takes (B, heads, L, hd); FA4 its tokens-first (B, L, heads, hd) (megassm.ops.flash4)
    shape = (1, seq_len, heads, hd) if backend == "fa4" else (1, heads, seq_len, hd)
    q, k, v = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn_like(q)
    attn = fa4_attention if backend == "fa4" else (lambda q, k, v: self_attention(q, k, v, backend))
    fwd = time_ms(lambda: attn(q, k, v), reps=10)["ms"]

    def both():
        attn(q, k, v).backward(g)

    fb = time_ms(both, reps=10)["ms"]
    flops = 4 * seq_len * seq_len * hd * heads  # QK^T and PV
    return {"bench": "attention", "seq_len": seq_len, "backend": backend, "fwd_ms": fwd, "fwd_bwd_ms": fb,
            "bwd_over_fwd": (fb - fwd) / fwd, "fwd_tflops": flops / fwd / 1e9, "fwd_bwd_tflops": 3.5 * flops / fb / 1e9}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", default="16384,29040")
    p.add_argument("--out", default=None)
    p.add_argument("--backends", default="cudnn,flash,efficient,fa4", help="SDPA kernels, and fa4 (FlashAttention-4)")
    args = p.parse_args()
    res = Results(Path(args.out) if args.out else out_dir(), "attention", COLUMNS)
    for n in (int(x) for x in args.seq_lens.split(",")):
        for backend in args.backends.split(","):
            try:
                row = bench(n, backend)
            except Exception as e:  # a kernel that refuses the shape
                err = f"{type(e).__name__}: {e}"[:300]
                row = {"bench": "attention", "seq_len": n, "backend": backend, "error": err}
            res.add(row)
    res.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
