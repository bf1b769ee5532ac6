"""Partitioned construction (megassm/train/build.py, megassm/models/init.py) and sliced loading
(megassm/checkpoint/sliced.py) on gloo ranks:

- for one seed the consolidated weights are bit-identical at world 1, 2 and 4, tp 1 and 2, ZeRO-0 and
  ZeRO-3, and equal ``init_full`` (the seeded draw of each whole tensor);
- the TP gradient hooks fire on the built parameters (gradients as the whole model's under TP);
- a ZeRO-3 rank keeps only its partition of every parameter (no full tensor left behind);
- the seeded init has today's distribution per parameter (``HTHModel.initialize_weights``);
- a warm start from a consolidated safetensors checkpoint reads, on each rank, exactly the bytes of
  its TP slices (counted by ``checkpoint.errors.bytes_read``) and loads them bit-exactly.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from build_cases import build_and_consolidate  # noqa: I001  (tests/distributed on the path, like dist_harness)
from dist_harness import spawn
from safetensors.torch import load_file

from megassm.checkpoint.writers import save_consolidated
from megassm.config.load import to_dict
from megassm.models import build_model
from megassm.models.init import init_full, init_rule
from megassm.parallel.sharding import shard_spec
from megassm.run_config import load_config

pytestmark = pytest.mark.slow

TINY = ["model.d_model=32", "model.num_heads=2", "model.headdim=16", "model.d_state=8", "model.chunk_size=16",
        "model.text_dim=16", "model.max_text_len=8", "model.in_channels=3", "model.pattern=hvAt", "train.seed=5"]
# (tag, overrides) per world size; one launch per world builds all of its layouts
WORLD2 = [("tp2", ["parallel.tp=2", "parallel.zero_stage=0"]), ("dp2-zero3", ["parallel.zero_stage=3"])]
WARM = ["parallel.tp=2", "parallel.zero_stage=3"]  # the warm start: TP-sliced reads, then ZeRO-3
WORLD4 = [("tp2-dp2-zero3", ["parallel.tp=2", "parallel.zero_stage=3"])]
# world 4 (tp 2 x ZeRO-3 dp 2): one launch of four processes, about 12 s on the quiet 2-core CI machine


def _cfg(*extra):
    return load_config("configs/smoke.yaml", [*TINY, *extra])


def _reference(cfg) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        names = {n: tuple(p.shape) for n, p in build_model(cfg.model).named_parameters()}
    return {n: init_full(n, s, cfg.model, cfg.train.seed) for n, s in names.items()}


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    """The seeded layouts, then a warm start from a consolidated checkpoint at tp 2 (ZeRO-3)."""
    out = tmp_path_factory.mktemp("world2")
    cfg = _cfg()
    torch.manual_seed(3)
    source = {n: p.detach().clone() for n, p in build_model(cfg.model).named_parameters()}
    save_consolidated(out / "ckpt", source, to_dict(cfg))  # the writer `megassm convert` uses
    jobs = [(tag, [*TINY, *o], None) for tag, o in WORLD2]
    jobs.append(("warm", [*TINY, *WARM], str(out / "ckpt")))
    jobs.append(("warm-dp2", [*TINY, "parallel.zero_stage=3"], str(out / "ckpt")))
    return out, spawn(build_and_consolidate, 2, out, jobs, str(out)), source


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    out = tmp_path_factory.mktemp("world4")
    jobs = [(tag, [*TINY, *o], None) for tag, o in WORLD4]
    return out, spawn(build_and_consolidate, 4, out, jobs, str(out))


@functools.cache
def _seeded() -> dict[str, torch.Tensor]:
    return _reference(_cfg())  # what one process draws: init_full of every parameter


def _check_layout(out, results, tag, overrides, world):
    got = load_file(str(out / f"{tag}.safetensors"))
    want = _seeded()
    assert got.keys() == want.keys()
    for n in want:  # bit-identical: every value is a function of (seed, name, position) only
        assert torch.equal(got[n], want[n]), (tag, n)
    cfg = _cfg(*overrides)
    tp, zero3 = cfg.parallel.tp, cfg.parallel.zero_stage == 3
    shards = world // tp if zero3 else 1
    for r in results:
        r = r[tag]
        if tp > 1 and not zero3:  # the TP grad-sum hooks fire on the built parameters
            assert r["grads_differ"] == [], (tag, r["grads_differ"])
        assert r["full_left"] == []  # ZeRO-3: p.data freed, only ds_tensor stays
        assert r["bytes_read"] == 0
        for n, held in r["held"].items():
            spec = shard_spec(n, cfg.model, tp) if tp > 1 else None
            local = math.prod(want[n].shape) // spec.size * spec.local_size(tp) if spec else math.prod(want[n].shape)
            assert held == math.ceil(local / shards), (tag, n)


@pytest.mark.parametrize("tag", [t for t, _ in WORLD2])
def test_seeded_weights_do_not_depend_on_the_layout_world2(world2, tag):
    out, results, _ = world2
    _check_layout(out, results, tag, dict(WORLD2)[tag], 2)


def test_seeded_weights_do_not_depend_on_the_layout_world4(world4):
    _check_layout(*world4, WORLD4[0][0], WORLD4[0][1], 4)


def test_sliced_draws_equal_the_whole_draw():
    """init_shard == shard_tensor(init_full) for every TP-split parameter, with chunks small enough that
    every parameter spans several generator seeds (the chunk boundaries must not show)."""
    import megassm.models.init as init
    from megassm.parallel.sharding import shard_tensor

    cfg = _cfg("model.ngroups=2").model
    old = init.CHUNK_ELEMS
    init.CHUNK_ELEMS = 300  # weight matrices have >= 32 columns: <= 9 rows per seed, a boundary in every slice
    try:
        for n, t in _reference(_cfg("model.ngroups=2")).items():
            full = init_full(n, tuple(t.shape), cfg, 5) if n.startswith("blocks.") else None
            for tp in (2, 4) if full is not None else ():
                spec = shard_spec(n, cfg, tp)
                if spec is None:
                    continue
                for r in range(tp):
                    want = shard_tensor(full, spec, r, tp)
                    assert torch.equal(init.init_shard(n, tuple(t.shape), cfg, 5, spec, r, tp), want), (n, tp, r)
    finally:
        init.CHUNK_ELEMS = old


def test_seeded_init_has_todays_distribution():
    """Per parameter, the seeded init against HTHModel.initialize_weights at a width where the
    statistics mean something (d_model 128: the smallest weight matrix has 4096 elements)."""
    cfg = load_config("configs/smoke.yaml", ["model.d_model=128", "model.num_heads=4", "model.headdim=32",
                                             "model.pattern=hvAt", "model.text_dim=64"]).model
    torch.manual_seed(0)
    today = dict(build_model(cfg).named_parameters())
    for name, old in today.items():
        old = old.detach()
        new = init_full(name, tuple(old.shape), cfg, 11)
        rule = init_rule(name, tuple(old.shape), cfg)
        if rule.kind == "const":  # zero-init gates / output layer, ones of norms and D: exactly today's
            assert torch.equal(new, old), name
            continue
        n = old.numel()
        # std of n draws has a relative standard error of about 1/sqrt(2n) (less for uniform draws):
        # 6 standard errors of the difference of two such estimates, plus fp32 rounding
        tol = 6 * math.sqrt(2) / math.sqrt(2 * n) + 1e-6
        assert abs(new.std().item() / old.std().item() - 1) < tol, (name, new.std().item(), old.std().item())
        assert abs(new.mean().item() - old.mean().item()) < 6 * old.std().item() * math.sqrt(2 / n), name
        if rule.kind == "uniform":  # same support: |x| <= bound for both, and both come close to it
            assert new.abs().max() <= rule.arg and old.abs().max() <= rule.arg, name
            if n >= 256:
                assert new.abs().max() > 0.9 * rule.arg and old.abs().max() > 0.9 * rule.arg, name
        if rule.kind == "dt_bias":  # the same log-uniform range of dt = softplus(dt_bias)
            for t in (new, old):
                dt = torch.nn.functional.softplus(t)
                assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5), name


def test_sliced_warm_start_reads_only_each_ranks_slices(world2):
    """init_from a consolidated checkpoint at tp 2 (ZeRO-3): each rank reads the bytes of its TP slices
    and nothing else, and the weights arrive bit-exactly."""
    out, results, source = world2
    cfg = _cfg()
    got = load_file(str(out / "warm.safetensors"))
    for n, t in source.items():
        assert torch.equal(got[n], t), n
    total = sum(t.numel() * 4 for t in source.values())
    want = 0  # a TP rank's slice of every tensor (replicated ones whole), fp32
    for n, t in source.items():
        spec = shard_spec(n, cfg.model, 2)
        want += 4 * (t.numel() if spec is None else t.numel() // spec.size * spec.local_size(2))
    for rank, r in enumerate(results):
        assert r["warm"]["bytes_read"] == want, rank
        assert r["warm"]["bytes_read"] < 0.75 * total  # replicated tensors are read by both TP ranks
        assert any("read by slices" in line for line in r["warm"]["report"])


def test_zero3_warm_start_reads_about_one_partition_per_rank(world2):
    """init_from at ZeRO-3 dp 2 (tp 1): rank r reads the whole rows covering its half of each flattened
    tensor (ZeRO-3's ceil(numel / 2) split), so the two ranks together read the checkpoint about once."""
    out, results, source = world2
    got = load_file(str(out / "warm-dp2.safetensors"))
    for n, t in source.items():
        assert torch.equal(got[n], t), n
    total = sum(t.numel() * 4 for t in source.values())
    for rank, r in enumerate(results):
        want = 0
        for t in source.values():
            numel, per_row = t.numel(), (t[0].numel() if t.dim() > 1 else 1)
            half = math.ceil(numel / 2)
            e0, e1 = min(numel, rank * half), min(numel, (rank + 1) * half)
            if e1 > e0:
                want += 4 * per_row * (-(-e1 // per_row) - e0 // per_row)
        assert r["warm-dp2"]["bytes_read"] == want, rank
        assert want < 0.6 * total  # about half; whole rows at the cut are read by both ranks


def test_a_pipeline_stage_and_a_lora_model_build_only_what_they_hold(tmp_path):
    """What ``Trainer._build_model`` asks of ``build_partitioned`` beyond the dense case, in one process:
    a pipeline stage (``owns``: its blocks) leaves every other stage's parameter on the meta device, never
    allocated, and its own hold the seeded draw; a LoRA model (adapters attached to the meta model inside
    ``parallelize``) reads its frozen base from ``init_from`` and draws its adapters (A: peft's
    kaiming-uniform bound 1 / sqrt(in), seeded; B: zero)."""
    from megassm.lora import attach_lora
    from megassm.parallel.pipeline import partition_blocks
    from megassm.parallel.pipeline_checkpoint import stage_owns
    from megassm.train.build import build_partitioned

    cfg = load_config("configs/smoke.yaml", [*TINY, "model.pattern=hvAthvAt", "parallel.zero_stage=1"])
    plan = partition_blocks(cfg.model, 2, 16)
    for stage in (0, 1):
        owns = functools.partial(stage_owns, plan=plan, pp_rank=stage)
        model, _ = build_partitioned(cfg, None, torch.device("cpu"), owns=owns)
        held = {n for n, p in model.named_parameters() if not p.is_meta}
        assert held == {n for n, _ in model.named_parameters() if stage_owns(n, plan, stage)}, stage
        assert 0 < len(held) < len(list(model.named_parameters())), (stage, len(held))
        for n, p in model.named_parameters():
            if not p.is_meta:
                assert torch.equal(p, init_full(n, tuple(p.shape), cfg.model, cfg.train.seed)), n

    base = build_model(cfg.model)
    for p in base.parameters():
        p.data.normal_()
    save_consolidated(tmp_path / "base", base.state_dict(), {"model": to_dict(cfg.model)})
    lora = load_config("configs/smoke.yaml", [*TINY, "parallel.zero_stage=1", f"init_from={tmp_path / 'base'}",
                                              "finetune.lora={rank: 4, targets: [attention, ffn]}"])
    model, report = build_partitioned(lora, None, torch.device("cpu"), init_from=lora.init_from,
                                      parallelize=lambda m: attach_lora(m, lora.finetune.lora))
    assert not any(p.is_meta for p in model.parameters())
    want = base.state_dict()
    adapters = {n: p for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
    assert adapters and all(p.requires_grad for p in adapters.values())
    for n, p in model.named_parameters():
        if n in adapters:
            continue
        assert not p.requires_grad and torch.equal(p, want[n]), n  # the frozen base, read from init_from
    for n, p in adapters.items():
        if n.endswith(".lora_B"):
            assert torch.count_nonzero(p) == 0, n
        else:
            bound = 1 / math.sqrt(p.shape[1])
            assert p.abs().max() <= bound and p.abs().max() > bound / 2, n
            assert torch.equal(p, init_full(n, tuple(p.shape), lora.model, lora.train.seed)), n
    assert any(f"{len(adapters)} tensors not in the checkpoint" in line for line in report), report
