"""LoRA under TP (with and without Megatron-SP, B/C groups replicated or split) and Ulysses CP on 2 gloo
processes: the model's output and every adapter's gradient equal the single-process LoRA model's, with
random lora_B; the live adapter shards follow the shard plan and consolidate back to the unsharded ones.
Tolerances: ``parallel_cases.OUT_TOL`` / ``GRAD_TOL`` (fp32; the parallel model sums the same products in
another order -- measured at most 7.4e-7 on outputs and 4.9e-6 on adapter gradients, relative to the
tensor's largest entry; a missing or doubled reduction is off by O(1), as the broken runs show)."""

import lora_cases as lc
import pytest
from dist_harness import spawn

pytestmark = pytest.mark.distributed


def test_lora_model_matches_single_process_and_breaks_are_detected(tmp_path):
    results = spawn(lc.run_lora_checks, 2, tmp_path)
    bad = {f"rank {r} {case}": v["failures"][:4] for r, res in enumerate(results)
           for case, v in res["layouts"].items() if v["failures"]}
    assert not bad, bad
    assert all(v["adapters"] == 2 * 4 * 7 for v in results[0]["layouts"].values())  # A, B x 4 blocks x 7 linears
    # the checks have teeth: skipping an adapter's reduction fails the layout that passes above
    assert set(results[0]["breaks"]) == set(lc.LORA_BREAKS)
    for name, r in results[0]["breaks"].items():
        assert r["broken"] > 0, f"{name}: breaking it went unnoticed ({r['layout']})"
