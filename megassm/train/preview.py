"""Training previews: a few fixed prompts sampled at the stage's own settings, for TensorBoard.

    prompts (train.preview_prompts / _file, or the demo's) --split over DP replicas: replica r takes prompts[r::dp]-->
    text encoder (the run's compute dtype, once; the encodings are kept, the encoder freed) -->
    Euler sampler (diffusion.sample_steps, cfg_scale, the training timestep shift; fp32 state), EMA weights,
      the latent shape of the stage's data, seed = prompt index; each TP x CP group generates together
      on the model as training shards it -->
    latents gathered to rank 0 --> VAE decode on rank 0 only (loaded for it, then freed) --> (N, 3, H, W x frames).

Every rank calls ``Previews.__call__`` at the same step: under ZeRO-3 each forward gathers weights from
all ranks, so a replica with no prompt of its own runs a stand-in and drops it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megassm.config.schema import RunConfig
from megassm.config.validate import read_prompt_lines
from megassm.data.manifest import most_common_latent_shape
from megassm.encoders import LatentDecoder, TextEncoder
from megassm.parallel.comm import failed_ranks, gather_object
from megassm.sample import SampleSpec, denoise, initial_noise
from megassm.train.ema import ShardedEMA, applied

# the procedural demo's captions (megassm.data.procedural): what the smoke run learns to draw
DEMO_PROMPTS = ["a red square at the top left", "a blue square at the bottom right",
                "a green square at the top right", "a yellow square at the bottom left"]
MAX_GRID_FRAMES = 8  # a video preview shows this many of its frames side by side


def preview_prompts(cfg: RunConfig) -> list[str]:
    """train.preview_prompts, else the lines of train.preview_prompts_file, else the demo's prompts."""
    t = cfg.train
    if t.preview_prompts is not None:
        return list(t.preview_prompts)
    if t.preview_prompts_file is not None:
        return read_prompt_lines(t.preview_prompts_file)
    return list(DEMO_PROMPTS)


def preview_latent_shape(cfg: RunConfig) -> tuple[int, int, int]:
    """Latent (frames, h, w) of a preview: train.preview_latent_shape, else the stage's data."""
    if cfg.train.preview_latent_shape is not None:
        T, h, w = cfg.train.preview_latent_shape
        return T, h, w
    if cfg.data.kind == "procedural":
        return cfg.data.frames, cfg.data.image_size, cfg.data.image_size
    shape = most_common_latent_shape(cfg.data.paths)
    if shape is None:
        raise ValueError(f"previews: the manifests of data.paths={cfg.data.paths} list no latent shapes; set "
                         "train.preview_latent_shape=[frames,height,width]")
    return shape


def frame_grid(pixels: torch.Tensor, max_frames: int = MAX_GRID_FRAMES) -> torch.Tensor:
    """(N, T, 3, H, W) -> (N, 3, H, F * W): up to ``max_frames`` evenly spaced frames side by side."""
    N, T, C, H, W = pixels.shape
    idx = torch.linspace(0, T - 1, min(T, max_frames)).round().long()
    return pixels[:, idx].permute(0, 2, 3, 1, 4).reshape(N, C, H, len(idx) * W)  # (N, 3, H, F, W) -> rows of frames


class Previews:
    """The preview samples of one rank; build once per run, call every train.sample_every steps on all ranks."""

    def __init__(self, cfg: RunConfig, device: torch.device, dtype: torch.dtype, dp_rank: int = 0, dp_size: int = 1,
                 leader: bool = True, prompts: list[str] | None = None,
                 latent_shape: tuple[int, int, int] | None = None):
        """dtype: the model's compute dtype (the text encoder runs in it too). leader: this rank sends its
        replica's latents to rank 0 (one rank of each TP x CP group). prompts / latent_shape: other than the
        config's previews (evaluation generates its own prompts)."""
        self.cfg, self.device, self.dtype, self.leader = cfg, device, dtype, leader
        self.prompts = list(prompts) if prompts is not None else preview_prompts(cfg)
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else preview_latent_shape(cfg)
        self.mine = list(range(dp_rank, len(self.prompts), dp_size))  # prompt indices of this replica
        self._text: tuple[torch.Tensor, torch.Tensor] | None = None
        self.sources: dict[int, int] = {}  # on rank 0 after a call: prompt index -> rank that generated it

    @classmethod
    def for_mesh(cls, cfg: RunConfig, mesh, device: torch.device, dtype: torch.dtype, **kw) -> Previews:
        leader = mesh.coords["tp"] == 0 and mesh.coords["cp"] == 0
        return cls(cfg, device, dtype, mesh.get_data_parallel_rank(), mesh.get_data_parallel_world_size(), leader,
                   **kw)

    def _specs(self) -> list[SampleSpec]:
        # a replica without prompts (more replicas than prompts) generates prompt 0 and drops it
        return [SampleSpec(self.prompts[i], seed=i) for i in (self.mine or [0])]

    def _encoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(text (k, L, text_dim), mask (k, L)) of this replica's prompts on the CPU, encoded at the first call."""
        if self._text is None:
            encoder = TextEncoder(self.cfg.encoders, self.cfg.model, self.device, self.dtype)
            text, mask = encoder([s.prompt for s in self._specs()])
            self._text = text.cpu(), mask.cpu()
            del encoder
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the encoder's weights go back before sampling
        return self._text

    @torch.no_grad()
    def latents(self, model: torch.nn.Module) -> torch.Tensor:
        """(k, C, T, h, w) float32 latents of this replica's prompts (the stand-in's if it has none), CPU.

        The text encoder (loaded at the first call) may fail on one rank alone (a file, memory): the ranks
        agree on that before sampling, whose forwards are collectives, and all raise together."""
        error = None
        try:
            text, mask = self._encoded()
        except Exception as exc:  # noqa: BLE001 -- every rank is told below
            error = exc
        failed = failed_ranks(error is not None)
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"previews: encoding the prompts failed on rank(s) {failed}; stopped on every rank")
        d = self.cfg.diffusion
        noise = initial_noise(self._specs(), self.cfg.model.in_channels, self.latent_shape)
        return denoise(model, self.cfg, noise, text, mask, d.sample_steps, d.cfg_scale, device=self.device,
                       dtype=self.dtype).cpu()

    def __call__(self, model: torch.nn.Module, ema: ShardedEMA | None = None) -> torch.Tensor | None:
        """Images (N, 3, H, W x frames) in [0, 1] on rank 0, in prompt order; None on the other ranks."""
        pixels = self.pixels(model, ema)
        return None if pixels is None else torch.cat([frame_grid(p[None]) for p in pixels])

    def pixels(self, model: torch.nn.Module, ema: ShardedEMA | None = None) -> list[torch.Tensor] | None:
        """On rank 0, per prompt in order, its decoded frames (T', 3, H, W) in [0, 1] (CPU); None elsewhere."""
        was_training = model.training
        model.eval()
        try:
            with applied(ema) if ema is not None else contextlib.nullcontext():
                lat = self.latents(model)
        finally:
            model.train(was_training)
        by_index = self._gather(lat[: len(self.mine)])
        if by_index is None:
            return None
        decoder = LatentDecoder(self.cfg.encoders, self.device, self.dtype)
        # one prompt at a time: a stage-3 video decodes to 129 frames; (1, C, T, h, w) -> (T', 3, H, W)
        pixels = [decoder(by_index[i][None])[0] for i in range(len(self.prompts))]
        del decoder
        return pixels

    def _gather(self, lat: torch.Tensor) -> dict[int, torch.Tensor] | None:
        """Every replica's latents on rank 0 as {prompt index: (C, T, h, w)}; None elsewhere."""
        distributed = dist.is_initialized()  # world 1 included: a single-GPU run takes the cluster's path
        mine = (dist.get_rank() if distributed else 0, self.mine, lat) if self.leader else None
        if not distributed:
            parts = [mine]
        else:
            parts = gather_object(mine, dst=0)
            if parts is None:
                return None
        out: dict[int, torch.Tensor] = {}
        self.sources = {}
        for rank, indices, tensors in (p for p in parts if p is not None):
            for i, t in zip(indices, tensors):
                assert i not in out, f"prompt {i} generated by ranks {self.sources[i]} and {rank}"
                out[i], self.sources[i] = t, rank
        missing = sorted(set(range(len(self.prompts))) - set(out))
        assert not missing, f"previews: no rank generated prompts {missing}"
        return out
