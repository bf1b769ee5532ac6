"""One short CPU training run with train.profile and W&B (offline) on, then its resume: the profiler's trace
names the model's ops, W&B gets the scalars and images TensorBoard gets, and the resumed job continues the
same W&B run."""

import importlib.util
import json
import re
import struct

import pytest

from tests.conftest import SMOKE, TINY_OVERRIDES, read_metrics, run_train

pytestmark = pytest.mark.slow
HAVE_WANDB = importlib.util.find_spec("wandb") is not None
ARGS = [*TINY_OVERRIDES, "train.ckpt_every=2", "train.sample_every=4", "train.profile.start_step=2",
        "train.profile.steps=2", "train.eval_every=4", "eval.samples=8", "eval.batch_size=4"]
WANDB = ["logging.wandb={mode: offline, project: megassm-ci, tags: [ci]}"] if HAVE_WANDB else []
needs_wandb = pytest.mark.skipif(not HAVE_WANDB, reason="wandb is not installed (pip install megassm[wandb])")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """Steps 1..4, profiling steps 2 and 3."""
    run = tmp_path_factory.mktemp("observed")
    proc = run_train(SMOKE, *ARGS, "train.steps=4", f"run_dir={run}", *WANDB)
    return run, proc.stderr


def test_profile_trace_names_the_model_ops(first_run):
    run, log = first_run
    assert sorted(p.name for p in (run / "profile").iterdir()) == ["rank0_steps2-3.pt.trace.json",
                                                                   "rank0_steps2-3_ops.txt"]
    trace = json.loads((run / "profile" / "rank0_steps2-3.pt.trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    # hvAh: self-attention, Hydra's depthwise convolution and the SSD reference scan's cumsum; whole steps
    assert {"aten::scaled_dot_product_attention", "aten::conv1d", "aten::cumsum"} <= names
    assert {"train step 2", "train step 3"} <= names and "train step 4" not in names
    assert any(n.startswith("Optimizer.step") for n in names if n)  # DeepSpeed's optimizer step is inside
    assert re.search(r"profile rank 0 steps 2-3: \S+rank0_steps2-3\.pt\.trace\.json .*host outside ops "
                     r"\d+\.\d%; top ops: \S+ [\d.e+-]+ ms", log), log[-3000:]


def _wandb_records(path):
    """Protobuf records of a W&B run file (.wandb): a header, then a LevelDB-style log of 32 KiB blocks,
    each record split into chunks behind 7-byte headers (crc32, length, type: 1 full, 2 first, 3 middle,
    4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, block = path.read_bytes(), 7, b"", 32768
    assert data.startswith(b":W&B")
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


def _wandb_run(run_dir):
    """(run id, tags, [history row as {key: value}]) of one offline run directory."""
    [file] = run_dir.glob("run-*.wandb")
    run_id, tags, rows = None, None, []
    for rec in _wandb_records(file):
        if rec.WhichOneof("record_type") == "run":
            run_id, tags = rec.run.run_id, list(rec.run.tags)
        elif rec.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return run_id, tags, rows


@pytest.fixture(scope="module")
def resumed(first_run):
    """The first run's job again, to step 6: it resumes at step 4."""
    run, _ = first_run
    run_id = (run / "wandb_run_id").read_text().strip() if HAVE_WANDB else None
    return run, run_id, run_train(SMOKE, *ARGS, "train.steps=6", f"run_dir={run}", *WANDB)


def test_text_log_of_steps_and_evaluation_and_a_resume_mark_in_tensorboard(first_run, resumed):
    """With train.progress_bar=false: a `step N/total | loss | lr | ... | tokens/s | MFU | mem` line every
    train.log_every steps (and at the last), the eval results as text; the resume is marked in TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, log = first_run
    steps = re.findall(r"step (\d+)/4 \| loss \d\.\d{4} \| lr [\d.e+-]+ \| grad norm [\d.]+ \| [\d,]+ tokens/s \| "
                       r"[\d.]+ samples/s \| MFU n/a \| mem [\d.]+ GiB \| [\d.]+ s/step", log)
    assert steps == ["1", "2", "3", "4"], log[-3000:]  # train.log_every=1
    assert re.search(r"step 4 \| eval/heldout_loss \d", log), log[-3000:]
    assert sorted(p.name for p in (first_run[0] / "samples").iterdir())[:1] == ["step_00000004_0.png"]
    run, _, proc = resumed
    assert re.findall(r"step (\d+)/6 \| loss", proc.stderr) == ["5", "6"]
    acc = EventAccumulator(str(run / "tb")).Reload()
    assert [e.step for e in acc.Scalars("event/resume")] == [4]
    assert [e.step for e in acc.Scalars("train/skipped_steps")] == [1, 2, 3, 4, 5, 6]


@needs_wandb
def test_wandb_offline_run_continues_across_a_resume(resumed):
    run, run_id, proc = resumed
    assert "train.profile: steps 2..3 are before this run's first step 5 (resumed); nothing is profiled" in proc.stderr
    assert (run / "wandb_run_id").read_text().strip() == run_id
    # offline, each job writes its own directory under the same run id (`wandb sync` uploads them to that run)
    dirs = sorted((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(dirs) == 2, list((run / "wandb").iterdir())
    losses = {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}
    for d, steps in zip(dirs, ([1, 2, 3, 4], [5, 6])):
        got_id, tags, rows = _wandb_run(d)
        assert (got_id, tags) == (run_id, ["ci"])
        scalars = {r["step"]: r for r in rows if "train/loss" in r}
        assert sorted(scalars) == steps
        for s in steps:
            assert scalars[s]["train/loss"] == pytest.approx(losses[s], rel=1e-6)
            assert {"train/lr", "train/grad_norm", "train/samples_per_s"} <= set(scalars[s])
    _, _, first_rows = _wandb_run(dirs[0])
    assert [r["step"] for r in first_rows if r.get("samples/_type") == "images/separated"] == [4]  # sample_every=4
    assert list((dirs[0] / "files" / "media" / "images").glob("samples_*.png"))
    _, _, resumed_rows = _wandb_run(dirs[1])
    assert [r["step"] for r in resumed_rows if "event/resume" in r] == [4]
