"""Issue 3's GPU check: the Triton SSD scan and the Hydra Triton/fused paths against the PyTorch
reference, then forward + backward of hth-5b-width blocks ('h' Hydra, 'A' attention; whole HTHBlock with
cross-attention and FFN) at L = 16,384 in bf16: runs, time, peak memory.

    python benchmarks/gpu_check.py [--out DIR]      -> gpu_check_<card>.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_layers import DT, GRIDS, fwd_bwd_fn, hth5b, rel_err  # noqa: E402
from common import Results, out_dir, peak_mem_gb, time_ms  # noqa: E402

from megassm.models.block import HTHBlock, TokenGrid  # noqa: E402
from megassm.models.hydra import Hydra  # noqa: E402
from megassm.ops.ssd import ssd_scan  # noqa: E402

COLUMNS = ["bench", "dtype", "impl", "seq_len", "max_rel_err", "tol", "ok", "ms", "peak_mem_gb"]
# norm-relative tolerances: fp32 runs the kernels' dots in tf32 or another summation order (~1e-3);
# bf16 rounds inputs and intermediates to 8 mantissa bits (~1e-2).
TOL = {torch.float32: 5e-3, torch.bfloat16: 3e-2}


def check_ssd(res: Results) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, L, h, p, g, n = 2, 4096, 8, 64, 1, 64
    for dtype in (torch.float32, torch.bfloat16):
        r = lambda *s: torch.randn(*s, device="cuda", generator=gen)
        x, B, C = r(b, L, h, p).to(dtype), r(b, L, g, n).to(dtype), r(b, L, g, n).to(dtype)
        dt = torch.nn.functional.softplus(r(b, L, h) - 1.0)
        A = -torch.rand(h, device="cuda", generator=gen) * 2 - 0.1
        ins = [t.requires_grad_() for t in (x, dt, A, B, C)]
        outs = {}
        for impl in ("triton", "ref"):
            y = ssd_scan(*ins, chunk_size=256, impl=impl)
            gy = torch.randn(y.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)).to(dtype)
            outs[impl] = (y, torch.autograd.grad(y, ins, gy))
        errs = [rel_err(outs["triton"][0], outs["ref"][0])]
        errs += [rel_err(a, b) for a, b in zip(outs["triton"][1], outs["ref"][1])]
        res.add({"bench": "ssd_check", "dtype": str(dtype).split(".")[-1], "impl": "triton vs ref", "seq_len": L,
                 "max_rel_err": max(errs), "rel_errs_out_x_dt_A_B_C": errs, "tol": TOL[dtype],
                 "ok": max(errs) < TOL[dtype]})


def check_hydra(res: Results) -> None:
    L = 4096
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        m = Hydra(1024, d_state=64, d_conv=7, expand=2, headdim=64, chunk_size=256, ssd_impl="ref")
        with torch.no_grad():
            m.A_log.uniform_(-1, 1)
            m.D.normal_()
            m.fc_D.weight.normal_(0, 0.05)
        m = m.cuda().to(dtype)
        u = torch.randn(2, L, 1024, device="cuda", dtype=dtype, requires_grad=True)
        gu = torch.randn_like(u)

        def run(fused, ssd_impl, m=m, u=u, gu=gu):
            m.fused, m.ssd_impl = fused, ssd_impl
            y = m(u)
            return [y] + list(torch.autograd.grad(y, [u] + list(m.parameters()), gu))

        ref = run(False, "ref")
        for impl, fused, ssd in (("reference path, triton scan", False, "triton"), ("fused", True, "triton")):
            got = run(fused, ssd)
            errs = [rel_err(a, b) for a, b in zip(got, ref)]
            res.add({"bench": "hydra_check", "dtype": str(dtype).split(".")[-1], "impl": f"{impl} vs PyTorch ref",
                     "seq_len": L, "max_rel_err": max(errs), "tol": TOL[dtype], "ok": max(errs) < TOL[dtype],
                     "rel_errs_out_then_grads": errs})


def blocks(res: Results, seq_len: int = 16384) -> None:
    m = hth5b()
    d = m.d_model
    grid = TokenGrid(GRIDS[seq_len], torch.device("cuda"), rope_head_dim=d // m.num_heads)
    x = torch.randn(1, seq_len, d, device="cuda", dtype=DT, requires_grad=True)
    g = torch.randn_like(x)
    t_mod = torch.randn(1, 6 * d, device="cuda", dtype=DT) * 0.1
    text = torch.randn(1, m.max_text_len, d, device="cuda", dtype=DT)
    mask = torch.ones(1, m.max_text_len, dtype=torch.bool, device="cuda")
    for sym, impls in (("h", ("fused", "reference path")), ("A", ("sdpa",))):
        torch.manual_seed(0)
        blk = HTHBlock(m, sym).to("cuda", DT)
        for impl in impls:
            if sym == "h":
                blk.mixer.fused = impl == "fused"
            fn = fwd_bwd_fn(blk, lambda: (x, t_mod, text, mask, grid), g)
            t = time_ms(fn)
            res.add({"bench": "block_fwd_bwd", "dtype": "bf16", "impl": f"'{sym}' {impl}", "seq_len": seq_len,
                     "ok": True, **t, "peak_mem_gb": peak_mem_gb(fn)})
        del blk
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    res = Results(Path(args.out) if args.out else out_dir(), "gpu_check", COLUMNS, extra={"markdown": False})
    res.md_path = res.json_path.with_suffix(".md.unused")
    res.write = _json_only(res)
    check_ssd(res)
    check_hydra(res)
    blocks(res)
    return 0 if all(r.get("ok", True) for r in res.rows) else 1


def _json_only(res: Results):
    import json

    def write():
        res.json_path.write_text(json.dumps({**res.info, "rows": res.rows}, indent=1))

    return write


if __name__ == "__main__":
    sys.exit(main())
