"""Every collective goes through megassm/parallel/comm.py, on the device its group communicates on.

The bug class: a CPU tensor handed to a collective over an NCCL group (``No backend type associated with
device type cpu``). gloo takes CPU tensors, so no CPU test of a training run can see it; what CPU tests can
hold is (1) that no module but comm.py calls ``torch.distributed`` collectives (read from the code), (2) that
comm.py's collectives move a tensor to the group's device before calling the backend, and (3) that the
warm start -- where the bug was -- gathers through them, at a group of one too (a single-GPU NCCL run must
take the cluster's path, so that the GPU run through the real CLI exercises it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megassm.parallel import comm

ROOT = Path(__file__).resolve().parents[2] / "megassm"
HOME = ROOT / "parallel" / "comm.py"
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
    "reduce_scatter_tensor", "reduce_scatter_single", "all_to_all", "all_to_all_single", "broadcast", "reduce",
    "gather", "scatter", "barrier", "monitored_barrier", "all_gather_object", "broadcast_object_list",
    "gather_object", "scatter_object_list", "send", "recv", "isend", "irecv", "batch_isend_irecv", "P2POp",
}
MODULES = ("torch.distributed", "deepspeed.comm")


def direct_collectives(source: str) -> list[str]:
    """``name`` for every collective of torch.distributed / deepspeed.comm that ``source`` calls or imports."""
    tree = ast.parse(source)
    aliases = set(MODULES)  # names bound to those modules: "dist", "torch.distributed", ...
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name in MODULES and a.asname}
        elif isinstance(node, ast.ImportFrom):
            if node.module in MODULES:
                found += [f"line {node.lineno}: from {node.module} import {a.name}" for a in node.names
                          if a.name in COLLECTIVES]
            elif node.module in ("torch", "deepspeed"):
                aliases |= {a.asname or a.name for a in node.names if f"{node.module}.{a.name}" in MODULES}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and ast.unparse(node.value) in aliases:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_but_comm_calls_collectives():
    offenders = {str(p.relative_to(ROOT.parent)): hits for p in sorted(ROOT.rglob("*.py")) if p != HOME
                 for hits in [direct_collectives(p.read_text())] if hits}
    assert not offenders, (
        "these call torch.distributed collectives directly; use megassm.parallel.comm (all_reduce_, broadcast_, "
        f"all_gather_stacked, barrier, gather_object, send_recv), which knows the group's device: {offenders}")


def test_the_code_reader_finds_each_spelling():
    for src in ("import torch.distributed as dist\ndist.all_reduce(x)",
                "import torch.distributed\ntorch.distributed.barrier()",
                "from torch import distributed as d\nd.broadcast(x, 0)",
                "from torch.distributed import all_gather",
                "import deepspeed.comm as c\nc.all_reduce(x)"):
        assert direct_collectives(src), src
    assert not direct_collectives("import torch.distributed as dist\ndist.get_rank()")
    assert direct_collectives(HOME.read_text())  # the home of the collectives does call them


def test_group_device_follows_the_backend(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    for backend, want in (("nccl", torch.device("cuda", 3)), ("cpu:gloo,cuda:nccl", torch.device("cuda", 3)),
                          ("gloo", torch.device("cpu"))):
        monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: b)
        assert comm.group_device() == want, backend
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "ucc")
    with pytest.raises(RuntimeError, match="ucc"):
        comm.group_device()


def _fake_group(monkeypatch, n: int, device: str = "meta"):
    """A group of ``n`` ranks that communicates on ``device`` (meta stands in for CUDA on this machine), whose
    all-gather records the devices it was handed."""
    seen = []

    def gather(out, x, group=None):
        seen.append((out.device.type, x.device.type))
        return None

    monkeypatch.setattr(comm, "group_device", lambda group=None: torch.device(device))
    monkeypatch.setattr(comm, "_all_gather_flat", lambda: gather)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: n)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    return seen


def test_a_cpu_tensor_reaches_the_collective_on_the_groups_device(monkeypatch):
    seen = _fake_group(monkeypatch, 2)
    out = comm.all_gather_stacked(torch.arange(6.0).view(2, 3), group="g")
    assert seen == [("meta", "meta")] and out.shape == (2, 2, 3) and out.device.type == "meta"


def test_warm_start_gathers_on_the_groups_device(monkeypatch):
    """Under ZeRO-3 each rank reads its 1/N of a parameter and one all-gather joins the pieces. It gathered CPU
    tensors over the DP x CP group, which is NCCL on GPUs: every init_from crashed at start-up on a cluster."""
    from megassm.train.build import WarmStart

    seen = _fake_group(monkeypatch, 2)

    class Rows:
        def read_shard_rows(self, name, spec, tp_rank, tp, lo, hi):
            return torch.arange(12.0).view(4, 3)[lo:hi]

    ws = WarmStart.__new__(WarmStart)
    ws.weights, ws.group = Rows(), "dp_cp"
    piece = ws._read_partitioned("w", (4, 3), None, 0, 1)
    assert seen == [("meta", "meta")], "the warm start's all-gather must take tensors on the group's device"
    assert piece.shape == (4, 3)


def test_warm_start_gathers_at_a_group_of_one(monkeypatch):
    """No world-size-1 shortcut: one GPU under ZeRO-3 runs the same all-gather as a cluster (over a real
    one-rank gloo group here), so the single-GPU run through the CLI exercises the NCCL path."""
    from types import SimpleNamespace

    from megassm.train.build import WarmStart

    want = torch.randn(4, 3)

    class Weights:
        specs = {"w": SimpleNamespace(shape=(4, 3))}

        def read_shard(self, name, spec, tp_rank, tp):
            return want

        def read_shard_rows(self, name, spec, tp_rank, tp, lo, hi):
            return want[lo:hi]

    calls = []
    real = comm.all_gather_stacked
    monkeypatch.setattr("megassm.train.build.all_gather_stacked", lambda t, g: calls.append(g) or real(t, g))
    # the tests that build a Trainer in the pytest process leave its one-rank gloo group behind: use it then
    owned = not dist.is_initialized()
    if owned:
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(_free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        assert dist.get_world_size() == 1 and dist.get_backend() == "gloo"
        ws = WarmStart.__new__(WarmStart)
        ws.weights, ws.group, ws.used, ws.fresh = Weights(), dist.group.WORLD, set(), []
        got = ws.read("w", (4, 3), (4, 3), None, 0, 1)
    finally:
        if owned:
            dist.destroy_process_group()
    assert len(calls) == 1, "a ZeRO-3 group of one must still gather"
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
