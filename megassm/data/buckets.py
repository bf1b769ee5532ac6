"""Buckets on both sides of the shards.

Preprocessing: ``ResolutionBuckets`` -- the pixel sizes of a stage (one per aspect ratio,
all of about the same area, sides a multiple of VAE stride x patch size); every image or
video goes to the bucket nearest its aspect ratio and is resized to cover it, then
centre-cropped, so aspect ratios are kept up to the bucket's rounding.

Reading: ``ShapeBucketer`` -- groups samples by latent shape so that every batch is one
tensor. Its state (pending items per shape, in order) is part of the reader position.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

# (w:h) ratios from 1:2 (portrait) to 2:1 (landscape) -- the common photo / video formats
DEFAULT_ASPECT_RATIOS = "1:2,9:16,2:3,3:4,1:1,4:3,3:2,16:9,2:1"


def parse_resolution(text: str | int) -> tuple[int, int]:
    """ "256" -> (256, 256); "352x640" -> (352, 640) as (height, width)."""
    s = str(text).lower().strip()
    try:
        h, w = (s.split("x") + [s])[:2] if "x" in s else (s, s)
        h, w = int(h), int(w)
        assert h > 0 and w > 0
    except (ValueError, AssertionError):
        raise ValueError(f"resolution {text!r} is not valid; use a side (256) or HEIGHTxWIDTH (352x640)") from None
    return h, w


def parse_aspect_ratios(text: str) -> list[float]:
    """ "1:1,16:9" -> [1.0, 1.777..] (width / height)."""
    out = []
    for part in str(text).split(","):
        try:
            a, b = part.split(":")
            r = float(a) / float(b)
            assert r > 0
        except (ValueError, AssertionError, ZeroDivisionError):
            raise ValueError(f"aspect ratio {part!r} in {text!r} is not W:H (e.g. 16:9)") from None
        out.append(r)
    return out


@dataclass(frozen=True)
class ResolutionBuckets:
    """Pixel sizes (height, width) of a stage's buckets.

    resolution: the base (height, width), always a bucket; the others have about its area.
    aspect_ratios: width / height of each bucket.
    multiple: bucket sides are multiples of this (VAE stride x patch size, e.g. 8 x 2 = 16).
    """

    sizes: tuple[tuple[int, int], ...]

    @classmethod
    def build(cls, resolution: str | int = 256, aspect_ratios: str = DEFAULT_ASPECT_RATIOS,
              multiple: int = 16) -> ResolutionBuckets:
        h0, w0 = parse_resolution(resolution)
        if multiple < 1:
            raise ValueError(f"bucket multiple={multiple} must be >= 1")
        area = h0 * w0
        sizes = {(h0 // multiple * multiple or multiple, w0 // multiple * multiple or multiple)}
        for r in parse_aspect_ratios(aspect_ratios):
            h = max(multiple, round(math.sqrt(area / r) / multiple) * multiple)
            w = max(multiple, round(math.sqrt(area * r) / multiple) * multiple)
            sizes.add((h, w))
        return cls(tuple(sorted(sizes, key=lambda hw: hw[1] / hw[0])))

    def nearest(self, height: int, width: int) -> tuple[int, int]:
        """The bucket whose aspect ratio is nearest (in log space) to height x width."""
        target = math.log(width / height)
        return min(self.sizes, key=lambda hw: (abs(math.log(hw[1] / hw[0]) - target), -hw[0] * hw[1]))

    def to_json(self) -> list[list[int]]:
        return [list(s) for s in self.sizes]


def cover_crop_box(height: int, width: int, bh: int, bw: int) -> tuple[int, int, int, int, int, int]:
    """Resize (height, width) to cover (bh, bw) keeping aspect, then centre-crop.

    Returns (resized_h, resized_w, top, left, bh, bw).
    """
    scale = max(bh / height, bw / width)
    rh, rw = max(bh, round(height * scale)), max(bw, round(width * scale))
    return rh, rw, (rh - bh) // 2, (rw - bw) // 2, bh, bw


class ShapeBucketer:
    """Collects items by latent shape; emits a batch as soon as a shape has ``batch_size``.

    Deterministic: the emitted sequence depends only on the sequence of (item, shape)
    added. ``pending()`` / ``restore()`` expose the state for a saved reader position.
    """

    def __init__(self, batch_size: int):
        assert batch_size >= 1
        self.batch_size = batch_size
        self._pending: dict[tuple[int, ...], list[Any]] = {}

    def add(self, item: Any, shape: tuple[int, ...]) -> list[Any] | None:
        items = self._pending.setdefault(tuple(shape), [])
        items.append(item)
        if len(items) == self.batch_size:
            del self._pending[tuple(shape)]
            return items
        return None

    def flush(self) -> Iterator[list[Any]]:
        """The incomplete batches left at the end of a finite stream, oldest shape first."""
        while self._pending:
            shape = next(iter(self._pending))
            yield self._pending.pop(shape)

    def pending(self) -> list[tuple[tuple[int, ...], list[Any]]]:
        return [(s, list(v)) for s, v in self._pending.items()]

    def restore(self, pending: list[tuple[tuple[int, ...], list[Any]]]) -> None:
        self._pending = {tuple(s): list(v) for s, v in pending}
