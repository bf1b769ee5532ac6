"""Built-in procedural data: coloured squares in image quadrants, with captions.

"a red square at the top left" -> a 3 x S x S image in [-1, 1] (pixels stand in for VAE latents)
whose top-left quadrant holds a red square on a dark background. Every sample is a pure function of
(seed, global sample index), so the data position is one integer, resume is exact, and a global batch
holds the same samples under any data-parallel degree or micro-batching.

Its captions are encoded by ``builtin:words`` (``megassm/encoders/words.py``: ``WordEmbeddingEncoder``).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from megassm.encoders.words import WordEmbeddingEncoder

COLOURS = {
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
    "white": (1.0, 1.0, 1.0),
}
POSITIONS = {  # (row, col) of the quadrant
    "top left": (0, 0),
    "top right": (0, 1),
    "bottom left": (1, 0),
    "bottom right": (1, 1),
}
BACKGROUND = -0.6


def caption(colour: str, position: str) -> str:
    return f"a {colour} square at the {position}"


def parse_caption(text: str) -> tuple[str, str] | None:
    """(colour, position) named in a prompt, or None."""
    text = text.lower()
    colour = next((c for c in COLOURS if re.search(rf"\b{c}\b", text)), None)
    position = next((p for p in POSITIONS if p in text), None)
    return (colour, position) if colour and position else None


def render(colour: str, position: str, size: int, jitter: Tensor | None = None) -> Tensor:
    """(3, 1, size, size) image in [-1, 1]. ``jitter``: two ints in [-1, 1] moving the square."""
    img = torch.full((3, size, size), BACKGROUND)
    q = size // 2
    side = max(2, q * 3 // 4)
    r0 = POSITIONS[position][0] * q + (q - side) // 2
    c0 = POSITIONS[position][1] * q + (q - side) // 2
    if jitter is not None:
        r0 = min(max(r0 + int(jitter[0]), POSITIONS[position][0] * q), POSITIONS[position][0] * q + q - side)
        c0 = min(max(c0 + int(jitter[1]), POSITIONS[position][1] * q), POSITIONS[position][1] * q + q - side)
    img[:, r0 : r0 + side, c0 : c0 + side] = torch.tensor(COLOURS[colour])[:, None, None]
    return img.unsqueeze(1)


def _clip(colour: str, position: str, jitter: Tensor, size: int, frames: int) -> Tensor:
    """(3, frames, size, size): the square slides right within its quadrant, one pixel per frame (clamped)."""
    if frames == 1:
        return render(colour, position, size, jitter)
    return torch.cat([render(colour, position, size, jitter + torch.tensor([0, f])) for f in range(frames)], dim=1)


class ProceduralShapes:
    """Infinite stream of batches {"latents", "text", "text_mask", "captions"} (see data contract)."""

    def __init__(self, image_size: int, batch_size: int, text_dim: int, text_len: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, frames: int = 1, schedule=None):
        if image_size < 4 or image_size % 2:
            raise ValueError(f"data.image_size={image_size} must be an even number >= 4")
        if frames < 1:
            raise ValueError(f"data.frames={frames} must be >= 1")
        self.image_size, self.batch_size, self.frames = image_size, batch_size, frames
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.encoder = WordEmbeddingEncoder(text_dim, text_len)
        # data.buckets: batch k is micro-batch k of a megassm.data.token_budget.BucketSchedule (its shape and
        # global sample indices); otherwise batch_size samples of image_size^2 x frames
        self.schedule = schedule
        self.position = 0  # batches handed out on this rank

    def sample_indices(self, index: int) -> list[int]:
        """Global sample indices of this rank's batch ``index``: batch k of every data-parallel rank
        together is one contiguous block of batch_size x dp_size samples, rank r holding its r-th slice."""
        first = (index * self.dp_size + self.dp_rank) * self.batch_size
        return list(range(first, first + self.batch_size))

    def batch(self, index: int) -> dict:
        """Each sample is a function of (seed, its global index) alone: the same samples arrive in the same
        optimizer step whatever the micro-batch size, accumulation or data-parallel degree."""
        extra, frames, size = {}, self.frames, self.image_size
        if self.schedule is not None:
            mb = self.schedule.micro_batch(index)
            ids, (frames, size, _) = mb.sample_index, mb.shape
            extra = {"sample_index": ids, "step_samples": mb.step_samples, "step_tokens": mb.step_tokens,
                     "bucket": mb.bucket}
        else:
            ids = self.sample_indices(index)
        colours, positions = list(COLOURS), list(POSITIONS)
        caps, imgs = [], []
        for i in ids:
            gen = torch.Generator().manual_seed(hash((self.seed, i)) & (2**62 - 1))
            c = int(torch.randint(len(colours), (1,), generator=gen))
            p = int(torch.randint(len(positions), (1,), generator=gen))
            jit = torch.randint(-1, 2, (2,), generator=gen)
            caps.append(caption(colours[c], positions[p]))
            imgs.append(_clip(colours[c], positions[p], jit, size, frames))
        text, mask = self.encoder(caps)
        # latents (B, 3, T, S, S)
        return {"latents": torch.stack(imgs), "text": text, "text_mask": mask, "captions": caps, **extra}

    def __iter__(self):
        while True:
            b = self.batch(self.position)
            self.position += 1
            yield b

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def prompt_following(image: Tensor, prompt: str) -> dict:
    """How well an image (3, S, S) in [0, 1] follows a demo prompt.

    Returns the fraction of the named quadrant's pixels closest to the named colour (among the
    palette and the background) and the same fraction in the other quadrants; a prompt-following
    sample has a high ``in_region`` and a low ``elsewhere``.
    """
    parsed = parse_caption(prompt)
    if parsed is None:
        raise ValueError(f"prompt {prompt!r} names no demo colour and position; e.g. {caption('red', 'top left')!r}")
    colour, position = parsed
    palette = {**COLOURS, "background": (BACKGROUND,) * 3}
    names = list(palette)
    ref = (torch.tensor([palette[n] for n in names]) + 1) / 2  # (K, 3) in [0, 1]
    S = image.shape[-1]
    q = S // 2
    nearest = ((image.permute(1, 2, 0)[:, :, None, :] - ref) ** 2).sum(-1).argmin(-1)  # (S, S)
    hit = nearest == names.index(colour)
    r, c = POSITIONS[position]
    region = torch.zeros(S, S, dtype=torch.bool)
    region[r * q:(r + 1) * q, c * q:(c + 1) * q] = True
    side = max(2, q * 3 // 4)
    return {"in_region": hit[region].float().mean().item(), "elsewhere": hit[~region].float().mean().item(),
            "ideal_in_region": side * side / (q * q)}
