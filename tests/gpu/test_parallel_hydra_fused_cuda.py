"""CUDA-only: the cut fused Hydra parts (what ParallelHydra runs on each rank) on a CP-shaped head subset.

One rank's share under Ulysses CP is the full sequence with nheads/cp heads and every B/C group. Here
one GPU runs that share through ``megassm.ops.hydra_mix``'s parts, fused (compiled Triton kernels) and
reference (PyTorch), with the scan in PyTorch on both sides and, where mamba-ssm is installed, with its
Triton scan on both sides. The norm runs its two-launch path, with sum_over_ranks = cp x (the other
ranks' channels taken to have the same sum of squares), as under TP. Output and the gradients of every
input and weight, fp32 and bf16, each against an fp64 evaluation; errors norm-relative, ||a - b|| / ||b||.
"""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")

from megassm.models.hydra import Hydra, decay_rates  # noqa: E402
from megassm.ops.hydra_mix import combine, gated_norm, local_mix  # noqa: E402
from megassm.ops.ssd import triton_available  # noqa: E402


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _share(m: Hydra, cp: int, batch: int, seqlen: int, dtype, seed: int = 0):
    """CP rank 0's inputs: x/dt of heads [0, nheads/cp), all B/C, z of those heads' channels."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hc, p = m.nheads // cp, m.headdim
    xbc = torch.randn(batch, seqlen, hc * p + 2 * m.d_bc, device="cuda", dtype=dtype, generator=gen)
    dt = torch.randn(batch, seqlen, 2 * hc, device="cuda", dtype=dtype, generator=gen) - 2.0
    z = torch.randn(batch, seqlen, hc * p, device="cuda", dtype=dtype, generator=gen)
    rows = torch.cat([torch.arange(hc * p), m.d_inner + torch.arange(2 * m.d_bc)]).cuda()
    weights = {"conv_w": m.conv1d.weight[rows].detach(), "conv_b": m.conv1d.bias[rows].detach(),
               "dt_bias": m.dt_bias[:hc].detach(), "A_log": m.A_log[:hc].detach(),
               "fc_w": m.fc_D.weight[:hc, : hc * p].detach(), "D": m.D[:hc].detach(),
               "norm_w": m.norm.weight[: hc * p].detach()}
    return [xbc, dt, z], weights


def _run(m, cp, ins, w, fused, scan_impl):
    xbc, dt, z = ins
    mix = local_mix(xbc, dt, w["conv_w"], w["conv_b"], w["dt_bias"], decay_rates(w["A_log"]), w["fc_w"],
                    headdim=m.headdim, d_state=m.d_state, chunk_size=m.chunk_size, fused=fused, scan_impl=scan_impl)
    y = combine(mix.scan, mix.x, mix.diag_partial + w["D"].to(mix.x.dtype), fused=fused)
    return gated_norm(y, z, w["norm_w"], m.norm.eps, width=m.d_inner, sum_over_ranks=lambda s: s * cp,
                      fused=fused)


SCANS = ["ref"] + (["triton"] if triton_available() else [])


@pytest.mark.parametrize("scan_impl", SCANS)
@pytest.mark.parametrize("dtype,floor", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("seqlen", [2048, 16384])
@pytest.mark.parametrize("cp", [2, 4])
def test_fused_parts_on_cp_share_match_reference(cp, seqlen, dtype, floor, scan_impl):
    # Both paths against the reference parts in fp64 (PyTorch scan): the fused one must be at most twice as
    # far from it as the reference path in the same dtype and scan, plus a floor: fp32 1e-4 for summation
    # order (tf32 dots inside mamba-ssm's scan on both sides), bf16 3e-2 as the uncut test's bf16 bound.
    # Gradients that sum over every token (D, dt_bias, A_log) cancel, so in bf16 either path's error there
    # varies several-fold with the rounding points (CPU interpreter, tiny shapes: fused 1.7e-2 vs reference
    # 4e-3 on dt_bias, 4e-3 vs 6e-3 on D). A wrong index, flip or reduction is off by O(1).
    torch.manual_seed(0)
    m = Hydra(512, d_state=64, d_conv=7, expand=2, headdim=64, chunk_size=256, ssd_impl=scan_impl).cuda()
    with torch.no_grad():
        m.A_log.uniform_(-1.0, 1.0)
        m.D.normal_()
        m.fc_D.weight.normal_(0.0, 0.05)
        m.norm.weight.uniform_(0.5, 1.5)
    ins, w = _share(m, cp, 1, seqlen, torch.float64)
    g = None
    res = {}
    for name, fused, dt, scan in (("truth", False, torch.float64, "ref"), ("fused", True, dtype, scan_impl),
                                  ("reference", False, dtype, scan_impl)):
        ins_ = [t.detach().to(dt).requires_grad_() for t in ins]
        w_ = {k: v.detach().to(dt if k != "A_log" else torch.float32).requires_grad_() for k, v in w.items()}
        if dt == torch.float64:
            w_["A_log"] = w["A_log"].detach().clone().requires_grad_()
        out = _run(m, cp, ins_, w_, fused, scan)
        if g is None:
            g = torch.randn_like(out)
        res[name] = [out, *torch.autograd.grad(out, ins_ + list(w_.values()), g.to(out.dtype))]
    assert torch.isfinite(res["fused"][0]).all()
    names = ["out", "xbc", "dt", "z", *w]
    err = {k: {n: _rel(a, b) for n, a, b in zip(names, res[k], res["truth"])} for k in ("fused", "reference")}
    bad = {n: (err["fused"][n], err["reference"][n]) for n in names
           if not err["fused"][n] <= 2 * err["reference"][n] + floor}
    assert not bad, (err, bad)
