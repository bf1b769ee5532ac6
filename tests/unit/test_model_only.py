"""``megassm/checkpoint/model_only.py``: the Adam moments leave every place DeepSpeed 0.19 files an optimizer's
state dict, and nothing else changes (the fp32 masters, parameter groups and the caller's dicts stay)."""

import json

import pytest
import torch

from megassm.checkpoint.model_only import (
    optimizer_state_count,
    optimizer_states,
    saved_optimizer_state,
    without_optimizer_moments,
)


def _adam() -> dict:
    """A torch AdamW state dict of two parameters."""
    state = {i: {"step": torch.tensor(7.0), "exp_avg": torch.ones(3), "exp_avg_sq": torch.ones(3)} for i in (0, 1)}
    return {"state": state, "param_groups": [{"lr": 1e-3, "weight_decay": 0.1, "params": [0, 1]}]}


MASTERS = torch.arange(6.0)
LAYOUTS = {  # one file's state dict per DeepSpeed layout (the module doc's table)
    "zero3 optim": lambda: {"optimizer_state_dict": {"optimizer_state_dict": _adam(), "fp32_flat_groups": [MASTERS],
                                                     "partition_count": 2}, "ds_version": "0.19.8"},
    "zero1/2 optim": lambda: {"optimizer_state_dict": {"base_optimizer_state": _adam(),
                                                       "single_partition_of_fp32_groups": [MASTERS]}},
    "zero0 fp32 model states": lambda: {"module": {"w": MASTERS}, "optimizer": _adam(), "global_steps": 7},
    "zero0 bf16 model states": lambda: {"module": {"w": MASTERS}, "global_steps": 7,
                                        "optimizer": {"base_optimizer_state": _adam(),
                                                      "single_partition_of_fp32_groups": [MASTERS]}},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_moments_dropped_masters_and_groups_kept(layout):
    sd = LAYOUTS[layout]()
    out, dropped = without_optimizer_moments(sd)
    assert dropped == 2 and optimizer_state_count(out) == 0
    assert optimizer_state_count(sd) == 2  # the caller's dict (DeepSpeed's live state) is not touched

    def tensors(obj):
        if isinstance(obj, dict):
            return [t for v in obj.values() for t in tensors(v)]
        return [t for v in obj for t in tensors(v)] if isinstance(obj, list) else [obj] * torch.is_tensor(obj)

    # what stays is the same objects (no copy): every tensor but the moments and steps
    assert [id(t) for t in tensors(out)] == [id(t) for t in tensors(sd) if t is MASTERS]
    (kept,) = optimizer_states(out)
    assert kept["state"] == {} and kept["param_groups"] == _adam()["param_groups"]


def test_other_files_pass_through():
    sd = {"module": {"w": MASTERS}, "optimizer": None, "lr_scheduler": {"last_epoch": 3}}
    assert without_optimizer_moments(sd) == (sd, 0)
    assert without_optimizer_moments([1, 2]) == ([1, 2], 0)


def test_saved_optimizer_state_reads_the_trainer_state(tmp_path):
    assert saved_optimizer_state(tmp_path)  # nothing recorded (an older checkpoint): it has the optimizer state
    (tmp_path / "trainer").mkdir()
    f = tmp_path / "trainer" / "rank_00000.json"
    f.write_text(json.dumps({"step": 2}))
    assert saved_optimizer_state(tmp_path)
    f.write_text(json.dumps({"step": 2, "optimizer_state": False}))
    assert not saved_optimizer_state(tmp_path)
