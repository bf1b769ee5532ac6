"""``megassm convert`` on real DeepSpeed checkpoints written by the trainer (1 and 2 gloo ranks, ZeRO-3
and ZeRO-1) and by a TP=2 engine: the consolidated weights equal DeepSpeed's own ``zero_to_fp32``,
the training model's gathered parameters and outputs, and the union of the per-rank EMA shards."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import child_env

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow]

# Train with the real Trainer (its pipeline step when pp > 1), then dump what the checkpoint must reproduce:
# every rank's ZeRO-gathered (TP-local / stage-local) parameters, its EMA slices, and rank 0's model output
# on a fixed input.
TRAIN_AND_DUMP = r"""
import sys
from pathlib import Path
import deepspeed, torch, torch.distributed as dist
from safetensors.torch import save_file
from megassm.run_config import load_config
from megassm.train.loop import Trainer

out = Path(sys.argv[1])
cfg = load_config(sys.argv[2], sys.argv[3:])
trainer = Trainer(cfg)
trainer.fit()
model, rank = trainer.model, trainer.rank
with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
    gathered = {n: p.detach().clone() for n, p in model.named_parameters()}
save_file(gathered, str(out / f"gathered_rank{rank}.safetensors"))
if trainer.ema is not None:
    # this rank's EMA as it is saved (ZeRO-1/2: the fragments of all ranks summed, a collective)
    save_file({n: t.contiguous() for n, t in trainer.ema.full_shadow().items()},
              str(out / f"ema_rank{rank}.safetensors"))
    # what previews and evaluation compute with: the module's weights inside applied(ema)
    from megassm.train.ema import applied
    with applied(trainer.ema), deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        under = {n: p.detach().clone() for n, p in model.named_parameters()}
    save_file(under, str(out / f"applied_ema_rank{rank}.safetensors"))
if cfg.parallel.pp > 1:  # a stage cannot run the whole model
    dist.barrier()
    sys.exit(0)
g = torch.Generator().manual_seed(123)
m = cfg.model
x, t = torch.randn(2, m.in_channels, 1, 8, 8, generator=g), torch.rand(2, generator=g)
text, mask = torch.randn(2, 5, m.text_dim, generator=g), torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]).bool()
model.eval()
with torch.no_grad():
    y = model(x, t, text, mask)  # the training module itself (ZeRO-3 gathers parameters on the fly)
if rank == 0:
    save_file({"x": x, "t": t, "text": text, "mask": mask.to(torch.uint8), "y": y.contiguous()},
              str(out / "outputs.safetensors"))
dist.barrier()
"""

# A TP=2 DeepSpeed checkpoint of known full weights (perturbed init), sharded with parallelize_hth, wrapped
# by the trainer's backend, saved by DeepSpeed: checks the TP merge against the unsharded original,
# independently of merge_state_dicts.
TP_SAVE = r"""
import sys
from pathlib import Path
import torch, torch.distributed as dist
from safetensors.torch import save_file
from megassm.config.load import to_yaml
from megassm.run_config import load_config
from megassm.models import build_model
from megassm.parallel.apply import parallelize_hth
from megassm.parallel.mesh import ParallelDims, ParallelMesh, init_distributed
from megassm.train.backends.deepspeed import DeepSpeedBackend

run, tp = Path(sys.argv[1]), int(sys.argv[2])
cfg = load_config(sys.argv[3], [f"run_dir={run}", f"parallel.tp={tp}"])
init_distributed()
mesh = ParallelMesh(ParallelDims(dist.get_world_size(), tp=tp))
torch.manual_seed(0)
model = build_model(cfg.model)
with torch.no_grad():
    for p in model.parameters():
        p.add_(torch.randn(p.shape))
if dist.get_rank() == 0:
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    save_file({n: t.contiguous() for n, t in model.state_dict().items()}, str(run / "full.safetensors"))
parallelize_hth(model, mesh)
backend = DeepSpeedBackend(mesh, cfg.parallel, cfg.train, cfg.optim, torch.device("cpu"))
backend.prepare(model, cfg.train.grad_accum)
backend.engine.save_checkpoint(str(run / "checkpoints"), tag="step_00000000")
dist.barrier()
if dist.get_rank() == 0:
    (run / "checkpoints" / "latest").write_text("step_00000000")
"""

TRAIN_ARGS = ["train.ckpt_every=2", "train.micro_batch_size=2", "train.progress_bar=false", "train.ema_decay=0.9",
              "train.log_every=1"]


def _env(rank: int, world: int, port: int) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MEGASSM_DEVICE": "cpu",
            "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/megassm_torch_ext")}


def _launch(world: int, script: str, *args, timeout: int = 480) -> None:
    """Run ``python -c script args`` as ``world`` gloo ranks (RANK/WORLD_SIZE/MASTER_* as torchrun sets)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=REPO, env=_env(r, world, port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    if any(p.returncode for p in procs):
        raise AssertionError("\n".join(f"--- rank {r} exit {p.returncode}\n{o[-4000:]}"
                                       for r, (p, o) in enumerate(zip(procs, outs))))


def _train(tmp_path_factory, name: str, world: int, *overrides: str) -> Path:
    root = tmp_path_factory.mktemp(name)
    _launch(world, TRAIN_AND_DUMP, root, REPO / "configs" / "smoke.yaml", f"run_dir={root / 'run'}", *TRAIN_ARGS,
            *overrides)
    return root


@pytest.fixture(scope="module")
def zero3(tmp_path_factory) -> Path:
    return _train(tmp_path_factory, "zero3", 1, "train.steps=4")


@pytest.fixture(scope="module")
def zero3_2rank(tmp_path_factory) -> Path:
    return _train(tmp_path_factory, "zero3_2rank", 2, "train.steps=2")


@pytest.fixture(scope="module")
def zero1_2rank(tmp_path_factory) -> Path:
    return _train(tmp_path_factory, "zero1_2rank", 2, "train.steps=2", "parallel.zero_stage=1")


@pytest.fixture(scope="module")
def pp2(tmp_path_factory) -> Path:
    return _train(tmp_path_factory, "pp2", 2, "train.steps=2", "parallel.pp=2", "parallel.zero_stage=1",
                  "parallel.micro_batches=2")


@pytest.fixture(scope="module")
def pp2_tp2(tmp_path_factory) -> Path:
    return _train(tmp_path_factory, "pp2_tp2", 4, "train.steps=2", "parallel.pp=2", "parallel.tp=2",
                  "parallel.zero_stage=1", "parallel.micro_batches=2")


@pytest.fixture(scope="module")
def tp2_trained(tmp_path_factory) -> Path:
    return _train(tmp_path_factory, "tp2_trained", 2, "train.steps=2", "parallel.tp=2")


@pytest.fixture(scope="module")
def tp2(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tp2")
    _launch(2, TP_SAVE, root / "run", 2, REPO / "configs" / "smoke.yaml")
    return root


def convert(*args, check: bool = True, subprocess_: bool = False) -> subprocess.CompletedProcess:
    """``megassm convert ARGS`` in this process (``megassm.cli.main``: the CLI minus ~10 s of imports), or
    with ``subprocess_`` through the thin wrapper users call, tools/convert_checkpoint.py."""
    if subprocess_:
        proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), *map(str, args)],
                              cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=300)
    else:
        from megassm.cli import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["convert", *map(str, args)])
        proc = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"convert {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def _zero_to_fp32(tag_dir: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


def _latest(run: Path) -> Path:
    ckpt = run / "checkpoints"
    return ckpt / (ckpt / "latest").read_text().strip()


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for n in a:
        assert a[n].dtype == b[n].dtype and a[n].shape == b[n].shape and torch.equal(a[n], b[n]), n


def _ema_union_from_files(tag_dir: Path, shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """Independent reconstruction: concatenate every rank's EMA slice, cut to the parameter's size."""
    files = sorted((tag_dir / "ema").glob("shard_*.safetensors"))
    parts = [load_file(str(f)) for f in files]
    return {n: torch.cat([p[n].reshape(-1) for p in parts])[: math.prod(s)].view(s) for n, s in shapes.items()}


def _check_run(root: Path, world: int, out: Path, subprocess_: bool = False) -> dict[str, torch.Tensor]:
    tag_dir = _latest(root / "run")
    convert("zero-to-consolidated", root / "run", out, subprocess_=subprocess_)
    model = load_file(str(out / "model.safetensors"))
    _assert_same(model, _zero_to_fp32(tag_dir))  # DeepSpeed's own consolidation, bit for bit
    _assert_same(model, load_file(str(root / "gathered_rank0.safetensors")))  # the live training weights
    ema = load_file(str(out / "ema.safetensors"))
    _assert_same(ema, _ema_union_from_files(tag_dir, {n: tuple(t.shape) for n, t in model.items()}))
    # ... and the union of the trainer's in-memory EMA slices (one per ZeRO partition)
    shadows = [load_file(str(root / f"ema_rank{r}.safetensors")) for r in range(world)]
    _assert_same(ema, {n: torch.cat([s[n].reshape(-1) for s in shadows])[: t.numel()].view(t.shape)
                       for n, t in model.items()})
    meta = json.loads((out / "meta.json").read_text())
    step = int(tag_dir.name.split("_")[-1])
    assert meta["step"] == step and meta["stage"] == "smoke" and meta["source"] == str(tag_dir)
    assert meta["source_parallel"]["zero_partitions"] == world
    return model


def test_zero3_single_rank(zero3, tmp_path):
    _check_run(zero3, 1, tmp_path / "c", subprocess_=True)
    from megassm.run_config import load_config

    cfg = load_config(tmp_path / "c" / "config.yaml")
    assert json.loads((tmp_path / "c" / "config.json").read_text())["model"]["pattern"] == cfg.model.pattern
    assert cfg.train.steps == 4  # the run's own config, not the stage file's


def _assert_reproduces_outputs(consolidated: Path, root: Path) -> None:
    """A plain HTHModel loaded from the consolidated directory gives the training model's output."""
    from megassm.checkpoint.load import load_weights
    from megassm.models import build_model
    from megassm.run_config import from_dict

    loaded = load_weights(consolidated)
    model = build_model(from_dict(loaded.config).model)
    model.load_state_dict(loaded.model, strict=True)
    model.eval()
    io = load_file(str(root / "outputs.safetensors"))
    with torch.no_grad():
        y = model(io["x"], io["t"], io["text"], io["mask"].bool())
    # The weights are bit-identical (the tests above); the outputs may differ in the last bits because
    # ZeRO-3's gathered parameters sit at other memory alignments (BLAS may take another vector path)
    # and TP sums partial products in another order. 1e-5 relative is ~100 fp32 ulps: any wrong or
    # missing weight is far outside it.
    torch.testing.assert_close(y, io["y"], rtol=1e-5, atol=1e-7)


def test_consolidated_model_reproduces_training_outputs(zero3, tmp_path):
    convert("zero-to-consolidated", zero3 / "run", tmp_path / "c")
    _assert_reproduces_outputs(tmp_path / "c", zero3)


@pytest.mark.distributed
def test_tp2_trained(tp2_trained, tmp_path):
    """The trainer at TP=2 (ZeRO-3): consolidated == the live TP shards merged; EMA likewise; outputs."""
    from megassm.parallel.sharding import merge_state_dicts
    from megassm.run_config import load_config

    cfg = load_config(tp2_trained / "run" / "config.yaml").model
    convert("zero-to-consolidated", tp2_trained / "run", tmp_path / "c")
    live = [load_file(str(tp2_trained / f"gathered_rank{r}.safetensors")) for r in range(2)]
    _assert_same(load_file(str(tmp_path / "c" / "model.safetensors")), merge_state_dicts(live, cfg))
    # each rank's EMA is its flat ZeRO-3 slice (one partition here) of its TP-local tensors
    emas = [load_file(str(tp2_trained / f"ema_rank{r}.safetensors")) for r in range(2)]
    emas = [{n: t[: live[r][n].numel()].view(live[r][n].shape) for n, t in e.items()} for r, e in enumerate(emas)]
    _assert_same(load_file(str(tmp_path / "c" / "ema.safetensors")), merge_state_dicts(emas, cfg))
    _assert_reproduces_outputs(tmp_path / "c", tp2_trained)
    # one TP rank's EMA missing: the model is still converted, the EMA left out with a note
    tag = _copy_run(tp2_trained, tmp_path / "r")
    for f in (tag / "ema").glob("mp_01_*"):
        f.unlink()
    proc = convert("zero-to-consolidated", tmp_path / "r", tmp_path / "no_ema")
    assert "EMA is left out" in proc.stderr and not (tmp_path / "no_ema" / "ema.safetensors").exists()


@pytest.mark.distributed
def test_zero3_two_ranks(zero3_2rank, tmp_path):
    _check_run(zero3_2rank, 2, tmp_path / "c")
    _assert_same(load_file(str(zero3_2rank / "gathered_rank1.safetensors")),
                 load_file(str(zero3_2rank / "gathered_rank0.safetensors")))
    _assert_applied_ema_is_the_whole_ema(zero3_2rank, 2, load_file(str(tmp_path / "c" / "ema.safetensors")))


def _assert_applied_ema_is_the_whole_ema(root: Path, world: int, ema: dict[str, torch.Tensor]) -> None:
    """Inside ``applied(ema)`` (previews, evaluation) every rank's module holds the whole EMA ``ema`` in its dtype."""
    for r in range(world):
        under = load_file(str(root / f"applied_ema_rank{r}.safetensors"))
        assert under.keys() == ema.keys()
        bad = [n for n in ema if not torch.equal(under[n], ema[n].to(under[n].dtype))]
        assert not bad, f"rank {r}: {len(bad)} of {len(ema)} tensors are not the EMA, e.g. {bad[:3]}"


@pytest.mark.distributed
def test_zero1_two_ranks(zero1_2rank, tmp_path):
    tag_dir = _latest(zero1_2rank / "run")
    convert("zero-to-consolidated", zero1_2rank / "run", tmp_path / "c")
    model = load_file(str(tmp_path / "c" / "model.safetensors"))
    _assert_same(model, _zero_to_fp32(tag_dir))
    _assert_same(model, load_file(str(zero1_2rank / "gathered_rank0.safetensors")))
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["source_format"] == "deepspeed-zero1"
    # without ZeRO-3 the EMA is whole tensors (each rank updates its optimizer's fragment); shard 0 is the EMA
    _assert_same(load_file(str(tmp_path / "c" / "ema.safetensors")),
                 load_file(str(zero1_2rank / "ema_rank0.safetensors")))
    # ZeRO-1/2: each rank's shadow is current only in its optimizer's fragment; applied() must use the whole EMA
    _assert_applied_ema_is_the_whole_ema(zero1_2rank, 2, load_file(str(tmp_path / "c" / "ema.safetensors")))


@pytest.mark.distributed
def test_tp2_deepspeed_round_trip(tp2, tmp_path):
    """TP=2 DeepSpeed -> consolidated -> TP 2 (== DeepSpeed's TP-local tensors) -> TP 1 -> TP 2, bit-exact."""
    from megassm.checkpoint.zero import DeepSpeedCheckpoint

    full = load_file(str(tp2 / "run" / "full.safetensors"))
    convert("zero-to-consolidated", tp2 / "run", tmp_path / "c")
    _assert_same(load_file(str(tmp_path / "c" / "model.safetensors")), full)
    convert("reshard", tmp_path / "c", tmp_path / "tp2", "--tp", "2")
    ds = DeepSpeedCheckpoint(_latest(tp2 / "run"))
    for r in range(2):
        local = load_file(str(tmp_path / "tp2" / f"tp_rank_{r:02d}" / "model.safetensors"))
        _assert_same(local, {n: ds.rank(r).read(n) for n in ds.rank(r).specs})
    convert("reshard", tmp_path / "tp2", tmp_path / "tp1", "--tp", "1")
    _assert_same(load_file(str(tmp_path / "tp1" / "model.safetensors")), full)
    convert("reshard", tmp_path / "tp1", tmp_path / "tp2b", "--tp", "2")
    for r in range(2):
        d = f"tp_rank_{r:02d}/model.safetensors"
        _assert_same(load_file(str(tmp_path / "tp2b" / d)), load_file(str(tmp_path / "tp2" / d)))


@pytest.mark.distributed
def test_pipeline_two_stages(pp2, tmp_path):
    """PP=2 (megassm's pipeline trainer, ZeRO-1): consolidated == the union of the stages' live weights ==
    checkpoint.zero.consolidate_pipeline_checkpoint; EMA == the stages' EMAs; PP layout round trip."""
    from megassm.checkpoint.zero import DeepSpeedCheckpoint, consolidate_pipeline_checkpoint
    from megassm.run_config import load_config

    tag_dir = _latest(pp2 / "run")
    convert("zero-to-consolidated", pp2 / "run", tmp_path / "c")
    model = load_file(str(tmp_path / "c" / "model.safetensors"))
    stages = [load_file(str(pp2 / f"gathered_rank{r}.safetensors")) for r in range(2)]
    assert not set(stages[0]) & set(stages[1])
    _assert_same(model, {**stages[0], **stages[1]})
    cfg = load_config(pp2 / "run" / "config.yaml")
    _assert_same(model, consolidate_pipeline_checkpoint(tag_dir, cfg.model, pp=2, tp=1))
    emas = [load_file(str(pp2 / f"ema_rank{r}.safetensors")) for r in range(2)]
    _assert_same(load_file(str(tmp_path / "c" / "ema.safetensors")), {**emas[0], **emas[1]})
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["source_parallel"]["pp"] == 2 and meta["source_format"] == "deepspeed-zero1"
    # consolidated -> PP 2 layout: each stage directory == that DeepSpeed rank's tensors
    convert("reshard", tmp_path / "c", tmp_path / "pp", "--pp", "2")
    ds = DeepSpeedCheckpoint(tag_dir)
    layout = json.loads((tmp_path / "pp" / "layout.json").read_text())
    for r in range(2):
        local = load_file(str(tmp_path / "pp" / layout["ranks"][r] / "model.safetensors"))
        _assert_same(local, {n: ds.rank(r).read(n) for n in ds.rank(r).specs})
    convert("reshard", tmp_path / "pp", tmp_path / "c2")
    _assert_same(load_file(str(tmp_path / "c2" / "model.safetensors")), model)


@pytest.mark.distributed
def test_pipeline_x_tensor_parallel(pp2_tp2, tmp_path):
    """PP=2 x TP=2 (4 ranks): stages' TP shards merged with merge_state_dicts, then joined."""
    from megassm.checkpoint.zero import consolidate_pipeline_checkpoint
    from megassm.parallel.sharding import merge_state_dicts
    from megassm.run_config import load_config

    cfg = load_config(pp2_tp2 / "run" / "config.yaml")
    convert("zero-to-consolidated", pp2_tp2 / "run", tmp_path / "c")
    model = load_file(str(tmp_path / "c" / "model.safetensors"))
    _assert_same(model, consolidate_pipeline_checkpoint(_latest(pp2_tp2 / "run"), cfg.model, pp=2, tp=2))

    def merged(prefix: str) -> dict:  # rank = pp_rank * 2 + tp_rank (TP innermost)
        parts = [load_file(str(pp2_tp2 / f"{prefix}_rank{r}.safetensors")) for r in range(4)]
        return {**merge_state_dicts(parts[:2], cfg.model), **merge_state_dicts(parts[2:], cfg.model)}

    _assert_same(model, merged("gathered"))
    _assert_same(load_file(str(tmp_path / "c" / "ema.safetensors")), merged("ema"))
    convert("reshard", tmp_path / "c", tmp_path / "pt", "--pp", "2", "--tp", "2")
    convert("reshard", tmp_path / "pt", tmp_path / "c2")
    _assert_same(load_file(str(tmp_path / "c2" / "model.safetensors")), model)


def test_sharded_output_dtype_and_load(zero3, tmp_path):
    from megassm.checkpoint.load import load_weights

    convert("zero-to-consolidated", zero3 / "run", tmp_path / "s", "--max-shard-size", "300KB")
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 4 and all((tmp_path / "s" / f).stat().st_size <= 300_000 + 20_000 for f in files)
    ref = _zero_to_fp32(_latest(zero3 / "run"))
    loaded = load_weights(tmp_path / "s")
    _assert_same(loaded.model, ref)
    convert("zero-to-consolidated", zero3 / "run", tmp_path / "b", "--dtype", "bf16", "--no-ema")
    _assert_same(load_file(str(tmp_path / "b" / "model.safetensors")), {n: t.bfloat16() for n, t in ref.items()})
    assert not (tmp_path / "b" / "ema.safetensors").exists()
    convert("extract-ema", zero3 / "run", tmp_path / "e")
    _assert_same(load_file(str(tmp_path / "e" / "model.safetensors")), loaded.ema)
    # an older step by tag
    convert("zero-to-consolidated", zero3 / "run", tmp_path / "t2", "--tag", "step_00000002")
    assert json.loads((tmp_path / "t2" / "meta.json").read_text())["step"] == 2


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "run", dst)
    return _latest(dst)


def _refused(out: Path, *args, subprocess_: bool = False) -> str:
    proc = convert("zero-to-consolidated", *args, out, check=False, subprocess_=subprocess_)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))  # nothing half-written
    return proc.stderr


def test_corrupt_and_partial_checkpoints_are_refused(zero3, zero3_2rank, tp2, tmp_path):
    tag = _copy_run(zero3, tmp_path / "r1")
    optim = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:-4096])
    assert "truncated" in _refused(tmp_path / "o1", tmp_path / "r1", subprocess_=True)

    tag = _copy_run(zero3, tmp_path / "r2")
    ema = tag / "ema" / "shard_00000.safetensors"
    ema.write_bytes(ema.read_bytes()[:-100])
    assert "truncated" in _refused(tmp_path / "o2", tmp_path / "r2")

    tag = _copy_run(zero3, tmp_path / "r3")
    (tag / "COMPLETE").unlink()
    assert "partial" in _refused(tmp_path / "o3", tag)

    tag = _copy_run(zero3_2rank, tmp_path / "r4")
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert "partitioned over 2 ranks" in _refused(tmp_path / "o4", tmp_path / "r4")

    tag = _copy_run(zero3, tmp_path / "r5")  # an optimizer file of another model (TP-local shapes)
    other = _latest(tp2 / "run") / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shutil.copy(other, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert "different saves or models" in _refused(tmp_path / "o5", tmp_path / "r5")

    (tmp_path / "exists").mkdir()
    proc = convert("zero-to-consolidated", zero3 / "run", tmp_path / "exists", check=False)
    assert proc.returncode == 2 and "--force" in proc.stderr
    convert("zero-to-consolidated", zero3 / "run", tmp_path / "exists", "--force")
    assert (tmp_path / "exists" / "model.safetensors").is_file()


def test_inspect_and_stage_on_deepspeed(zero3, tmp_path):
    env = child_env(OMP_NUM_THREADS="1")

    def inspect(*args):
        return subprocess.run([sys.executable, "-m", "megassm", "inspect", "checkpoint", *map(str, args)], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=300)

    proc = inspect(zero3 / "run", "--json", "--crc")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["kind"] == "deepspeed" and summary["step"] == 4 and summary["problems"] == []
    gathered = load_file(str(zero3 / "gathered_rank0.safetensors"))
    assert summary["parameters"] == sum(t.numel() for t in gathered.values())
    tag = _copy_run(zero3, tmp_path / "flip")
    f = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # a flipped bit inside the tensor data
    f.write_bytes(bytes(raw))
    proc = inspect(tmp_path / "flip", "--crc")
    assert proc.returncode == 1 and "CRC-32" in proc.stdout
    # image -> video stage: block 1 'v' -> 't' keeps its weights
    proc = convert("stage", zero3 / "run", REPO / "configs" / "smoke.yaml", tmp_path / "video", "--set",
                   "model.pattern=htAh", "--set", "stage=video")
    assert "block 1: scan order 'v'" in proc.stdout and "0 new (fresh init)" in proc.stdout
    _assert_same(load_file(str(tmp_path / "video" / "model.safetensors")), _zero_to_fp32(_latest(zero3 / "run")))
    cfg = json.loads((tmp_path / "video" / "config.json").read_text())
    assert cfg["model"]["pattern"] == "htAh" and cfg["stage"] == "video"
