"""The sbatch scripts in slurm/, submitted for real to a single-node SLURM started here.

The cluster (munged + slurmctld + slurmd, see slurm_cluster.py) lives for the test session;
the scripts run unchanged except for what a user would change to smoke-test them on CPU:
sbatch options for the resources (2 tasks, no GPUs) and the launcher's environment
(MEGASSM_DEVICE=cpu, MEGASSM_EXTRA_OVERRIDES from slurm/cpu_tiny.overrides). Covered:
preprocess.sh on 2 ranks (tiny random-weight VAE + T5) -> stage0 trained on those shards,
stage3 on the built-in procedural data, and preemption: SIGUSR1 to the batch shell ->
checkpoint -> `scontrol requeue` -> the requeued job resumes from the saved step.

Needs root and `apt-get install -y slurmctld slurmd slurm-client munge`; skipped
otherwise, except under CI=true, where a missing prerequisite fails the test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.slurm_cluster import SlurmCluster, missing_requirements

REPO = Path(__file__).resolve().parents[2]
STAGES = ["stage0_256px", "stage1_1k", "stage2_2k", "stage3_video"]
# What a user passes to run a GPU script on one CPU node: sbatch command-line options win
# over the script's #SBATCH lines. --time stays above the scripts' --signal lead (<= 600 s).
CPU_SBATCH = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=30"]
JOB_TIMEOUT_S = 480


# --- static checks (no cluster needed) ------------------------------------------------
def _sbatch_options(script: Path) -> dict[str, str]:
    opts = {}
    for line in script.read_text().splitlines():
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            opts[m.group(1)] = m.group(2) or ""
    return opts


@pytest.mark.parametrize("name", [*STAGES, "preprocess"])
def test_script_headers(name):
    script = REPO / "slurm" / f"{name}.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    opts = _sbatch_options(script)
    # One task per GPU, preemption signal to the batch shell, requeue, logs appended on requeue.
    assert opts["ntasks-per-node"] == opts["gpus-per-node"], opts
    assert re.fullmatch(r"B:USR1@\d+", opts["signal"]), opts
    assert "requeue" in opts and opts["open-mode"] == "append", opts
    # sbatch does not create the output directory; a missing one fails the job silently.
    assert (REPO / os.path.dirname(opts["output"])).is_dir(), opts["output"]
    lead = int(opts["signal"].split("@")[1])
    h, m, s = (int(v) for v in opts["time"].split(":"))
    assert lead < h * 3600 + m * 60 + s
    if name != "preprocess":  # the grace check's lead (slurm/common.sh) is the --signal lead
        assert f': "${{MEGASSM_SIGNAL_LEAD:={lead}}}"' in script.read_text()


def test_dry_run_command_line(tmp_path):
    env = {**os.environ, "MEGASSM_DRY_RUN": "1", "MEGASSM_RUN_DIR": str(tmp_path / "run"),
           "MEGASSM_EXTRA_OVERRIDES": "train.steps=7\nmodel.d_model=64"}
    env.pop("SLURM_JOB_ID", None)
    out = subprocess.run(["bash", "slurm/stage3_video.sh", "train.ckpt_every=2"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    cmd = next(line for line in out.stdout.splitlines() if "command:" in line)
    # Config, run dir, then the environment's overrides, then the script's arguments (last wins).
    tail = cmd.split(" -m megassm train ", 1)[1].split()
    assert tail == ["configs/stage3_video.yaml", f"run_dir={tmp_path / 'run'}", "train.steps=7",
                    "model.d_model=64", "train.ckpt_every=2"]
    assert not (tmp_path / "run").exists()
    bad = subprocess.run(["bash", "slurm/stage3_video.sh", "run_dir=/x"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "MEGASSM_RUN_DIR" in bad.stderr


def test_dry_run_derives_the_grace_from_the_measured_save_rate(tmp_path):
    """No save yet: the script's fallback; after one: 1.5 x (t_step + S / B) from save_stats.json
    (megassm/grace.py); MEGASSM_SIGNAL_GRACE wins; a grace beyond the --signal lead is called out."""
    run = tmp_path / "run"
    env = {**os.environ, "MEGASSM_DRY_RUN": "1", "MEGASSM_RUN_DIR": str(run)}
    env.pop("SLURM_JOB_ID", None)

    def grace_line(**extra):
        out = subprocess.run(["bash", "slurm/stage3_video.sh"], cwd=REPO, env={**env, **extra},
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return next(line for line in out.stdout.splitlines() if "SIGUSR1 grace" in line)

    assert "grace 480 s: no save of this run measured yet" in grace_line()
    (run / "checkpoints").mkdir(parents=True)
    stats = {"tag": "step_00000250", "mode": "async", "bytes": 82e9, "write_gbps": 0.328, "step_s": 30.0}
    (run / "checkpoints" / "save_stats.json").write_text(json.dumps(stats))
    line = grace_line()
    assert "grace 420 s: 1.5 x (t_step 30.0 s + 82.00 GB / 0.328 GB/s)" in line and "WARNING" not in line
    assert "grace 100 s: MEGASSM_SIGNAL_GRACE (explicit" in grace_line(MEGASSM_SIGNAL_GRACE="100")
    (run / "checkpoints" / "save_stats.json").write_text(json.dumps({**stats, "write_gbps": 0.1}))
    assert "WARNING" in grace_line() and "--signal=B:USR1@1350" in grace_line()


# --- the cluster ----------------------------------------------------------------------
@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    reason = missing_requirements()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true, so the SLURM test must run, but {reason}")
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


class Job:
    """A submitted script: its id, log file and (for stage scripts) run directory."""

    def __init__(self, cluster: SlurmCluster, job_id: int, log: Path, run_dir: Path | None):
        self.cluster, self.id, self.log, self.run_dir = cluster, job_id, log, run_dir

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log yet)"

    def diagnostics(self) -> str:
        return (f"--- job {self.id} log {self.log}\n{self.text()[-6000:]}\n"
                f"--- scontrol: {self.cluster.job_info(self.id)}\n{self.cluster.logs_tail(15)}")

    def metrics(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def wait_for(self, what: str, cond, timeout: float = JOB_TIMEOUT_S, poll: float = 0.3) -> None:
        """Poll cond() until true; fail at the timeout or as soon as the job has left the queue."""
        deadline = time.monotonic() + timeout
        while not cond():
            if str(self.id) not in self.cluster.queue() and not cond():
                pytest.fail(f"job {self.id} ended before {what}\n{self.diagnostics()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{self.diagnostics()}")
            time.sleep(poll)


def submit(cluster: SlurmCluster, script: str, args: list[str], workdir: Path, wait: bool) -> tuple[Job, int]:
    """sbatch slurm/<script>.sh on 2 CPU tasks; returns the job and sbatch's exit code
    (with --wait: the job's)."""
    job_name = "megassm-" + script.replace("_", "-")
    env = {**cluster.env,
           "MEGASSM_DEVICE": "cpu", "MEGASSM_PYTHON": sys.executable, "MEGASSM_RUNS": str(workdir / "runs"),
           "MEGASSM_EXTRA_OVERRIDES": (REPO / "slurm" / "cpu_tiny.overrides").read_text(),
           "OMP_NUM_THREADS": "1",
           # DeepSpeed compiles its CPU communication op on first use (~30 s): once per machine.
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  str(Path.home() / ".cache" / "torch_extensions"))}
    cmd = ["sbatch", "--parsable", *CPU_SBATCH, f"--output={workdir}/%x-%j.out", *(["--wait"] if wait else []),
           f"slurm/{script}.sh", *args]
    proc = cluster.run(cmd, env=env, cwd=REPO, check=False, timeout=JOB_TIMEOUT_S + 60)
    m = re.match(r"(\d+)", proc.stdout.strip())
    assert m, f"sbatch failed ({proc.returncode}): {proc.stdout}{proc.stderr}\n{cluster.logs_tail()}"
    job_id = int(m.group(1))
    run_dir = None if script == "preprocess" else workdir / "runs" / f"{job_name}-{job_id}"
    return Job(cluster, job_id, workdir / f"{job_name}-{job_id}.out", run_dir), proc.returncode


def assert_trained(job: Job, steps: int) -> None:
    """DONE, a final checkpoint, one metrics line per step, the launcher saw 2 tasks exit 0."""
    d = job.diagnostics
    assert (job.run_dir / "DONE").read_text().strip() == str(steps), d()
    assert [r["step"] for r in job.metrics() if "event" not in r] == list(range(1, steps + 1)), d()
    latest = job.run_dir / "checkpoints" / "latest"  # names the newest complete tag, "step_00000004"
    assert latest.exists() and int(latest.read_text().strip().rsplit("_", 1)[-1]) == steps, d()
    assert "2 tasks on" in job.text() and "tasks exited with code 0" in job.text(), d()


# --- preprocess, stage3 ---------------------------------------------------------------
@pytest.fixture(scope="module")
def latent_dataset(slurm, tmp_path_factory) -> Path:
    """8 images (32x32, captions) encoded by slurm/preprocess.sh on 2 ranks into 4 shards."""
    from megassm.data import testing as T

    d = tmp_path_factory.mktemp("preprocess")
    vae, t5 = T.make_tiny_vae(d / "vae"), T.make_tiny_text_encoder(d / "t5")
    (d / "images").mkdir()
    for i in range(8):
        T.write_image(d / "images" / f"img{i}.png", 32, 32, seed=i, caption=f"image number {i}")
    out = d / "latents"
    job, rc = submit(slurm, "preprocess", [
        "--input", str(d / "images"), "--output", str(out), "--vae", str(vae), "--text-encoder", str(t5),
        "--resolution", "32", "--aspect-ratios", "1:1", "--bucket-multiple", "8", "--samples-per-shard", "2",
        "--batch-size", "2", "--num-workers", "0", "--device", "cpu", "--no-progress"], d, wait=True)
    assert rc == 0, job.diagnostics()
    assert (out / "manifest.json").exists(), job.diagnostics()
    assert "rank 0/2" in job.text() and "rank 1/2" in job.text(), job.diagnostics()
    return out


@pytest.mark.slurm
@pytest.mark.slow
def test_preprocess_script_splits_work_over_ranks(latent_dataset):
    manifest = json.loads((latent_dataset / "manifest.json").read_text())
    assert manifest["num_samples"] == 8 and manifest["num_shards"] == 4, manifest


@pytest.mark.slurm
@pytest.mark.slow
def test_stage3_trains_on_procedural_data(slurm, tmp_path):
    job, rc = submit(slurm, "stage3_video", ["train.steps=4", "train.ckpt_every=2"], tmp_path, wait=True)
    assert rc == 0, job.diagnostics()
    assert_trained(job, 4)


# --- preemption -----------------------------------------------------------------------
@pytest.mark.slurm
@pytest.mark.slow
def test_stage0_on_shards_checkpoints_on_usr1_requeues_and_resumes(slurm, latent_dataset, tmp_path):
    """stage0 on the preprocessed shards, preempted after its first step, runs to the end."""
    steps = 8
    # One DataLoader worker per rank reads the shards: srun delivers the forwarded signal
    # to every process of the task, workers included, and the run must survive that.
    job, _ = submit(slurm, "stage0_256px", [
        "data.kind=shards", f"data.paths=[{latent_dataset}]", "model.in_channels=4", "data.num_workers=1",
        f"train.steps={steps}", "train.ckpt_every=1000"], tmp_path, wait=False)
    job.wait_for("the first training step", lambda: any("step" in r for r in job.metrics()))

    # What `--signal=B:USR1@600` does 10 minutes before the time limit.
    slurm.run(["scancel", "--signal=USR1", "--batch", str(job.id)])
    job.wait_for("the job to be requeued, resume and finish", lambda: (job.run_dir / "DONE").exists())
    job.wait_for("the job to leave the queue", lambda: str(job.id) not in slurm.queue())

    log, d = job.text(), job.diagnostics
    saved = re.search(r"checkpoint written on signal at step (\d+)", log)
    assert saved and "requeueing job" in log, d()
    n = int(saved.group(1))
    assert 1 <= n < steps, d()
    assert f"resumed from step {n}" in log, d()
    # the first start had no measured save; the requeued one derives its grace from the signal's save
    graces = re.findall(r"SIGUSR1 grace (\d+) s: (.*?);", log)
    assert len(graces) == 2 and "no save of this run measured yet" in graces[0][1], graces
    assert f"measured at step_{n:08d}" in graces[1][1], graces
    rows = job.metrics()
    resume = [i for i, r in enumerate(rows) if r.get("event") == "resume"]
    assert len(resume) == 1 and rows[resume[0]]["step"] == n, rows
    before = [r["step"] for r in rows[:resume[0]] if "step" in r]
    after = [r["step"] for r in rows[resume[0] + 1:] if "event" not in r]
    assert before == list(range(1, n + 1)) and after == list(range(n + 1, steps + 1)), rows
    assert_trained(job, steps)
    starts = (job.run_dir / "slurm_jobs.log").read_text()
    assert "restart=0" in starts and "restart=1" in starts, starts
