"""Checks of the fused Hydra mixer against its references, runnable on CPU (Triton interpreter) or CUDA.

Run by tests/unit/ops/test_hydra_fused.py in a child process with TRITON_INTERPRET=1 (the interpreter
must be switched on before the kernels are first imported; ``megassm.ops.hydra_kernels`` then patches a
Triton 3.6 interpreter bug), and by tests/gpu on CUDA.
"""

from __future__ import annotations

import sys

import torch

from megassm.models.hydra import Hydra
from megassm.ops.hydra_fused import hydra_mix_fused
from megassm.ops.hydra_mix import conv_silu_ref, hydra_mix, hydra_mix_ref


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_inputs(batch=2, seqlen=37, d_model=32, headdim=16, d_state=8, ngroups=1, dtype=torch.float64,
                device="cpu", seed=0, chunk_size=16, conv_bias=True, d_conv=7):
    torch.manual_seed(seed)
    m = Hydra(d_model, d_state=d_state, d_conv=d_conv, expand=2, headdim=headdim, ngroups=ngroups,
              chunk_size=chunk_size, ssd_impl="ref", conv_bias=conv_bias)
    with torch.no_grad():  # non-trivial values everywhere (the defaults make A = -1, D = 1, norm = 1)
        m.A_log.uniform_(-1.0, 1.0)
        m.D.normal_()
        m.norm.weight.uniform_(0.5, 1.5)
        m.fc_D.weight.normal_(0.0, 0.1)
    m = m.to(device=device, dtype=dtype)
    u = torch.randn(batch, seqlen, d_model, device=device, dtype=dtype)
    return m, u


def mix_args(m: Hydra):
    return (m.conv1d.weight, m.conv1d.bias, m.dt_bias, -torch.exp(m.A_log.float()), m.fc_D.weight, m.D,
            m.norm.weight, m.norm.eps, m.headdim, m.d_state, m.ngroups, m.chunk_size)


def check_conv(device="cpu", dtype=torch.float32):
    from megassm.ops.hydra_fused import _launch_conv_fwd

    m, u = make_inputs(device=device, dtype=dtype, seqlen=45)
    zxbcdt = m.in_proj(u).detach()
    xbc = zxbcdt[..., m.d_inner: 2 * m.d_inner + 2 * m.d_bc]
    xs, bcs = _launch_conv_fwd(xbc, m.conv1d.weight.reshape(xbc.shape[-1], -1).contiguous(), m.conv1d.bias,
                               m.d_inner, m.d_bc)
    xs_r, bcs_r = conv_silu_ref(xbc, m.conv1d.weight, m.conv1d.bias, m.d_inner)
    return {"conv_xs": _rel(xs, xs_r), "conv_bcs": _rel(bcs, bcs_r)}


def _fused_parts(zxbcdt, *args, scan_impl="ref"):
    return hydra_mix(zxbcdt, *args, fused=True, scan_impl=scan_impl)


def _compiled_uncut(zxbcdt, *args, scan_impl="ref"):
    """``hydra_mix_fused`` traced whole by torch.compile (its custom ops); fullgraph: a graph break fails."""
    return torch.compile(hydra_mix_fused, backend="aot_eager", fullgraph=True, dynamic=False)(
        zxbcdt, *args, scan_impl=scan_impl)


def _inductor_uncut(zxbcdt, *args, scan_impl="ref"):
    """The same under Inductor, the backend ``model.compile: blocks`` uses: it asserts each custom op's output
    shapes and strides against the fake's, which aot_eager does not (a transposed d conv_w passed aot_eager on CPU
    and stopped the first compiled step on an H100)."""
    return torch.compile(hydra_mix_fused, backend="inductor", fullgraph=True, dynamic=False)(
        zxbcdt, *args, scan_impl=scan_impl)


def check_custom_ops(device="cpu", dtype=torch.float64, scan_impl="ref"):
    """The compiled path's ops: torch.library.opcheck (schema, fake shapes and dtypes against the real
    outputs, autograd registration, AOT dispatch), with and without the conv bias."""
    for conv_bias in (True, False):
        m, u = make_inputs(device=device, dtype=dtype, batch=1, seqlen=20, conv_bias=conv_bias)
        zxbcdt = m.in_proj(u).detach().requires_grad_()
        conv_w, conv_b, dt_bias, A, *rest = mix_args(m)
        args = (zxbcdt, conv_w, conv_b, dt_bias, A.detach().requires_grad_(), *rest[:4], *rest[4:], scan_impl)
        torch.library.opcheck(torch.ops.megassm.hydra_mix_fwd.default, args)
        # the backward op too: its fake must give the real outputs' shapes and strides (Inductor asserts them;
        # on an H100 d conv_w came back transposed, (1, ., 6400) strides against the fake's (7, 7, 1))
        with torch.no_grad():
            out, *saved = torch.ops.megassm.hydra_mix_fwd.default(*args)
        dout = torch.randn_like(out)
        bwd_args = (dout, *args[:8], *saved, *args[9:])
        real = torch.ops.megassm.hydra_mix_bwd.default(*bwd_args)
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            fake = torch.ops.megassm.hydra_mix_bwd.default(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                            for a in bwd_args])
        for r, f in zip(real, fake):
            assert r.shape == f.shape and r.stride() == f.stride(), (tuple(r.shape), r.stride(), f.stride())
    return {}


def _fused_h_block_config():
    """A small Hydra block on the fused path (in Triton's interpreter on CPU, the PyTorch scan inside)."""
    from megassm.config.schema import ModelConfig

    return ModelConfig(d_model=32, pattern="h", d_state=8, headdim=8, chunk_size=4, num_heads=4, text_dim=16,
                       max_text_len=8, ssd_impl="ref", hydra_path="fused")


def check_block_is_one_graph(device="cpu"):
    """A Hydra block on the fused path, as ``model.compile: blocks`` compiles it: one graph, no break (the mixer
    used to be a compiler-disabled call that split every block into several compiled regions)."""
    import torch._dynamo

    from megassm.models.block import HTHBlock, TokenGrid

    cfg = _fused_h_block_config()
    torch.manual_seed(0)
    blk = HTHBlock(cfg, "h").to(device)
    x, t_mod = torch.randn(1, 32, 32, device=device), torch.randn(1, 6 * 32, device=device)
    text, mask = torch.randn(1, 8, 32, device=device), torch.ones(1, 8, dtype=torch.bool, device=device)
    grid = TokenGrid((2, 4, 4), x.device, rope_head_dim=8)
    ex = torch._dynamo.explain(HTHBlock._forward)(blk, x, t_mod, text, mask, grid)
    assert blk.mixer.path_taken == "fused", blk.mixer.path_taken
    return {"h_block_extra_graphs": ex.graph_count - 1, "h_block_graph_breaks": ex.graph_break_count}


def check_block_inductor(device="cpu"):
    """A Hydra block on the fused path compiled as ``model.compile: blocks`` compiles it (Inductor, one graph
    with the custom ops inside) against the same block eager: output and the gradients of its inputs and
    parameters, fp64. What the GPU's compiled step runs, short of the CUDA kernels."""
    import copy

    from megassm.models.block import HTHBlock, TokenGrid

    cfg = _fused_h_block_config()
    torch.manual_seed(0)
    eager = HTHBlock(cfg, "h").to(device, torch.float64)
    with torch.no_grad():
        eager.scale_shift_table.normal_(0.0, 0.3)  # open the gates: every branch carries gradient
    comp = copy.deepcopy(eager)
    comp.compile_backend = "inductor"
    g = torch.Generator().manual_seed(1)
    x, t_mod, text = (torch.randn(*s, generator=g, dtype=torch.float64).to(device)
                      for s in ((2, 32, 32), (2, 6 * 32), (2, 8, 32)))
    mask = torch.ones(2, 8, dtype=torch.bool, device=device)
    mask[1, 5:] = False
    grid = TokenGrid((2, 4, 4), x.device, rope_head_dim=8)

    def run(blk):
        xs = [t.clone().requires_grad_() for t in (x, t_mod, text)]
        out = blk(xs[0], xs[1], xs[2], mask, grid)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=device).view_as(out)).sum().backward()
        return [out] + [t.grad for t in xs] + [p.grad for p in blk.parameters()]

    a, b = run(comp), run(eager)
    assert comp.mixer.path_taken == "fused", comp.mixer.path_taken
    return {"inductor_block_h": max(_rel(u, v) for u, v in zip(a, b))}


def check_mix(device="cpu", dtype=torch.float64, scan_impl="ref", fn=hydra_mix_fused, **kw):
    """A fused composition (the uncut Function, or the cut parts) vs the autograd-composed reference
    parts: output and all gradients."""
    m, u = make_inputs(device=device, dtype=dtype, **kw)
    zxbcdt = m.in_proj(u).detach().requires_grad_()
    params = [m.conv1d.weight, m.conv1d.bias, m.dt_bias, m.A_log, m.fc_D.weight, m.D, m.norm.weight]
    params = [p for p in params if p is not None]
    out = fn(zxbcdt, *mix_args(m), scan_impl=scan_impl)
    g_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [zxbcdt] + params, g_out)
    out_r = hydra_mix_ref(zxbcdt, *mix_args(m))
    grads_r = torch.autograd.grad(out_r, [zxbcdt] + params, g_out)
    names = ["zxbcdt", "conv_w", "conv_b", "dt_bias", "A_log", "fc_D", "D", "norm_w"]
    if m.conv1d.bias is None:
        names.remove("conv_b")
    res = {"out": _rel(out, out_r)}
    res.update({f"grad_{n}": _rel(a, b) for n, a, b in zip(names, grads, grads_r)})
    return res


def check_norm_across_ranks(device="cpu", dtype=torch.float64):
    """The cut gated norm's two-launch path (a reduction between them) against the reference with the same
    reduction: this token's channels are half of its width and the other half is taken to have the
    same sum of squares (sum_over_ranks = 2x, its own adjoint)."""
    from megassm.ops.hydra_mix import gated_norm

    gen = torch.Generator().manual_seed(5)
    y, z, dout = (torch.randn(2, 9, 24, generator=gen, dtype=dtype).to(device) for _ in range(3))
    z = torch.randn(2, 9, 40, generator=gen, dtype=dtype).to(device)[..., 3:27]  # a strided view, as from in_proj
    w = (torch.rand(24, generator=gen, dtype=dtype) + 0.5).to(device)
    res = {}
    outs = []
    for fused in (False, True):
        ins = [t.detach().clone().requires_grad_() for t in (y, z, w)]
        out = gated_norm(*ins[:2], ins[2], 1e-5, width=48, sum_over_ranks=lambda s: 2 * s, fused=fused)
        outs.append((out, torch.autograd.grad(out, ins, dout)))
    res["ranks_norm_out"] = _rel(outs[1][0], outs[0][0])
    for n, a, b in zip(("y", "z", "w"), outs[1][1], outs[0][1]):
        res[f"ranks_norm_grad_{n}"] = _rel(a, b)
    return res


def check_module(device="cpu", dtype=torch.float64, scan_impl="ref", **kw):
    """Hydra(fused=True) vs Hydra(fused=False) (the reference path): output and parameter grads."""
    m, u = make_inputs(device=device, dtype=dtype, **kw)
    u.requires_grad_()
    res = {}
    outs = {}
    for fused in (False, True):
        m.fused = fused
        m.fused_scan_impl = scan_impl
        out = m(u)
        assert m.path_taken == ("fused" if fused else "reference"), m.path_taken
        g = torch.autograd.grad(out, [u] + list(m.parameters()), torch.ones_like(out) * 0.1 + out.detach())
        outs[fused] = (out, g)
    res["module_out"] = _rel(outs[True][0], outs[False][0])
    names = ["u"] + [n for n, _ in m.named_parameters()]
    for n, a, b in zip(names, outs[True][1], outs[False][1]):
        res[f"module_grad_{n}"] = _rel(a, b)
    return res


def run_all(device="cpu", scan_impl="ref"):
    res = {}
    res.update(check_conv(device))
    res.update(check_mix(device, torch.float64, scan_impl))
    res.update({f"L1_{k}": v for k, v in check_mix(device, torch.float64, scan_impl, seqlen=1).items()})
    res.update({f"nobias_{k}": v for k, v in check_mix(device, torch.float64, scan_impl, conv_bias=False,
                                                       ngroups=2, batch=1, seqlen=20, d_conv=3).items()})
    res.update(check_module(device, torch.float64, scan_impl))
    # the cut parts (what ParallelHydra runs) on one rank: ragged chunks, L = 1, ngroups 2 / d_conv 3 / no bias
    res.update({f"parts_{k}": v for k, v in check_mix(device, torch.float64, scan_impl, fn=_fused_parts).items()})
    res.update({f"parts_L1_{k}": v for k, v in check_mix(device, torch.float64, scan_impl, fn=_fused_parts,
                                                         seqlen=1).items()})
    res.update({f"parts_nobias_{k}": v for k, v in check_mix(device, torch.float64, scan_impl, fn=_fused_parts,
                                                             conv_bias=False, ngroups=2, batch=1, seqlen=20,
                                                             d_conv=3).items()})
    res.update(check_norm_across_ranks(device))
    # the uncut path as a compiled block runs it (custom ops, no graph break), and the ops' registrations
    res.update({f"compiled_{k}": v for k, v in check_mix(device, torch.float64, scan_impl, fn=_compiled_uncut).items()})
    res.update({f"compiled_nobias_{k}": v for k, v in check_mix(device, torch.float64, scan_impl, fn=_compiled_uncut,
                                                                conv_bias=False, ngroups=2, batch=1, seqlen=20,
                                                                d_conv=3).items()})
    res.update({f"inductor_{k}": v for k, v in check_mix(device, torch.float64, scan_impl, fn=_inductor_uncut).items()})
    res.update({f"inductor_nobias_{k}": v for k, v in check_mix(device, torch.float64, scan_impl, fn=_inductor_uncut,
                                                                conv_bias=False, ngroups=2, batch=1, seqlen=20,
                                                                d_conv=3).items()})
    res.update(check_custom_ops(device, torch.float64, scan_impl))
    if device == "cpu":  # Dynamo's view of the block; on CUDA tests/gpu/test_block_cuda.py compiles it for real
        res.update(check_block_is_one_graph(device))
        res.update(check_block_inductor(device))
    return res


if __name__ == "__main__":
    import json

    print(json.dumps(run_all(*sys.argv[1:]), indent=1))
