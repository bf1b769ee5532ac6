"""Issue 25, item 2: one context-parallel rank's share of the real layouts on one GPU, forward + backward, bf16.

    python benchmarks/bench_cp_share.py [--layouts 2:16384,4:29040] [--out DIR]
    python benchmarks/bench_cp_share.py --cpu       # tiny shapes, CPU timer: a dry run of the code

Under Ulysses CP over cp ranks (megassm.parallel.hydra.ParallelHydra), a rank projects its L/cp tokens at
full width, then scans the *full* sequence on nheads/cp heads (conv + SSD both directions + diagonal term),
then normalises and projects its L/cp tokens again. Timed here, without the all-to-alls:

  hydra_share  a Hydra of nheads/cp heads (d_inner = expand*d_model/cp) whose in_proj reads d_model = 3072
               and whose out_proj writes d_model = 3072, on the full L: the same projection, conv, scan and
               norm work as one rank (its in_proj also computes B/C for all L tokens, 4*64 of its output
               columns, where a rank computes them for L/cp tokens and all-gathers them).
               impl = megassm_reference_path (the PyTorch parts), goombalab (the public Hydra, same
               weights, same surgery), megassm_fused (the single-GPU fused path, same heads, uncut),
               megassm_cut (what ParallelHydra runs per CP rank on CUDA: the fused parts of
               megassm.ops.hydra_mix cut at the norm's cross-rank sum, here summing cp equal shares).
  hydra_full   the whole-width fused Hydra (96 heads) on the full L, for scale (per-rank work ~ 1/cp of it).
  ffn, cross_attention  on L/cp tokens (cross-attention to 300 text tokens, half padded).
  attention_core_share  SDPA (megassm's 'auto' order: cuDNN first) on num_heads/cp heads over the full L,
               no projections: the attention kernel one Ulysses rank runs.
FLOPs: the rank's share = accounting's per-token FLOPs x L / cp (x3 for forward + backward); MFU against
989 TFLOP/s (datasheet bf16). Writes cp_share_<card>.json (JSON only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_layers import build_goombalab_hydra, cross_flops_per_token, fwd_bwd_fn, hth5b, rel_err  # noqa: E402
from common import card_tag, device_info, out_dir, peak_mem_gb, time_ms  # noqa: E402

from megassm.models import accounting as acc  # noqa: E402
from megassm.models.attention import CrossAttention, self_attention  # noqa: E402
from megassm.models.block import FeedForward  # noqa: E402
from megassm.models.hydra import Hydra, decay_rates  # noqa: E402
from megassm.ops.hydra_mix import combine, gated_norm, local_mix  # noqa: E402

DT = torch.bfloat16
PEAK = 989.0


def head_share(mod: nn.Module, d_model: int, dev) -> nn.Module:
    """Give a Hydra built at d_model = its d_inner (expand 1) a full-width in_proj / out_proj."""
    mod.in_proj = nn.Linear(d_model, mod.in_proj.out_features, bias=False, device=dev, dtype=DT)
    mod.out_proj = nn.Linear(mod.out_proj.in_features, d_model, bias=False, device=dev, dtype=DT)
    mod.d_model = d_model
    return mod


def cpu_time(fn, reps: int = 3) -> dict:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(ts), "reps": reps}


class Runner:
    def __init__(self, dev: str, path: Path, info: dict):
        self.dev, self.path, self.info, self.rows = dev, path, info, []

    def run(self, bench: str, fn, flops: float | None, **extra) -> dict | None:
        try:
            t = time_ms(fn, budget_s=1.0) if self.dev == "cuda" else cpu_time(fn)
            mem = peak_mem_gb(fn) if self.dev == "cuda" else None
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            row = {"bench": bench, "error": f"OOM: {e}"[:200], **extra}
        else:
            row = {"bench": bench, **extra, **t, "peak_mem_gb": mem}
            if flops:
                tf = 3 * flops / (t["ms"] * 1e-3) / 1e12
                row.update(tflops=tf, mfu=tf / PEAK)
        self.rows.append(row)
        keys = ("bench", "impl", "cp", "seq_len", "tokens", "heads", "ms", "tflops", "mfu", "peak_mem_gb",
                "ratio_vs_reference_path", "rel_err_fwd_vs_reference_path")
        print(" | ".join(f"{k}={_fmt(row.get(k))}" for k in keys if k in row), flush=True)
        self.write()
        return row

    def write(self) -> None:
        self.path.write_text(json.dumps({**self.info, "rows": self.rows}, indent=1))


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def layout(r: Runner, m, cp: int, L: int, with_fused: bool) -> None:
    dev, d = r.dev, m.d_model
    di = m.expand * d // cp
    heads = di // m.headdim
    torch.manual_seed(0)
    hyd = head_share(Hydra(di, d_state=m.d_state, d_conv=m.d_conv, expand=1, headdim=m.headdim, ngroups=m.ngroups,
                           chunk_size=m.chunk_size, ssd_impl="triton" if dev == "cuda" else "ref"), d, "cpu")
    with torch.no_grad():
        hyd.fc_D.weight.normal_(0.0, 0.02)
    hyd = hyd.to(dev, DT)
    x = torch.randn(1, L, d, device=dev, dtype=DT, requires_grad=True)
    g = torch.randn(1, L, d, device=dev, dtype=DT)
    share = acc.mixer_flops_per_token(m, "h", L) * L / cp
    common = {"cp": cp, "seq_len": L, "tokens": L, "heads": heads, "d_inner_local": di}
    mods = {}
    if dev == "cuda":
        try:
            ref = build_goombalab_hydra(Hydra(di, d_state=m.d_state, d_conv=m.d_conv, expand=1, headdim=m.headdim,
                                              ngroups=m.ngroups, chunk_size=m.chunk_size).to(dev, DT))
            mods["goombalab"] = head_share(ref, d, dev)
            mods["goombalab"].load_state_dict(hyd.state_dict(), strict=True)
        except Exception as e:
            print(f"goombalab reference unavailable: {type(e).__name__}: {e}", flush=True)
    with torch.no_grad():
        hyd.fused = False
        y_ref = hyd(x)
        errs = {"megassm_reference_path": 0.0}
        if "goombalab" in mods:
            errs["goombalab"] = rel_err(mods["goombalab"](x), y_ref)
        if with_fused:
            hyd.fused = True
            errs["megassm_fused"] = rel_err(hyd(x), y_ref)
        del y_ref
    rows = {}
    hyd.fused = False  # Hydra reads its flag at each forward; each run below times its path at once
    rows["megassm_reference_path"] = r.run("hydra_share", fwd_bwd_fn(hyd, lambda: (x,), g), share,
                                           impl="megassm_reference_path", **common, rel_err_fwd_vs_reference_path=0.0)
    if "goombalab" in mods:
        rows["goombalab"] = r.run("hydra_share", fwd_bwd_fn(mods["goombalab"], lambda: (x,), g), share,
                                  impl="goombalab", **common, rel_err_fwd_vs_reference_path=errs["goombalab"])
    if with_fused:
        cut = CutHydra(hyd, cp)
        with torch.no_grad():
            errs["megassm_cut"] = rel_err(cut(x), hyd(x))
        rows["megassm_cut"] = r.run("hydra_share", fwd_bwd_fn(cut, lambda: (x,), g), share,
                                    impl="megassm_cut", **common, rel_err_fwd_vs_reference_path=errs["megassm_cut"])
        hyd.fused = True
        rows["megassm_fused"] = r.run("hydra_share", fwd_bwd_fn(hyd, lambda: (x,), g), share,
                                      impl="megassm_fused", **common,
                                      rel_err_fwd_vs_reference_path=errs["megassm_fused"])
    base = rows["megassm_reference_path"]
    for row in rows.values():
        if row and base and "ms" in row and "ms" in base:
            row["ratio_vs_reference_path"] = row["ms"] / base["ms"]
    r.write()
    del hyd, mods
    if with_fused:  # the whole-width module on the full sequence, for scale
        torch.manual_seed(0)
        full = Hydra(d, d_state=m.d_state, d_conv=m.d_conv, expand=m.expand, headdim=m.headdim, ngroups=m.ngroups,
                     chunk_size=m.chunk_size, ssd_impl="triton", fused=True).to(dev, DT)
        r.run("hydra_full", fwd_bwd_fn(full, lambda: (x,), g), acc.mixer_flops_per_token(m, "h", L) * L,
              impl="megassm_fused", cp=1, seq_len=L, tokens=L, heads=full.nheads)
        del full
    # token-local layers on this rank's L/cp tokens
    n = L // cp
    xs = torch.randn(1, n, d, device=dev, dtype=DT, requires_grad=True)
    gs = torch.randn(1, n, d, device=dev, dtype=DT)
    hidden = int(d * m.mlp_ratio)
    ffn = FeedForward(d, hidden).to(dev, DT)
    r.run("ffn", fwd_bwd_fn(ffn, lambda: (xs,), gs), 4 * d * hidden * n, cp=cp, seq_len=L, tokens=n)
    cross = CrossAttention(d, m.num_heads, m.qk_norm).to(dev, DT)
    text = torch.randn(1, m.max_text_len, d, device=dev, dtype=DT)
    mask = torch.ones(1, m.max_text_len, dtype=torch.bool, device=dev)
    mask[:, m.max_text_len // 2:] = False
    r.run("cross_attention", fwd_bwd_fn(cross, lambda: (xs, text, mask), gs), cross_flops_per_token(m, n) * n,
          cp=cp, seq_len=L, tokens=n)
    del ffn, cross
    # Ulysses attention kernel: num_heads/cp heads over all L tokens
    hd, ha = d // m.num_heads, m.num_heads // cp
    q, k, v = (torch.randn(1, ha, L, hd, device=dev, dtype=DT, requires_grad=True) for _ in range(3))
    go = torch.randn(1, ha, L, hd, device=dev, dtype=DT)

    def attn_step():
        for t in (q, k, v):
            t.grad = None
        self_attention(q, k, v, "auto" if dev == "cuda" else "default").backward(go)

    r.run("attention_core_share", attn_step, 4 * L * L * hd * ha, impl="sdpa_auto", cp=cp, seq_len=L, tokens=L,
          heads=ha)
    if dev == "cuda":
        torch.cuda.empty_cache()


class CutHydra(nn.Module):
    """One CP rank's cut fused path over ``m`` (a head share): in_proj -> fused local_mix -> fused combine ->
    fused gated norm whose sum of squares is "all-reduced" over cp ranks holding equal shares (s * cp: the
    same arithmetic as the two-launch norm under CP, without the collective) -> out_proj."""

    def __init__(self, m: Hydra, cp: int):
        super().__init__()
        self.m, self.cp = m, cp

    def forward(self, u):
        m = self.m
        z, xbc, dt = torch.split(m.in_proj(u), [m.d_inner, m.d_inner + 2 * m.d_bc, 2 * m.nheads], dim=-1)
        mix = local_mix(xbc, dt, m.conv1d.weight, m.conv1d.bias, m.dt_bias, decay_rates(m.A_log),
                        m.fc_D.weight, headdim=m.headdim, d_state=m.d_state, chunk_size=m.chunk_size,
                        fused=True, scan_impl="triton")
        y = combine(mix.scan, mix.x, mix.diag_partial + m.D.to(mix.x.dtype), fused=True)
        y = gated_norm(y, z, m.norm.weight, m.norm.eps, width=m.d_inner * self.cp,
                       sum_over_ranks=lambda s: s * self.cp, fused=True)
        return m.out_proj(y)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="2:16384,4:29040", help="cp:L pairs")
    p.add_argument("--cpu", action="store_true", help="dry run: tiny shapes on CPU, reference path only")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    m = hth5b()
    if args.cpu:
        dev, pairs = "cpu", [(2, 512), (4, 512)]
        m.d_model, m.num_heads, m.max_text_len = 256, 4, 16
    else:
        dev, pairs = "cuda", [tuple(int(v) for v in s.split(":")) for s in args.layouts.split(",")]
        torch.backends.cuda.matmul.allow_tf32 = False
    info = device_info() if dev == "cuda" else {"device": "cpu"}
    info.update(model="hth-5b width", dtype="bf16", datasheet_bf16_tflops=PEAK)
    out = Path(args.out) if args.out else out_dir()
    out.mkdir(parents=True, exist_ok=True)
    r = Runner(dev, out / f"cp_share_{card_tag(info['device'])}.json", info)
    for cp, L in pairs:
        layout(r, m, cp, L, with_fused=dev == "cuda")
    return 0


if __name__ == "__main__":
    sys.exit(main())
