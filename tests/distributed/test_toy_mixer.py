"""A new kind of token mixer needs no edit outside its own file: this file defines one (a causal linear
attention, run along a scan order: symbols 'c' row-major, 'C' column-major), its ``MixerSpec`` and its
TP / SP / Ulysses-CP parallel twin, registers it, and then a model with pattern 'cCAh' trains through
``megassm train`` (DeepSpeed ZeRO-3, one gloo process), shards on 2 gloo ranks exactly as one process
computes, is planned by ``megassm plan`` and is converted by ``megassm convert`` (ZeRO -> consolidated ->
TP 2 -> consolidated, bit-exact) and inspected. The spawned ranks and the training process import this
module, which registers the mixer there too.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import parallel_cases as pc
import pytest
import torch
import torch.nn.functional as F
from dist_harness import spawn
from torch import Tensor, nn

from megassm.models.mixers import MixerSpec, ShardSpec, register_mixer
from megassm.models.scan import in_scan_order
from megassm.parallel.context import heads_to_seq, seq_to_heads
from megassm.parallel.tensor import ColumnParallelLinear, ParallelContext, RowParallelLinear
from tests.conftest import REPO, TINY_OVERRIDES, child_env

HERE = Path(__file__).resolve().parent


# -- the mixer ----------------------------------------------------------------------------------------
def causal_linear_attention(q: Tensor, k: Tensor, v: Tensor, eps: float = 1e-6) -> Tensor:
    """q, k, v (B, L, h, hd), tokens in scan order -> (B, L, h, hd): token i attends to tokens <= i with
    the kernel phi(q_i) . phi(k_j), phi = elu + 1 (a running sum of phi(k) v^T)."""
    q, k = F.elu(q) + 1, F.elu(k) + 1
    kv = torch.cumsum(k.unsqueeze(-1) * v.unsqueeze(-2), dim=1)  # (B, L, h, hd, hd)
    z = torch.cumsum(k, dim=1)  # (B, L, h, hd)
    num = torch.einsum("blhi,blhij->blhj", q, kv)
    return num / ((q * z).sum(-1, keepdim=True) + eps)


class ToyLinearAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def mix(self, x: Tensor, grid, scan_order: str) -> Tensor:
        return in_scan_order(self, x, grid, scan_order)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, L, d), tokens in scan order -> (B, L, d)."""
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, -1, self.head_dim).unbind(2)  # each (B, L, h, hd)
        return self.proj(causal_linear_attention(q, k, v).reshape(B, L, -1))


class ParallelToyLinearAttention(nn.Module):
    """TP: qkv column-parallel (this rank's heads), proj row-parallel (+SP through those layers);
    CP: all-to-all to the full sequence of 1/cp of the heads, the scan order, back."""

    def __init__(self, toy: ToyLinearAttention, ctx: ParallelContext):
        super().__init__()
        self.ctx, self.head_dim = ctx, toy.head_dim
        self.qkv = ColumnParallelLinear.from_linear(toy.qkv, ctx)
        self.proj = RowParallelLinear.from_linear(toy.proj, ctx)

    def mix(self, x: Tensor, grid, scan_order: str) -> Tensor:
        """x: (B, L/cp, d), or (B, L/(cp*tp), d) under SP, canonical order -> same shape."""
        qkv = self.qkv(x)
        B, Lc = qkv.shape[:2]
        qkv = qkv.view(B, Lc, 3, -1, self.head_dim)  # (B, L/cp, 3, h, hd)
        if self.ctx.cp > 1:
            qkv = seq_to_heads(qkv, self.ctx.cp_group, head_dim=3)  # (B, L, 3, h/cp, hd)
        y = in_scan_order(lambda t: causal_linear_attention(*t.unbind(2)), qkv, grid, scan_order)  # (B, L, hc, hd)
        if self.ctx.cp > 1:
            y = heads_to_seq(y, self.ctx.cp_group, head_dim=2)  # (B, L/cp, h, hd)
        return self.proj(y.reshape(B, Lc, -1))


# -- its spec -------------------------------------------------------------------------------------------
def _params(m) -> int:
    d = m.d_model
    return 3 * d * d + 3 * d + d * d + d


def _flops(m, seq_len: int) -> int:
    d, hd = m.d_model, m.d_model // m.num_heads
    return 2 * d * 3 * d + 2 * d * d + 4 * d * hd + 2 * d  # projections, kv update + readout, normaliser


def _activation_bytes(m, bytes_per_el: int) -> int:
    d, hd = m.d_model, m.d_model // m.num_heads
    return (3 * d + 2 * d + d * hd + d + 2 * d) * bytes_per_el  # qkv, phi(q, k), running kv, z, output


def _shard_specs(m, tp: int) -> dict:
    d = m.d_model
    return {"qkv.weight": ShardSpec(0, ((d, True),) * 3), "qkv.bias": ShardSpec(0, ((d, True),) * 3),
            "proj.weight": ShardSpec(1, ((d, True),))}


TOY = register_mixer(MixerSpec(
    name="toy_linear_attention", label="toy linear-attention mixers",
    symbols={"c": "row", "C": "col"},
    descriptions={"c": "toy causal linear attention, row-major", "C": "toy causal linear attention, column-major"},
    build=lambda m: ToyLinearAttention(m.d_model, m.num_heads),
    parallel=lambda mixer, ctx, m: ParallelToyLinearAttention(mixer, ctx),
    params=_params, flops=_flops, activation_bytes=_activation_bytes, shard_specs=_shard_specs,
    divisibility=lambda m, tp: [("tp", "toy heads (model.num_heads)", m.num_heads),
                                ("cp", "toy heads per TP rank (num_heads/tp)", m.num_heads // tp)],
), replace=True)

PATTERN = "cCAh"


# -- sharded == one process (2 gloo ranks) ---------------------------------------------------------------
def run_toy_checks(rank: int, world: int) -> dict:
    report = {}
    for tp, cp, sp in ((2, 1, True), (1, 2, False)):  # on a 2-frame grid: row and column orders differ
        f, _ = pc.check_model(world, tp, cp, sp, pc.VIDEO, pc.tiny_cfg(pattern="cC"))
        report[f"model tp{tp} cp{cp} sp{int(sp)}"] = f
    return report


@pytest.mark.distributed
def test_toy_mixer_sharded_matches_one_process(tmp_path):
    """TP 2 + SP and CP 2: a model of two toy blocks ('cC'): its output, every parameter's gradient, and its
    state dict against shard_state_dict / merge_state_dicts, equal one process's (parallel_cases tolerances)."""
    bad = {f"rank {r} {case}": f[:3] for r, res in enumerate(spawn(run_toy_checks, 2, tmp_path))
           for case, f in res.items() if f}
    assert not bad, bad


# -- trains, plans, converts ---------------------------------------------------------------------------
TRAIN = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import test_toy_mixer; from megassm.cli import main; "
         "sys.exit(main(sys.argv[1:]))")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("toy") / "run"
    args = [*TINY_OVERRIDES, f"model.pattern={PATTERN}", f"run_dir={run}", "train.steps=3", "train.ckpt_every=3",
            "train.micro_batch_size=2", "train.ema_decay=0.9", "optim.warmup_steps=0"]
    proc = subprocess.run([sys.executable, "-c", TRAIN, str(HERE), "train", str(REPO / "configs/smoke.yaml"), *args],
                          cwd=REPO, env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run


def test_toy_mixer_trains(trained):
    from megassm.checkpoint.sources import open_checkpoint
    from megassm.models.hth import HTHModel

    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in steps), steps
    ckpt = open_checkpoint(trained)
    torch.manual_seed(0)  # the trainer's initial weights (train.seed 0): the toy's weights moved
    init = HTHModel(ckpt.model_config()).state_dict()
    for name in ("blocks.0.mixer.qkv.weight", "blocks.1.mixer.proj.weight"):
        assert not torch.equal(ckpt.model.read(name).float(), init[name]), name


def test_toy_mixer_plans(trained):
    from megassm.models.accounting import forward_flops, mixer_flops_per_token, param_counts
    from megassm.models.hth import HTHModel
    from megassm.plan import plan
    from megassm.run_config import load_config

    cfg = load_config(trained / "config.yaml")
    m = cfg.model
    model = HTHModel(m)
    toy_params = sum(p.numel() for i in (0, 1) for p in model.blocks[i].mixer.parameters())
    counts = param_counts(m)
    assert counts["toy_linear_attention_mixers"] == toy_params == 2 * _params(m)
    res = plan(cfg, gpus=2, seq_len=64, gpu_mem_gb=80, mfu=0.35, peak_tflops=989, link_gbps=150)
    assert res["params"] == sum(p.numel() for p in model.parameters())
    assert mixer_flops_per_token(m, "C", 64) == _flops(m, 64)
    without = load_config(trained / "config.yaml", ["model.pattern=AAAh"])
    # forward FLOPs differ from an all-attention model exactly by the toy blocks' FLOPs
    assert forward_flops(m, 64) - forward_flops(without.model, 64) == 64 * 2 * (
        _flops(m, 64) - mixer_flops_per_token(m, "A", 64))
    assert res["configured"]["fits"] and res["recommended"]["layout"]["tp"] in (1, 2)


def test_toy_mixer_converts_and_inspects(trained, tmp_path):
    from megassm.checkpoint.convert import plan_stage, reshard, zero_to_consolidated
    from megassm.checkpoint.inspection import inspect_checkpoint
    from megassm.checkpoint.model_specs import expected_specs
    from megassm.checkpoint.safetensors_io import SafetensorsFile
    from megassm.checkpoint.sources import open_checkpoint
    from megassm.parallel.sharding import shard_state_dict
    from megassm.run_config import load_config

    zero_to_consolidated(trained, tmp_path / "full")
    reshard(tmp_path / "full", tmp_path / "tp2", tp=2)
    reshard(tmp_path / "tp2", tmp_path / "back", tp=1)
    full, back = open_checkpoint(tmp_path / "full"), open_checkpoint(tmp_path / "back")
    sd = {n: full.model.read(n) for n in full.model.specs}
    assert set(back.model.specs) == set(sd)
    for n in sd:
        assert torch.equal(back.model.read(n), sd[n]), n
    cfg = full.model_config()
    for r in range(2):  # the TP-2 directory holds the shard plan's pieces (toy qkv rows split by head)
        local = SafetensorsFile(tmp_path / "tp2" / f"tp_rank_{r:02d}" / "model.safetensors")
        want = shard_state_dict(sd, cfg, r, 2)
        assert local.specs["blocks.0.mixer.qkv.weight"].shape == (3 * cfg.d_model // 2, cfg.d_model)
        for n in ("blocks.0.mixer.qkv.weight", "blocks.1.mixer.proj.weight", "blocks.3.mixer.in_proj.weight"):
            assert torch.equal(local.read(n), want[n]), (r, n)
    summary, problems = inspect_checkpoint(tmp_path / "full", scan=False)
    assert not problems, problems
    assert summary["per_component"]["toy linear-attention mixers"] == 2 * _params(cfg)
    # a warm start may change a toy block's scan order (same weights) or its kind (fresh weights)
    dst = load_config(trained / "config.yaml", ["model.pattern=CcAc"]).model
    report = "\n".join(plan_stage(cfg, dst, expected_specs(cfg)).report)
    assert "block 0: scan order 'c' (toy causal linear attention, row-major) -> 'C'" in report
    assert "block 3: mixer 'h' (Hydra, row-major raster scan (t, h, w)) -> 'c'" in report
