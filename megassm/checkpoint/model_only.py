"""Model-only checkpoints (``train.save_optimizer_state: false``): DeepSpeed's files without the Adam moments.

A checkpoint keeps DeepSpeed's own file set and layout, so the resume, ``megassm convert`` and
``megassm inspect`` read it as they read any other; only the torch optimizer's per-parameter ``state``
(``exp_avg``, ``exp_avg_sq``, ``step``) is written empty. What stays is what a resume needs to continue
the model exactly: the fp32 master weights (ZeRO-3 ``fp32_flat_groups``, ZeRO-1/2 and bf16
``single_partition_of_fp32_groups``, ZeRO-0 fp32 the module itself), the parameter groups (learning
rates, weight decay), the LR schedule and the step counters in the model-states file.

Where DeepSpeed 0.19 files the torch optimizer's state dict::

    ZeRO-3 (zero_pp_rank_*_optim_states.pt)            ["optimizer_state_dict"]["optimizer_state_dict"]
    ZeRO-1/2, bf16 ([bf16_]zero_pp_rank_*_optim_states.pt)   ["optimizer_state_dict"]["base_optimizer_state"]
    ZeRO-0 fp32 (mp_rank_*_model_states.pt)            ["optimizer"]
    ZeRO-0 bf16 (mp_rank_*_model_states.pt)            ["optimizer"]["base_optimizer_state"]

Loading such a file with DeepSpeed's ``load_optimizer_states=True`` restores the fp32 masters bit for bit
and hands the torch optimizer an empty state: its first step after the resume starts Adam afresh
(moments zero, bias correction from step 1). ``load_optimizer_states=False`` would instead rebuild the
masters from the training-dtype weights (bf16: rounded) and, under ZeRO-3, read the whole model on every
rank; so the resume path is the ordinary one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# trainer/rank_R.json's key: false in a model-only checkpoint (absent in checkpoints from before the option)
OPTIMIZER_STATE_KEY = "optimizer_state"
# the keys under which DeepSpeed nests an optimizer's state dict (module doc)
_NESTING = ("optimizer", "optimizer_state_dict", "base_optimizer_state")


def _is_torch_optimizer_state(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("state"), dict) and isinstance(obj.get("param_groups"), list)


def without_optimizer_moments(state_dict: Any, depth: int = 3) -> tuple[Any, int]:
    """``state_dict`` (one file's, as DeepSpeed hands it to its checkpoint engine) with every torch optimizer
    state dict nested under ``_NESTING`` given an empty ``state``; returns (the copy, how many per-parameter
    states were dropped). Only the dicts on the path are copied: no tensor is touched or copied."""
    if _is_torch_optimizer_state(state_dict):
        return {**state_dict, "state": {}}, len(state_dict["state"])
    if not isinstance(state_dict, dict) or depth == 0:
        return state_dict, 0
    out, dropped = dict(state_dict), 0
    for key in _NESTING:
        if key in out:
            out[key], n = without_optimizer_moments(out[key], depth - 1)
            dropped += n
    return out, dropped


def optimizer_states(state_dict: Any, depth: int = 3) -> list[dict]:
    """The torch optimizer state dicts nested in a loaded DeepSpeed file (module doc's table)."""
    if _is_torch_optimizer_state(state_dict):
        return [state_dict]
    if not isinstance(state_dict, dict) or depth == 0:
        return []
    return [sd for k in _NESTING if k in state_dict for sd in optimizer_states(state_dict[k], depth - 1)]


def optimizer_state_count(state_dict: Any) -> int:
    """How many per-parameter optimizer states (Adam moments) a loaded DeepSpeed file holds (the tests' check
    that a model-only checkpoint has none)."""
    return sum(len(sd["state"]) for sd in optimizer_states(state_dict))


def fresh_optimizer_note(tag_dir: Any) -> str:
    """The one line a resume from a model-only checkpoint logs."""
    return (f"resuming from {tag_dir}, a model-only checkpoint (saved with train.save_optimizer_state=false): "
            "weights, step, data position, RNG and LR schedule are restored, but the optimizer starts afresh (Adam "
            "moments zero, bias correction from step 1) at the restored learning rate, without a new warm-up: "
            "expect a bump in the loss while the moments rebuild, and a curve that is not the uninterrupted run's. "
            "Keep train.save_optimizer_state=true where the disk allows, for exact resumes")


def saved_optimizer_state(tag_dir: str | Path) -> bool:
    """Whether the checkpoint at ``tag_dir`` holds optimizer state, as its rank-0 trainer state records
    (True where it records nothing: every checkpoint written before ``train.save_optimizer_state``)."""
    f = Path(tag_dir) / "trainer" / "rank_00000.json"
    try:
        state = json.loads(f.read_text())
    except (OSError, ValueError):
        return True  # unreadable or missing: verify.damaged_files says so; nothing to claim here
    return not (isinstance(state, dict) and state.get(OPTIMIZER_STATE_KEY) is False)
