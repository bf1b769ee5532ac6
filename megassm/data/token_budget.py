"""Joint image + video training by token budget: every train step trains one bucket (one latent shape).

    data:
      tokens_per_step: 232320            # global tokens of one step (all replicas, all micro-batches)
      buckets:
        - {name: img256, shape: [1, 32, 32], weight: 0.2, samples: 256}   # explicit global batch
        - {name: vid129, shape: [33, 44, 80], weight: 0.4}                # tokens_per_step // 29,040 = 8

The step's bucket: ``BucketTable.draw(seed, step)``, one uniform number from a generator keyed on
(seed, step) alone -- every rank of every group draws the same bucket with no communication and no state,
so a resume continues the sequence exactly. The bucket's global batch of S samples is split over the
step's Q = grad_accum x dp slots, slot q = micro x dp + dp_rank holding S // Q samples plus one for the
first S % Q slots, as a contiguous block of the global batch. Sample j of step s (j in [0, S)) has the
global index s x stride + j, stride = the largest S: indices never repeat, and a sample's draws
(timestep, noise, caption dropout; the procedural data's content) do not depend on grad_accum or dp.

Every bucket's tokens must split over parallel.cp x tp (nothing is padded): ``check_divides`` at config
load, and ``check_manifests`` against the datasets' shape histograms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class BucketError(ValueError):
    """A bucket table that cannot train: the message names the bucket and what would be valid."""


def tokens_of(shape: Sequence[int], patch_size: Sequence[int]) -> int:
    """Tokens of one latent (T, H, W) after the (pt, ph, pw) patchify; each side must divide."""
    if len(shape) != 3 or any(int(s) < 1 for s in shape):
        raise BucketError(f"latent shape {list(shape)} must be three positive ints [frames, height, width]")
    if any(int(s) % int(p) for s, p in zip(shape, patch_size)):
        raise BucketError(f"latent shape {list(shape)} is not a multiple of model.patch_size={list(patch_size)}")
    return math.prod(int(s) // int(p) for s, p in zip(shape, patch_size))


@dataclass(frozen=True)
class Bucket:
    name: str
    shape: tuple[int, int, int]  # latent (T, H, W)
    weight: float
    samples: int  # global batch of a step of this bucket
    tokens: int  # per sample

    @property
    def step_tokens(self) -> int:
        return self.samples * self.tokens

    def describe(self) -> str:
        return f"bucket {self.name!r} (latent {'x'.join(map(str, self.shape))}, {self.tokens:,} tokens per sample)"


@dataclass(frozen=True)
class BucketTable:
    buckets: tuple[Bucket, ...]

    @classmethod
    def from_config(cls, data_cfg: Any, patch_size: Sequence[int]) -> BucketTable:
        """From ``data.buckets`` and ``data.tokens_per_step``; BucketError names what is wrong."""
        if not data_cfg.buckets:
            raise BucketError("data.buckets is empty")
        budget = data_cfg.tokens_per_step
        if budget is not None and budget < 1:
            raise BucketError(f"data.tokens_per_step={budget} must be >= 1 (or null with every bucket's samples set)")
        out, names, shapes = [], set(), set()
        for i, b in enumerate(data_cfg.buckets):
            name = b.name or f"#{i}"
            tokens = tokens_of(b.shape, patch_size)
            shape = tuple(int(s) for s in b.shape)
            if name in names or shape in shapes:
                raise BucketError(f"data.buckets[{i}] ({name!r}, shape {list(shape)}): names and shapes must be "
                                  "unique, one bucket per latent shape")
            names.add(name)
            shapes.add(shape)
            if b.weight < 0:
                raise BucketError(f"data.buckets[{i}] ({name!r}): weight={b.weight} must be >= 0")
            if b.samples is not None:
                samples = int(b.samples)
            elif budget is None:
                raise BucketError(f"data.buckets[{i}] ({name!r}) has no samples and data.tokens_per_step is null; "
                                  "set one of them")
            else:
                samples = budget // tokens
            if samples < 1:
                raise BucketError(f"data.buckets[{i}] ({name!r}): {tokens:,} tokens per sample exceed "
                                  f"data.tokens_per_step={budget:,}; raise the budget to at least {tokens:,} "
                                  "or give the bucket its samples")
            out.append(Bucket(name, shape, float(b.weight), samples, tokens))
        if sum(b.weight for b in out) <= 0:
            raise BucketError("data.buckets: the weights sum to 0; give at least one bucket a positive weight")
        return cls(tuple(out))

    @property
    def stride(self) -> int:
        """Global sample indices reserved per step: the largest bucket batch."""
        return max(b.samples for b in self.buckets)

    @property
    def probabilities(self) -> np.ndarray:
        w = np.asarray([b.weight for b in self.buckets], dtype=np.float64)
        return w / w.sum()

    def draw(self, seed: int, step: int) -> int:
        """The bucket of train step ``step`` (0-based): a pure function of (seed, step)."""
        u = np.random.default_rng([int(seed) & (2**63 - 1), int(step), 0x6275636B]).random()
        cum = np.cumsum(self.probabilities)
        return min(int(np.searchsorted(cum, u, side="right")), len(self.buckets) - 1)

    def check_divides(self, model_parallel: int) -> None:
        """Every bucket's tokens split over ``model_parallel`` = cp x tp ranks."""
        for b in self.buckets:
            if b.tokens % model_parallel:
                raise BucketError(f"{b.describe()}: {b.tokens:,} tokens do not split over parallel.cp x tp = "
                                  f"{model_parallel} ranks (nothing is padded). {_valid_choices(b, model_parallel)}")

    def check_slots(self, grad_accum: int, dp: int) -> None:
        """Every micro-batch of every replica gets at least one sample."""
        for b in self.buckets:
            if b.samples < grad_accum * dp:
                raise BucketError(f"{b.describe()}: {b.samples} samples per step cannot fill train.grad_accum x dp = "
                                  f"{grad_accum} x {dp} micro-batches; give it samples >= {grad_accum * dp} (or a "
                                  "larger data.tokens_per_step), or lower train.grad_accum")

    def max_micro_batch(self, b: Bucket, grad_accum: int, dp: int) -> int:
        return -(-b.samples // (grad_accum * dp))

    def by_shape(self) -> dict[tuple[int, int, int], int]:
        return {b.shape: i for i, b in enumerate(self.buckets)}


def _valid_choices(b: Bucket, model_parallel: int) -> str:
    divisors = [d for d in range(1, min(b.tokens, 64) + 1) if b.tokens % d == 0]
    return (f"Valid cp x tp for this bucket: {divisors}{' ...' if b.tokens > 64 else ''}; or a latent shape whose "
            f"token count is a multiple of {model_parallel}")


@dataclass(frozen=True)
class MicroBatch:
    """What one data-parallel rank trains in one micro-batch of a bucketed step."""

    step: int
    micro: int
    bucket: int
    shape: tuple[int, int, int]
    sample_index: list[int]  # global indices, len = this slot's size
    step_samples: int  # the step's global batch
    step_tokens: int


class BucketSchedule:
    """The bucket table laid out for one data-parallel rank: micro-batch k (counting from the run's start,
    k = step x grad_accum + micro) -> ``MicroBatch``."""

    def __init__(self, table: BucketTable, seed: int, grad_accum: int, dp_rank: int, dp_size: int):
        table.check_slots(grad_accum, dp_size)
        self.table, self.seed, self.grad_accum = table, seed, grad_accum
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def slot(self, samples: int, micro: int) -> tuple[int, int]:
        """(first position in the step's global batch, size) of this rank's slot in micro-batch ``micro``."""
        q, slots = micro * self.dp_size + self.dp_rank, self.grad_accum * self.dp_size
        base, extra = divmod(samples, slots)
        return q * base + min(q, extra), base + (q < extra)

    def micro_batch(self, k: int) -> MicroBatch:
        step, micro = divmod(k, self.grad_accum)
        i = self.table.draw(self.seed, step)
        b = self.table.buckets[i]
        first, size = self.slot(b.samples, micro)
        start = step * self.table.stride + first
        return MicroBatch(step, micro, i, b.shape, list(range(start, start + size)), b.samples, b.step_tokens)

    def caps(self) -> dict[tuple[int, int, int], int]:
        """Per shape, how many read-ahead samples a reader keeps (twice this rank's share of a step, >= 4):
        enough that a requested shape is never dropped, so the samples taken do not depend on grad_accum."""
        return {b.shape: max(4, 2 * -(-b.samples // self.dp_size)) for b in self.table.buckets}


class PendingByShape:
    """Samples read but not yet batched, by latent (T, H, W), oldest first; at most ``caps[shape]`` each.

    ``add`` returns None when kept, else why the sample is dropped: "no_bucket" (its shape is in no bucket)
    or "bucket_overflow" (that shape's read-ahead is full: the mix holds more of it than its bucket takes).
    """

    def __init__(self, caps: dict[tuple[int, int, int], int]):
        self.caps = caps
        self._items: dict[tuple[int, int, int], list[Any]] = {}

    def add(self, item: Any, shape: tuple[int, ...]) -> str | None:
        shape = tuple(shape)
        if shape not in self.caps:
            return "no_bucket"
        items = self._items.setdefault(shape, [])
        if len(items) >= self.caps[shape]:
            return "bucket_overflow"
        items.append(item)
        return None

    def count(self, shape: tuple[int, ...]) -> int:
        return len(self._items.get(tuple(shape), ()))

    def take(self, shape: tuple[int, ...], n: int) -> list[Any]:
        items = self._items[tuple(shape)]
        out, self._items[tuple(shape)] = items[:n], items[n:]
        return out

    def pending(self) -> list[tuple[tuple[int, ...], list[Any]]]:
        return [(s, list(v)) for s, v in self._items.items() if v]

    def restore(self, pending: list[tuple[tuple[int, ...], list[Any]]]) -> None:
        self._items = {tuple(s): list(v) for s, v in pending}


# -- checks at config load -------------------------------------------------------------------------------


def _local_manifest(path: str) -> dict | None:
    """A dataset's manifest when it is a local directory that has one (remote ones are checked by the reader)."""
    from megassm.data import remote
    from megassm.data.format import MANIFEST_NAME
    from megassm.data.manifest import load_manifest

    if not remote.is_local(str(path)) or not (Path(remote.local_path(str(path))) / MANIFEST_NAME).is_file():
        return None
    return load_manifest(path)


def check_manifests(manifests: dict[str, dict], table: BucketTable | None, patch_size: Sequence[int],
                    model_parallel: int) -> None:
    """Against the datasets' shape histograms: with buckets, every bucket's shape is in some dataset; without,
    every shape in them splits over cp x tp (each shape is then its own bucket)."""
    from megassm.data.format import parse_shape_key

    present: dict[tuple[int, ...], list[str]] = {}
    for path, m in manifests.items():
        for key in m.get("shape_histogram", {}):
            present.setdefault(tuple(parse_shape_key(key)[1:]), []).append(path)
    if table is not None:
        for b in table.buckets:
            if b.weight > 0 and b.shape not in present:
                have = ", ".join("x".join(map(str, s)) for s in sorted(present)) or "none"
                raise BucketError(f"{b.describe()} appears in no dataset's shape histogram "
                                  f"({', '.join(manifests)}); latent (T, H, W) shapes present: {have}")
        return
    for shape, paths in sorted(present.items()):
        tokens = tokens_of(shape, patch_size)
        if tokens % model_parallel:
            b = Bucket("x".join(map(str, shape)), tuple(shape), 1.0, 1, tokens)
            raise BucketError(f"dataset {paths[0]}: {b.describe()} does not split over parallel.cp x tp = "
                              f"{model_parallel} ranks (nothing is padded). {_valid_choices(b, model_parallel)}")


def check_config(cfg: Any, manifests: bool = True) -> None:
    """The load-time rules of ``data.buckets`` / ``data.tokens_per_step`` for a RunConfig (BucketError);
    ``manifests``: also against the local datasets' shape histograms."""
    d, m, p = cfg.data, cfg.model, cfg.parallel
    mp = p.cp * p.tp
    table = None
    if d.buckets:
        table = BucketTable.from_config(d, m.patch_size)
        table.check_divides(mp)
        if cfg.train.grad_accum > min(b.samples for b in table.buckets):
            table.check_slots(cfg.train.grad_accum, 1)
        if p.pp > 1:
            raise BucketError(f"data.buckets with parallel.pp={p.pp}: the pipeline schedule has one micro-batch "
                              "shape; joint-shape training runs with pp=1")
        if d.kind == "procedural":
            for b in table.buckets:
                if b.shape[1] != b.shape[2] or b.shape[1] < 4 or b.shape[1] % 2:
                    raise BucketError(f"{b.describe()}: the procedural data renders square images of an even "
                                      "side >= 4; give shape [frames, S, S]")
    elif d.tokens_per_step is not None:
        raise BucketError(f"data.tokens_per_step={d.tokens_per_step} without data.buckets; list the buckets "
                          "(shapes and weights) the budget fills")
    if d.kind == "shards" and manifests:
        found = {str(path): mf for path in d.paths if (mf := _local_manifest(str(path))) is not None}
        if found:
            check_manifests(found, table, m.patch_size, mp)
