"""The fused Hydra path under TP, TP + SP and Ulysses CP, on 2 and 4 gloo processes: ParallelHydra with the
fused kernels (cut at the fc_D and norm reductions) against ParallelHydra on the reference parts and
against the single-process Hydra -- outputs, input and every parameter gradient, every scan order, image
and video grids, L = 1 and ragged chunks (``hydra_fused_cases.CASES``; tolerances explained there).

The kernels run in Triton's interpreter (TRITON_INTERPRET=1 in the spawned ranks) around the PyTorch SSD
scan; tests/gpu/test_parallel_hydra_fused_cuda.py covers the compiled kernels and mamba-ssm's scan.
"""

import hydra_fused_cases as hfc
import parallel_cases as pc
import pytest
from dist_harness import spawn

pytest.importorskip("triton")
pytestmark = [pytest.mark.distributed, pytest.mark.slow]
INTERPRET = {"TRITON_INTERPRET": "1"}


@pytest.mark.parametrize("world", [2, 4])
def test_fused_parallel_hydra_matches_reference_and_single_process(world, tmp_path):
    results = spawn(hfc.run_fused_checks, world, tmp_path, env=INTERPRET)
    assert set(results[0]) and all(set(r) == set(results[0]) for r in results)
    bad = {f"rank {r} {case}": v["failures"][:4] for r, res in enumerate(results) for case, v in res.items()
           if v["failures"]}
    assert not bad, bad


def test_broken_collectives_are_detected_on_fused_path(tmp_path):
    """Each break of parallel_cases.BREAKS (a skipped fc_D sum, norm sum of squares, TP gradient sum,
    column-parallel input-gradient all-reduce, or B/C gather reduce-scatter), and the fused norm's backward
    without its cross-rank sum, fails the fused checks."""
    report = spawn(hfc.run_broken_fused_checks, 2, tmp_path, env=INTERPRET)[0]
    assert set(report) == set(pc.BREAKS) | set(hfc.FUSED_BREAKS)
    for name, r in report.items():
        assert r["clean"] == 0, f"{name}: the unbroken fused layout already fails: {r['example']}"
        assert r["broken"] > 0, f"{name}: breaking it went unnoticed on the fused path"
