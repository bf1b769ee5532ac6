"""train.profile: which steps a (possibly resumed) process records, the trace and summary it writes, and the
config errors. The whole-trainer run is in tests/integration/test_observability.py."""

import json
import logging

import pytest
import torch
from torch.autograd import DeviceType

from megassm.config import ConfigError, ProfileConfig
from megassm.run_config import load_config
from megassm.train.profiling import (
    ProfileWindow,
    StepProfiler,
    _union_length,
    kernel_kind,
    kernel_kinds,
    kinds_table,
    profile_window,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_window_fresh_run_has_one_warmup_step():
    assert profile_window(start_step=5, steps=3, first_step=1) == ProfileWindow(first=5, last=7, wait=3, warmup=1)
    assert profile_window(start_step=1, steps=2, first_step=1) == ProfileWindow(first=1, last=2, wait=0, warmup=0)


def test_window_after_resume():
    # resumed at step 6 (next step 7): what is left of steps 5..7 is step 7, with no warm-up step before it
    assert profile_window(start_step=5, steps=3, first_step=7) == ProfileWindow(first=7, last=7, wait=0, warmup=0)
    assert profile_window(start_step=5, steps=3, first_step=8) is None
    assert profile_window(start_step=5, steps=0, first_step=1) is None


def test_union_length_clips_and_merges_overlaps():
    assert _union_length([(0, 4), (2, 6), (8, 9), (-5, 1)], lo=0, hi=10) == 7
    assert _union_length([(3, 5), (0, 10)], lo=2, hi=4) == 2


def _train_steps(profiler, device, steps):
    """A toy training loop: ``steps`` optimizer steps, the profiler told after each (as Trainer.fit does)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 1)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, steps + 1):
        loss = model(torch.randn(16, 32, device=device)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        profiler.step(step)


@pytest.mark.parametrize("device", DEVICES)
def test_trace_names_the_ops_and_the_steps(tmp_path, caplog, device):
    cfg = ProfileConfig(start_step=2, steps=2, ranks=[0], memory=True)
    profiler = StepProfiler(cfg, tmp_path, rank=0, world=1, device=torch.device(device), first_step=1)
    with caplog.at_level(logging.INFO, logger="megassm.train"):
        _train_steps(profiler, device, steps=4)
        profiler.close()
    trace = json.loads((tmp_path / "rank0_steps2-3.pt.trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"aten::addmm", "aten::gelu", "train step 2", "train step 3"} <= names
    assert "train step 1" not in names and "train step 4" not in names  # warm-up and after the window
    assert "aten::addmm" in (tmp_path / "rank0_steps2-3_ops.txt").read_text()
    assert (tmp_path / "rank0_steps2-3_memory.pickle").is_file() == (device == "cuda")
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("profile rank 0")]
    assert ("GPU idle" if device == "cuda" else "host outside ops") in line
    tops = line.split("; top ")[1]
    assert tops.startswith("kernels: " if device == "cuda" else "ops: ") and "train step" not in tops
    if device == "cpu":
        assert "aten::addmm" in tops


def test_a_window_cut_short_still_writes_its_trace(tmp_path):
    profiler = StepProfiler(ProfileConfig(start_step=2, steps=5), tmp_path, 0, 1, torch.device("cpu"), first_step=1)
    _train_steps(profiler, "cpu", steps=3)  # e.g. SIGTERM after step 3
    profiler.close()
    names = {e.get("name") for e in json.loads((tmp_path / "rank0_steps2-6.pt.trace.json").read_text())["traceEvents"]}
    assert {"train step 2", "train step 3"} <= names


def test_other_ranks_and_a_resume_past_the_window_record_nothing(tmp_path):
    cfg = ProfileConfig(start_step=2, steps=2, ranks=[1])
    assert StepProfiler(cfg, tmp_path / "a", 0, 2, torch.device("cpu"), first_step=1).prof is None
    assert StepProfiler(cfg, tmp_path / "b", 1, 2, torch.device("cpu"), first_step=4).prof is None
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(ConfigError, match=r"train.profile.ranks=\[1\].*world size 1"):
        StepProfiler(cfg, tmp_path, 0, 1, torch.device("cpu"), first_step=1)


@pytest.mark.parametrize("override, message", [
    ("train.profile.start_step=0", r"train.profile.start_step=0 must be >= 1"),
    ("train.profile.ranks=[]", r"train.profile.ranks=\[\] must be a non-empty list"),
    ("train.profile.ranks=[0,0]", r"train.profile.ranks=\[0, 0\] must be a non-empty list of distinct"),
    ("train.profile.ranks=[-1]", r"train.profile.ranks=\[-1\]"),
    ("train.profile.start_step=99", r"train.profile covers steps 99..100 but train.steps=10"),
])
def test_bad_profile_config_fails_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["train.steps=10", "train.profile.steps=2", override])


@pytest.mark.parametrize("name, kind", [
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128", "attention"),
    ("kernel_cutlass_FlashAttentionForwardSm90_0", "attention"),
    ("_chunk_scan_chunk_state_bwd_dx_kernel", "hydra (scan, conv, norm)"),
    ("conv_silu_fwd_kernel", "hydra (scan, conv, norm)"),
    ("nvjet_sm90_tst_192x192_64x3_1x2_h_bz_coopB_NTN", "gemm"),
    ("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128", "gemm fp8"),
    ("nvjet_sm90_qrtst_128x160_128x5_2x1_v_bz_coopA_algo2_TNT", "gemm fp8"),
    ("nvjet_sm90_qqtst_192x208_128x4_2x1_v_bz_coopB_TNT", "gemm fp8"),
    ("triton_poi_fused__to_copy_add_mul_0", "inductor fused"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<TensorListMetadata<4>>", "optimizer"),
    ("Memcpy DtoD (Device -> Device)", "copy"),
    ("void at::native::elementwise_kernel<128, 4, gpu_kernel_impl_nocast<...>>", "elementwise / reduce (eager)"),
    ("some_new_kernel", "other"),
])
def test_kernel_kind_names_where_a_steps_gpu_time_goes(name, kind):
    assert kernel_kind(name) == kind


def test_kernel_kinds_counts_device_events_once():
    from types import SimpleNamespace as E

    cpu = DeviceType.CPU
    cuda = DeviceType.CUDA
    averages = [E(key="aten::mm", device_type=cpu, self_device_time_total=0.0, count=2, is_user_annotation=False),
                E(key="nvjet_sm90_tst_a", device_type=cuda, self_device_time_total=3000.0, count=2,
                  is_user_annotation=False),
                E(key="_chunk_scan_fwd_kernel", device_type=cuda, self_device_time_total=1000.0, count=1,
                  is_user_annotation=False),
                E(key="train step 3", device_type=cuda, self_device_time_total=9000.0, count=1,
                  is_user_annotation=True)]
    rows = kernel_kinds(averages)
    assert rows == [("gemm", 3.0, 75.0, 2), ("hydra (scan, conv, norm)", 1.0, 25.0, 1)]
    assert "gemm" in kinds_table(rows).splitlines()[1]
