"""Forward + backward of HTH layers at hth-5b width on one GPU, with references in the same process.

    python benchmarks/bench_layers.py [--seq-lens 4096,16384] [--profile] [--out DIR]
    TRITON_INTERPRET=1 python benchmarks/bench_layers.py --dry-run     # CPU: the hydra_cp_share rows, tiny

Rows (bench): hydra (megassm, fused path), hydra_reference (impl=goombalab: the public reference
module, weights copied from megassm's; impl=megassm_reference_path: megassm's unfused path),
mamba2_reference (mamba-ssm Mamba2, one direction, use_mem_eff_path=False), attention (qkv + RoPE +
SDPA + proj; impl=sdpa_auto|sdpa_flash|sdpa_cudnn), cross_attention (300 text tokens), ffn, block_step
(a whole HTHBlock, mixer 'h' or 'A'; impl *_eager_glue = without the compiled elementwise glue),
memory_plan (activation bytes per token saved for backward by one block, for megassm plan),
hydra_cp_share (one rank's share of a Hydra layer under Ulysses CP = cp: the full sequence with nheads/cp
heads through megassm.ops.hydra_mix's parts -- local_mix, combine, and the gated norm on L/cp tokens of
all heads -- impl=megassm_fused_parts (the kernels ParallelHydra runs) or megassm_reference_parts; no
collectives).
TFLOP/s use megassm.models.accounting's FLOP counts (x3 for forward + backward); MFU is against the
datasheet bf16 peak and against an 8192^3 bf16 GEMM measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, Results, ensure_selective_scan_stub, gemm_tflops, out_dir, peak_mem_gb, time_ms  # noqa: E402

from megassm.models import accounting as acc  # noqa: E402
from megassm.models.attention import CrossAttention, SelfAttention  # noqa: E402
from megassm.models.block import FeedForward, HTHBlock, TokenGrid  # noqa: E402
from megassm.models.hydra import Hydra  # noqa: E402
from megassm.run_config import load_config

# token grids (T, H, W) of the stages' sequence lengths (docs/architecture.md §7) and of the 65,536 case
GRIDS = {256: (1, 16, 16), 4096: (1, 64, 64), 16384: (1, 128, 128), 29040: (33, 22, 40), 65536: (1, 256, 256)}
CASES = [(256, 64), (4096, 1), (16384, 1), (29040, 1), (65536, 1)]  # (seq_len, batch)
COLUMNS = ["bench", "impl", "seq_len", "batch", "ms", "tflops", "mfu", "mfu_vs_gemm", "ratio_vs_reference",
           "peak_mem_gb", "rel_err_vs_reference"]
DT = torch.bfloat16


def hth5b():
    return load_config(REPO / "configs" / "model" / "hth-5b.yaml").model


def build_goombalab_hydra(src: Hydra):
    """The public reference module (goombalab/hydra, fetched into .ref/), with src's weights."""
    ensure_selective_scan_stub()  # before hydra/mamba_ssm import: their try/except would hide the error
    ref_dir = REPO / ".ref"
    if str(ref_dir) not in sys.path:
        sys.path.insert(0, str(ref_dir))
    from hydra.modules.hydra import Hydra as RefHydra

    m = RefHydra(src.d_model, d_state=src.d_state, d_conv=src.d_conv, expand=src.expand, headdim=src.headdim,
                 ngroups=src.ngroups, chunk_size=src.chunk_size, device="cuda", dtype=DT)
    m.load_state_dict(src.state_dict(), strict=True)
    return m.to(DT)  # its D / A_log are created fp32; as megassm's, everything runs in bf16


def build_mamba2(m):
    ensure_selective_scan_stub()
    from mamba_ssm.modules.mamba2 import Mamba2

    return Mamba2(m.d_model, d_state=m.d_state, d_conv=4, expand=m.expand, headdim=m.headdim, ngroups=m.ngroups,
                  chunk_size=m.chunk_size, use_mem_eff_path=False, device="cuda", dtype=DT)


def mamba2_flops_per_token(m, seq_len: int) -> int:
    d_inner = m.expand * m.d_model
    h = d_inner // m.headdim
    G = m.ngroups * m.d_state
    cs = min(m.chunk_size, seq_len)
    scan = 2 * cs * G + h * (2 * cs * m.headdim + 4 * m.d_state * m.headdim)
    return 2 * m.d_model * (2 * d_inner + 2 * G + h) + 2 * (d_inner + 2 * G) * 4 + scan + 2 * d_inner * m.d_model


def cross_flops_per_token(m, seq_len: int) -> float:
    d, lt = m.d_model, m.max_text_len
    return 2 * d * d + (2 * lt * d * 2 * d) / seq_len + 4 * lt * d + 2 * d * d


def fwd_bwd_fn(module, make_inputs, grad):
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        inputs = make_inputs()
        for t in params + [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]:
            t.grad = None
        out = module(*inputs)
        out.backward(grad)

    return step


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


class Bench:
    def __init__(self, res: Results, gemm: float, peak: float, dry_run: bool = False):
        self.res, self.gemm, self.peak = res, gemm, peak
        self.only: set[str] = set()
        self.dry_run = dry_run  # CPU: one untimed-quality call per row, to exercise the code

    def run(self, bench, fn, flops, seq_len, batch, **extra):
        if self.only and bench not in self.only:
            return None
        if self.dry_run:
            t0 = time.perf_counter()
            fn()
            self.res.add({"bench": bench, "seq_len": seq_len, "batch": batch, "ms": 1e3 * (time.perf_counter() - t0),
                          **extra})
            return self.res.rows[-1]
        try:
            t = time_ms(fn)
            mem = peak_mem_gb(fn)
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            self.res.add({"bench": bench, "seq_len": seq_len, "batch": batch, "error": f"OOM: {e}"[:200], **extra})
            return None
        tf = 3 * flops / (t["ms"] * 1e-3) / 1e12 if flops else None
        row = {"bench": bench, "seq_len": seq_len, "batch": batch, **t, "peak_mem_gb": mem, **extra}
        if tf is not None:
            row.update(tflops=tf, mfu=tf / self.peak if self.peak else None, mfu_vs_gemm=tf / self.gemm)
        self.res.add(row)
        return row


def bench_case(b: Bench, m, mods, seq_len: int, batch: int, profile_path=None) -> None:
    dev = "cuda"
    d = m.d_model
    grid = TokenGrid(GRIDS[seq_len], torch.device(dev), rope_head_dim=d // m.num_heads, rope_theta=m.rope_theta)
    x = torch.randn(batch, seq_len, d, device=dev, dtype=DT, requires_grad=True)
    g = torch.randn(batch, seq_len, d, device=dev, dtype=DT)
    ntok = seq_len * batch
    hyd, ref = mods["hydra"], mods.get("goombalab")
    hflops = acc.mixer_flops_per_token(m, "h", seq_len) * ntok

    # Hydra: fused vs the public reference vs megassm's reference path, same weights, same inputs
    with torch.no_grad():
        hyd.fused = True
        y_f = hyd(x)
        errs = {}
        if ref is not None:
            errs["goombalab"] = rel_err(y_f, ref(x))
        hyd.fused = False
        errs["megassm_reference_path"] = rel_err(y_f, hyd(x))
        del y_f
    hyd.fused = True
    row_f = b.run("hydra", fwd_bwd_fn(hyd, lambda: (x,), g), hflops, seq_len, batch, impl="megassm_fused")
    rows_ref = {}
    if ref is not None:
        rows_ref["goombalab"] = b.run("hydra_reference", fwd_bwd_fn(ref, lambda: (x,), g), hflops, seq_len, batch,
                                      impl="goombalab", rel_err_vs_reference=errs["goombalab"])
    hyd.fused = False
    rows_ref["megassm_reference_path"] = b.run("hydra_reference", fwd_bwd_fn(hyd, lambda: (x,), g), hflops, seq_len,
                                               batch, impl="megassm_reference_path",
                                               rel_err_vs_reference=errs["megassm_reference_path"])
    hyd.fused = True
    if row_f:
        for k, r in rows_ref.items():
            if r:
                row_f[f"ratio_vs_{k}"] = row_f["ms"] / r["ms"]
        main_ref = rows_ref.get("goombalab") or rows_ref.get("megassm_reference_path")
        if main_ref:
            row_f["ratio_vs_reference"] = row_f["ms"] / main_ref["ms"]
        b.res.write()
    if profile_path is not None:
        profile(hyd, ref, x, g, profile_path)

    if "mamba2" in mods:
        b.run("mamba2_reference", fwd_bwd_fn(mods["mamba2"], lambda: (x,), g),
              mamba2_flops_per_token(m, seq_len) * ntok, seq_len, batch, impl="mamba_ssm")
    rope = grid.rope()
    attn = mods["attention"]
    row_a = None
    for backend in ("auto", "flash", "cudnn"):  # auto = cuDNN first on Hopper (megassm's default)
        attn.backend = backend
        r = b.run("attention", fwd_bwd_fn(attn, lambda: (x, rope), g),
                  acc.mixer_flops_per_token(m, "A", seq_len) * ntok, seq_len, batch, impl=f"sdpa_{backend}")
        row_a = row_a or r
    attn.backend = "auto"
    if row_a and row_f:
        row_f["speedup_vs_attention"] = row_a["ms"] / row_f["ms"]
        b.res.write()
    text = torch.randn(batch, m.max_text_len, d, device=dev, dtype=DT)
    mask = torch.ones(batch, m.max_text_len, dtype=torch.bool, device=dev)
    mask[:, m.max_text_len // 2:] = False  # half the text padded, as typical captions are
    b.run("cross_attention", fwd_bwd_fn(mods["cross"], lambda: (x, text, mask), g),
          cross_flops_per_token(m, seq_len) * ntok, seq_len, batch, impl="sdpa")
    hidden = int(d * m.mlp_ratio)
    b.run("ffn", fwd_bwd_fn(mods["ffn"], lambda: (x,), g), 4 * d * hidden * ntok, seq_len, batch)

    t_mod = torch.randn(batch, 6 * d, device=dev, dtype=DT) * 0.1
    blk_rows = {}
    for sym in ("h", "A"):
        blk = mods[f"block_{sym}"]
        fl = acc.block_flops_per_token(m, sym, seq_len) * ntok
        # (impl, Hydra fused path / attention backend, compiled elementwise glue); the first is megassm's default
        variants = ([("megassm_fused", True, True), ("megassm_fused_eager_glue", True, False),
                     ("megassm_reference_path", False, False)] if sym == "h" else
                    [("sdpa", "auto", True), ("sdpa_flash_eager_glue", "flash", False)])
        for impl, mixer_opt, glue in variants:
            if sym == "h":
                blk.mixer.fused = mixer_opt
            else:
                blk.mixer.backend = mixer_opt
            blk.fuse_elementwise = glue
            blk_rows[(sym, impl)] = b.run("block_step", fwd_bwd_fn(blk, lambda: (x, t_mod, text, mask, grid), g), fl,
                                          seq_len, batch, mixer=sym, impl=impl)
        blk.fuse_elementwise = True
        if sym == "h":
            blk.mixer.fused = True
        else:
            blk.mixer.backend = "auto"
    fh, ra = blk_rows.get(("h", "megassm_fused")), blk_rows.get(("A", "sdpa"))
    if fh and ra:
        fh["speedup_vs_attention"] = ra["ms"] / fh["ms"]
        b.res.write()
    bench_cp_share(b, m, hyd, seq_len, batch, torch.device(dev), DT)
    if batch == 1 and seq_len in (4096, 16384) and (not b.only or "memory_plan" in b.only):
        for sym in ("h", "A"):
            saved_activation_row(b, mods[f"block_{sym}"], sym, x, t_mod, text, mask, grid, seq_len)


def cp_share_fn(hyd: Hydra, cp: int, seq_len: int, batch: int, fused: bool, dev, dtype):
    """fwd + bwd of CP rank 0's share of ``hyd`` (heads [0, nheads/cp), every B/C group), as ParallelHydra
    runs it between its all-to-alls; the norm on the (B, L/cp, d_inner) token slice it gets after them."""
    from megassm.models.hydra import decay_rates
    from megassm.ops.hydra_mix import combine, gated_norm, local_mix

    hc, p = hyd.nheads // cp, hyd.headdim
    rows = torch.cat([torch.arange(hc * p), hyd.d_inner + torch.arange(2 * hyd.d_bc)]).to(dev)
    ins = [torch.randn(batch, seq_len, hc * p + 2 * hyd.d_bc, device=dev, dtype=dtype),
           torch.randn(batch, seq_len, 2 * hc, device=dev, dtype=dtype) - 2.0,
           torch.randn(batch, seq_len // cp, hyd.d_inner, device=dev, dtype=dtype)]
    for t in ins:
        t.requires_grad_()
    scan_impl = hyd.fused_scan_impl or ("triton" if dev.type == "cuda" else "ref")
    params = [hyd.conv1d.weight, hyd.conv1d.bias, hyd.dt_bias, hyd.A_log, hyd.fc_D.weight, hyd.D, hyd.norm.weight]

    def step():
        for t in ins + params:
            t.grad = None
        xbc, dt, z = ins
        mix = local_mix(xbc, dt, hyd.conv1d.weight[rows], hyd.conv1d.bias[rows], hyd.dt_bias[:hc],
                        decay_rates(hyd.A_log[:hc]), hyd.fc_D.weight[:, : hc * p], headdim=p, d_state=hyd.d_state,
                        chunk_size=hyd.chunk_size, fused=fused, scan_impl=scan_impl if fused else hyd.ssd_impl)
        # (the reduce-scatter would sum the other ranks' partials and keep this rank's heads)
        y = combine(mix.scan, mix.x, mix.diag_partial[..., :hc] + hyd.D[:hc].to(dtype), fused=fused)
        # (the all-to-all would turn (B, L, hc*p) into (B, L/cp, d_inner): same bytes)
        y = y.reshape(batch, seq_len // cp, hyd.d_inner)
        out = gated_norm(y, z, hyd.norm.weight, hyd.norm.eps, fused=fused)
        out.backward(torch.ones_like(out))

    return step


def bench_cp_share(b: Bench, m, hyd: Hydra, seq_len: int, batch: int, dev, dtype, cps=(2, 4)) -> None:
    for cp in cps:
        if hyd.nheads % cp or seq_len % cp:
            continue
        fl = acc.mixer_flops_per_token(m, "h", seq_len) * seq_len * batch / cp
        rows = {impl: b.run("hydra_cp_share", cp_share_fn(hyd, cp, seq_len, batch, fused, dev, dtype), fl, seq_len,
                            batch, impl=impl, cp=cp)
                for impl, fused in (("megassm_fused_parts", True), ("megassm_reference_parts", False))}
        if rows["megassm_fused_parts"] and rows["megassm_reference_parts"]:
            rows["megassm_fused_parts"]["ratio_vs_reference"] = (rows["megassm_fused_parts"]["ms"]
                                                                 / rows["megassm_reference_parts"]["ms"])
            b.res.write()


def saved_activation_row(b: Bench, blk, sym, x, t_mod, text, mask, grid, seq_len) -> None:
    """Bytes per token that one block's forward keeps for backward (the planner's activation term)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = blk(x, t_mod, text, mask, grid)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
    fwd_peak = torch.cuda.max_memory_allocated() - before
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    bwd_peak = torch.cuda.max_memory_allocated() - before
    for p in blk.parameters():
        p.grad = None
    x.grad = None
    del out
    b.res.add({"bench": "memory_plan", "stage": f"block_{sym}", "seq_len": seq_len, "mixer": sym,
               "saved_bytes_per_token": kept / seq_len, "fwd_peak_bytes_per_token": fwd_peak / seq_len,
               "fwd_bwd_peak_bytes_per_token": bwd_peak / seq_len,
               "predicted_bytes_per_token_accounting": acc.activation_bytes_per_token(hth5b(), sym)})


def profile(hyd, ref, x, g, path: Path) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    lines = []
    for name, mod in (("megassm fused", hyd), ("goombalab reference", ref)):
        if mod is None:
            continue
        fn = fwd_bwd_fn(mod, lambda: (x,), g)
        fn()
        torch.cuda.synchronize()
        with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        lines.append(f"==== {name}, L={x.shape[1]}, fwd+bwd, one call\n")
        lines.append(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")


def build_modules(m) -> dict:
    torch.manual_seed(0)
    dev = "cuda"
    hyd = Hydra(m.d_model, d_state=m.d_state, d_conv=m.d_conv, expand=m.expand, headdim=m.headdim,
                ngroups=m.ngroups, chunk_size=m.chunk_size, ssd_impl="triton", fused=True).to(dev, DT)
    with torch.no_grad():
        hyd.fc_D.weight.normal_(0.0, 0.02)  # the default init is small random; keep it non-trivial
    mods = {"hydra": hyd}
    try:
        mods["goombalab"] = build_goombalab_hydra(hyd)
    except Exception as e:  # no .ref/ copy carried: fall back to megassm's reference path only
        print(f"goombalab reference unavailable: {type(e).__name__}: {e}", flush=True)
    try:
        mods["mamba2"] = build_mamba2(m)
    except Exception as e:
        print(f"mamba2 reference unavailable: {type(e).__name__}: {e}", flush=True)
    mods["attention"] = SelfAttention(m.d_model, m.num_heads, m.qk_norm).to(dev, DT)
    mods["cross"] = CrossAttention(m.d_model, m.num_heads, m.qk_norm).to(dev, DT)
    mods["ffn"] = FeedForward(m.d_model, int(m.d_model * m.mlp_ratio)).to(dev, DT)
    for sym in ("h", "A"):
        blk = HTHBlock(m, sym).to(dev, DT)
        with torch.no_grad():
            blk.scale_shift_table.normal_(0.0, 0.1)  # open the residual gates
        mods[f"block_{sym}"] = blk
    return mods


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", default=None, help="comma-separated subset of " + ",".join(str(c[0]) for c in CASES))
    p.add_argument("--profile", action="store_true", help="also write a CUDA kernel profile of Hydra at 16,384")
    p.add_argument("--only", default="", help="comma-separated bench names to run (default: all)")
    p.add_argument("--stem", default="layers", help="result file name stem")
    p.add_argument("--out", default=None)
    p.add_argument("--dry-run", action="store_true", help="CPU, hth-tiny width, fp32: only the hydra_cp_share "
                   "rows (the fused ones need TRITON_INTERPRET=1)")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else out_dir()
    if args.dry_run:
        return dry_run(out, args.stem)
    torch.backends.cuda.matmul.allow_tf32 = False
    m = hth5b()
    gemm = gemm_tflops()
    res = Results(out, args.stem, COLUMNS, extra={"gemm_8192_bf16_tflops": gemm, "model": "hth-5b width",
                                                 "dtype": "bf16"})
    print(f"{res.info['device']}: 8192^3 bf16 GEMM {gemm:.0f} TFLOP/s", flush=True)
    b = Bench(res, gemm, res.info["datasheet_bf16_tflops"])
    b.only = {x for x in args.only.split(",") if x}
    mods = build_modules(m)
    batch_of = dict(CASES)
    order = [int(s) for s in args.seq_lens.split(",")] if args.seq_lens else [c[0] for c in CASES]
    for seq_len in order:
        batch = batch_of[seq_len]
        prof = out / f"profile_{res.json_path.stem.split('_')[-1]}.txt" if args.profile and seq_len == 16384 else None
        bench_case(b, m, mods, seq_len, batch, prof)
        torch.cuda.empty_cache()
    return 0


def dry_run(out: Path, stem: str) -> int:
    """The hydra_cp_share rows on CPU at hth-tiny width (kernels in Triton's interpreter): the code runs."""
    import os

    m = load_config(REPO / "configs" / "model" / "hth-tiny.yaml").model
    res = Results(out, f"{stem}_dry_run", COLUMNS + ["cp"], extra={"model": "hth-tiny width", "dtype": "fp32"})
    b = Bench(res, gemm=float("nan"), peak=None, dry_run=True)
    hyd = Hydra(m.d_model, d_state=m.d_state, d_conv=m.d_conv, expand=m.expand, headdim=m.headdim, ngroups=m.ngroups,
                chunk_size=m.chunk_size, ssd_impl="ref")
    if os.environ.get("TRITON_INTERPRET") != "1":
        b.only = {"none"}  # the fused parts cannot run on CPU without the interpreter
        print("TRITON_INTERPRET=1 not set: nothing to run on CPU", flush=True)
    bench_cp_share(b, m, hyd, 32, 1, torch.device("cpu"), torch.float32)
    return 0


if __name__ == "__main__":
    sys.exit(main())
