"""The training fast paths against their references: FP8 linears (torchao in emulation on CPU), regional
compilation of the blocks (a recording backend, no code generation), ZeRO-3 options and leaves.

Tolerances: FP8 e4m3 keeps 3 mantissa bits (relative rounding up to 2^-4 per element, ~2^-5 on average);
a GEMM's output averages that error over its inner dimension, so the emulated model's output stays within a
few percent of fp32's -- 10 % is asserted, and more than 1e-4 (it did round: FP8 really ran). Padding and
compilation change no arithmetic: they are compared to 1e-6 (fp32 reassociation) or exactly.
"""

import copy

import pytest
import torch
from torch import nn

from megassm.config import ModelConfig
from megassm.config.validate import ConfigError
from megassm.models import build_model
from megassm.models.block import HTHBlock, compile_blocks
from megassm.run_config import load_config, validate

torchao = pytest.importorskip("torchao")  # CI installs it (pyproject's dev extra)

from megassm.ops.fp8 import _padded_class, convert_to_fp8, fp8_targets  # noqa: E402
from megassm.train.speed import apply_speed  # noqa: E402

# widths where every token linear is a multiple of 16 (Hydra's in_proj: 2*128 + 4*8 + 2*8 = 304)
M16 = dict(in_channels=4, d_model=64, num_heads=4, headdim=16, d_state=8, chunk_size=8, text_dim=16, max_text_len=6)


def _inputs(B=2, T=2, H=6, W=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 4, T, H, W, generator=g), torch.rand(B, generator=g),
            torch.randn(B, 5, 16, generator=g), torch.ones(B, 5, dtype=torch.bool))


def _model(pattern="hvAt", seed=0, **kw):
    torch.manual_seed(seed)
    m = build_model(ModelConfig(pattern=pattern, **{**M16, **kw}))
    for p in m.parameters():  # open the zero-initialised gates and output: every path carries a gradient
        if p.abs().sum() == 0:
            nn.init.normal_(p, std=0.2)
    return m


def _step(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    w = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * w).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _recording_backend():
    """(graphs, backend): a torch.compile backend that keeps each captured graph in ``graphs`` and runs it as is."""
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return graphs, recording


def test_fp8_takes_the_token_linears_and_keeps_the_rest():
    take, keep = fp8_targets(_model())
    leaves = {n.split(".", 2)[2] for n in take}
    assert leaves == {"mixer.in_proj", "mixer.out_proj", "mixer.qkv", "mixer.proj", "cross_attn.q",
                      "cross_attn.proj", "mlp.fc1", "mlp.fc2"}
    assert {k.split(".", 2)[2].split(" ")[0] for k in keep} == {"mixer.fc_D", "cross_attn.kv"}
    # widths that are not multiples of 16 stay in bf16, named with the reason
    _, keep = fp8_targets(_model(d_model=40, num_heads=4, headdim=20))
    assert any("multiples of 16" in k and "mixer.in_proj" in k for k in keep)


def test_fp8_emulated_model_is_near_fp32_and_really_rounds():
    ref, inputs = _model(), _inputs()
    fp8 = copy.deepcopy(ref)
    report = convert_to_fp8(fp8, "tensorwise", emulate=True)
    assert "tensorwise (emulated) on 24 linears" in report, report
    names = dict(ref.named_parameters()).keys()
    assert dict(fp8.named_parameters()).keys() == names  # checkpoints cannot tell
    out_r, g_r = _step(ref, inputs)
    out_f, g_f = _step(fp8, inputs)
    rel = (out_f - out_r).norm() / out_r.norm()
    assert 1e-4 < rel < 0.1, rel
    for n in ("blocks.0.mixer.in_proj.weight", "blocks.2.mixer.qkv.weight", "blocks.3.mlp.fc2.weight"):
        rel = (g_f[n] - g_r[n]).norm() / g_r[n].norm()
        assert 1e-4 < rel < 0.15, (n, rel)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_token_padding_is_exact(recipe):
    """A token count that is not a multiple of 16 (stage 3 under cp 4: 7,260) is padded with zero rows: the
    same output rows and the same weight gradient as the unpadded emulated GEMM."""
    from torchao.float8.float8_linear import Float8Linear

    from megassm.ops.fp8 import _float8_config

    torch.manual_seed(0)
    lin = nn.Linear(32, 48)
    cfg = _float8_config(recipe, emulate=True)
    plain, padded = Float8Linear.from_float(copy.deepcopy(lin), config=cfg), _padded_class().from_float(
        copy.deepcopy(lin), config=cfg)
    x = torch.randn(3, 7, 32)  # 21 tokens
    outs = []
    for mod in (plain, padded):
        xi = x.clone().requires_grad_()
        y = mod(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y.detach(), xi.grad, mod.weight.grad, mod.bias.grad))
    assert outs[1][0].shape == (3, 7, 48)
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), (a - b).abs().max()


def test_compiled_blocks_equal_eager_and_compile_something():
    """Regional compilation through a recording backend (the captured graphs run as they are): output and
    every gradient equal eager; graphs were captured for each mixer kind; Hydra's fused kernels stay out."""
    graphs, recording = _recording_backend()
    ref, inputs = _model("hvvA"), _inputs()
    comp = copy.deepcopy(ref)
    assert compile_blocks(comp, backend=recording) == 4
    comp.blocks[3].grad_checkpoint = True  # checkpointing around a compiled block
    out_r, g_r = _step(ref, inputs)
    out_c, g_c = _step(comp, inputs)
    assert graphs, "nothing was compiled"
    _step(comp, inputs)  # the second step may still trace resume frames first run then
    n = len(graphs)
    _step(comp, inputs)  # steady state: a new grid, same shapes, the same graphs
    assert len(graphs) == n, f"recompiled: {n} graphs after two steps, {len(graphs)} after three"
    assert torch.allclose(out_c, out_r, rtol=1e-6, atol=1e-6)
    assert g_c.keys() == g_r.keys()
    for n in g_r:
        assert torch.allclose(g_c[n], g_r[n], rtol=1e-5, atol=1e-6), n


@pytest.mark.parametrize("pattern", ["hvhAvhvA", "hthAvtvA"])  # hth-5b's and stage 3 video's repeating units
def test_compiled_blocks_compile_one_graph_per_kind_of_block(pattern):
    """One graph per distinct block symbol, however the kinds interleave. A block that filled the token grid's
    caches (scan permutations, RoPE angles) inside its compiled region guarded on their state, and each later
    block met another: 5 and 7 graphs for these patterns, each minutes of Inductor on the GPU."""
    import torch._dynamo

    graphs, recording = _recording_backend()
    torch._dynamo.reset()
    model = _model(pattern)
    compile_blocks(model, backend=recording)
    _step(model, _inputs())
    _step(model, _inputs())
    assert len(graphs) == len(set(pattern)), f"{len(graphs)} graphs for {len(set(pattern))} kinds of block"


def _cfg(**over):
    cfg = load_config("configs/smoke.yaml")
    for k, v in over.items():
        section, key = k.split(".")
        setattr(getattr(cfg, section), key, v)
    return cfg


@pytest.mark.parametrize("over, match", [
    ({"model.fp8": "fp8"}, r"model.fp8='fp8' is not valid; choose one of \['none', 'tensorwise', 'rowwise'\]"),
    ({"model.compile": "full"}, r"model.compile='full' is not valid; choose one of \['none', 'blocks'\]"),
    ({"model.fp8": "tensorwise", "parallel.tp": 2}, r"model.fp8=tensorwise with parallel.tp=2"),
    ({"parallel.zero_options": {"stage3_prefetch": 5}}, r"parallel.zero_options.stage3_prefetch is not a key"),
    ({"parallel.zero_options": {"reduce_bucket_size": -1}}, r"must be a whole number >= 0"),
    ({"parallel.zero_options": {"overlap_comm": 1}}, r"must be true or false"),
    ({"parallel.zero_options": {"stage3_max_live_parameters": 10}, "parallel.zero_stage": 2},
     r"applies to ZeRO-3 only"),
])
def test_bad_speed_keys_are_refused_at_load(over, match):
    with pytest.raises(ConfigError, match=match):
        validate(_cfg(**over))


def test_zero_options_reach_deepspeed_and_compiled_blocks_are_leaves():
    from megassm.train.backends.deepspeed import deepspeed_config, mark_model

    cfg = _cfg(**{"parallel.zero_options": {"stage3_param_persistence_threshold": 1e9, "overlap_comm": False}})
    validate(cfg)
    ds = deepspeed_config(cfg.parallel, cfg.train, 1.0, torch.device("cpu"), 1, 1)
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 1e9
    assert ds["zero_optimization"]["overlap_comm"] is False
    pytest.importorskip("deepspeed")
    model = _model("hA")
    notes = apply_speed(model, ModelConfig(**{**M16, "pattern": "hA", "compile": "blocks"}), torch.device("cpu"))
    assert notes == ["compile: 2 blocks (torch.compile per block, static shapes; the first step compiles)"]
    mark_model(model, 3)
    assert [type(m).__name__ for m in model.modules() if getattr(m, "_z3_leaf", False)] == ["HTHBlock"] * 2
    eager = _model("hA")
    mark_model(eager, 3)
    assert {type(m).__name__ for m in eager.modules() if getattr(m, "_z3_leaf", False)} == {"Hydra"}
    assert all(isinstance(b, HTHBlock) for b in model.blocks)


def test_cuda_runs_are_told_the_fast_paths_are_experimental(caplog):
    """On CUDA, model.compile / model.fp8 log what one H100 showed and what is unproven; on CPU, and on CUDA with
    both off, nothing is said."""
    from megassm.train.speed import CUDA_CAVEAT

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    with caplog.at_level("WARNING", logger="megassm.train"):
        apply_speed(_model("hA"), ModelConfig(compile="none"), cuda)
        apply_speed(_model("hA"), ModelConfig(compile="blocks"), cpu)
        assert CUDA_CAVEAT not in caplog.text
        notes = apply_speed(_model("hA"), ModelConfig(compile="blocks"), cuda)  # flags only: nothing runs here
    assert CUDA_CAVEAT in caplog.text and "docs/performance.md" in CUDA_CAVEAT
    assert notes and notes[0].startswith("compile: ")


def test_compiled_regions_take_no_views_of_the_modulation():
    """With the mixer run eager (as Hydra's fused call and SDPA are on CUDA), the compiled block splits into
    regions; the later one must take the (B, 6, d) modulation itself, not (B, 1, d) views of it (aliased view
    inputs are where a compiled backward returned a mis-shaped gradient on an H100: docs/performance.md)."""
    inputs_seen = []

    def recording(gm, example_inputs):
        inputs_seen.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward

    model = _model("hA")
    for blk in model.blocks:
        blk.mixer.mix = torch.compiler.disable(blk.mixer.mix)
    compile_blocks(model, backend=recording)
    _step(model, _inputs())
    assert len(inputs_seen) >= 2, "the eager mixer call should split each block into regions"
    batch, d = _inputs()[0].shape[0], model.blocks[0].scale_shift_table.shape[1]
    views = [s for shapes in inputs_seen for s in shapes if s == (batch, 1, d)]
    assert not views, f"compiled regions took {len(views)} (B, 1, d) modulation views as inputs"


def test_compile_blocks_decides_the_hydra_path_before_tracing(monkeypatch):
    """Whether Hydra runs the fused kernels is a cached check that imports mamba-ssm and Triton. Left unset until
    the first compiled forward, Dynamo traced those imports, and on an H100 the compiled blocks then ran the
    reference scan (its chunk x chunk intermediates filled the card). compile_blocks answers both checks eagerly,
    so the compiled graph only reads the cached answers. Failed before the fix: both caches were still unset."""
    import megassm.ops.hydra_fused as hf
    import megassm.ops.ssd as ssd

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # no forward runs: nothing touches a GPU
    monkeypatch.setattr(hf, "_AVAILABLE", None)
    monkeypatch.setattr(hf, "_MAMBA_FWD_BWD", None)
    monkeypatch.setattr(ssd, "_TRITON_SCAN", None)
    monkeypatch.setattr(ssd, "_TRITON_IMPORT_ERROR", None)
    compile_blocks(_model("hA"))
    assert hf._AVAILABLE is not None
    assert ssd._TRITON_SCAN is not None or ssd._TRITON_IMPORT_ERROR is not None


def test_an_availability_check_first_asked_while_tracing_is_loud(monkeypatch):
    """The other half of the fix above: a check whose first answer would come from a Dynamo trace raises instead of
    answering (a whole-graph compile fails naming it; otherwise Dynamo runs that call eagerly). Before, it
    answered, and on an H100 the traced answer was a wrong False."""
    import torch._dynamo

    import megassm.ops.hydra_fused as hf
    import megassm.ops.ssd as ssd

    monkeypatch.setattr(hf, "_AVAILABLE", None)
    monkeypatch.setattr(ssd, "_TRITON_SCAN", None)
    monkeypatch.setattr(ssd, "_TRITON_IMPORT_ERROR", None)
    for check in (hf.fused_available, ssd._load_triton_scan):
        torch._dynamo.reset()
        fn = torch.compile(lambda x, check=check: x + 1 if check() else x - 1, backend="eager", fullgraph=True)
        with pytest.raises(Exception, match="first (asked|looked up) inside a torch.compile region"):
            fn(torch.zeros(1))
    assert hf._AVAILABLE is None and ssd._TRITON_SCAN is None and ssd._TRITON_IMPORT_ERROR is None


@pytest.mark.parametrize("device, over, warns", [
    ("cuda", {}, True),  # auto on CUDA, yet the reference ran: the kernels did not import (or were traced away)
    ("cuda", {"hydra_path": "reference"}, False),  # asked for
    ("cuda", {"ssd_impl": "ref"}, False),
    ("cpu", {}, False),  # the CPU's path
])
def test_a_reference_hydra_on_cuda_is_warned_about(device, over, warns):
    """megassm train's first-step line: a Hydra mixer on the PyTorch reference scan on CUDA, unasked, is a warning
    that says how to find out why (the compiled blocks that ran it on an H100 said nothing but 'out of memory')."""
    from megassm.train.loop import hydra_paths

    model = _model("hvA")
    model(*_inputs())  # CPU: every Hydra on the reference path
    msg, warn = hydra_paths(model, torch.device(device), ModelConfig(**{**M16, "pattern": "hvA", **over}))
    assert msg.startswith("Hydra mixers: 0 fused, 2 reference path")
    assert warn is warns and (("fused_available()" in msg) is warns)
