"""State-passing context parallelism for Hydra (parallel.cp_impl=state_passing / auto) on 2 and 4 gloo
processes, fp64: every Hydra block ('h', 'v', 't') and the whole HTH model with stage 3's pattern, on image and
video token grids, equal the single-process model in output and every gradient; uneven slices too. Teeth:
dropping the state exchange, the conv halo or the shift message fails the same checks."""

import pytest
import state_passing_cases as sc
from dist_harness import assert_clean, spawn

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("world", [2, 4])
def test_hydra_blocks_match_single_process(world, tmp_path):
    """cp 2 / cp 4 / tp2 x cp2; which blocks passed states: 'h' always, 'v' when the cuts fall between frames
    (video (2, 2, 4) on cp 2: 8 tokens = 1 frame; never on a one-frame image), 't' only on images (T' = 1);
    the rest ran Ulysses. ``auto`` on a 128-token video: its per-block choice (test_cp_impl covers the rule)."""
    results = spawn(sc.run_mixer_checks, world, tmp_path)
    assert_clean(results)
    for case, v in results[0].items():
        paths = v["paths"]
        if "auto" in case:  # 128 tokens: 'h' passes states wherever cheaper, here at cp 2 and 4 (comm_model)
            want = ["state_passing", "state_passing" if "cp2" in case else "reference", "reference"]
            assert [paths[f"block {i} ({s})"] for i, s in enumerate("hvt")] == want, (case, paths)
            continue
        video = "video" in case
        aligned = video and "cp2" in case
        assert paths["block 0 (h)"] == "state_passing", (case, paths)
        assert (paths["block 1 (v)"] == "state_passing") == aligned, (case, paths)
        assert (paths["block 2 (t)"] == "state_passing") == (not video), (case, paths)


@pytest.mark.parametrize("world", [2, 4])
def test_uneven_slices_match_single_process(world, tmp_path):
    assert_clean(spawn(sc.run_uneven_checks, world, tmp_path))


@pytest.mark.parametrize("world", [2, 4])
def test_model_matches_single_process(world, tmp_path):
    assert_clean(spawn(sc.run_model_checks, world, tmp_path))


def test_dropped_messages_are_detected(tmp_path):
    report = spawn(sc.run_drop_checks, 2, tmp_path)[0]
    assert set(report) == set(sc.DROPS)
    for name, r in report.items():
        assert r["clean"] == 0, f"{name}: the unbroken layout already fails"
        assert r["broken"] > 0, f"{name}: dropping it went unnoticed"


@pytest.mark.parametrize("world", [2, 4])
def test_comm_bytes_match_comm_model(world, tmp_path):
    """Bytes per (op, group) of each block and the whole model under state passing, counted by wrapping
    torch.distributed (point-to-point messages included), equal comm_model's -- the first / last CP rank
    sending only towards its one neighbour."""
    assert_clean(spawn(sc.run_comm_checks, world, tmp_path))
