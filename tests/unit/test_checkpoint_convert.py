"""Converters on synthetic consolidated checkpoints (no DeepSpeed run needed): TP reshard round trips,
stage warm start, reference-Hydra import, inspect, load_weights of every layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megassm.checkpoint.convert import plan_stage, reshard, stage
from megassm.checkpoint.errors import CheckpointError
from megassm.checkpoint.hydra_import import HYDRA_PARAMS, import_hydra
from megassm.checkpoint.inspection import inspect_checkpoint
from megassm.checkpoint.load import load_weights
from megassm.checkpoint.sources import open_checkpoint
from megassm.checkpoint.writers import save_consolidated
from megassm.config.load import to_dict
from megassm.models import build_model
from megassm.models.hydra import Hydra
from megassm.parallel.sharding import shard_state_dict
from megassm.run_config import from_dict, load_config

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"


def _config(*overrides: str) -> dict:
    return to_dict(load_config(SMOKE, list(overrides)))


def _random_weights(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model(from_dict(cfg).model)
    # no zero-initialised tensor left, so every element shows where it came from
    return {n: t + torch.randn(t.shape) for n, t in model.state_dict().items()}


@pytest.fixture
def consolidated(tmp_path):
    cfg = _config()
    model, ema = _random_weights(cfg, 0), _random_weights(cfg, 1)
    path = tmp_path / "cons"
    save_consolidated(path, model, cfg, ema=ema, meta={"step": 7})
    return path, cfg, model, ema


def _read_dir(path: Path, stem: str = "model") -> dict[str, torch.Tensor]:
    index = path / f"{stem}.safetensors.index.json"
    if index.is_file():
        out = {}
        for f in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_file(str(path / f)))
        return out
    return load_file(str(path / f"{stem}.safetensors"))


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for n in a:
        assert a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]), n


def test_consolidated_layout(consolidated):
    path, cfg, model, ema = consolidated
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "config.yaml", "ema.safetensors", "meta.json",
                                                      "model.safetensors"]
    _assert_same(_read_dir(path), model)
    _assert_same(_read_dir(path, "ema"), ema)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 7 and meta["format"] == "megassm-consolidated" and meta["ema"] is True
    assert json.loads((path / "config.json").read_text()) == cfg
    assert to_dict(load_config(path / "config.yaml")) == cfg
    loaded = load_weights(path)
    _assert_same(loaded.model, model)
    _assert_same(loaded.ema, ema)
    assert loaded.step == 7 and loaded.config["model"]["pattern"] == "hvAh"


@pytest.mark.parametrize("overrides,tp", [((), 2), (("model.num_heads=4",), 4), (("model.ngroups=2",), 2)])
def test_tp_round_trip_is_bit_exact(consolidated, tmp_path, overrides, tp):
    cfg = _config(*overrides)
    model = _random_weights(cfg, 3)
    src = tmp_path / "src"
    save_consolidated(src, model, cfg, ema=model)
    model_cfg = from_dict(cfg).model
    # consolidated -> TP k: every rank's file is shard_state_dict of the full weights
    reshard(src, tmp_path / "tpk", tp=tp, max_shard_bytes=50_000)
    layout = json.loads((tmp_path / "tpk" / "layout.json").read_text())
    assert layout["tp"] == tp and layout["ranks"] == [f"tp_rank_{r:02d}" for r in range(tp)]
    for r in range(tp):
        rank_dir = tmp_path / "tpk" / f"tp_rank_{r:02d}"
        assert (rank_dir / "model.safetensors.index.json").is_file()  # sharded at 50 kB
        expected = shard_state_dict(model, model_cfg, r, tp)
        _assert_same(_read_dir(rank_dir), {n: t.contiguous() for n, t in expected.items()})
    # TP k -> consolidated -> TP 1 (also consolidated) -> TP k again: all bit-exact
    reshard(tmp_path / "tpk", tmp_path / "c1", tp=1)
    _assert_same(_read_dir(tmp_path / "c1"), model)
    _assert_same(_read_dir(tmp_path / "c1", "ema"), model)
    reshard(tmp_path / "c1", tmp_path / "c2", tp=1)
    _assert_same(_read_dir(tmp_path / "c2"), model)
    reshard(tmp_path / "c2", tmp_path / "tpk2", tp=tp, max_shard_bytes=50_000)
    for r in range(tp):
        d = f"tp_rank_{r:02d}"
        _assert_same(_read_dir(tmp_path / "tpk2" / d), _read_dir(tmp_path / "tpk" / d))
    # load_weights merges a TP-sharded directory on the fly
    _assert_same(load_weights(tmp_path / "tpk").model, model)


@pytest.mark.parametrize("pp,tp,virtual", [(2, 1, 1), (2, 2, 1), (2, 1, 2)])
def test_pipeline_layout_round_trip(consolidated, tmp_path, pp, tp, virtual):
    from megassm.parallel.pipeline import partition_blocks
    from megassm.parallel.pipeline_checkpoint import full_to_stage_state_dict

    path, cfg, model, ema = consolidated
    reshard(path, tmp_path / "pp", tp=tp, pp=pp, virtual=virtual, seq_len=64)
    layout = json.loads((tmp_path / "pp" / "layout.json").read_text())
    plan = partition_blocks(from_dict(cfg).model, pp, 64, virtual)
    assert layout["pipeline"]["bounds"] == [list(b) for b in plan.bounds] and len(layout["ranks"]) == pp * tp
    for r in range(pp):
        for t in range(tp):
            rank_dir = tmp_path / "pp" / layout["ranks"][r * tp + t]
            expected = full_to_stage_state_dict(model, from_dict(cfg).model, plan, r, t, tp)
            _assert_same(_read_dir(rank_dir), {n: v.contiguous() for n, v in expected.items()})
    reshard(tmp_path / "pp", tmp_path / "back", tp=1)
    _assert_same(_read_dir(tmp_path / "back"), model)
    _assert_same(_read_dir(tmp_path / "back", "ema"), ema)


def test_reshard_rejects_bad_degrees(consolidated, tmp_path):
    path = consolidated[0]
    with pytest.raises(ValueError, match="parallel.tp=3 does not divide"):
        reshard(path, tmp_path / "x", tp=3)
    with pytest.raises(ValueError, match="parallel.pp=5 x virtual stages 1 = 5 stages but the model has 4 blocks"):
        reshard(path, tmp_path / "x", pp=5, seq_len=64)
    assert not (tmp_path / "x").exists()
    with pytest.raises(CheckpointError, match="--force"):
        reshard(path, path, tp=1)


def test_stage_revises_scan_orders_and_inits_new_blocks(consolidated, tmp_path, capsys):
    path, cfg, model, ema = consolidated
    # video-like target: block 1 'v' -> 't' (same weights), block 3 'h' -> 'A' (new mixer), a new 5th block
    target = _config("model.pattern=htAAh", "stage=video_test")
    meta, report = stage(path, target, tmp_path / "video")
    text = "\n".join(report)
    assert "block 1: scan order 'v'" in text and "-> 't'" in text and "same weights" in text
    assert "block 3: mixer 'h'" in text and "block 4: new 'h'" in text
    out = _read_dir(tmp_path / "video")
    fresh = set(meta["fresh_tensors"])
    assert any(n.startswith("blocks.3.mixer.qkv") for n in fresh) and any(n.startswith("blocks.4.") for n in fresh)
    for n, t in out.items():
        if n not in fresh:
            assert torch.equal(t, model[n]), n
    # fresh tensors follow the model's own init: zero-init modulation tables, A_log = 0, D = 1
    assert torch.equal(out["blocks.4.scale_shift_table"], torch.zeros(6, 64))
    assert torch.equal(out["blocks.4.mixer.A_log"], torch.zeros(4))
    assert torch.equal(out["blocks.4.mixer.D"], torch.ones(4))
    assert out["blocks.3.mixer.qkv.weight"].std() > 0
    # the EMA keeps the source EMA where it was copied, and the same fresh values where new
    ema_out = _read_dir(tmp_path / "video", "ema")
    assert torch.equal(ema_out["blocks.0.mlp.fc1.weight"], ema["blocks.0.mlp.fc1.weight"])
    assert torch.equal(ema_out["blocks.4.mixer.in_proj.weight"], out["blocks.4.mixer.in_proj.weight"])
    stored = json.loads((tmp_path / "video" / "config.json").read_text())
    assert stored["model"]["pattern"] == "htAAh" and stored["stage"] == "video_test"
    # the output is a valid checkpoint for the target model
    m = build_model(from_dict(stored).model)
    m.load_state_dict(out, strict=True)


def test_stage_refuses_width_changes(consolidated):
    path, cfg, model, _ = consolidated
    src = from_dict(cfg).model
    dst = from_dict(_config("model.d_model=128")).model
    specs = open_checkpoint(path).model.specs
    with pytest.raises(CheckpointError, match="changes the shapes"):
        plan_stage(src, dst, specs)


def _reference_hydra_state(cfg, n_layers: int, prefix: str = "layers.{}.mixer.") -> dict[str, torch.Tensor]:
    """A stand-in for goombalab/hydra weights: megassm's Hydra has the reference's names and shapes."""
    m = from_dict(cfg).model
    sd = {"embedding.weight": torch.randn(10, m.d_model)}
    for i in range(n_layers):
        h = Hydra(m.d_model, d_state=m.d_state, d_conv=m.d_conv, expand=m.expand, headdim=m.headdim, ngroups=m.ngroups)
        for k, v in h.state_dict().items():
            sd[prefix.format(i) + k] = v + torch.randn(v.shape)
        sd[f"layers.{i}.norm.weight"] = torch.randn(m.d_model)
    return sd


def test_import_hydra(tmp_path, consolidated):
    cfg = _config()  # pattern hvAh: Hydra blocks 0, 1, 3
    ref = _reference_hydra_state(cfg, 3)
    torch.save(ref, tmp_path / "ref.pt")
    meta, report = import_hydra(tmp_path / "ref.pt", cfg, tmp_path / "imp")
    out = _read_dir(tmp_path / "imp")
    for layer, block in ((0, 0), (1, 1), (2, 3)):
        for leaf in HYDRA_PARAMS:
            assert torch.equal(out[f"blocks.{block}.mixer.{leaf}"], ref[f"layers.{layer}.mixer.{leaf}"])
    assert meta["mapping"] == {"layers.0.mixer.": 0, "layers.1.mixer.": 1, "layers.2.mixer.": 3}
    build_model(from_dict(cfg).model).load_state_dict(out, strict=True)
    # explicit mapping onto a base checkpoint: only block 3 changes
    base_path, _, base, _ = consolidated
    import_hydra(tmp_path / "ref.pt", cfg, tmp_path / "imp2", mapping=["2=3"], base=base_path)
    out2 = _read_dir(tmp_path / "imp2")
    for n, t in out2.items():
        expected = ref[n.replace("blocks.3.mixer.", "layers.2.mixer.")] if n.startswith("blocks.3.mixer.") else base[n]
        assert torch.equal(t, expected), n


def test_import_hydra_errors(tmp_path):
    cfg = _config()
    ref = _reference_hydra_state(cfg, 2)
    from safetensors.torch import save_file

    save_file(ref, str(tmp_path / "ref.safetensors"))
    with pytest.raises(CheckpointError, match="--map REF=BLOCK"):
        import_hydra(tmp_path / "ref.safetensors", cfg, tmp_path / "x")
    with pytest.raises(CheckpointError, match="block 2 is not a Hydra block"):
        import_hydra(tmp_path / "ref.safetensors", cfg, tmp_path / "x", mapping=["0=2"])
    with pytest.raises(CheckpointError, match="matches 0 layers"):
        import_hydra(tmp_path / "ref.safetensors", cfg, tmp_path / "x", mapping=["7=0"])
    wide = _reference_hydra_state(_config("model.d_model=96", "model.num_heads=2"), 1)
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(CheckpointError, match=r"does not fit megassm block 0: in_proj.weight is \(460, 96\)"):
        import_hydra(tmp_path / "wide.safetensors", cfg, tmp_path / "x", mapping=["0=0"])
    ref["layers.0.mixer.out_proj.bias"] = torch.zeros(64)
    save_file(ref, str(tmp_path / "bias.safetensors"))
    with pytest.raises(CheckpointError, match="bias=True"):
        import_hydra(tmp_path / "bias.safetensors", cfg, tmp_path / "x", mapping=["0=0"])
    assert not (tmp_path / "x").exists()


def test_inspect_of_a_truncated_checkpoint_lists_the_problem_with_status_1(consolidated, tmp_path, capsys):
    """docs/checkpoints.md: status 1 with every problem listed (was 2, a usage error); 2 stays for a path that
    does not exist."""
    import shutil

    from megassm.cli import main

    path = tmp_path / "cut"
    shutil.copytree(consolidated[0], path)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert main(["inspect", "checkpoint", str(path)]) == 1
    assert "unreadable" in capsys.readouterr().out
    assert main(["inspect", "checkpoint", str(tmp_path / "none")]) == 2


def test_inspect_finds_nan_and_shape_problems(consolidated, tmp_path):
    path, cfg, model, ema = consolidated
    summary, problems = inspect_checkpoint(path)
    assert problems == [] and summary["parameters"] == sum(t.numel() for t in model.values())
    assert summary["step"] == 7 and summary["ema"] and summary["dtypes"] == {"float32": len(model)}
    bad = dict(model)
    bad["blocks.1.mlp.fc1.weight"] = bad["blocks.1.mlp.fc1.weight"].clone()
    bad["blocks.1.mlp.fc1.weight"][0, :3] = float("nan")
    save_consolidated(tmp_path / "nan", bad, cfg)
    _, problems = inspect_checkpoint(tmp_path / "nan")
    assert problems == ["blocks.1.mlp.fc1.weight: 3 NaN, 0 Inf of 16384"]
    _, problems = inspect_checkpoint(path, config=_config("model.pattern=hvAhh"))
    assert any("missing" in p for p in problems)
