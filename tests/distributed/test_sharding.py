"""shard_state_dict / merge_state_dicts (single process): exact round trips, the packed layouts
of Hydra's in_proj / conv1d and attention's qkv, and errors. The live sharded model is checked
against them in test_parallel_hth.py."""

import pytest
import torch

from megassm.config.schema import ModelConfig
from megassm.models.hth import HTHModel
from megassm.parallel.mesh import MeshError
from megassm.parallel.sharding import merge_state_dicts, shard_spec, shard_state_dict

KW = dict(in_channels=4, d_model=32, pattern="hvtA", d_state=8, d_conv=3, expand=2, headdim=8, chunk_size=4,
          num_heads=4, mlp_ratio=2.0, text_dim=16, max_text_len=8)


def _sd(cfg):
    torch.manual_seed(0)
    return HTHModel(cfg).state_dict()


@pytest.mark.parametrize("tp,ngroups", [(1, 1), (2, 1), (4, 1), (2, 2), (4, 4)])
def test_round_trip_is_exact(tp, ngroups):
    cfg = ModelConfig(**KW, ngroups=ngroups)
    full = _sd(cfg)
    shards = [shard_state_dict(full, cfg, r, tp) for r in range(tp)]
    merged = merge_state_dicts(shards, cfg, check_replicated=True)
    assert merged.keys() == full.keys()
    for k, v in full.items():
        assert torch.equal(merged[k], v), k
    # every split tensor is 1/tp of its split segments, replicated tensors are shared, not copied
    for k, v in full.items():
        spec = shard_spec(k, cfg, tp)
        if spec is None or tp == 1:
            assert shards[-1][k] is v, k
        else:
            assert shards[0][k].shape[spec.dim] == spec.local_size(tp) < v.shape[spec.dim], k


def test_hydra_in_proj_rows_per_rank():
    """Rank r keeps its heads' z, x, dt_f, dt_b rows and every B/C row (ngroups=1 is replicated)."""
    cfg = ModelConfig(**KW)
    d_inner, nheads, gn = 64, 8, 8
    rows = torch.arange(2 * d_inner + 4 * gn + 2 * nheads, dtype=torch.float32)[:, None].expand(-1, 32)
    sd = {"blocks.0.mixer.in_proj.weight": rows, "blocks.0.mixer.conv1d.bias": torch.arange(d_inner + 4 * gn) * 1.0}
    r1 = shard_state_dict(sd, cfg, 1, 2)
    got = r1["blocks.0.mixer.in_proj.weight"][:, 0].long().tolist()
    z, x = list(range(32, 64)), list(range(64 + 32, 128))
    bc = list(range(128, 128 + 4 * gn))
    dt_f, dt_b = list(range(160 + 4, 168)), list(range(168 + 4, 176))
    assert got == z + x + bc + dt_f + dt_b
    assert r1["blocks.0.mixer.conv1d.bias"].long().tolist() == list(range(32, 64)) + list(range(64, 96))
    # with 2 groups over 2 ranks each rank keeps one group of each of B_f, C_f, B_b, C_b
    cfg2 = ModelConfig(**KW, ngroups=2)
    rows2 = torch.arange(2 * d_inner + 4 * 2 * gn + 2 * nheads, dtype=torch.float32)[:, None]
    got2 = shard_state_dict({"blocks.1.mixer.in_proj.weight": rows2}, cfg2, 1, 2)["blocks.1.mixer.in_proj.weight"]
    bc2 = [i for seg in range(4) for i in range(128 + seg * 16 + 8, 128 + seg * 16 + 16)]
    assert got2[:, 0].long().tolist()[64:96] == bc2


def test_attention_qkv_keeps_each_ranks_heads_of_q_k_and_v():
    cfg = ModelConfig(**KW)
    qkv = torch.arange(96, dtype=torch.float32)[:, None]
    got = shard_state_dict({"module.blocks.3.mixer.qkv.weight": qkv}, cfg, 0, 2)["module.blocks.3.mixer.qkv.weight"]
    assert got[:, 0].long().tolist() == list(range(0, 16)) + list(range(32, 48)) + list(range(64, 80))
    # the row-parallel projection splits its input columns; its bias is replicated
    assert shard_spec("blocks.3.mixer.proj.weight", cfg, 2).dim == 1
    assert shard_spec("blocks.3.mixer.proj.bias", cfg, 2) is None
    assert shard_spec("blocks.0.mixer.fc_D.weight", cfg, 2).dim == 1  # Hydra: all heads, local channels


def test_errors_name_the_problem():
    cfg = ModelConfig(**KW)
    full = _sd(cfg)
    with pytest.raises(MeshError, match="parallel.tp=3 does not divide the attention heads"):
        shard_state_dict(full, cfg, 0, 3)
    with pytest.raises(ValueError, match="tp_rank=2 must be in"):
        shard_state_dict(full, cfg, 2, 2)
    wrong = ModelConfig(**{**KW, "d_model": 64, "num_heads": 4})
    with pytest.raises(ValueError, match=r"blocks.0.mixer.dt_bias: size 8 along dim 0, the model config implies 16"):
        shard_state_dict(full, wrong, 0, 2)
    shards = [shard_state_dict(full, cfg, r, 2) for r in range(2)]
    shards[1]["blocks.0.norm2.weight"] = shards[1]["blocks.0.norm2.weight"] + 1
    with pytest.raises(ValueError, match="blocks.0.norm2.weight: replicated tensor differs"):
        merge_state_dicts(shards, cfg, check_replicated=True)
    del shards[1]["y_null"]
    with pytest.raises(ValueError, match="TP shard 1 has different keys"):
        merge_state_dicts(shards, cfg)
