"""``megassm plan``: memory / step-time predictions and the layout search (CPU only, analytic)."""

import copy
import json

import pytest

from megassm.cli import main
from megassm.config.load import load_config
from megassm.models.accounting import activation_bytes_per_token, param_counts
from megassm.plan import Layout, choose_layout, predict_memory, predict_step_seconds


@pytest.fixture(scope="module")
def m5b():
    return load_config("configs/model/hth-5b.yaml").model


def test_zero3_static_memory_shards_over_dp_and_cp(m5b):
    P = param_counts(m5b)["total"]
    one = predict_memory(m5b, 4096, Layout(gpus=1, checkpointing="all"))
    eight = predict_memory(m5b, 4096, Layout(gpus=8, cp=2, checkpointing="all"))
    assert one["params"] + one["grads"] + one["optimizer"] == pytest.approx(16 * P)
    assert eight["params"] + eight["grads"] + eight["optimizer"] == pytest.approx(16 * P / 8)
    assert eight["zero_gathered"] > 0 and one["zero_gathered"] == 0  # nothing to gather on one rank


def test_checkpointing_and_cp_reduce_activations(m5b):
    acts = {ck: predict_memory(m5b, 16384, Layout(gpus=8, checkpointing=ck))["activations"]
            for ck in ("none", "every_k", "all")}
    assert acts["all"] < acts["every_k"] < acts["none"]
    # no checkpointing: every block keeps its activations -> the accounting sum over the pattern
    per_token = sum(activation_bytes_per_token(m5b, s) for s in m5b.pattern)
    assert acts["none"] == pytest.approx(16384 * per_token)
    cp2 = predict_memory(m5b, 16384, Layout(gpus=8, cp=2, checkpointing="none"))["activations"]
    assert cp2 == pytest.approx(acts["none"] / 2)


def test_activation_accounting_counts_hydra_above_attention(m5b):
    eager = copy.deepcopy(m5b)
    eager.fuse_elementwise = False
    h, a = activation_bytes_per_token(eager, "h"), activation_bytes_per_token(eager, "A")
    # measured on an H100 with the eager glue (benchmarks/results/layers_h100_run1.json): 217.6 kB and 174.1 kB
    assert h == pytest.approx(217.6e3, rel=0.02) and a == pytest.approx(174.1e3, rel=0.02)
    # the fused glue keeps no LayerNorm outputs: two (d,) bf16 tensors per token fewer
    for s, eager_bytes in (("h", h), ("A", a)):
        assert activation_bytes_per_token(m5b, s) == eager_bytes - 2 * 2 * m5b.d_model


def test_step_time_counts_recompute_and_communication(m5b):
    base = predict_step_seconds(m5b, 29040, Layout(gpus=4, cp=4, checkpointing="none"), 0.4, 989, 150)
    ck = predict_step_seconds(m5b, 29040, Layout(gpus=4, cp=4, checkpointing="all"), 0.4, 989, 150)
    assert ck["compute_s"] == pytest.approx(base["compute_s"] * 4 / 3)
    assert base["comm_s"] > 0
    assert predict_step_seconds(m5b, 29040, Layout(gpus=1), 0.4, 989, 150)["comm_s"] == 0


def test_choose_layout_fits_budget_or_says_none(m5b):
    pick = choose_layout(m5b, 29040, 8, 1, 80e9, 0.4, 989, 150)
    assert pick is not None
    lay, mem = pick
    assert mem <= 80e9 and lay.gpus == 8 and 8 % (lay.tp * lay.cp) == 0
    assert predict_memory(m5b, 29040, lay)["total"] == pytest.approx(mem)
    assert choose_layout(m5b, 29040, 1, 1, 80e9, 0.4, 989, 150) is None  # 5B + Adam: > 80 GB on one GPU
    small = copy.deepcopy(m5b)
    small.pattern = "hvhA"
    assert choose_layout(small, 29040, 1, 1, 80e9, 0.4, 989, 150) is not None


def test_cli_plan_prints_a_layout(capsys):
    assert main(["plan", "configs/stage3_video.yaml", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "configured layout: tp=1 cp=4" in out and "recommended:" in out
    assert main(["plan", "configs/stage2_2k.yaml", "--gpus", "4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["seq_len"] == 16384 and res["configured"]["fits"] in (True, False)


def test_cli_plan_needs_seq_len_for_unknown_stage(capsys):
    assert main(["plan", "configs/smoke.yaml", "--gpus", "1"]) == 2
    assert "--seq-len" in capsys.readouterr().err
    assert main(["plan", "configs/smoke.yaml", "--gpus", "1", "--seq-len", "64"]) == 0
