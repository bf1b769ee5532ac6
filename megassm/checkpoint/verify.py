"""Is every file of a training checkpoint whole? The check a resume runs before it trusts a checkpoint
(``megassm/train/checkpoint.py: resume_tag``), and part of ``megassm inspect checkpoint``.

Structural, and cheap next to a load: each DeepSpeed ``*.pt`` file's zip directory, record extents and
data.pkl (its CRC-32; ``torchzip.read_archive``, nothing is unpickled), each safetensors header against its
file size, each trainer-state JSON, and that no rank's file is missing (DeepSpeed's files per model-parallel
rank, one trainer state per rank of the run). ``crc=True`` also reads every tensor record and checks its
CRC-32 (bit rot; as long as reading the checkpoint). A model-only checkpoint (``train.save_optimizer_state:
false``, ``model_only.py``) has the same file set, its optimizer files holding the fp32 masters without the
Adam moments: the same checks apply.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from megassm.checkpoint.errors import CheckpointError
from megassm.checkpoint.safetensors_io import SafetensorsFile
from megassm.checkpoint.torchzip import TorchFile, read_archive
from megassm.config.tags import COMPLETE

# DeepSpeed's per-rank files: zero_pp_rank_{dp}_mp_rank_{mp}_{model,optim}_states.pt (ZeRO-3; optim with a
# "bf16_" prefix under ZeRO-1/2), mp_rank_{mp}_model_states.pt (ZeRO-0/1/2, one per model-parallel rank)
_PARTITIONED = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_(model|optim)_states\.pt")
_MP_MODEL = re.compile(r"mp_rank_(\d+)_model_states\.pt")


def damaged_files(tag_dir: str | Path, crc: bool = False, training: bool = True) -> list[str]:
    """Why ``tag_dir`` cannot be loaded, one line per problem naming the file; [] when it is whole.
    ``training``: a megassm training checkpoint (COMPLETE and the trainer state are required), else any
    DeepSpeed checkpoint directory."""
    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir():
        return [f"{tag_dir}: no such checkpoint directory"]
    problems = _missing_ranks(tag_dir)
    if training and not (tag_dir / COMPLETE).is_file():
        problems.insert(0, f"{tag_dir}: no {COMPLETE} file (an interrupted save)")
    for f in sorted(tag_dir.glob("*.pt")):
        try:
            TorchFile(f).check_crc() if crc else read_archive(f)
        except (CheckpointError, OSError) as e:
            problems.append(str(e))
    for f in sorted(tag_dir.rglob("*.safetensors")):
        try:
            SafetensorsFile(f)
        except (CheckpointError, OSError) as e:
            problems.append(str(e))
    if training:
        problems += _trainer_state_problems(tag_dir)
    return problems


def _missing_ranks(tag_dir: Path) -> list[str]:
    """DeepSpeed's files must cover ranks 0..N-1 of each kind, the same N for every model-parallel rank."""
    ranks: dict[tuple[str, int], set[int]] = defaultdict(set)  # (kind, mp) -> dp ranks present
    mp_models = set()
    for p in tag_dir.glob("*.pt"):
        if m := _PARTITIONED.fullmatch(p.name):
            ranks[(m.group(3), int(m.group(2)))].add(int(m.group(1)))
        elif m := _MP_MODEL.fullmatch(p.name):
            mp_models.add(int(m.group(1)))
    if not ranks and not mp_models:
        return [f"{tag_dir}: no DeepSpeed *_model_states.pt file"]
    problems = []
    mps = sorted({mp for _, mp in ranks} | mp_models)
    if mps != list(range(len(mps))):
        problems.append(f"{tag_dir}: model-parallel ranks {mps} present; the files of ranks "
                        f"{sorted(set(range(max(mps) + 1)) - set(mps))} are missing")
    width = max((max(v) + 1 for v in ranks.values()), default=0)
    for (kind, mp), present in sorted(ranks.items()):
        if missing := sorted(set(range(width)) - present):
            problems.append(f"{tag_dir}: {kind}_states.pt of mp_rank {mp:02d} is missing for dp ranks {missing}")
    return problems + _missing_optimizer_files(tag_dir, ranks, mp_models)


def _missing_optimizer_files(tag_dir: Path, ranks: dict, mp_models: set[int]) -> list[str]:
    """Model-parallel ranks whose optimizer files are all gone although a ZeRO optimizer wrote the model states:
    ZeRO-3 (every zero_pp model file has one) or ZeRO-1/2 (the mp_rank model file records parameter shapes).
    They hold the fp32 master weights, in a model-only checkpoint too; without them DeepSpeed's load would
    rebuild the masters from the training-dtype weights and drop the optimizer state without a word."""
    with_optim = {mp for kind, mp in ranks if kind == "optim"}
    zero3 = {mp for kind, mp in ranks if kind == "model"} - with_optim
    zero12 = {mp for mp in mp_models - with_optim
              if _zero12_model_states(tag_dir / f"mp_rank_{mp:02d}_model_states.pt")}
    return [f"{tag_dir}: no [bf16_]zero_pp_rank_*_mp_rank_{mp:02d}_optim_states.pt although a ZeRO-"
            f"{3 if mp in zero3 else '1/2'} optimizer wrote its model states: they hold the fp32 master weights (in "
            "a model-only checkpoint too)" for mp in sorted(zero3 | zero12)]


def _zero12_model_states(model_states: Path) -> bool:
    """An ``mp_rank_XX_model_states.pt`` written under ZeRO-1/2 (DeepSpeed records the parameter shapes there
    only when a ZeRO optimizer holds the fp32 masters; ZeRO-0: None)."""
    try:
        obj = TorchFile(model_states).obj
    except (CheckpointError, OSError):
        return False  # unreadable: damaged_files reports the file itself
    return isinstance(obj, dict) and obj.get("param_shapes") is not None


def _trainer_state_problems(tag_dir: Path) -> list[str]:
    """Each trainer/rank_R.json parses, and one exists (with its .safetensors) for every rank of the run."""
    d = tag_dir / "trainer"
    states = sorted(d.glob("rank_*.json"))
    if not states:
        return [f"{d}: no trainer state (rank_*.json)"]
    problems, world = [], None
    for f in states:
        try:
            state = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            problems.append(f"{f}: unreadable trainer state ({e}); the file is truncated or corrupt")
            continue
        if f.name == "rank_00000.json" and isinstance(state, dict) and isinstance(state.get("world"), int):
            world = state["world"]
    for r in range(world or 0):
        for name in (f"rank_{r:05d}.json", f"rank_{r:05d}.safetensors"):
            if not (d / name).is_file():
                problems.append(f"{d / name}: missing (the run had {world} ranks)")
    return problems
