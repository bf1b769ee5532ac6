"""State-passing Hydra over k slices, the ranks simulated in one process (megassm.ops.hydra_state_passing):
outputs and every gradient equal the unsplit mixer (``hydra_mix_ref``) in fp64, with slices shorter than a
chunk, an uneven last chunk and uneven slices; and dropping the state exchange, the conv halo or the shift
message each breaks it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megassm.models.hydra import Hydra, decay_rates
from megassm.ops import hydra_state_passing as sp
from megassm.ops.hydra_mix import combine, gated_norm, hydra_mix_ref

TOL = 1e-10  # fp64: the same sums in another order (chunk boundaries moved, the state added afterwards)


def _hydra(d_conv=5, ngroups=1, chunk_size=4, seed=0) -> Hydra:
    torch.manual_seed(seed)
    m = Hydra(16, d_state=4, d_conv=d_conv, expand=2, headdim=8, ngroups=ngroups, chunk_size=chunk_size,
              ssd_impl="ref").double()
    with torch.no_grad():  # non-trivial values everywhere (defaults: A = -1, D = 1, norm = 1)
        m.A_log.uniform_(-1.0, 1.0)
        m.D.normal_()
        m.norm.weight.uniform_(0.5, 1.5)
        m.fc_D.weight.normal_(0.0, 0.3)
    return m


def _split(m: Hydra, zxbcdt):
    return torch.split(zxbcdt, [m.d_inner, m.d_inner + 2 * m.d_bc, 2 * m.nheads], dim=-1)


def sliced_mix(m: Hydra, zxbcdt: torch.Tensor, bounds: list[int], drop: str | None = None,
               scan_impl: str = "ref") -> torch.Tensor:
    """The mixer as ``len(bounds) - 1`` ranks compute it, each holding tokens [bounds[r], bounds[r+1]), every
    message handed over explicitly. ``drop``: "state", "halo" or "shift" replaces that message by zeros;
    ``scan_impl``: ``ssd_scan``'s ("triton": mamba-ssm's kernel with return_final_states, CUDA)."""
    z, xbc, dt = _split(m, zxbcdt)
    k, cp = m.d_conv // 2, len(bounds) - 1
    sl = [(bounds[r], bounds[r + 1]) for r in range(cp)]
    halos = [sp.halo_rows(xbc[:, a:b], k) for a, b in sl]  # (to_prev, to_next) of each rank
    zero_halo = torch.zeros_like(halos[0][0])
    scans = []
    for r, (a, b) in enumerate(sl):
        prev = halos[r - 1][1] if r > 0 and drop != "halo" else zero_halo
        nxt = halos[r + 1][0] if r < cp - 1 and drop != "halo" else zero_halo
        ext = torch.cat([prev, xbc[:, a:b], nxt], dim=1)
        scans.append(sp.slice_scan(ext, dt[:, a:b], m.conv1d.weight, m.conv1d.bias, m.dt_bias,
                                   decay_rates(m.A_log), headdim=m.headdim, d_state=m.d_state,
                                   chunk_size=m.chunk_size, scan_impl=scan_impl))
    stacked = torch.stack([s.summary for s in scans])  # what the all-gather delivers
    corrected = []
    for r, s in enumerate(scans):
        h0 = sp.incoming_state(stacked, r, m.d_state)
        corrected.append(sp.correct_scan(s, h0 if drop != "state" else torch.zeros_like(h0)))
    edges = [sp.edge_rows(c) for c in corrected]
    zero_edge = torch.zeros_like(edges[0][0])
    ys = []
    for r, (s, c) in enumerate(zip(scans, corrected)):
        from_prev = edges[r - 1][1] if r > 0 and drop != "shift" else zero_edge
        from_next = edges[r + 1][0] if r < cp - 1 and drop != "shift" else zero_edge
        diag = F.linear(s.x, m.fc_D.weight) + m.D
        ys.append(combine(c.to(s.x.dtype), s.x, diag, shift_in=torch.cat([from_prev, from_next])))
    return gated_norm(torch.cat(ys, dim=1), z, m.norm.weight, m.norm.eps)


def _reference(m: Hydra, zxbcdt):
    return hydra_mix_ref(zxbcdt, m.conv1d.weight, m.conv1d.bias, m.dt_bias, decay_rates(m.A_log), m.fc_D.weight,
                         m.D, m.norm.weight, m.norm.eps, m.headdim, m.d_state, m.ngroups, m.chunk_size)


def _run(m: Hydra, zxbcdt, fn):
    """fn's output and the gradients of <out, w> w.r.t. the input and every parameter."""
    m.zero_grad()
    x = zxbcdt.clone().requires_grad_()
    out = fn(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
    (out * w).sum().backward()
    return out, [x.grad] + [p.grad.clone() for p in m.parameters() if p.grad is not None]


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


CASES = {  # name: (seqlen, slice bounds, chunk_size, d_conv, ngroups)
    "2 even slices": (24, [0, 12, 24], 4, 5, 1),
    "4 slices shorter than a chunk": (22, [0, 5, 11, 16, 22], 8, 5, 1),
    "uneven slices, uneven last chunk": (29, [0, 3, 13, 14, 29], 4, 3, 2),
    "3 slices, d_conv 7": (30, [0, 9, 21, 30], 16, 7, 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sliced_mix_equals_unsplit(case):
    L, bounds, cs, d_conv, g = CASES[case]
    m = _hydra(d_conv=d_conv, ngroups=g, chunk_size=cs)
    zxbcdt = torch.randn(2, L, m.in_proj.out_features, dtype=torch.float64)
    out_r, grads_r = _run(m, zxbcdt, lambda x: _reference(m, x))
    out_s, grads_s = _run(m, zxbcdt, lambda x: sliced_mix(m, x, bounds))
    assert _rel(out_s, out_r) < TOL
    assert len(grads_s) == len(grads_r)
    for gs, gr in zip(grads_s, grads_r):
        assert _rel(gs, gr) < TOL


@pytest.mark.parametrize("drop", ["state", "halo", "shift"])
def test_each_message_matters(drop):
    """Teeth: the equality above fails when any one message is dropped."""
    L, bounds, cs, d_conv, g = CASES["uneven slices, uneven last chunk"]
    m = _hydra(d_conv=d_conv, ngroups=g, chunk_size=cs)
    zxbcdt = torch.randn(2, L, m.in_proj.out_features, dtype=torch.float64)
    with torch.no_grad():
        err = _rel(sliced_mix(m, zxbcdt, bounds, drop=drop), _reference(m, zxbcdt))
    assert err > 1e-3, f"dropping the {drop} message went unnoticed ({err:.2g})"


def test_incoming_state_is_the_prefix_and_suffix():
    """The combine over slices against the recursion written out: forward prefix, backward suffix."""
    gen = torch.Generator().manual_seed(1)
    cp, B, h, p, n = 4, 1, 2, 3, 2
    summ = torch.randn(cp, 2 * B, h, p * n + 1, generator=gen, dtype=torch.float64)
    summ[..., -1] = -summ[..., -1].abs()
    S, ld = summ[..., :-1].unflatten(-1, (p, n)), summ[..., -1]
    for r in range(cp):
        got = sp.incoming_state(summ, r, n)
        want_f = sum(torch.exp(ld[s + 1:r, :B].sum(0))[..., None, None] * S[s, :B] for s in range(r))
        want_b = sum(torch.exp(ld[r + 1:s, B:].sum(0))[..., None, None] * S[s, B:] for s in range(r + 1, cp))
        torch.testing.assert_close(got[:B], want_f if r else torch.zeros_like(got[:B]), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[B:], want_b if r < cp - 1 else torch.zeros_like(got[B:]),
                                   rtol=1e-12, atol=1e-12)


def test_slice_shorter_than_the_halo_is_rejected():
    with pytest.raises(ValueError, match="shorter than the conv's halo"):
        sp.halo_rows(torch.zeros(1, 2, 4), 3)


def test_bf16_sliced_is_as_close_to_fp64_as_unsplit():
    """In bf16 the slices' summaries travel in fp32 and the shift rows in bf16: the sliced mixer is no further
    from the fp64 mixer than the unsplit one in bf16 (twice its error, plus a floor of bf16 rounding)."""
    import copy

    L, bounds, cs, d_conv, g = CASES["4 slices shorter than a chunk"]
    m = _hydra(d_conv=d_conv, ngroups=g, chunk_size=cs)
    zxbcdt = torch.randn(2, L, m.in_proj.out_features, dtype=torch.float64)
    mb = copy.deepcopy(m).to(torch.bfloat16)
    with torch.no_grad():
        want = _reference(m, zxbcdt)
        err_unsplit = _rel(_reference(mb, zxbcdt.bfloat16()).double(), want)
        err_sliced = _rel(sliced_mix(mb, zxbcdt.bfloat16(), bounds).double(), want)
    assert err_sliced <= 2 * err_unsplit + 4e-3, (err_sliced, err_unsplit)
