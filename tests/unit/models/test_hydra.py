"""Hydra against its closed-form quasiseparable matrix (docs/architecture.md §2), forward and gradients."""

import pytest
import torch
import torch.nn.functional as F

from megassm.models.hydra import Hydra
from megassm.ops.norm import gated_rms_norm_ref


def hydra_closed_form(m: Hydra, u: torch.Tensor) -> torch.Tensor:
    """y_i = sum_{j<i} C_f,i-1 B_f,j dt_f,j prod_{k=j+1}^{i-1} a_f,k x_j
           + sum_{j>i} C_b,i+1 B_b,j dt_b,j prod_{k=i+1}^{j-1} a_b,k x_j + (fc_D(x)_i + D) x_i."""
    Bsz, L, _ = u.shape
    h, p, n, g = m.nheads, m.headdim, m.d_state, m.ngroups
    z, xbc, dt = torch.split(m.in_proj(u), [m.d_inner, m.d_inner + 2 * m.d_bc, 2 * h], dim=-1)
    xbc = F.silu(m.conv1d(xbc.transpose(1, 2)).transpose(1, 2))
    x, Bf, Cf, Bb, Cb = torch.split(xbc, [m.d_inner, g * n, g * n, g * n, g * n], dim=-1)
    dtf = F.softplus(dt[..., :h] + m.dt_bias)  # (B, L, h)
    dtb = F.softplus(dt[..., h:] + m.dt_bias)
    A = -torch.exp(m.A_log)
    xh = x.view(Bsz, L, h, p)
    rep = lambda t: t.view(Bsz, L, g, n).repeat_interleave(h // g, dim=2)  # (B, L, h, n)
    Bf, Cf, Bb, Cb = rep(Bf), rep(Cf), rep(Bb), rep(Cb)
    M = torch.zeros(Bsz, h, L, L, dtype=u.dtype)
    for i in range(L):
        for j in range(L):
            if i > j:
                decay = torch.exp((dtf[:, j + 1 : i] * A).sum(1))  # (B, h)
                M[:, :, i, j] = (Cf[:, i - 1] * Bf[:, j]).sum(-1) * dtf[:, j] * decay
            elif i < j:
                decay = torch.exp((dtb[:, i + 1 : j] * A).sum(1))
                M[:, :, i, j] = (Cb[:, i + 1] * Bb[:, j]).sum(-1) * dtb[:, j] * decay
    y = torch.einsum("bhij,bjhp->bihp", M, xh)
    diag = F.linear(x, m.fc_D.weight, m.D)  # (B, L, h)
    y = y + xh * diag.unsqueeze(-1)
    y = gated_rms_norm_ref(y.reshape(Bsz, L, -1), z, m.norm.weight, m.norm.eps)
    return m.out_proj(y)


@pytest.mark.parametrize("ngroups,chunk,L", [(1, 4, 11), (2, 3, 9), (1, 64, 6), (1, 4, 1)])
def test_hydra_equals_closed_form(ngroups, chunk, L):
    torch.manual_seed(0)
    m = Hydra(16, d_state=4, d_conv=3, expand=2, headdim=8, ngroups=ngroups, chunk_size=chunk, ssd_impl="ref")
    m = m.double()
    with torch.no_grad():  # move away from the init values so every term matters
        m.A_log.uniform_(-1, 1)
        m.D.uniform_(-1, 1)
        m.norm.weight.uniform_(0.5, 1.5)
    u = torch.randn(2, L, 16, dtype=torch.float64, requires_grad=True)
    y = m(u)
    y_ref = hydra_closed_form(m, u)
    # fp64: both sides differ only in summation order
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    w = torch.randn_like(y)
    params = [u] + list(m.parameters())
    # L = 1 leaves the scan terms out of the closed form's graph: unused means zero gradient
    g = torch.autograd.grad((y * w).sum(), params, allow_unused=True, materialize_grads=True)
    g_ref = torch.autograd.grad((y_ref * w).sum(), params, allow_unused=True, materialize_grads=True)
    names = ["input"] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=f"gradient of {name}")


def test_reference_parameter_names_and_shapes():
    """Names/shapes of goombalab/hydra's Hydra(d_model=64) with its defaults."""
    m = Hydra(64)
    d_inner, nheads, d_state = 128, 2, 64
    expected = {
        "in_proj.weight": (2 * d_inner + 4 * d_state + 2 * nheads, 64),
        "conv1d.weight": (d_inner + 4 * d_state, 1, 7),
        "conv1d.bias": (d_inner + 4 * d_state,),
        "dt_bias": (nheads,),
        "A_log": (nheads,),
        "D": (nheads,),
        "fc_D.weight": (nheads, d_inner),
        "norm.weight": (d_inner,),
        "out_proj.weight": (64, d_inner),
    }
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    assert m.chunk_size == 256 and m.d_conv == 7 and m.headdim == 64 and m.ngroups == 1
    # A = -1 initially, as the reference initialises A_log = log(1)
    assert torch.equal(m.A_log, torch.zeros(nheads))
    # a reference-layout state dict loads strictly
    Hydra(64).load_state_dict(m.state_dict(), strict=True)


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="headdim"):
        Hydra(10, headdim=8)
    with pytest.raises(ValueError, match="odd"):
        Hydra(16, headdim=8, d_conv=4)
    with pytest.raises(ValueError, match="ngroups"):
        Hydra(16, headdim=8, ngroups=3)
