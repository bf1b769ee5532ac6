"""``megassm plan``: memory / step-time predictions and the layout search (CPU only, analytic)."""

import copy
import json

import pytest
import torch

from megassm.cli import main
from megassm.models.accounting import activation_bytes_per_token, param_counts
from megassm.plan import Layout, choose_layout, predict_memory, predict_step_seconds
from megassm.run_config import load_config


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


def test_optimizer_offload_moves_masters_adam_and_grads_to_the_host(m5b):
    """parallel.offload_optimizer: 14P/N leave the GPU (bf16 grads, fp32 masters, Adam m and v), the host holds
    16P/N pinned, and each optimizer step pays Adam on the host plus the bf16 copies both ways."""
    from megassm.plan import CPU_ADAM_PARAMS_PER_S, HOST_LINK_GBPS, plan

    P = param_counts(m5b)["total"]
    on, off = (predict_memory(m5b, 16384, Layout(gpus=2, checkpointing="all", offload_optimizer=o)) for o in (0, 1))
    static = lambda m: m["params"] + m["grads"] + m["optimizer"]  # noqa: E731
    assert static(on) - static(off) == pytest.approx(14 * P / 2)
    assert off["optimizer_step"] == 0 < on["optimizer_step"] and off["total"] < on["total"]
    step = predict_step_seconds(m5b, 16384, Layout(gpus=2, checkpointing="all", offload_optimizer=True), 0.35, 989, 100)
    assert step["offload_optimizer_s"] == pytest.approx(P / 2 / CPU_ADAM_PARAMS_PER_S + 2 * P / (HOST_LINK_GBPS * 1e9))
    cfg = load_config("configs/stage2_2k.yaml", ["parallel.cp=1", "parallel.offload_optimizer=true",
                                                 "train.sample_every=0"])
    res = plan(cfg, 1, 16384, 80, 0.35, 989, 100)
    assert res["host"]["offload_optimizer_gb"] == pytest.approx(16 * P / 1e9)
    assert res["recommended"]["layout"]["offload_optimizer"]  # the search keeps the configured offload


def test_checkpoint_size_with_and_without_optimizer_state(m5b, capsys):
    """12 P (fp32 masters + Adam m, v) + 4 P EMA; train.save_optimizer_state=false leaves the moments out: 4 P + 4 P.
    The save seconds and the grace follow the configured one."""
    from megassm.host_plan import print_host
    from megassm.plan import plan

    P = param_counts(m5b)["total"]
    hosts = {}
    for keep in (True, False):
        cfg = load_config("configs/stage2_2k.yaml", ["train.sample_every=0", f"train.save_optimizer_state={keep}"])
        hosts[keep] = plan(cfg, 1, 16384, 80, 0.35, 989, 100)["host"]
    for h in hosts.values():
        assert h["checkpoint_full_gb"] == pytest.approx(16 * P / 1e9)
        assert h["checkpoint_model_only_gb"] == pytest.approx(8 * P / 1e9)
    assert hosts[True]["checkpoint_gb"] == hosts[True]["checkpoint_full_gb"]
    assert hosts[False]["checkpoint_gb"] == hosts[False]["checkpoint_model_only_gb"]
    assert hosts[False]["save_s"] < hosts[True]["save_s"] and hosts[False]["grace_s"] <= hosts[True]["grace_s"]
    print_host(hosts[False])
    assert f"{8 * P / 1e9:.1f} GB in all (model-only; {16 * P / 1e9:.1f} GB with the optimizer state)" in \
        capsys.readouterr().out


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


def test_cli_plan_reports_cp_traffic_of_both_implementations(capsys):
    """Stage 3 (cp 4): the bytes each rank sends per step under Ulysses and under state passing (its 8 'h'
    blocks), and the configured parallel.cp_impl's."""
    assert main(["plan", "configs/stage3_video.yaml", "parallel.cp_impl=state_passing", "--gpus", "8", "--json"]) == 0
    cpt = json.loads(capsys.readouterr().out)["configured"]["cp_traffic"]
    assert cpt["cp_impl"] == "state_passing" and cpt["state_passing"]["state_passing_blocks"] == 8
    assert cpt["ulysses"]["state_passing_blocks"] == 0
    assert cpt["state_passing"]["gib"] < cpt["ulysses"]["gib"]
    assert main(["plan", "configs/stage3_video.yaml", "--gpus", "8"]) == 0
    assert "state passing" in capsys.readouterr().out


def test_cli_plan_takes_the_sequence_length_from_the_data_of_an_unknown_stage(capsys, tmp_path):
    from megassm.data.testing import write_synthetic_dataset

    assert main(["plan", "configs/smoke.yaml", "--gpus", "1"]) == 0  # procedural 16 x 16, patch 2: 64 tokens
    assert "sequence length 64 tokens per sample (the procedural data's latent 1x16x16)" in capsys.readouterr().out
    write_synthetic_dataset(tmp_path / "d", [(16, 1, 32, 32), (16, 1, 64, 48)], 4, 2, text_dim=4096)
    mine = ["stage=mymix", "data.kind=shards", f"data.paths=[{tmp_path / 'd'}]"]
    assert main(["plan", "configs/stage0_256px.yaml", *mine, "--gpus", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["seq_len"] == 32 * 24  # the larger shape, 1 x 64 x 48 / (1, 2, 2)
    assert main(["plan", "configs/stage0_256px.yaml", "stage=mymix", "--gpus", "8"]) == 2
    assert "no readable manifest in data.paths" in capsys.readouterr().err
    assert main(["plan", "configs/stage0_256px.yaml", "stage=mymix", "--gpus", "8", "--seq-len", "256"]) == 0


def test_plan_counts_preview_memory(tmp_path):
    from megassm.plan import PreviewLoad, plan, preview_load

    cfg = load_config("configs/stage3_video.yaml")
    res = plan(cfg, 8, 29040, 80, 0.35, 989, 150)
    mem = res["configured"]["memory_gb"]
    # encoders not on this machine: the T5-v1.1-XXL encoder in bf16 (9.5 GB) is the largest preview phase,
    # beside one copy of the local (ZeRO-3 partition of the) bf16 weights while the EMA weights are in
    assert res["preview"]["prompts"] == 4 and res["preview"]["seq_len"] == 29040
    assert mem["preview"] == pytest.approx(2 * 4.76 + mem["params"], rel=1e-6)
    off = plan(load_config("configs/stage3_video.yaml", ["train.sample_every=0"]), 8, 29040, 80, 0.35, 989, 150)
    assert "preview" not in off and off["configured"]["memory_gb"]["preview"] == 0
    # a short-sequence step with recomputation: the preview, not the step, sets the peak
    m = cfg.model
    lay = Layout(gpus=8, micro_batch=1, checkpointing="all")
    load, _ = preview_load(cfg, 256)
    without, with_preview = predict_memory(m, 256, lay), predict_memory(m, 256, lay, preview=load)
    static = sum(v for k, v in without.items() if k in ("params", "grads", "optimizer", "zero_buckets",
                                                         "zero_gathered"))
    assert with_preview["total"] == pytest.approx(static + with_preview["preview"])
    assert with_preview["total"] > without["total"]
    # encoders on this machine: their sizes from the safetensors headers
    from safetensors.torch import save_file

    (tmp_path / "t5").mkdir()
    save_file({"w": torch.zeros(1000, 300), "b": torch.zeros(7)}, str(tmp_path / "t5" / "model.safetensors"))
    local_cfg = load_config("configs/stage3_video.yaml", [f"encoders.text_encoder={tmp_path / 't5'}"])
    local, sources = preview_load(local_cfg, 29040)
    assert isinstance(local, PreviewLoad) and local.text_encoder_params == 300_007
    assert sources["text_encoder"] == str(tmp_path / "t5")


def test_preview_sampler_memory_matches_the_sampling_plan():
    """A training preview's sampler phase is a sampling run: per token of both CFG branches, the same transient
    block working set that ``megassm plan --sample`` holds to the full-size H100 measurements (sample_plan.py),
    plus the residual stream in and out and the latents. It once counted a block's whole training activations
    (2x what those measurements show)."""
    import math

    from megassm.plan import PreviewLoad
    from megassm.sample_plan import predict_sampling

    cfg = load_config("configs/stage3_video.yaml")
    m = cfg.model
    load = PreviewLoad(prompts=1, seq_len=29040, text_encoder_params=0.0, vae_params=0.0, ema=False)
    preview = load.bytes_per_gpu(m, Layout(gpus=1, micro_batch=1, checkpointing="none"), 0.0)
    sampling = predict_sampling(cfg, 29040)
    assert sampling["cfg_branches"] == 2
    stream = 2 * 29040 * (2 * 2 * m.d_model + 2 * m.in_channels * math.prod(m.patch_size))
    assert preview == pytest.approx(sampling["activations_gb"] * 1e9 + stream, rel=1e-9)
