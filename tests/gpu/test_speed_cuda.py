"""CUDA-only: the training fast paths (megassm/train/speed.py) against their references, bf16.

- FP8 linears (torchao, real ``torch._scaled_mm``) against the same FP8 recipe emulated (the CPU tests'
  path) and against bf16, including a token count that is not a multiple of 16 (padded);
- a compiled HTHBlock (Inductor) against the eager block, Hydra and attention mixers.
Norm-relative errors ||a - b|| / ||b||. Bounds: 2e-2 for two bf16 computations of the same block (bf16
rounding over 1024-wide sums, as tests/gpu/test_block_cuda.py); FP8 against bf16 10 % (e4m3: 3 mantissa
bits); hardware FP8 against emulated FP8 3e-2 (the same casts, different accumulation order).
"""

import copy

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("torchao")

from megassm.config.schema import ModelConfig  # noqa: E402
from megassm.models import build_model  # noqa: E402
from megassm.models.block import compile_blocks  # noqa: E402
from megassm.ops.fp8 import convert_to_fp8  # noqa: E402

DT = torch.bfloat16
CFG = dict(in_channels=16, d_model=1024, num_heads=8, headdim=64, d_state=64, chunk_size=256, text_dim=256,
           max_text_len=32)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _model(pattern):
    torch.manual_seed(0)
    m = build_model(ModelConfig(pattern=pattern, **CFG))
    for p in m.parameters():
        if p.abs().sum() == 0:  # open the zero-initialised gates and output layer
            torch.nn.init.normal_(p, std=0.02)
    return m.cuda().to(DT)


def _step(model, T=3, H=22, W=30):  # 3 x 11 x 15 = 495 tokens: not a multiple of 16
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1, 16, T, H, W, device="cuda", dtype=DT, generator=g)
    text = torch.randn(1, 20, 256, device="cuda", dtype=DT, generator=g)
    model.zero_grad(set_to_none=True)
    out = model(x, torch.full((1,), 0.5, device="cuda"), text, torch.ones(1, 20, dtype=torch.bool, device="cuda"))
    out.float().square().mean().backward()
    return [out.detach()] + [p.grad for n, p in model.named_parameters() if "blocks.1." in n and p.grad is not None]


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_hardware_matches_emulation_and_bf16(recipe):
    ref = _model("hA")
    hw, emu = copy.deepcopy(ref), copy.deepcopy(ref)
    convert_to_fp8(hw, recipe, emulate=False)
    convert_to_fp8(emu, recipe, emulate=True)
    r, h, e = _step(ref), _step(hw), _step(emu)
    assert 1e-3 < _rel(h[0], r[0]) < 0.1
    for a, b in zip(h, e):
        assert _rel(a, b) < 3e-2


def test_compiled_block_matches_eager():
    ref = _model("hvtA")
    comp = copy.deepcopy(ref)
    compile_blocks(comp)
    for a, b in zip(_step(comp), _step(ref)):
        assert _rel(a, b) < 2e-2


def test_compiled_hydra_runs_the_fused_kernels_from_a_fresh_process():
    """A compiled block's Hydra must run the same fused kernels as eager, not the PyTorch reference scan. In a
    fresh process (nothing has asked yet whether mamba-ssm imports), compile, run a step under the profiler, look
    for mamba-ssm's chunk-scan kernels forward and backward, and check the mixer recorded the fused path. Before
    compile_blocks decided the path eagerly, the traced check came out False on an H100."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch
        from torch.profiler import ProfilerActivity, profile
        from megassm.config.schema import ModelConfig
        from megassm.models import build_model
        from megassm.models.block import compile_blocks
        m = build_model(ModelConfig(pattern="h", in_channels=16, d_model=512, num_heads=4, headdim=64, d_state=64,
                                    chunk_size=256, text_dim=256, max_text_len=32)).cuda().to(torch.bfloat16)
        compile_blocks(m)
        x = torch.randn(1, 16, 2, 32, 32, device="cuda", dtype=torch.bfloat16)
        args = (x, torch.full((1,), 0.5, device="cuda"), torch.randn(1, 20, 256, device="cuda", dtype=torch.bfloat16),
                torch.ones(1, 20, dtype=torch.bool, device="cuda"))
        m(*args).float().square().mean().backward()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            m(*args).float().square().mean().backward()
            torch.cuda.synchronize()
        names = {e.key for e in prof.key_averages()}
        print("SCAN_KERNELS", sorted(n for n in names if "chunk_scan" in n or "chunk_state" in n))
        print("PATH", [mod.path_taken for mod in m.modules() if hasattr(mod, "path_taken")])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    scan_line = next(s for s in out.stdout.splitlines() if s.startswith("SCAN_KERNELS"))
    assert "_chunk_scan_fwd_kernel" in scan_line and "_chunk_scan_bwd" in scan_line, out.stdout
    assert next(s for s in out.stdout.splitlines() if s.startswith("PATH")) == "PATH ['fused']", out.stdout
