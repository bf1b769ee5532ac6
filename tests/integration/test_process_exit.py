"""How a process that ran collectives ends (``megassm.cli.end_process``, CPU, gloo).

CI saw rank 0 of a two-rank ``megassm train`` abort with SIGABRT ("terminate called without an active
exception") after it had logged its clean stop: the groups outlive ``destroy_process_group`` (DeepSpeed holds
them), so the interpreter's finalization destroys them, and a gloo thread that finishes a collective then and
needs the GIL is stopped mid-destructor. Two plain gloo ranks replay that order on purpose: rank 0 leaves an
all-reduce with a Python callback in flight and exits; rank 1 joins it once rank 0 is finalizing. Exiting
the interpreter's way aborts (the hazard is real, so the check below can fail); ``end_process`` exits 0,
after what finalization would have done first: an idle thread pool stopped, a running thread waited for,
the atexit handlers run, stdout flushed."""

import signal
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO, child_env, free_port

pytestmark = pytest.mark.distributed

SCRIPT = textwrap.dedent('''
    import atexit, os, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path
    import torch, torch.distributed as dist

    mode, work = sys.argv[1], Path(sys.argv[2])
    exiting = work / "rank0_exiting"
    if os.environ["RANK"] == "0":  # registered first, so it runs last of the atexit handlers
        atexit.register(exiting.touch)
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:  # joins the all-reduce once rank 0 is finalizing (its last atexit handler + 2 s)
        deadline = time.monotonic() + 120
        while not exiting.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(2.0)
        try:
            dist.all_reduce(torch.ones(1))
        except Exception:  # rank 0 already gone (end_process does not wait for it): not what is tested
            pass
        os._exit(0)

    # rank 0: a collective in flight whose completion runs Python on gloo's thread. Finalization's first
    # garbage collection destroys the group, whose destructor waits for it: rank 1 joins, and the callback
    # needs the GIL of an interpreter that is finalizing.
    fut = dist.all_reduce(torch.ones(1), async_op=True).get_future().then(lambda f: f.value())
    atexit.register(lambda: (work / "atexit_ran").touch())
    print("rank 0 printed this before exiting", flush=False)  # end_process must flush it
    if mode == "end_process":
        pool = ThreadPoolExecutor(1)
        pool.submit(int).result()  # an idle pool worker, never shut down: must not hang the exit
        threading.Thread(target=lambda: (time.sleep(0.3), (work / "thread_done").touch())).start()  # waited for
        from megassm.cli import end_process

        end_process(0)
    sys.exit(0)
''')


def _run_two_ranks(tmp_path, mode: str) -> tuple[int, str]:
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    work = tmp_path / mode
    work.mkdir()
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script), mode, str(work)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=child_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1"))
             for r in range(2)]
    try:
        out, _ = procs[0].communicate(timeout=180)
        procs[1].wait(timeout=120)
    finally:
        for p in procs:
            p.kill()
    return procs[0].returncode, out


def test_exiting_the_interpreters_way_aborts_when_a_collective_finishes_during_finalization(tmp_path):
    code, out = _run_two_ranks(tmp_path, "interpreter")
    assert code == -signal.SIGABRT, (
        f"rank 0 exited {code}, not by SIGABRT: this torch/CPython may no longer abort when a gloo thread "
        f"needs the GIL during finalization; end_process may then be unnecessary (see its docstring)\n{out}")
    assert "terminate called without an active exception" in out, out


def test_end_process_exits_0_after_the_threads_and_atexit_handlers(tmp_path):
    code, out = _run_two_ranks(tmp_path, "end_process")
    assert code == 0, out
    assert (tmp_path / "end_process" / "atexit_ran").exists()
    assert (tmp_path / "end_process" / "thread_done").exists()  # a running non-daemon thread was waited for
    assert "rank 0 printed this before exiting" in out, out


def test_the_console_script_and_python_m_megassm_end_through_entry():
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("megassm") == "megassm.cli:entry", scripts.get("megassm")
    assert (REPO / "megassm" / "__main__.py").read_text().strip().endswith("entry()")
