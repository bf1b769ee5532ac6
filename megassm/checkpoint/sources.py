"""Open any megassm checkpoint as lazy, unsharded weights: names + shapes up front, tensors on demand.

    consolidated   DIR/model.safetensors (or sharded + index) [+ ema.*] + config.yaml/json + meta.json
    sharded        DIR/layout.json + one directory per (pp, tp) rank with model.safetensors [+ ema]
                   + config + meta (written by ``megassm convert reshard --tp K --pp P``)
    deepspeed      a run directory (checkpoints/latest), its checkpoints/ directory, or one tag
                   directory (step_*: DeepSpeed files + ema/shard_*.safetensors, or under the
                   pipeline trainer ema/mp_rank_XX.safetensors)

Every kind yields a ``Checkpoint`` whose ``model`` / ``ema`` are ``WeightSet``s of *unsharded*
tensors: TP shards are merged with ``megassm.parallel.sharding.merge_state_dicts`` one tensor at a
time, pipeline stages are a union of disjoint name sets (HTHModel names throughout), ZeRO
partitions are joined one tensor at a time, so nothing holds the whole model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import yaml

from megassm.checkpoint.errors import CheckpointError
from megassm.checkpoint.safetensors_io import SafetensorsDir, SafetensorsFile, TensorSpec
from megassm.checkpoint.zero import DeepSpeedCheckpoint, is_deepspeed_dir
from megassm.config.tags import COMPLETE, LATEST

MODEL, EMA = "model", "ema"
META, LAYOUT = "meta.json", "layout.json"
FORMAT = "megassm-consolidated"
SHARDED_FORMAT = "megassm-sharded"


class WeightSet(Protocol):
    specs: dict[str, TensorSpec]

    def read(self, name: str) -> torch.Tensor: ...


@dataclass
class Checkpoint:
    kind: str  # consolidated | sharded | deepspeed
    path: Path
    model: WeightSet
    ema: WeightSet | None
    config: dict | None  # the RunConfig dict stored with the checkpoint
    meta: dict = field(default_factory=dict)  # step, stage, source, ...
    notes: list[str] = field(default_factory=list)  # things a user should know (e.g. EMA unusable)

    @property
    def step(self) -> int | None:
        return self.meta.get("step")

    def model_config(self):
        """The stored ModelConfig (validated), or a CheckpointError saying how to supply one."""
        if not self.config or "model" not in self.config:
            raise CheckpointError(f"{self.path} stores no config.yaml/config.json; pass --config CONFIG.yaml "
                                  "(the run's stage config)")
        from megassm.run_config import from_dict

        return from_dict(self.config).model


def read_config_file(*candidates: Path) -> dict | None:
    for c in candidates:
        if c.is_file():
            text = c.read_text()
            return yaml.safe_load(text) if c.suffix in (".yaml", ".yml") else json.loads(text)
    return None


# -- merged / joined views ----------------------------------------------------------------------

class DictWeights:
    """A WeightSet over an in-memory state dict (e.g. a live model's)."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self.tensors = state_dict
        self.specs = {n: TensorSpec(tuple(t.shape), t.dtype) for n, t in state_dict.items()}

    def read(self, name: str) -> torch.Tensor:
        return self.tensors[name]


class TPMerged:
    """Unsharded view of k TP-local weight sets (list index = TP rank)."""

    def __init__(self, ranks: list[WeightSet], model_cfg, where: str):
        from megassm.parallel.sharding import shard_spec

        self.ranks, self.model_cfg = ranks, model_cfg
        names = list(ranks[0].specs)
        for r, ws in enumerate(ranks[1:], 1):
            if set(ws.specs) != set(names):
                diff = sorted(set(ws.specs) ^ set(names))[:5]
                raise CheckpointError(f"{where}: TP rank {r} holds different tensors from rank 0, e.g. {diff}")
        self.specs = {}
        for n in names:
            shape = list(ranks[0].specs[n].shape)
            spec = shard_spec(n, model_cfg, len(ranks))
            if spec is not None:
                shape[spec.dim] = spec.size
            self.specs[n] = TensorSpec(tuple(shape), ranks[0].specs[n].dtype)

    def read(self, name: str) -> torch.Tensor:
        from megassm.parallel.sharding import merge_state_dicts

        return merge_state_dicts([{name: ws.read(name)} for ws in self.ranks], self.model_cfg)[name]


class StageUnion:
    """Pipeline stages' weight sets, whose names are disjoint, as one."""

    def __init__(self, stages: list[WeightSet], where: str):
        self.stages, self.specs, self._owner = stages, {}, {}
        for r, ws in enumerate(stages):
            for n, spec in ws.specs.items():
                if n in self._owner:
                    raise CheckpointError(f"{where}: {n} is held by pipeline stages {self._owner[n]} and {r}")
                self.specs[n], self._owner[n] = spec, r

    def read(self, name: str) -> torch.Tensor:
        return self.stages[self._owner[name]].read(name)


def assemble(parts: list[WeightSet], pp: int, tp: int, model_cfg, where: str) -> WeightSet:
    """Unsharded view of ``pp * tp`` weight sets in model-parallel order (mp = pp_rank * tp + tp_rank)."""
    if len(parts) != pp * tp:
        raise CheckpointError(f"{where}: {len(parts)} model-parallel parts for pp={pp} x tp={tp}")
    stages = [parts[r * tp] if tp == 1 else TPMerged(parts[r * tp:(r + 1) * tp], model_cfg(), where)
              for r in range(pp)]
    return stages[0] if pp == 1 else StageUnion(stages, where)


class FileWeights:
    """One safetensors file as a WeightSet."""

    def __init__(self, path: Path):
        self.file = SafetensorsFile(path)
        self.specs = self.file.specs

    def read(self, name: str) -> torch.Tensor:
        return self.file.read(name)


class EmaShards:
    """One model-parallel rank's EMA shards (``ShardedEMA.save``), one whole fp32 tensor at a time.

    Partitioned shards (ZeRO-3) hold rank r's flat slice ``ds_tensor`` of each parameter
    (ceil(numel / N) elements, the last padded); the tensor is their concatenation, cut to numel --
    the same union ``megassm.train.ema.ShardedEMA.consolidate`` forms in memory. Unpartitioned
    shards hold whole tensors (shard 0 is read).
    """

    def __init__(self, files: list[Path]):
        self.files = sorted(files)
        if not self.files:
            raise CheckpointError("no EMA shards")
        self.shards = [SafetensorsFile(f) for f in self.files]
        meta = self.shards[0].metadata
        try:
            shapes = json.loads(meta["shapes"])
        except (KeyError, json.JSONDecodeError):
            raise CheckpointError(f"{self.files[0]}: EMA shard without its 'shapes' metadata") from None
        self.partitioned = meta.get("partitioned") == "True"
        if not self.partitioned:
            self.shards = self.shards[:1]
        for sf in self.shards:
            if set(sf.specs) != set(shapes):
                raise CheckpointError(f"{sf.path}: holds different tensors from its 'shapes' metadata")
        self.specs = {n: TensorSpec(tuple(s), self.shards[0].specs[n].dtype) for n, s in shapes.items()}
        n = len(self.shards)
        for name, spec in self.specs.items():
            numel = math.prod(spec.shape)
            per = math.ceil(numel / n) if self.partitioned else numel
            sizes = {math.prod(sf.specs[name].shape) for sf in self.shards}
            if sizes != {per}:
                raise CheckpointError(
                    f"{self.files[0].parent}: EMA {name} needs {per} elements per shard for {n} shards of "
                    f"{spec.shape}, the files hold {sorted(sizes)}; shards are missing or from a different run")

    def read(self, name: str) -> torch.Tensor:
        spec = self.specs[name]
        if not self.partitioned:
            return self.shards[0].read(name).view(spec.shape)
        numel, per = math.prod(spec.shape), math.ceil(math.prod(spec.shape) / len(self.shards))
        out = torch.empty(numel, dtype=spec.dtype)
        for r, sf in enumerate(self.shards):  # each slice straight into place; the padding is never read
            n = min(per, numel - r * per)
            if n > 0:
                sf.read(name, 0, n, out=out[r * per:r * per + n])
        return out.view(spec.shape)

    def read_flat(self, name: str, start: int, count: int) -> torch.Tensor:
        """Flat elements [start, start + count) of tensor ``name``, read from only the shards that hold them
        (a resume at another layout: each rank reads its own partition, ``ShardedEMA.load_sliced``)."""
        spec = self.specs[name]
        numel = math.prod(spec.shape)
        if start < 0 or count < 0 or start + count > numel:
            raise CheckpointError(f"{self.files[0].parent}: EMA {name} has {numel} elements; "
                                  f"[{start}, {start + count}) is outside it")
        if not self.partitioned:
            return self.shards[0].read(name, start, count)
        per, out, pos = math.ceil(numel / len(self.shards)), torch.empty(count, dtype=spec.dtype), start
        while pos < start + count:
            r, off = divmod(pos, per)
            n = min(per - off, start + count - pos)
            self.shards[r].read(name, off, n, out=out[pos - start:pos - start + n])
            pos += n
        return out


# -- opening ---------------------------------------------------------------------------------

def resolve_tag_dir(path: Path, tag: str | None = None) -> Path:
    """A DeepSpeed tag directory from a run dir, a checkpoints/ dir (via ``latest`` or ``tag``) or itself."""
    if is_deepspeed_dir(path):
        if tag is not None:
            raise CheckpointError(f"--tag {tag} given but {path} already is a checkpoint directory")
        if (path / "trainer").is_dir() and not (path / COMPLETE).is_file():
            raise CheckpointError(f"{path} has no {COMPLETE} file: the save was interrupted and the checkpoint is "
                                  "partial. Use an earlier step_* directory (see checkpoints/latest)")
        return path
    for ckpt_dir in (path, path / "checkpoints"):
        if tag is not None and (ckpt_dir / tag).is_dir():
            return resolve_tag_dir(ckpt_dir / tag)
        if tag is None and (ckpt_dir / LATEST).is_file():
            name = (ckpt_dir / LATEST).read_text().strip()
            return resolve_tag_dir(ckpt_dir / name)
    raise CheckpointError(
        f"{path} is not a megassm checkpoint: expected a consolidated directory (model.safetensors + config), a "
        "TP-sharded directory (layout.json), a run directory with checkpoints/latest, a checkpoints/ directory, or "
        f"a step_* directory with DeepSpeed *_model_states.pt files{f' (no tag {tag!r} found)' if tag else ''}")


def open_checkpoint(path: str | Path, tag: str | None = None, config: dict | None = None) -> Checkpoint:
    """Open ``path`` (any kind above). ``config`` (a RunConfig dict) replaces the stored one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path does not exist: {path}")
    if path.is_dir() and SafetensorsDir.exists(path, MODEL):
        return _open_consolidated(path, config)
    if path.is_dir() and (path / LAYOUT).is_file():
        return _open_sharded(path, config)
    return _open_deepspeed(resolve_tag_dir(path, tag), config)


def _open_consolidated(path: Path, config: dict | None) -> Checkpoint:
    model = SafetensorsDir(path, MODEL)
    ema = SafetensorsDir(path, EMA) if SafetensorsDir.exists(path, EMA) else None
    meta = read_config_file(path / META) or {}
    cfg = config or read_config_file(path / "config.yaml", path / "config.json")
    return Checkpoint("consolidated", path, model, ema, cfg, meta)


def _open_sharded(path: Path, config: dict | None) -> Checkpoint:
    layout = read_config_file(path / LAYOUT) or {}
    if layout.get("format") != SHARDED_FORMAT:
        raise CheckpointError(f"{path / LAYOUT}: format {layout.get('format')!r}, expected {SHARDED_FORMAT!r}")
    cfg = config or read_config_file(path / "config.yaml", path / "config.json")
    ckpt = Checkpoint("sharded", path, None, None, cfg, read_config_file(path / META) or {})  # type: ignore[arg-type]
    pp, tp = int(layout.get("pp", 1)), int(layout["tp"])
    dirs = [path / d for d in layout["ranks"]]
    ckpt.model = assemble([SafetensorsDir(d, MODEL) for d in dirs], pp, tp, ckpt.model_config, str(path))
    if all(SafetensorsDir.exists(d, EMA) for d in dirs):
        ckpt.ema = assemble([SafetensorsDir(d, EMA) for d in dirs], pp, tp, ckpt.model_config, str(path))
    return ckpt


def _open_deepspeed(tag_dir: Path, config: dict | None) -> Checkpoint:
    ds = DeepSpeedCheckpoint(tag_dir)
    run_dir = tag_dir.parent.parent
    cfg = config or read_config_file(run_dir / "config.yaml")
    pp, tp = ds.layout()
    meta = {"step": ds.step(), "stage": (cfg or {}).get("stage"), "source": str(tag_dir),
            "source_format": f"deepspeed-zero{ds.stage}", "deepspeed_version": ds.info.get("ds_version"),
            "source_parallel": {"tp": tp, "pp": pp, "zero_partitions": ds.rank(0).world if ds.stage else 1}}
    ckpt = Checkpoint("deepspeed", tag_dir, None, None, cfg, meta)  # type: ignore[arg-type]
    ckpt.model = assemble([ds.rank(mp) for mp in ds.mp_ranks], pp, tp, ckpt.model_config, str(tag_dir))
    ema_dir = tag_dir / "ema"
    if not ema_dir.is_dir():
        return ckpt
    parts = [_ema_of_rank(ema_dir, mp, len(ds.mp_ranks)) for mp in ds.mp_ranks]
    if any(p is None for p in parts):
        missing = [mp for mp, p in zip(ds.mp_ranks, parts) if p is None]
        ckpt.notes.append(f"{ema_dir} has no EMA files for model-parallel ranks {missing} of {len(parts)} (written "
                          "by a trainer that saved only rank 0's EMA?); the EMA is left out")
        return ckpt
    ema = assemble(parts, pp, tp, ckpt.model_config, str(ema_dir))
    bad = [n for n, s in ema.specs.items() if ckpt.model.specs.get(n, s).shape != s.shape]
    if bad or set(ema.specs) != set(ckpt.model.specs):
        ckpt.notes.append(
            f"EMA in {ema_dir} does not match the model's tensors ({len(bad)} shapes differ, e.g. {bad[:2]}; "
            f"{len(set(ema.specs) ^ set(ckpt.model.specs))} names differ): it was saved for another layout or "
            "model; the EMA is left out")
    else:
        ckpt.ema = ema
    return ckpt


def _ema_of_rank(ema_dir: Path, mp: int, mp_world: int) -> WeightSet | None:
    """Model-parallel rank ``mp``'s EMA, in any of the trainers' file layouts:

    ema/shard_{r}.safetensors            ShardedEMA, no model parallelism (r: ZeRO partition)
    ema/mp_{mp}_shard_{r}.safetensors    ShardedEMA under TP / PP
    ema/mp_rank_{mp}.safetensors         the pipeline trainer's per-stage EMA (whole tensors)
    """
    per_rank = sorted(ema_dir.glob(f"mp_{mp:02d}_shard_*.safetensors"))
    if per_rank:
        return EmaShards(per_rank)
    stage = ema_dir / f"mp_rank_{mp:02d}.safetensors"
    if stage.is_file():
        return FileWeights(stage)
    plain = sorted(ema_dir.glob("shard_*.safetensors"))
    if plain and mp_world == 1:
        return EmaShards(plain)
    return None
