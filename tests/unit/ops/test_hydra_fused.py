"""The fused Hydra mixer's Triton kernels against their PyTorch twins and the module's reference path.

On CPU the kernels run in Triton's interpreter, which must be on before triton is first imported, so
the checks (tests/unit/ops/_hydra_fused_cases.py) run in a child process with TRITON_INTERPRET=1. The
SSD scan inside is the PyTorch reference there; tests/gpu/test_hydra_fused_cuda.py covers the compiled
kernels with mamba-ssm's scan.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

CASES = Path(__file__).with_name("_hydra_fused_cases.py")
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def interpreted_results():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(CASES), "cpu", "ref"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_fused_matches_reference_fp64_inputs(interpreted_results):
    # fp64 inputs, fp32 arithmetic inside the kernels: agreement to ~1e-7 relative (norm-wise);
    # 1e-5 leaves room for summation order and still catches any indexing or sign error (>1e-2).
    # The uncut Function (single-GPU module) and the cut parts (ParallelHydra's) are both checked here.
    assert set(interpreted_results) >= {"out", "grad_zxbcdt", "grad_conv_w", "module_out", "module_grad_u",
                                        "parts_out", "parts_grad_zxbcdt", "parts_L1_out", "ranks_norm_grad_y",
                                        "compiled_out", "compiled_grad_zxbcdt", "inductor_grad_conv_w",
                                        "inductor_nobias_grad_conv_w", "inductor_block_h", "h_block_graph_breaks"}
    bad = {k: v for k, v in interpreted_results.items() if not v < 1e-5}
    assert not bad, bad
