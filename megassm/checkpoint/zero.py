"""DeepSpeed checkpoint (one tag directory) -> whole fp32 tensors, one at a time.

Files of a tag directory (DeepSpeed 0.1x naming; "pp_rank" in them is the ZeRO partition = DP rank,
``mp_rank`` the model-parallel rank = pp * TP + tp in megassm's mesh):

    ZeRO-3   zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt   param_shapes, buffers, frozen fragments
             zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt   fp32_flat_groups: this rank's slice of
                                                                  every parameter, ceil(numel/DP) each
    ZeRO-1/2 mp_rank_{mp:02d}_model_states.pt                     module (training dtype), param_shapes
             [bf16_]zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt
                                                                  single_partition_of_fp32_groups: rank dp's
                                                                  contiguous 1/DP of each group's flat vector
    ZeRO-0   mp_rank_{mp:02d}_model_states.pt                     module holds the weights
    megassm's pipeline (train/steps/pipeline.py) is one engine per stage: ZeRO-1/0 files whose
             mp_rank = pp_rank * tp + tp_rank each hold their stage's tensors under HTHModel names
    DeepSpeed's PipelineEngine  layer_{XX}-model_{mp}-model_states.pt  (megassm does not use it; refused)

The reconstruction protocol is DeepSpeed's ``utils/zero_to_fp32.py`` (tests compare the two bit for
bit); the difference is that each parameter is read from each rank's file by byte offset
(``TorchFile.read``) straight into its output tensor, so memory holds one parameter, not the model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from megassm.checkpoint.errors import CheckpointError
from megassm.checkpoint.safetensors_io import TensorSpec
from megassm.checkpoint.torchzip import TensorRef, TorchFile

_Z3_MODEL = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_OPTIM = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_MODEL = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_LAYER = re.compile(r"^layer_(\d+)-.*model_states\.pt$")


def is_deepspeed_dir(path: Path) -> bool:
    return path.is_dir() and any(p.name.endswith("_model_states.pt") for p in path.iterdir())


@dataclass(frozen=True)
class _Slice:
    """Where one parameter lives in a rank's flat partition(s)."""

    group: int  # ZeRO-1/2: param group; ZeRO-3: unused (all groups form one flat vector per rank)
    offset: int  # element offset in that flat vector
    numel: int  # ZeRO-3: partitioned numel per rank; ZeRO-1/2: the parameter's numel


class _FlatConcat:
    """Virtual concatenation of 1-D tensors spread over files: read element ranges across the joins."""

    def __init__(self, parts: Sequence[tuple[TorchFile, TensorRef]]):
        self.parts = list(parts)
        self.starts = [0]
        for _, ref in self.parts:
            self.starts.append(self.starts[-1] + ref.numel)

    @property
    def numel(self) -> int:
        return self.starts[-1]

    def read_into(self, start: int, out: torch.Tensor) -> None:
        """Copy elements [start, start + out.numel()) into ``out`` (1-D)."""
        pos, end = start, start + out.numel()
        if end > self.numel:
            raise CheckpointError(f"flat partition has {self.numel} elements, asked for [{start}, {end}); the "
                                  "checkpoint's files do not match its parameter list")
        for (tf, ref), lo, hi in zip(self.parts, self.starts, self.starts[1:]):
            if pos >= end:
                break
            if hi <= pos:
                continue
            n = min(hi, end) - pos
            tf.read(ref, pos - lo, n, out=out[pos - start:pos - start + n])
            pos += n


class MPRankReader:
    """All DP partitions of one model-parallel rank: names, full (TP-local) shapes, fp32 tensors."""

    def __init__(self, tag_dir: Path, mp: int, model_files: dict[int, Path], optim_files: dict[int, Path]):
        self.tag_dir, self.mp = tag_dir, mp
        dp0 = min(model_files)
        self.model_state = TorchFile(model_files[dp0])
        ms = self.model_state.obj
        if not isinstance(ms, dict) or "module" not in ms:
            raise CheckpointError(f"{model_files[dp0]}: not a DeepSpeed model-states file (no 'module')")
        self.info = {k: ms.get(k) for k in ("ds_version", "global_steps", "megassm_step", "dp_world_size",
                                            "mp_world_size", "checkpoint_parallel_dimensions")}
        self.specs: dict[str, TensorSpec] = {}
        self._readers: dict[str, object] = {}
        optim = {dp: TorchFile(p) for dp, p in sorted(optim_files.items())}
        osd = optim[min(optim)].obj.get("optimizer_state_dict", {}) if optim else {}
        if "fp32_flat_groups" in osd:
            self.stage = 3
            self._init_zero3(optim)
            self._init_frozen3(model_files)
        elif "single_partition_of_fp32_groups" in osd:
            self.stage = int(osd.get("zero_stage", 1) or 1)
            self._init_zero12(optim)
        else:
            self.stage = 0
            self._init_module(ms)
        self._init_buffers(ms)

    # -- ZeRO-3 -----------------------------------------------------------------------------
    def _check_ranks(self, optim: dict[int, TorchFile], count) -> int:
        world = max(count) if isinstance(count, (list, tuple)) else int(count)
        if sorted(optim) != list(range(world)):
            raise CheckpointError(
                f"{self.tag_dir}: mp_rank {self.mp:02d} was partitioned over {world} ranks but the optimizer files "
                f"present are for ranks {sorted(optim)}; a rank's file is missing or left over from another save")
        return world

    def _init_zero3(self, optim: dict[int, TorchFile]) -> None:
        osd0 = optim[0].obj["optimizer_state_dict"] if 0 in optim else {}
        self.world = self._check_ranks(optim, osd0.get("partition_count", len(optim)))
        self._flats = [_FlatConcat([(tf, r) for r in tf.obj["optimizer_state_dict"]["fp32_flat_groups"]])
                       for _, tf in sorted(optim.items())]
        offset = 0
        for shapes in self.model_state.obj["param_shapes"]:
            for name, shape in shapes.items():
                numel = math.prod(shape)
                pn = math.ceil(numel / self.world)
                self.specs[name] = TensorSpec(tuple(shape), torch.float32)
                self._readers[name] = ("z3", _Slice(0, offset, pn))
                offset += pn
        sizes = {f.numel for f in self._flats}
        if sizes != {offset}:
            raise CheckpointError(
                f"{self.tag_dir}: parameter list needs {offset} elements per rank, the fp32 partitions hold "
                f"{sorted(sizes)}; the model- and optimizer-state files are from different saves or models")

    def _read_zero3(self, name: str, sl: _Slice) -> torch.Tensor:
        spec = self.specs[name]
        numel = math.prod(spec.shape)
        out = torch.empty(numel, dtype=torch.float32)
        for rank, flat in enumerate(self._flats):
            start = rank * sl.numel
            n = min(sl.numel, numel - start)
            if n <= 0:
                break
            flat.read_into(sl.offset, out[start:start + n])
        return out.view(spec.shape)

    def _init_frozen3(self, model_files: dict[int, Path]) -> None:
        frozen = self.model_state.obj.get("frozen_param_shapes") or {}
        if not frozen:
            return
        files = [TorchFile(p) for _, p in sorted(model_files.items())]
        for name, shape in frozen.items():
            frags = [(tf, tf.obj["frozen_param_fragments"][name]) for tf in files]
            self.specs[name] = TensorSpec(tuple(shape), frags[0][1].dtype)
            self._readers[name] = ("concat", _FlatConcat(frags))

    # -- ZeRO-1/2 ---------------------------------------------------------------------------
    def _init_zero12(self, optim: dict[int, TorchFile]) -> None:
        osd0 = optim[min(optim)].obj["optimizer_state_dict"]
        self.world = self._check_ranks(optim, osd0.get("partition_count", len(optim)))
        groups = [tf.obj["optimizer_state_dict"]["single_partition_of_fp32_groups"] for _, tf in sorted(optim.items())]
        self._groups = [_FlatConcat([(optim[r], groups[r][g]) for r in range(self.world)])
                        for g in range(len(groups[0]))]
        paddings = osd0.get("param_alignment_paddings")
        shapes_per_group = self.model_state.obj["param_shapes"]
        if len(shapes_per_group) != len(self._groups):
            raise CheckpointError(f"{self.tag_dir}: {len(shapes_per_group)} parameter groups in the model states, "
                                  f"{len(self._groups)} in the optimizer files")
        for g, shapes in enumerate(shapes_per_group):
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                numel = math.prod(shape)
                self.specs[name] = TensorSpec(tuple(shape), torch.float32)
                self._readers[name] = ("z12", _Slice(g, offset, numel))
                offset += numel + (paddings[g][i] if paddings is not None else 0)
            align = 2 * self.world  # DeepSpeed pads each group to a multiple of 2 * DP (see zero_to_fp32)
            if math.ceil(offset / align) * align != math.ceil(self._groups[g].numel / align) * align:
                raise CheckpointError(f"{self.tag_dir}: group {g} needs {offset} elements, the partitions hold "
                                      f"{self._groups[g].numel}; files from different saves or models")

    # -- ZeRO-0 / buffers ---------------------------------------------------------------------
    def _init_module(self, ms: dict) -> None:
        for name, ref in ms["module"].items():
            if isinstance(ref, TensorRef) and name not in (ms.get("buffer_names") or []):
                self.specs[name] = TensorSpec(ref.shape, ref.dtype)
                self._readers[name] = ("ref", ref)

    def _init_buffers(self, ms: dict) -> None:
        for name in ms.get("buffer_names") or []:
            ref = ms["module"].get(name)
            if isinstance(ref, TensorRef):
                self.specs[name] = TensorSpec(ref.shape, ref.dtype)
                self._readers[name] = ("ref", ref)
        for alias, target in (ms.get("shared_params") or {}).items():
            if target in self.specs:
                self.specs[alias] = self.specs[target]
                self._readers[alias] = ("alias", target)

    def read_flat(self, name: str, start: int, count: int) -> torch.Tensor | None:
        """Flat elements [start, start + count) of tensor ``name`` (fp32 masters; ZeRO-0: the module's), read
        by offset from the files that hold them; None where that is not possible (the caller reads it whole)."""
        kind, arg = self._readers[name]
        if kind == "ref":  # ZeRO-0: the module's own tensor (training dtype)
            return self.model_state.read(arg, start, count)
        out = torch.empty(count, dtype=torch.float32)
        if kind == "z12":
            self._groups[arg.group].read_into(arg.offset + start, out)
            return out
        if kind != "z3":
            return None
        pos = start
        while pos < start + count:  # element e lives in partition e // pn at offset e % pn
            rank, within = divmod(pos, arg.numel)
            n = min(arg.numel - within, start + count - pos)
            self._flats[rank].read_into(arg.offset + within, out[pos - start:pos - start + n])
            pos += n
        return out

    def module_names(self) -> list[str]:
        """The names in the rank's ``module`` state dict (ZeRO-1/2/0: every parameter and buffer)."""
        return [n for n, ref in self.model_state.obj["module"].items() if isinstance(ref, TensorRef)]

    def read_module(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as the module held it (training dtype), not the optimizer's fp32 master."""
        ref = self.model_state.obj["module"].get(name)
        if not isinstance(ref, TensorRef):
            raise CheckpointError(f"{self.tag_dir}: mp_rank {self.mp:02d}'s module state has no tensor {name!r}")
        return self.model_state.load(ref).clone()

    def read(self, name: str) -> torch.Tensor:
        """Whole (TP-local) tensor ``name`` (fp32 master weights for ZeRO-1/2/3)."""
        kind, arg = self._readers[name]
        spec = self.specs[name]
        if kind == "z3":
            return self._read_zero3(name, arg)
        if kind == "z12":
            out = torch.empty(arg.numel, dtype=torch.float32)
            self._groups[arg.group].read_into(arg.offset, out)
            return out.view(spec.shape)
        if kind == "concat":
            out = torch.empty(math.prod(spec.shape), dtype=spec.dtype)
            arg.read_into(0, out)
            return out.view(spec.shape)
        if kind == "alias":
            return self.read(arg)
        return self.model_state.load(arg).clone()


class DeepSpeedCheckpoint:
    """A DeepSpeed tag directory, per model-parallel rank."""

    def __init__(self, tag_dir: str | Path):
        self.tag_dir = Path(tag_dir)
        if not self.tag_dir.is_dir():
            raise CheckpointError(f"DeepSpeed checkpoint directory does not exist: {self.tag_dir}")
        model3: dict[int, dict[int, Path]] = {}
        model12: dict[int, dict[int, Path]] = {}
        optim: dict[int, dict[int, Path]] = {}
        layers = []
        for p in sorted(self.tag_dir.iterdir()):
            if m := _Z3_MODEL.match(p.name):
                model3.setdefault(int(m.group(2)), {})[int(m.group(1))] = p
            elif m := _OPTIM.match(p.name):
                optim.setdefault(int(m.group(2)), {})[int(m.group(1))] = p
            elif m := _MODEL.match(p.name):
                model12.setdefault(int(m.group(1)), {})[0] = p
            elif _LAYER.match(p.name):
                layers.append(p.name)
        if layers:
            raise CheckpointError(
                f"{self.tag_dir} is a checkpoint of DeepSpeed's PipelineEngine ({layers[0]}, ...), whose layer "
                "files carry no HTHModel names. megassm's pipeline runs one engine per stage and writes "
                "mp_rank_XX_model_states.pt files, which this converter reads; PipelineEngine layouts are not "
                "supported")
        model = model3 or model12
        if not model:
            raise CheckpointError(f"{self.tag_dir}: no DeepSpeed *_model_states.pt files; not a DeepSpeed checkpoint")
        self.mp_ranks = sorted(model)
        if self.mp_ranks != list(range(len(self.mp_ranks))):
            raise CheckpointError(f"{self.tag_dir}: model-parallel ranks {self.mp_ranks} are not 0..N-1; files missing")
        self._files = (model, optim)
        self._ranks: dict[int, MPRankReader] = {}
        self.info = self.rank(0).info

    def rank(self, mp: int) -> MPRankReader:
        if mp not in self._ranks:
            model, optim = self._files
            self._ranks[mp] = MPRankReader(self.tag_dir, mp, model[mp], optim.get(mp, {}))
        return self._ranks[mp]

    @property
    def stage(self) -> int:
        return self.rank(0).stage

    def layout(self) -> tuple[int, int]:
        """(pp, tp) as DeepSpeed recorded them from the mpu; mp_rank = pp_rank * tp + tp_rank."""
        dims = self.info.get("checkpoint_parallel_dimensions") or {}
        pp = int(dims.get("pp_degree") or 1)
        tp = int(dims.get("tp_degree") or len(self.mp_ranks) // pp)
        if pp * tp != len(self.mp_ranks):
            raise CheckpointError(f"{self.tag_dir}: DeepSpeed recorded pp={pp} x tp={tp} but there are "
                                  f"{len(self.mp_ranks)} model-parallel ranks; files are missing or extra")
        return pp, tp

    def step(self) -> int | None:
        s = self.info.get("megassm_step")
        return int(s) if s is not None else self.info.get("global_steps")

    def files(self) -> list[Path]:
        model, optim = self._files
        return sorted([p for d in model.values() for p in d.values()] + [p for d in optim.values() for p in d.values()])


def consolidate_pipeline_checkpoint(tag_dir: str | Path, model_cfg, pp: int, tp: int = 1,
                                    fp32: bool = True) -> dict[str, torch.Tensor]:
    """The consolidated (full, HTHModel-named) state dict of a pipeline run's DeepSpeed checkpoint
    (``mp_rank_XX_model_states.pt``, XX = pp_rank*tp + tp_rank), read without unpickling; the stages joined
    by ``parallel/pipeline_checkpoint.py``.

    fp32: read ZeRO-1's fp32 master weights (exact under bf16 training); falls back to the
    module weights (exact for fp32 training) when the checkpoint has no ZeRO optimizer files.
    """
    from megassm.parallel.pipeline_checkpoint import pipeline_state_dict_to_full

    ds = DeepSpeedCheckpoint(tag_dir)  # offset reads of the files' tensors: nothing is unpickled
    if len(ds.mp_ranks) != pp * tp:
        raise FileNotFoundError(f"{tag_dir} has {len(ds.mp_ranks)} model-parallel ranks, pp={pp} x tp={tp} "
                                f"needs {pp * tp}: not a checkpoint of this pipeline x TP layout")
    stages = []
    for r in range(pp):
        shards = []
        for t in range(tp):
            rank = ds.rank(r * tp + t)
            # ZeRO-1 files: the fp32 masters; ZeRO-0 (or fp32=False): the module's own weights
            read = rank.read if (fp32 and rank.stage > 0) else rank.read_module
            shards.append({n: read(n).float() for n in rank.module_names()})
        stages.append(shards)
    return pipeline_state_dict_to_full(stages, model_cfg)
