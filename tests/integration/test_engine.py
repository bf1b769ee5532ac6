"""The training engine (CPU, gloo): exact kill-and-resume, SIGTERM checkpoints, TensorBoard scalars, non-finite
guards, bf16 EMA, optimizer offload. The engine on two ranks (ZeRO stages, the stage chain, TP / CP against one
rank): test_engine_ranks.py."""

import signal
import subprocess
import time

import pytest
import torch

from megassm.train.ema import ShardedEMA
from tests.conftest import REPO, SMOKE, TINY_OVERRIDES, child_env, losses_by_step, read_metrics, run_train, train_cmd

pytestmark = pytest.mark.slow


def _wait_for_step(run_dir, step: int, proc: subprocess.Popen, timeout: float = 300) -> int:
    t0 = time.time()
    while time.time() - t0 < timeout:
        done = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
        if done and done[-1] >= step:
            return done[-1]
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout}s")


def _popen(run_dir, *overrides):
    env = child_env(OMP_NUM_THREADS="1")
    return subprocess.Popen(train_cmd(SMOKE, *TINY_OVERRIDES, f"run_dir={run_dir}", *overrides), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


RESUME_ARGS = ["train.steps=12", "train.ckpt_every=4", "data.image_size=16", "train.micro_batch_size=16",
               "train.ema_decay=0.9", "train.sample_every=6", "train.peak_tflops=1.0", "diffusion.caption_dropout=0.3"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref")
    run_train(SMOKE, *TINY_OVERRIDES, f"run_dir={run}", *RESUME_ARGS)
    return run


def test_sigkill_and_resume_reproduces_the_uninterrupted_run(reference_run, tmp_path):
    run = tmp_path / "killed"
    proc = _popen(run, *RESUME_ARGS)
    killed_at = _wait_for_step(run, 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed_at < 12, "the run finished before it could be killed"
    run_train(SMOKE, *TINY_OVERRIDES, f"run_dir={run}", *RESUME_ARGS)
    resumes = [r["step"] for r in read_metrics(run) if r.get("event") == "resume"]
    assert resumes and resumes[0] <= killed_at and resumes[0] % 4 == 0
    ref, got = losses_by_step(reference_run), losses_by_step(run)
    assert sorted(got) == list(range(1, 13))
    # fp32 on CPU, same thread count: the resumed run is bit-identical, step by step
    assert [got[s] for s in range(1, 13)] == [ref[s] for s in range(1, 13)]
    ema_ref = ShardedEMA.consolidate(reference_run / "checkpoints" / "step_00000012")
    ema_got = ShardedEMA.consolidate(run / "checkpoints" / "step_00000012")
    for k in ema_ref:
        assert torch.equal(ema_ref[k], ema_got[k]), k


def test_tensorboard_holds_the_scalars_and_samples(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(reference_run / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for name in ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "mfu", "peak_mem_gb", "data_wait_s"):
        assert f"train/{name}" in tags, (name, tags)
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert len(losses) == 12
    assert "samples" in acc.Tags()["images"]  # sample_every=6: the trainer's preview images


def test_sigterm_writes_a_loadable_checkpoint(tmp_path):
    run = tmp_path / "term"
    proc = _popen(run, "train.steps=100000", "train.ckpt_every=100000")
    _wait_for_step(run, 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    tag = (run / "checkpoints" / "latest").read_text().strip()
    saved = int(tag.split("_")[1])
    assert saved >= 3
    # resumes from it and continues
    run_train(SMOKE, *TINY_OVERRIDES, f"run_dir={run}", f"train.steps={saved + 2}")
    resumes = [r["step"] for r in read_metrics(run) if r.get("event") == "resume"]
    assert resumes == [saved]
    assert max(losses_by_step(run)) == saved + 2


def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    from megassm.run_config import load_config
    from megassm.train import loop
    from megassm.train.steps import dense

    calls = {"n": 0}
    real = dense.compute_loss

    def flaky(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] in (2, 4, 5, 6) else loss

    monkeypatch.setattr(dense, "compute_loss", flaky)
    # this test builds a Trainer in the pytest process: give it its own rendezvous, undone afterwards
    from tests.conftest import free_port

    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    cfg = load_config(SMOKE, [*TINY_OVERRIDES, f"run_dir={tmp_path}", "train.steps=10",
                              "train.max_consecutive_nonfinite=3", "train.ckpt_every=100"])
    trainer = loop.Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(loop.NonFiniteError, match="3 consecutive steps"):
        trainer.fit()
    rows = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 2, 3]
    for n, p in trainer.model.named_parameters():  # no NaN ever reached the weights
        assert torch.isfinite(p).all(), n
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_a_nonfinite_micro_batch_skips_its_whole_accumulation_window(tmp_path, monkeypatch):
    """grad_accum=2: a NaN in the second micro-batch of step 2 discards that step's window (no update, no
    LR step), and the next step opens a fresh window: one optimizer step per good train step, the data
    consumed two micro-batches per step."""
    from megassm.run_config import load_config
    from megassm.train import loop
    from megassm.train.optim import lr_lambda
    from megassm.train.steps import dense
    from tests.conftest import free_port

    calls = {"n": 0}
    real = dense.compute_loss

    def flaky(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(dense, "compute_loss", flaky)
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    cfg = load_config(SMOKE, [*TINY_OVERRIDES, f"run_dir={tmp_path}", "train.steps=4", "train.grad_accum=2",
                              "train.ckpt_every=100", "optim.warmup_steps=3"])
    trainer = loop.Trainer(cfg)
    trainer.fit()
    rows = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]
    assert [r["optimizer_steps"] for r in rows] == [1, 1, 2, 3]
    assert trainer.backend.optimizer_steps == 3 and trainer.data.position == 8
    f = lr_lambda(cfg.optim, cfg.train.steps)
    assert [r["lr"] for r in rows] == pytest.approx([cfg.optim.lr * f(s) for s in (0, 1, 1, 2)])


def test_bf16_ema_follows_the_fp32_masters_not_the_bf16_weights(tmp_path, monkeypatch):
    """ZeRO-3 in bf16 at a small LR: most Adam updates (~lr) are below one bf16 step of the weights, so the
    bf16 partitions barely change while the fp32 masters do. An EMA of the bf16 values would stay put
    (a staircase); the EMA of the masters moves nearly everywhere and matches them exactly at decay 0."""
    from deepspeed.utils import safe_get_local_fp32_param

    from megassm.run_config import load_config
    from megassm.train import loop
    from tests.conftest import free_port

    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    cfg = load_config(SMOKE, [*TINY_OVERRIDES, f"run_dir={tmp_path}", "train.steps=3", "train.precision=bf16",
                              "optim.lr=1e-5", "optim.warmup_steps=0", "train.ema_decay=0.5", "train.ckpt_every=100"])
    trainer = loop.Trainer(cfg)
    name = "blocks.0.mixer.in_proj.weight"
    p = trainer.ema.params[name]
    lp0 = p.ds_tensor.detach().clone()
    trainer.fit()
    assert p.ds_tensor.dtype == torch.bfloat16 and trainer.ema.shadow[name].dtype == torch.float32
    lp_moved = (p.ds_tensor != lp0).float().mean().item()
    ema_moved = (trainer.ema.shadow[name] != lp0.float()).float().mean().item()
    assert lp_moved < 0.5 < ema_moved, (lp_moved, ema_moved)
    master = safe_get_local_fp32_param(p)
    assert torch.allclose(trainer.ema.shadow[name], master, atol=3e-5)  # decay 0.5: within ~lr of the masters


def test_optimizer_offload_trains_as_the_gpu_optimizer(tmp_path):
    """parallel.offload_optimizer: DeepSpeed's CPUAdam over the fp32 masters on the host (DeepSpeed refuses a torch
    optimizer under ZeRO-Offload, so the key failed at start-up before) takes the same steps as torch's AdamW:
    equal losses to fp32 rounding (the two implement the same AdamW update; 1e-5 relative covers their
    different operation order over 4 steps)."""
    args = [*TINY_OVERRIDES, "train.steps=4", "train.ckpt_every=100", "optim.warmup_steps=1", "optim.weight_decay=0.1"]
    run_train(SMOKE, *args, f"run_dir={tmp_path / 'ref'}")
    log = run_train(SMOKE, *args, f"run_dir={tmp_path / 'off'}", "parallel.offload_optimizer=true")
    # the engine's set-up (CPUAdam's first build, the pinned host memory: a minute or more at 5B) is announced
    assert "optimizer offloaded to the host" in log.stderr + log.stdout
    assert "DeepSpeed engine ready in" in log.stderr + log.stdout
    ref, off = losses_by_step(tmp_path / "ref"), losses_by_step(tmp_path / "off")
    assert sorted(off) == [1, 2, 3, 4]
    assert off[1] == ref[1]  # the same model and batch before any update
    assert ref[4] != ref[1]
    for s in (2, 3, 4):
        assert off[s] == pytest.approx(ref[s], rel=1e-5), (s, off[s], ref[s])
