"""parallel.cp_impl=state_passing in training: a stage config in miniature (as test_configs_miniature.py
shrinks it, its CP layout kept) trains to the losses and weights of the one-process reference, and resumes
after a SIGKILL to the same losses bit for bit."""

from __future__ import annotations

import math

import pytest

from megassm.checkpoint.load import load_weights
from tests.conftest import run_train
from tests.integration.test_configs_miniature import CKPT_EVERY, KILL_AT, MINIATURES, STEPS, _common, _latest_losses

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.mark.parametrize("name", ["stage1_1k", "stage3_video"])
def test_state_passing_trains_like_one_process(name, tmp_path):
    """stage1_1k (pattern hvAh): cp 2 on images, the 'h' blocks pass states, 'v' (a frame cut in two) and
    attention run Ulysses; stage3_video (htvA): cp 4 on 3-frame clips, 'h' passes states, 'v' and 't' keep
    Ulysses. fp32: the layouts differ from the reference in summation order only (~1e-7,
    test_configs_miniature's tolerances). The log says which blocks passed states."""
    nproc = MINIATURES[name][0]
    config = f"configs/{name}.yaml"
    common = [*_common(name), "train.sample_every=0"]
    from megassm.run_config import load_config

    cfg = load_config(config, common)
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * (nproc // cfg.parallel.cp)
    run_train(config, *common, f"run_dir={tmp_path / 'ref'}", "parallel.zero_stage=0", "parallel.cp=1",
              "train.grad_accum=1", f"train.micro_batch_size={global_batch}")
    sp = [*common, f"run_dir={tmp_path / 'sp'}", "parallel.cp_impl=state_passing"]
    killed = run_train(config, *sp, nproc=nproc, check=False, env={"MEGASSM_FAULT_SIGKILL_AT_STEP": str(KILL_AT)})
    assert killed.returncode != 0, "the run was to be killed at step KILL_AT"
    assert "Hydra 'h' blocks on token grid" in killed.stderr and "run state_passing" in killed.stderr, \
        killed.stderr[-3000:]
    first = _latest_losses(tmp_path / "sp")
    run_train(config, *sp, nproc=nproc)
    ref, got = _latest_losses(tmp_path / "ref"), _latest_losses(tmp_path / "sp")
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for s in ref:
        assert math.isclose(got[s], ref[s], rel_tol=2e-5), (name, s, got[s], ref[s])
    resumed_from = KILL_AT - KILL_AT % CKPT_EVERY
    for s in range(resumed_from + 1, KILL_AT + 1):  # re-run after the resume: bit for bit
        assert got[s] == first[s], (name, s, first[s], got[s])
    w_ref = load_weights(tmp_path / "ref" / "checkpoints" / f"step_{STEPS:08d}").model
    w_got = load_weights(tmp_path / "sp" / "checkpoints" / f"step_{STEPS:08d}").model
    w_early = load_weights(tmp_path / "ref" / "checkpoints" / f"step_{CKPT_EVERY:08d}").model
    moved = max((w_ref[k] - w_early[k]).abs().max().item() for k in w_ref)
    diff = max((w_got[k] - w_ref[k]).abs().max().item() for k in w_ref)
    assert diff <= 1e-2 * moved, (name, diff, moved)
