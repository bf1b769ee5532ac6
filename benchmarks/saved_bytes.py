"""What one hth-5b block keeps for its backward, and what one block's forward + backward costs, per speed variant.

    python benchmarks/saved_bytes.py [--seq-len 29040] [--symbols h,A] [--variants eager,compile,fp8,...]

Why: at stage 3's shape, a depth-8 stack that fits in 64 GiB eagerly ran out of memory (over 76.6 GiB) once its
blocks were compiled. This counts, per block kind and variant, the activation bytes saved for the backward
(``torch.autograd.graph.saved_tensors_hooks``; every saved tensor's storage once; parameters left out), in units of
one (L x d) bf16 tensor, lists the largest saved tensors, and times one block's forward + backward with its peak
memory -- no DeepSpeed, bf16 weights, one block at a time.

Variants: eager (the CUDA path of today: fused glue), compile (model.compile=blocks), fp8 (compile + FP8
tensorwise), fp8_eager, and ``compile_budget<f>`` (compile with the partitioner's activation memory budget f,
torch._functorch.config.activation_memory_budget: recompute cheap ops to save less).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_layers import GRIDS, hth5b  # noqa: E402
from common import Results, out_dir, time_ms  # noqa: E402

from megassm.models import block as block_mod  # noqa: E402
from megassm.models.block import HTHBlock, TokenGrid  # noqa: E402

COLUMNS = ["bench", "symbol", "variant", "seq_len", "saved_units", "saved_gb", "fwd_bwd_ms", "peak_gb",
           "speedup_vs_eager"]


class OneBlock(nn.Module):  # ``blocks.0``: the names convert_to_fp8 and compile_blocks look for
    def __init__(self, blk: HTHBlock):
        super().__init__()
        self.blocks = nn.ModuleList([blk])


def saved_by(fn, exclude: set[int]) -> dict:
    """Storages saved for backward while running ``fn`` (a forward): {data_ptr: (bytes, dtype, shape)}."""
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in exclude and s.nbytes():
            seen[s.data_ptr()] = (max(seen.get(s.data_ptr(), (0,))[0], s.nbytes()), str(t.dtype), list(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return seen, out


def run_case(m, symbol: str, variant: str, seq_len: int, dev: torch.device) -> dict:
    import torch._dynamo
    import torch._functorch.config as fconfig

    from megassm.train.speed import apply_speed

    torch._dynamo.reset()
    block_mod._COMPILED.clear()
    fconfig.activation_memory_budget = float(variant[len("compile_budget"):]) if variant.startswith(
        "compile_budget") else 1.0
    cfg = copy.deepcopy(m)
    cfg.compile = "blocks" if variant in ("compile", "fp8") or variant.startswith("compile_budget") else "none"
    cfg.fp8 = "tensorwise" if variant.startswith("fp8") else "none"
    torch.manual_seed(0)
    wrapper = OneBlock(HTHBlock(cfg, symbol)).to(dev, torch.bfloat16)
    apply_speed(wrapper, cfg, dev)
    blk = wrapper.blocks[0]
    d, B = cfg.d_model, 1
    x = torch.randn(B, seq_len, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    t_mod = torch.randn(B, 6 * d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    text = torch.randn(B, cfg.max_text_len, d, device=dev, dtype=torch.bfloat16)
    mask = torch.ones(B, cfg.max_text_len, dtype=torch.bool, device=dev)
    grid = TokenGrid(GRIDS[seq_len], dev, rope_head_dim=d // cfg.num_heads, rope_theta=cfg.rope_theta)
    gy = torch.randn(B, seq_len, d, device=dev, dtype=torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for p in wrapper.parameters()}
    params |= {x.untyped_storage().data_ptr(), t_mod.untyped_storage().data_ptr()}

    def step():
        y = blk(x, t_mod, text, mask, grid)
        y.backward(gy)

    step()  # compiles, when compiled
    seen, y = saved_by(lambda: blk(x, t_mod, text, mask, grid), params)
    y.backward(gy)
    unit = B * seq_len * d * 2
    total = sum(v[0] for v in seen.values())
    big = sorted(seen.values(), key=lambda v: -v[0])[:12]
    t = time_ms(step, warmup=1, reps=3)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 1e9
    return {"bench": "block_saved", "symbol": symbol, "variant": variant, "seq_len": seq_len,
            "saved_units": total / unit, "saved_gb": total / 1e9, "fwd_bwd_ms": t["ms"], "peak_gb": peak,
            "largest_saved": [[round(b / unit, 3), dt, shape] for b, dt, shape in big]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=29040, choices=sorted(GRIDS))
    p.add_argument("--symbols", default="h,A")
    p.add_argument("--variants", default="eager,compile,fp8,compile_budget0.5")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("saved_bytes.py measures the CUDA path (fused glue, Triton Hydra): run it on a GPU")
    m, dev = hth5b(), torch.device("cuda")
    res = Results(Path(args.out) if args.out else out_dir(), "saved_bytes", COLUMNS)
    for symbol in args.symbols.split(","):
        eager_ms = None
        for variant in args.variants.split(","):
            try:
                row = run_case(m, symbol, variant, args.seq_len, dev)
            except Exception as e:  # noqa: BLE001 -- one failed variant is a row, not the end of the run
                row = {"bench": "block_saved", "symbol": symbol, "variant": variant, "seq_len": args.seq_len,
                       "error": f"{type(e).__name__}: {e}"[:400]}
            if variant == "eager" and "fwd_bwd_ms" in row:
                eager_ms = row["fwd_bwd_ms"]
            if eager_ms and "fwd_bwd_ms" in row:
                row["speedup_vs_eager"] = eager_ms / row["fwd_bwd_ms"]
            print(json.dumps(row), flush=True)
            res.add(row)
            torch.cuda.empty_cache()
    res.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
