"""Process groups for PP x DP x CP x TP (TP innermost, then CP, DP, PP).

    global rank = ((pp * DP + dp) * CP + cp) * TP + tp

so a TP group is TP consecutive ranks (one node's fastest links), a CP group strides by TP, etc.
``ParallelDims`` only does arithmetic and validation (no process groups), so it is testable
anywhere; ``ParallelMesh`` creates the groups once ``torch.distributed`` is initialised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


class MeshError(ValueError):
    """The parallel layout does not fit the world size or the model."""


@dataclass(frozen=True)
class ParallelDims:
    world: int
    tp: int = 1
    cp: int = 1
    pp: int = 1

    def __post_init__(self):
        for k in ("world", "tp", "cp", "pp"):
            if getattr(self, k) < 1:
                raise MeshError(f"{k}={getattr(self, k)} must be >= 1")
        if self.world % (self.tp * self.cp * self.pp):
            raise MeshError(
                f"world size {self.world} is not divisible by tp*cp*pp = {self.tp}*{self.cp}*{self.pp} = "
                f"{self.tp * self.cp * self.pp}; dp = world / (tp*cp*pp) must be a whole number. "
                f"Valid (tp, cp, pp) products divide {self.world}: {_divisors(self.world)}"
            )

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.cp * self.pp)

    def coords(self, rank: int) -> dict[str, int]:
        tp = rank % self.tp
        cp = (rank // self.tp) % self.cp
        dp = (rank // (self.tp * self.cp)) % self.dp
        pp = rank // (self.tp * self.cp * self.dp)
        return {"pp": pp, "dp": dp, "cp": cp, "tp": tp}

    def rank_of(self, pp: int, dp: int, cp: int, tp: int) -> int:
        return ((pp * self.dp + dp) * self.cp + cp) * self.tp + tp

    def group_ranks(self, dims: tuple[str, ...]) -> list[list[int]]:
        """All groups that vary over ``dims`` (e.g. ("tp",), ("dp", "cp")) with the rest fixed."""
        sizes = {"pp": self.pp, "dp": self.dp, "cp": self.cp, "tp": self.tp}
        fixed = [d for d in ("pp", "dp", "cp", "tp") if d not in dims]
        groups = []

        def rec(keys, acc):
            if not keys:
                yield dict(acc)
                return
            for i in range(sizes[keys[0]]):
                acc[keys[0]] = i
                yield from rec(keys[1:], acc)

        for f in rec(fixed, {}):
            ranks = sorted(self.rank_of(**{**f, **v}) for v in rec(list(dims), {}))
            groups.append(ranks)
        return groups

    def check_model(self, model_cfg, seq_len: int | None = None, sequence_parallel: bool = False) -> None:
        """Raise MeshError naming the size that a degree does not divide, and the valid degrees.

        ``seq_len``: tokens per sample; it must split evenly over the CP ranks (and over CP x TP
        with Megatron sequence parallelism), see ``check_seq_len``.
        """
        from megassm.models.mixers import kinds_in

        m = model_cfg
        kinds = kinds_in(m.pattern)
        checks = [
            ("tp", "attention heads (model.num_heads)", m.num_heads),  # cross-attention: every block
            ("tp", "FFN width (d_model*mlp_ratio)", int(m.d_model * m.mlp_ratio)),
        ] + [c for spec in kinds for c in spec.divisibility(m, self.tp)]  # each mixer kind's sizes
        # every tp rule before any cp rule (the cp sizes are per TP rank)
        for name, what, size in sorted(checks, key=lambda c: c[0] == "cp"):
            deg = getattr(self, name)
            if size % deg:
                raise MeshError(f"parallel.{name}={deg} does not divide the {what} = {size}; "
                                f"valid parallel.{name}: {_divisors(size)}")
        for spec in kinds:
            for msg in spec.layout_errors(m, self.tp, self.cp):
                raise MeshError(msg)
        if seq_len is not None:
            self.check_seq_len(seq_len, sequence_parallel)
        if self.pp > len(m.pattern):
            raise MeshError(f"parallel.pp={self.pp} exceeds the number of blocks ({len(m.pattern)}); "
                            f"valid parallel.pp: 1..{len(m.pattern)}")

    def seq_shards(self, sequence_parallel: bool = False) -> int:
        """How many pieces a sample's token sequence is cut into: cp, times tp under Megatron-SP."""
        return self.cp * (self.tp if sequence_parallel and self.tp > 1 else 1)

    def check_seq_len(self, seq_len: int, sequence_parallel: bool = False) -> None:
        """Token counts that do not split evenly are rejected (not padded): see docs/parallelism.md."""
        n = self.seq_shards(sequence_parallel)
        if seq_len % n:
            near = [v for v in (seq_len // n * n, (seq_len // n + 1) * n) if v > 0]
            what = f"cp*tp = {self.cp}*{self.tp}" if n != self.cp else f"cp = {self.cp}"
            raise MeshError(
                f"sequence length {seq_len} tokens is not divisible by {what} = {n} (each rank holds an "
                f"equal slice); nearest valid lengths: {' or '.join(map(str, near))} tokens -- change the "
                f"latent size (T'*H'*W' tokens after patchify) or the parallel degrees")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class DistEnv:
    rank: int
    world: int
    local_rank: int
    launcher: str  # "single" | "torchrun" | "slurm"


def read_dist_env() -> DistEnv:
    """Rank / world / local rank from torchrun variables, else SLURM's, else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       "slurm")
    return DistEnv(0, 1, 0, "single")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None, timeout_s: int = 1800) -> DistEnv:
    """Initialise torch.distributed from the environment; a lone process makes its own 1-rank group."""
    info = read_dist_env()
    if dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), info.local_rank, info.launcher)
    if backend is None:
        from megassm.runtime import cuda_enabled

        backend = "nccl" if cuda_enabled() else "gloo"
    if info.launcher == "single":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"{info.launcher} launch (rank {info.rank}/{info.world}) but {missing} not set; export them "
            "(torchrun does; under SLURM use slurm/common.sh or set them from `scontrol show hostnames`)"
        )
    # DeepSpeed and some libraries read these even when we pass rank/world explicitly
    os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world), LOCAL_RANK=str(info.local_rank))
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend, rank=info.rank, world_size=info.world, timeout=timedelta(seconds=timeout_s))
    return info


class ParallelMesh:
    """The process groups of this rank, with Megatron-style getters (``get_data_parallel_group``, ...).

    Those getters are the "mpu" interface that DeepSpeed reads; how a backend maps CP onto its data-parallel
    reduction is the backend's business (``megassm/train/backends/deepspeed.py``).
    """

    def __init__(self, dims: ParallelDims, rank: int | None = None):
        self.dims = dims
        self.rank = dist.get_rank() if rank is None else rank
        if dist.is_initialized() and dist.get_world_size() != dims.world:
            raise MeshError(f"ParallelDims.world={dims.world} but torch.distributed has {dist.get_world_size()}")
        self.coords = dims.coords(self.rank)
        self._groups: dict[tuple[str, ...], tuple[object, list[int]]] = {}
        for key in [("tp",), ("cp",), ("dp",), ("pp",), ("dp", "cp"), ("tp", "pp"), ("tp", "cp")]:
            mine = None
            for ranks in dims.group_ranks(key):
                g = dist.new_group(ranks)  # every rank must create every group, in the same order
                if self.rank in ranks:
                    mine = (g, ranks)
            self._groups[key] = mine

    @classmethod
    def from_config(cls, parallel_cfg) -> ParallelMesh:
        return cls(ParallelDims(dist.get_world_size(), parallel_cfg.tp, parallel_cfg.cp, parallel_cfg.pp))

    def group(self, *dims: str):
        return self._groups[tuple(dims)][0]

    def ranks(self, *dims: str) -> list[int]:
        return self._groups[tuple(dims)][1]

    # -- Megatron-style getters (the mpu interface) ---------------------------------------
    def get_model_parallel_group(self):
        return self.group("tp", "pp")

    def get_model_parallel_rank(self) -> int:
        return self.ranks("tp", "pp").index(self.rank)

    def get_model_parallel_world_size(self) -> int:
        return self.dims.tp * self.dims.pp

    def get_tensor_model_parallel_group(self):
        return self.group("tp")

    def get_tensor_model_parallel_rank(self) -> int:
        return self.coords["tp"]

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.dims.tp

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.ranks("tp")[0]

    def get_pipeline_model_parallel_group(self):
        return self.group("pp")

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.coords["pp"]

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.dims.pp

    def get_data_parallel_group(self):
        return self.group("dp")

    def get_data_parallel_rank(self) -> int:
        return self.coords["dp"]

    def get_data_parallel_world_size(self) -> int:
        return self.dims.dp

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.ranks("dp")

    def get_sequence_parallel_group(self):
        return self.group("cp")

    def get_sequence_parallel_rank(self) -> int:
        return self.coords["cp"]

    def get_sequence_parallel_world_size(self) -> int:
        return self.dims.cp

    def get_sequence_data_parallel_group(self):
        return self.group("dp", "cp")

    def get_sequence_data_parallel_rank(self) -> int:
        return self.ranks("dp", "cp").index(self.rank)

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.dims.dp * self.dims.cp

