"""Offset reads of TP slices (megassm/checkpoint/sliced.py) and sampling's one-copy load, with the
bytes each read costs (``checkpoint.errors.bytes_read``)."""

import pytest
import torch

from megassm.checkpoint.errors import CheckpointError, bytes_read
from megassm.checkpoint.safetensors_io import SafetensorsDir
from megassm.checkpoint.sliced import SlicedWeights
from megassm.checkpoint.writers import save_consolidated
from megassm.config.load import to_dict
from megassm.models import build_model
from megassm.parallel.sharding import shard_spec, shard_tensor
from megassm.run_config import load_config
from megassm.sample import load_model_for_sampling

TINY = ["model.d_model=32", "model.num_heads=4", "model.headdim=8", "model.d_state=8", "model.chunk_size=16",
        "model.text_dim=16", "model.max_text_len=8", "model.in_channels=3", "model.pattern=hvAt", "model.ngroups=2"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = load_config("configs/smoke.yaml", TINY)
    torch.manual_seed(0)
    model = {n: p.detach().clone() for n, p in build_model(cfg.model).named_parameters()}
    ema = {n: t + 1 for n, t in model.items()}
    out = tmp_path_factory.mktemp("ckpt") / "consolidated"
    save_consolidated(out, model, to_dict(cfg), ema=ema)
    return out, cfg, model, ema


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_slices_are_read_by_offset_and_cost_only_their_bytes(checkpoint, tp):
    out, cfg, model, _ = checkpoint
    sliced = SlicedWeights(SafetensorsDir(out, "model"))
    for name, full in model.items():
        spec = shard_spec(name, cfg.model, tp)
        for r in range(tp):
            before = bytes_read()
            got = sliced.read_shard(name, spec, r, tp)
            cost = bytes_read() - before
            want = full if spec is None else shard_tensor(full, spec, r, tp)
            assert torch.equal(got, want), (name, r)
            assert cost == want.numel() * 4, (name, r, cost)  # fp32: exactly the slice, nothing around it


def test_row_ranges_of_tp_slices_equal_the_slices_rows(checkpoint):
    """read_shard_rows (what a ZeRO-3 rank reads for its 1/N) == rows of read_shard, at any cut."""
    out, cfg, model, _ = checkpoint
    sliced = SlicedWeights(SafetensorsDir(out, "model"))
    for tp in (1, 2):
        for name in model:
            spec = shard_spec(name, cfg.model, tp) if tp > 1 else None
            whole = sliced.read_shard(name, spec, 0, tp)
            n = whole.shape[0]
            for lo, hi in ((0, n), (n // 3, n - n // 4), (n - 1, n)):
                assert torch.equal(sliced.read_shard_rows(name, spec, tp - 1, tp, lo, hi),
                                   sliced.read_shard(name, spec, tp - 1, tp)[lo:hi]), (name, tp, lo, hi)


def test_sampling_load_reads_the_ema_once_into_the_model(checkpoint):
    out, _, model, ema = checkpoint
    before = bytes_read()
    loaded, _, info = load_model_for_sampling(out, use_ema=True)
    assert bytes_read() - before == sum(t.numel() * 4 for t in ema.values())  # one read of each tensor
    assert info["weights"] == "ema"
    for n, p in loaded.named_parameters():
        assert p.device.type == "cpu" and torch.equal(p.detach(), ema[n]), n
    plain, _, info = load_model_for_sampling(out, use_ema=False)
    assert info["weights"] == "model"
    assert all(torch.equal(p.detach(), model[n]) for n, p in plain.named_parameters())


def test_sampling_load_names_mismatched_weights(checkpoint, tmp_path):
    out, cfg, model, _ = checkpoint
    bad = dict(model)
    bad.pop("y_null")
    save_consolidated(tmp_path / "bad", bad, to_dict(cfg))
    with pytest.raises(CheckpointError, match=r"do not match the stored config \(missing \['y_null'\]"):
        load_model_for_sampling(tmp_path / "bad")
