"""A throwaway single-node SLURM cluster (munged + slurmctld + slurmd) under one directory.

There is no systemd on our CI machines, so the daemons are started by hand, in the
foreground, as children of this process, with their config, state, spool, sockets and
logs under ``root``; ``SLURM_CONF`` points the client commands (sbatch, squeue, ...) at
it. Nothing under /etc is touched. Ports are picked free, and the first job id is random
so that clusters of concurrent test runs on one machine hand out different job ids
(the launcher derives MASTER_PORT from the job id).

Needs root (slurmd starts jobs as their user) and Debian's packages::

    apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge

By hand, for poking at the scripts::

    python tests/integration/slurm_cluster.py /tmp/myslurm [--gpus N]   # prints the SLURM_CONF line; Ctrl-C stops
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
APT_COMMAND = "apt-get update && apt-get install -y --no-install-recommends " + " ".join(APT_PACKAGES)
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")

# Short credential lifetime: a requeued job may start again only after it (default 120 s).
CRED_EXPIRE_S = 5
# Finished jobs leave squeue / scontrol after this many seconds (default 300).
MIN_JOB_AGE_S = 5


def missing_requirements() -> str | None:
    """Why a cluster cannot be started here, or None when it can."""
    if os.geteuid() != 0:
        return "a local SLURM needs root (slurmd starts jobs as their owner)"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"SLURM/munge binaries not found ({', '.join(missing)}); install with: {APT_COMMAND}"
    return None


def clean_environ() -> dict[str, str]:
    """os.environ without the variables of an enclosing SLURM job (tests may run inside one)."""
    prefixes = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SCANCEL_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """One node, one partition ("debug"), accounting off; start() / stop().

    ``gpus``: declare that many GPUs (/dev/nvidia0..) as GRES, so that scripts asking for
    ``--gpus-per-node`` run as on a GPU cluster (SLURM sets CUDA_VISIBLE_DEVICES).
    """

    def __init__(self, root: Path, gpus: int = 0) -> None:
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.gpus = gpus
        self._procs: dict[str, subprocess.Popen] = {}

    # --- lifecycle -----------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged refuses a socket whose directories others cannot traverse.
        self.root.chmod(0o755)
        try:
            self._start_munge()
            self._write_conf()
            self._spawn("slurmctld", ["slurmctld", "-D", "-c"])
            self._spawn("slurmd", ["slurmd", "-D"])
            self._wait_node_idle(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Cancel every job, wait for them to end, then stop the daemons we started."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self.run(["scancel", "--signal=KILL", "--user=root"], check=False)
            self.run(["scancel", "--user=root"], check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.queue():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- client side ---------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """Environment for client commands and jobs (SLURM_CONF set, outer SLURM_* dropped)."""
        return {**clean_environ(), "SLURM_CONF": str(self.conf)}

    def run(self, cmd: list[str], env: dict[str, str] | None = None, check: bool = True,
            timeout: float = 60.0, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=env or self.env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
                               f"\n{self.logs_tail()}")
        return proc

    def queue(self) -> list[str]:
        """Job ids still known to squeue (pending, running or completing)."""
        out = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout
        return out.split()

    def job_info(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict ({} once the record has aged out, see MIN_JOB_AGE_S)."""
        proc = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        if proc.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))

    def logs_tail(self, n: int = 30) -> str:
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-n:]
            parts.append(f"--- {log} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(parts)

    # --- internals -----------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        self._procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        time.sleep(0.2)
        if self._procs[name].poll() is not None:
            raise RuntimeError(f"{name} exited at once ({self._procs[name].returncode}):\n{self.logs_tail()}")

    def _start_munge(self) -> None:
        munge = self.root / "munge"
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = munge / "munge.socket"
        self._spawn("munged", [
            "munged", "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--log-file={self.root / 'log' / 'munged.log'}", f"--pid-file={munge / 'munged.pid'}",
            f"--seed-file={munge / 'munged.seed'}",
        ])
        deadline = time.monotonic() + 10
        while not self.munge_socket.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not create {self.munge_socket}:\n{self.logs_tail()}")
            time.sleep(0.1)

    def _write_conf(self) -> None:
        # slurmd -C prints this machine's node line (NodeName=<host> CPUs=... RealMemory=...).
        node_line = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
        node_line = node_line.splitlines()[0].strip()
        host = re.match(r"NodeName=(\S+)", node_line).group(1)
        gres = ""
        if self.gpus:
            # slurmd reads gres.conf from slurm.conf's directory.
            (self.root / "gres.conf").write_text(f"Name=gpu File=/dev/nvidia[0-{self.gpus - 1}]\n")
            gres = f" Gres=gpu:{self.gpus}"
        r = self.root
        (r / "spool" / f"slurmd-{host}").mkdir(parents=True, exist_ok=True)
        # slurmd sets up cgroup v2 where the machine has it, even with proctrack/linuxproc,
        # and by default asks systemd over D-Bus for a scope, which fails without systemd.
        # (Without systemd it then needs /sys/fs/cgroup/system.slice to exist.)
        (r / "cgroup.conf").write_text("IgnoreSystemd=yes\n")
        self.conf.write_text(f"""\
ClusterName=megassmtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE_S}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/slurmd-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
# Retry pending jobs every second: a requeued job becomes eligible (CRED_EXPIRE_S) with
# no event that would wake the scheduler, so by default it waits for the 30 s backfill pass.
SchedulerParameters=sched_interval=1,bf_interval=1
MailProg=/bin/true
MinJobAge={MIN_JOB_AGE_S}
KillWait=10
FirstJobId={random.randint(1000, 49000)}
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
{"GresTypes=gpu" if self.gpus else ""}
{node_line}{gres} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _wait_node_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} died ({proc.returncode}):\n{self.logs_tail()}")
            state = self.run(["sinfo", "-h", "-o", "%t"], check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.3)
        raise RuntimeError(f"node not idle after {timeout:.0f} s (state {state!r}):\n{self.logs_tail()}")


def main() -> None:
    p = argparse.ArgumentParser(description="Start a single-node SLURM under DIR until Ctrl-C / SIGTERM.")
    p.add_argument("dir", nargs="?", default="/tmp/megassm-slurm")
    p.add_argument("--gpus", type=int, default=0, help="GPUs to declare as GRES (/dev/nvidia0..N-1)")
    args = p.parse_args()
    reason = missing_requirements()
    if reason:
        sys.exit(reason)
    root = Path(args.dir).resolve()
    # Stop cleanly on SIGTERM too (a backgrounded script cannot send SIGINT: it is ignored there).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with SlurmCluster(root, gpus=args.gpus) as cluster:
        print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C stops the cluster", flush=True)
        try:
            while all(p.poll() is None for p in cluster._procs.values()):
                time.sleep(1)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
