"""Pipeline (x TP) layouts <-> the consolidated format (one full state dict, HTHModel names).

A ``PipelineStage`` keeps the HTHModel names of its modules, so a stage's state dict is the full
one restricted to the stage's keys (then TP-sharded, ``sharding.shard_state_dict``) and the full
one is the union over stages (after merging TP shards). No renaming, nothing shared between stages:

    full_to_stage_state_dict(full, model_cfg, plan, pp_rank, tp_rank, tp)   -> what a stage loads
    pipeline_state_dict_to_full(stage_sds, model_cfg[, plan])               -> the consolidated dict

(From a pipeline run's DeepSpeed checkpoint: ``megassm.checkpoint.zero.consolidate_pipeline_checkpoint``.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from megassm.config.schema import ModelConfig
from megassm.parallel.pipeline import PipelinePlan

EMBEDDERS = ("patch_embed.", "t_embedder.", "t_block.", "y_embedder.", "y_null")
HEAD = ("final_layer.",)


def stage_owns(name: str, plan: PipelinePlan, pp_rank: int) -> bool:
    """Whether parameter/buffer ``name`` (HTHModel naming, optional ``module.`` prefix) lives on ``pp_rank``."""
    name = name.removeprefix("module.")
    vstages = plan.virtual_stages(pp_rank)
    if name.startswith("blocks."):
        return int(name.split(".")[1]) in set(plan.blocks_of(pp_rank))
    if name.startswith(EMBEDDERS):
        return 0 in vstages
    if name.startswith(HEAD):
        return plan.num_stages - 1 in vstages
    raise KeyError(f"{name}: not a parameter of HTHModel; the pipeline does not know where it lives")


def full_to_stage_state_dict(full_sd: Mapping[str, Tensor], model_cfg: ModelConfig, plan: PipelinePlan,
                             pp_rank: int, tp_rank: int = 0, tp: int = 1) -> dict[str, Tensor]:
    """The state dict of ``PipelineStage(model, plan, pp_rank)`` (TP rank ``tp_rank`` of ``tp``)."""
    if len(plan.bounds) and plan.bounds[-1][1] != len(model_cfg.pattern):
        raise ValueError(f"plan covers {plan.bounds[-1][1]} blocks, model.pattern has {len(model_cfg.pattern)}")
    sub = {k: v for k, v in full_sd.items() if stage_owns(k, plan, pp_rank)}
    if tp > 1:
        from megassm.parallel.sharding import shard_state_dict

        sub = shard_state_dict(sub, model_cfg, tp_rank, tp)
    return sub


def pipeline_state_dict_to_full(stage_sds: Sequence, model_cfg: ModelConfig,
                                plan: PipelinePlan | None = None) -> dict[str, Tensor]:
    """Merge per-stage state dicts into one with every HTHModel key.

    ``stage_sds[pp_rank]`` is a stage's state dict, or the list of its TP ranks' state dicts.
    Raises if a key is missing or appears on two stages, or (given the ``plan``) sits on the wrong stage.
    The plan is not needed to merge: the keys say where each tensor belongs.
    """
    if plan is not None and len(stage_sds) != plan.pp:
        raise ValueError(f"got {len(stage_sds)} stage state dicts for pp={plan.pp}")
    full: dict[str, Tensor] = {}
    for r, sd in enumerate(stage_sds):
        if not isinstance(sd, Mapping):  # TP shards of this stage
            from megassm.parallel.sharding import merge_state_dicts

            sd = merge_state_dicts(sd, model_cfg) if len(sd) > 1 else sd[0]
        for k, v in sd.items():
            name = k.removeprefix("module.")
            if plan is not None and not stage_owns(name, plan, r):
                raise ValueError(f"{name} is in stage {r}'s state dict but the plan {plan.bounds} puts it elsewhere")
            if name in full:
                raise ValueError(f"{name} appears in two stages' state dicts")
            full[name] = v
    missing = sorted(set(expected_keys(model_cfg)) - set(full))
    if missing:
        raise ValueError(f"merged pipeline state dict lacks {len(missing)} keys, e.g. {missing[:5]}")
    return full


def expected_keys(model_cfg: ModelConfig) -> list[str]:
    """HTHModel's state-dict keys, from a model built on the meta device (no memory)."""
    from megassm.models.hth import HTHModel

    with torch.device("meta"):
        return list(HTHModel(model_cfg).state_dict().keys())
