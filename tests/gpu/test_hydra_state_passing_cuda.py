"""CUDA-only: state-passing Hydra over uneven slices (ranks simulated on one GPU, as in
tests/unit/ops/test_hydra_state_passing.py) with the scan in PyTorch and, where mamba-ssm is installed, in its
Triton kernel (``return_final_states``: the slice summaries), at real sizes (64 x 64 states, chunks of 256,
slices shorter than a chunk), fp32 against the unsplit mixer in fp64. Errors norm-relative.

Tolerances: with the scan in PyTorch, TF32 is off for matmuls and cuDNN's convolution (on by default for cuDNN),
so fp32 against fp64 is rounding only: 1e-4. mamba-ssm's kernel takes its dot products in tf32 whatever the
flags say (as in test_hydra_fused_cuda.py, Triton vs PyTorch in fp32): 5e-3."""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from megassm.models.hydra import Hydra  # noqa: E402
from megassm.ops.ssd import triton_available  # noqa: E402
from tests.unit.ops.test_hydra_state_passing import _reference, sliced_mix  # noqa: E402

SCANS = ["ref"] + (["triton"] if triton_available() else [])


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _out_and_grads(m, zxbcdt, fn):
    m.zero_grad()
    x = zxbcdt.clone().requires_grad_()
    out = fn(x)
    # drawn in float64 whatever out's dtype, then cast: a draw in float32 is another sequence on CUDA (and on
    # CPU), which weighted the fp32 run's loss differently from the fp64 reference's (gradients off by O(1))
    w = torch.randn(out.shape, generator=torch.Generator(device="cuda").manual_seed(9), device="cuda",
                    dtype=torch.float64).to(out.dtype)
    (out * w).sum().backward()
    return [out.detach(), x.grad] + [p.grad.clone() for p in m.parameters() if p.grad is not None]


@pytest.fixture
def true_fp32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("scan_impl, tol", [(s, 1e-4 if s == "ref" else 5e-3) for s in SCANS])
def test_state_passing_on_cuda_matches_unsplit(scan_impl, tol, true_fp32):
    bounds = [0, 100, 700, 1900, 2048]  # a slice shorter than a chunk; uneven slices and last chunks
    torch.manual_seed(0)
    m = Hydra(256, d_state=64, d_conv=7, expand=2, headdim=64, chunk_size=256, ssd_impl="ref").cuda()
    with torch.no_grad():
        m.A_log.uniform_(-1.0, 1.0)
        m.D.normal_()
        m.fc_D.weight.normal_(0.0, 0.05)
    zxbcdt = torch.randn(2, bounds[-1], m.in_proj.out_features, device="cuda") * 0.5
    want = _out_and_grads(m.double(), zxbcdt.double(), lambda x: _reference(m, x))
    got = _out_and_grads(m.float(), zxbcdt, lambda x: sliced_mix(m, x, bounds, scan_impl=scan_impl))
    errs = [_rel(g, w) for g, w in zip(got, want)]
    assert len(got) == len(want) and max(errs) < tol, errs
