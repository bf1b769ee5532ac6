"""TP, TP + Megatron-SP and Ulysses CP for every HTH layer and the whole model, on 2 and 4 gloo
processes: outputs and every parameter's gradient equal the single-process model's (same seed,
same weights), on image (T'=1) and video (T'=2) token grids, fp32. Tolerances and their reason:
``parallel_cases.OUT_TOL`` / ``GRAD_TOL``. The checks run inside the spawned ranks and report
failure strings, so the "teeth" test can assert that breaking one collective makes them fail.
"""

import comm_cases as cc
import parallel_cases as pc
import pytest
from dist_harness import assert_clean, spawn

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("world", [2, 4])
def test_layers_match_single_process(world, tmp_path):
    """Every block's mixer ('h', 'v', 't' Hydra, 'A' attention), cross-attention and FFN, alone:
    2 ranks: tp2, tp2+SP, cp2 (ngroups 1 and 2; attention_backend fa4 on video); 4 ranks: tp2 x cp2 + SP,
    tp4 + SP, cp4."""
    assert_clean(spawn(pc.run_layer_checks, world, tmp_path))


@pytest.mark.parametrize("world", [2, 4])
def test_model_matches_single_process(world, tmp_path):
    """The whole HTH model (pattern 'hvtA'): 2 ranks tp2+SP and cp2; 4 ranks tp2 x cp2 with and
    without SP. Also: the live shards equal shard_state_dict, merge_state_dicts restores the model."""
    assert_clean(spawn(pc.run_model_checks, world, tmp_path))


def test_broken_collectives_are_detected(tmp_path):
    """The checks have teeth: skipping any one reduction (or mis-scaling CP gradients) fails them,
    while the same checks pass unbroken."""
    report = spawn(pc.run_broken_checks, 2, tmp_path)[0]
    assert set(report) == set(pc.BREAKS) | {"CP gradient scale 2 not undone by the reducer"}
    for name, r in report.items():
        assert r["clean"] == 0, f"{name}: the unbroken layout already fails"
        assert r["broken"] > 0, f"{name}: breaking it went unnoticed"


@pytest.mark.parametrize("world", [2, 4])
def test_comm_bytes_match_comm_model(world, tmp_path):
    """Bytes per collective (op x group) of one block of each kind and of the whole model, counted
    by wrapping torch.distributed, equal megassm.parallel.comm_model's formulas."""
    results = spawn(cc.run_comm_checks, world, tmp_path)
    bad = {f"rank {r} {case}": f for r, res in enumerate(results) for case, f in res.items() if f}
    assert not bad, bad
