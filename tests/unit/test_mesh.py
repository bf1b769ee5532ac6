"""ParallelDims arithmetic (rank layout, TP innermost; group ranks) and its validation errors."""

import itertools

import pytest

from megassm.config.schema import ModelConfig
from megassm.parallel.mesh import MeshError, ParallelDims

# d_inner = 64 -> 8 Hydra heads of 8; 4 attention heads; FFN width 64
CFG = ModelConfig(d_model=32, expand=2, headdim=8, num_heads=4, mlp_ratio=2.0, pattern="hvtA", ngroups=1)


def test_rank_layout_tp_innermost_then_cp_dp_pp():
    d = ParallelDims(world=16, tp=2, cp=2, pp=2)
    assert d.dp == 2
    assert d.coords(0) == {"pp": 0, "dp": 0, "cp": 0, "tp": 0}
    assert d.coords(1) == {"pp": 0, "dp": 0, "cp": 0, "tp": 1}
    assert d.coords(2) == {"pp": 0, "dp": 0, "cp": 1, "tp": 0}
    assert d.coords(4) == {"pp": 0, "dp": 1, "cp": 0, "tp": 0}
    assert d.coords(8) == {"pp": 1, "dp": 0, "cp": 0, "tp": 0}
    for rank in range(16):  # rank_of inverts coords
        assert d.rank_of(**d.coords(rank)) == rank


@pytest.mark.parametrize("tp,cp,pp,world", [(2, 2, 2, 16), (4, 1, 1, 8), (1, 2, 3, 12), (2, 3, 1, 6)])
def test_groups_partition_the_world(tp, cp, pp, world):
    d = ParallelDims(world=world, tp=tp, cp=cp, pp=pp)
    sizes = {"tp": tp, "cp": cp, "dp": d.dp, "pp": pp}
    for key in [("tp",), ("cp",), ("dp",), ("pp",), ("dp", "cp"), ("tp", "pp"), ("tp", "cp")]:
        groups = d.group_ranks(key)
        n = 1
        for k in key:
            n *= sizes[k]
        assert all(len(g) == n for g in groups), key
        assert sorted(itertools.chain(*groups)) == list(range(world)), key  # disjoint, covering
        for g in groups:  # members agree on every coordinate outside ``key``
            fixed = [{k: v for k, v in d.coords(r).items() if k not in key} for r in g]
            assert all(f == fixed[0] for f in fixed), (key, g)


def test_tp_groups_are_consecutive_and_cp_strides_by_tp():
    d = ParallelDims(world=8, tp=2, cp=2)
    assert d.group_ranks(("tp",)) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert d.group_ranks(("cp",)) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert d.group_ranks(("dp",)) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # TP x CP: the ranks of one sample, in sequence-chunk order cp*tp_size + tp
    assert d.group_ranks(("tp", "cp")) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_sizes_that_do_not_multiply_to_the_world_are_named():
    with pytest.raises(MeshError, match=r"world size 6 .* tp\*cp\*pp = 2\*2\*1 = 4.*\[1, 2, 3, 6\]"):
        ParallelDims(world=6, tp=2, cp=2)
    with pytest.raises(MeshError, match="tp=0 must be >= 1"):
        ParallelDims(world=4, tp=0)


@pytest.mark.parametrize("dims,cfg_kw,pattern", [
    (dict(tp=3), {}, r"parallel.tp=3 does not divide the attention heads \(model.num_heads\) = 4; "
                     r"valid parallel.tp: \[1, 2, 4\]"),
    (dict(tp=2), dict(mlp_ratio=1.53125), r"FFN width \(d_model\*mlp_ratio\) = 49; valid parallel.tp: \[1, 7, 49\]"),
    (dict(tp=4), dict(headdim=32), r"Hydra heads \(expand\*d_model/headdim\) = 2; valid parallel.tp: \[1, 2\]"),
    (dict(tp=2), dict(ngroups=4, headdim=4, num_heads=2), None),  # 4 groups split over 2 ranks: fine
    (dict(tp=4), dict(ngroups=2, headdim=4), r"Hydra B/C groups \(model.ngroups\) = 2.*or set model.ngroups=1"),
    (dict(cp=8), {}, r"parallel.cp=8 does not divide the attention heads per TP rank \(num_heads/tp\) = 4"),
    (dict(tp=2, cp=4), {}, r"parallel.cp=4 does not divide the attention heads per TP rank \(num_heads/tp\) = 2"),
    (dict(tp=2, cp=8), dict(pattern="hv"), r"parallel.cp=8 does not divide the Hydra heads per TP rank .* = 4"),
    (dict(cp=4), dict(ngroups=2, num_heads=8, headdim=4), None),  # 16 heads, 2 groups, cp 4: one group each
    (dict(cp=4), dict(ngroups=4, num_heads=8, headdim=4), None),  # one group per CP rank
])
def test_check_model_names_the_size_and_valid_degrees(dims, cfg_kw, pattern):
    world = dims.get("tp", 1) * dims.get("cp", 1)
    cfg = ModelConfig(**{**CFG.__dict__, **cfg_kw})
    d = ParallelDims(world=world, **dims)
    if pattern is None:
        d.check_model(cfg)
    else:
        with pytest.raises(MeshError, match=pattern):
            d.check_model(cfg)


def test_cp_ranks_whose_heads_straddle_bc_groups_are_rejected():
    # 16 heads in 8 groups of 2; cp=8: each CP rank scans 2 heads = exactly one group
    cfg = ModelConfig(**{**CFG.__dict__, "headdim": 4, "ngroups": 8, "num_heads": 8})
    ParallelDims(world=8, cp=8).check_model(cfg)
    # 12 heads in 4 groups of 3; cp=3: 4 heads per CP rank straddle two groups
    cfg = ModelConfig(**{**CFG.__dict__, "headdim": 4, "ngroups": 4, "d_model": 24, "pattern": "hv"})
    with pytest.raises(MeshError, match=r"cp=3 with 4 Hydra B/C group\(s\).*valid parallel.cp: \[1, 2, 4, 12\]"):
        ParallelDims(world=3, cp=3).check_model(cfg)


def test_layers_and_sequence_lengths():
    with pytest.raises(MeshError, match=r"parallel.pp=5 exceeds the number of blocks \(4\); valid parallel.pp: 1..4"):
        ParallelDims(world=5, pp=5).check_model(CFG)
    d = ParallelDims(world=4, tp=2, cp=2)
    d.check_model(CFG, seq_len=30, sequence_parallel=False)  # CP alone: 30 splits over 2
    with pytest.raises(MeshError, match=r"sequence length 30 tokens is not divisible by cp\*tp = 2\*2 = 4.*28 or 32"):
        d.check_model(CFG, seq_len=30, sequence_parallel=True)
    with pytest.raises(MeshError, match=r"not divisible by cp = 4.*nearest valid lengths: 4 or 8"):
        ParallelDims(world=4, cp=4).check_seq_len(5)
    assert d.seq_shards(sequence_parallel=True) == 4 and d.seq_shards() == 2
