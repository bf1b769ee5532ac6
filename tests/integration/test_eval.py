"""Evaluation end to end with random-weight extractors (nothing downloaded): train.eval_every inside a 2-rank
ZeRO-3 run of the CPU demo writes the held-out loss, CLIP score and KID to TensorBoard; `megassm eval` of its
checkpoint (context parallel over 2 ranks) writes every metric's JSON and a table, and its held-out loss is the
one training logged for the same EMA weights."""

import json
import subprocess

import pytest

from tests.conftest import REPO, TINY_OVERRIDES, child_env, run_train, torchrun

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
PROMPTS = ["a red square at the top left", "a blue square at the bottom right", "a green square at the top right",
           "a yellow square at the bottom left"]


@pytest.fixture(scope="module")
def extractors(tmp_path_factory):
    """Random InceptionV3 (75 px input), a tiny CLIP, and 8 demo images as the reference set."""
    from megassm.data.procedural import ProceduralShapes
    from megassm.eval.testing import save_random_inception, save_tiny_clip
    from megassm.sample import save_image

    d = tmp_path_factory.mktemp("extractors")
    save_random_inception(d / "inception.pth")
    save_tiny_clip(d / "clip")
    (d / "ref").mkdir()
    for i, x in enumerate(ProceduralShapes(8, 8, 16, 8, seed=7).batch(0)["latents"]):  # (3, 1, 8, 8) in [-1, 1]
        save_image(((x[:, 0] + 1) / 2).clamp(0, 1), d / "ref" / f"{i}.png")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return d


def test_eval_every_on_two_ranks_then_megassm_eval(extractors, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d, run = extractors, tmp_path / "run"
    # 10 held-out samples in batches of 4: 3 batches over 2 replicas, replica 1 runs a stand-in (ZeRO-3 in step)
    run_train(REPO / "configs" / "smoke.yaml", *TINY_OVERRIDES, f"run_dir={run}", "train.steps=4",
              "train.eval_every=2", "train.ckpt_every=4", "eval.samples=10", "eval.batch_size=4",
              f"eval.clip_model={d / 'clip'}", f"eval.inception={d / 'inception.pth'}", f"eval.reference={d / 'ref'}",
              "diffusion.sample_steps=2", nproc=2)
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("eval/heldout_loss", "eval/clip_score", "eval/kid", "train/loss"):
        assert tag in tags, (tag, tags)
    for tag in ("eval/heldout_loss", "eval/clip_score", "eval/kid"):
        assert [e.step for e in acc.Scalars(tag)] == [2, 4], tag
    heldout = [e.value for e in acc.Scalars("eval/heldout_loss")]
    assert all(0 < v < 10 for v in heldout) and heldout[0] != heldout[1]  # the EMA weights moved

    out = tmp_path / "eval"
    cmd = [*torchrun(2), "-m", "megassm", "eval", str(run), "--prompts", str(d / "prompts.txt"),
           "--reference", str(d / "ref"), "--clip-model", str(d / "clip"), "--inception", str(d / "inception.pth"),
           "--out", str(out), "--steps", "2"]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "metrics.json").read_text())["metrics"]
    assert set(results) == {"heldout_loss", "clip_score", "fid", "kid"}
    for name in results:
        r = json.loads((out / f"{name}.json").read_text())
        assert r["metric"] == name and r["weights"] == "ema" and r["step"] == 4 and r["value"] >= 0
        assert name in proc.stdout  # the table
    assert results["fid"]["generated_frames"] == 4 and results["fid"]["reference_frames"] == 8
    # the same EMA weights, validation set and draws; 1e-5: the sequence is split over 2 CP ranks here, not in
    # training (a different reduction order in attention / the scan)
    assert results["heldout_loss"]["value"] == pytest.approx(heldout[-1], rel=1e-5)

