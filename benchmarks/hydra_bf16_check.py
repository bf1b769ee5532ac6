"""Issue 25, item 1: the fused Hydra path against the reference path in bf16 at long lengths, output and
the gradients of the input and of every parameter, with an fp32 ground truth beside them.

    python benchmarks/hydra_bf16_check.py [--seq-lens 2048,16384] [--widths hth5b,test] [--out DIR]
    python benchmarks/hydra_bf16_check.py --cpu      # tiny shapes, Triton interpreter: a dry run of the code

Per (width, L): one Hydra (A_log, D, fc_D drawn at random so no term is trivial), bf16 weights;
  fused      megassm's fused path (compiled kernels + mamba-ssm's SSD scan), bf16 in / bf16 out
  reference  megassm's reference path (PyTorch glue + mamba-ssm's SSD scan), bf16 throughout
  fp32       the reference path on the same weights and inputs upcast to fp32, PyTorch SSD scan (the truth)
Errors are norm-relative, ||a - b|| / ||b||, over the output and each gradient; ``max_rel_err`` is the largest.
Widths: hth5b = d_model 3072, 96 heads, batch 1 (the model's Hydra); test = d_model 256, batch 2
(tests/gpu/test_hydra_fused_cuda.py's module). Tolerance 3e-2 is the GPU test's bf16 tolerance.
Writes hydra_bf16_check_<card>.json (JSON only). No timings.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import card_tag, device_info, out_dir  # noqa: E402

from megassm.models.hydra import Hydra  # noqa: E402

TOL = 3e-2
DT = torch.bfloat16  # --cpu runs fp32: the Triton interpreter has no bf16
WIDTHS = {"hth5b": (3072, 1), "test": (256, 2)}  # d_model, batch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def build(d_model: int, dev: str, seed: int) -> Hydra:
    torch.manual_seed(seed)
    m = Hydra(d_model, d_state=64, d_conv=7, expand=2, headdim=64, chunk_size=256,
              ssd_impl="triton" if dev == "cuda" else "ref")
    with torch.no_grad():
        m.A_log.uniform_(-1.0, 1.0)
        m.D.normal_()
        m.fc_D.weight.normal_(0.0, 0.05)
    if dev != "cuda":
        m.fused_scan_impl = "ref"  # the fused kernels in Triton's interpreter around the PyTorch scan
    return m.to(dev, DT)


def fwd_bwd(m: Hydra, u: torch.Tensor, g: torch.Tensor, fused: bool):
    m.fused = fused
    u = u.detach().requires_grad_()
    out = m(u)
    grads = torch.autograd.grad(out, [u] + list(m.parameters()), g)
    return [out.detach()] + [x.detach() for x in grads]


def check(d_model: int, batch: int, seq_len: int, dev: str, seed: int = 0) -> dict:
    m = build(d_model, dev, seed)
    gen = torch.Generator(device=dev).manual_seed(seed + 1)
    u = torch.randn(batch, seq_len, d_model, device=dev, generator=gen).to(DT)
    g = torch.randn(batch, seq_len, d_model, device=dev, generator=gen).to(DT)
    names = ["out", "grad_u"] + [f"grad_{n}" for n, _ in m.named_parameters()]
    fused = fwd_bwd(m, u, g, True)
    ref = fwd_bwd(m, u, g, False)
    row = {"bench": "hydra_bf16_check", "d_model": d_model, "nheads": m.nheads, "batch": batch, "seq_len": seq_len,
           "dtype": str(DT).split(".")[-1], "finite": all(bool(torch.isfinite(t).all()) for t in fused + ref)}
    row["rel_err_fused_vs_reference"] = {n: rel(a, b) for n, a, b in zip(names, fused, ref)}
    try:  # fp32 truth: same weights upcast, PyTorch SSD scan
        m32 = copy.deepcopy(m).float()
        m32.ssd_impl = "ref"
        truth = fwd_bwd(m32, u.float(), g.float(), False)
        del m32
        row["rel_err_fused_vs_fp32"] = {n: rel(a, b) for n, a, b in zip(names, fused, truth)}
        row["rel_err_reference_vs_fp32"] = {n: rel(a, b) for n, a, b in zip(names, ref, truth)}
        del truth
    except torch.cuda.OutOfMemoryError as e:
        row["fp32_error"] = f"OOM: {e}"[:200]
    for k in ("fused_vs_reference", "fused_vs_fp32", "reference_vs_fp32"):
        if f"rel_err_{k}" in row:
            errs = row[f"rel_err_{k}"]
            worst = max(errs, key=errs.get)
            row[f"max_rel_err_{k}"], row[f"worst_{k}"] = errs[worst], worst
    row["tol"] = TOL
    row["ok"] = row["finite"] and row["max_rel_err_fused_vs_reference"] < TOL
    del fused, ref
    if dev == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", default="2048,16384")
    p.add_argument("--widths", default="hth5b,test")
    p.add_argument("--cpu", action="store_true", help="dry run: tiny shapes on CPU (Triton interpreter)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev = "cpu" if args.cpu else "cuda"
    if args.cpu:
        global DT
        DT = torch.float32
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first launched
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit" / "ops"))
        from _hydra_fused_cases import fix_interpreter  # numpy >= 2.4 vs Triton 3.6's interpreter

        fix_interpreter()
        cases = [(64, 2, 260)]
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        cases = [(*WIDTHS[w], int(L)) for w in args.widths.split(",") for L in args.seq_lens.split(",")]
    info = device_info() if dev == "cuda" else {"device": "cpu"}
    out = Path(args.out) if args.out else out_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"hydra_bf16_check_{card_tag(info['device'])}.json"
    rows = []
    for d_model, batch, L in cases:
        row = check(d_model, batch, L, dev)
        rows.append(row)
        print(" | ".join(f"{k}={row.get(k)}" for k in ("d_model", "batch", "seq_len", "ok",
                                                        "max_rel_err_fused_vs_reference", "worst_fused_vs_reference",
                                                        "max_rel_err_fused_vs_fp32", "max_rel_err_reference_vs_fp32")),
              flush=True)
        path.write_text(json.dumps({**info, "rows": rows}, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
