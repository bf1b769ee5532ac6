"""Text -> image / video generation from a megassm checkpoint (``megassm sample``).

prompt -> text encoder -> Euler flow-matching sampler with CFG (the training timestep shift) ->
VAE decode -> PNG (images) or MP4 (videos) + a JSON sidecar with every setting.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megassm.checkpoint.load import CheckpointError
from megassm.config.load import to_dict
from megassm.config.schema import RunConfig
from megassm.config.validate import ConfigError
from megassm.diffusion.flow import euler_sample, resolution_shift
from megassm.encoders import LatentDecoder, TextEncoder
from megassm.models import HTHModel, build_model
from megassm.run_config import from_dict
from megassm.runtime import compute_dtype, default_device


@dataclass
class SampleSpec:
    prompt: str
    seed: int = 0
    height: int | None = None  # latent-space size is height / vae_factor
    width: int | None = None
    frames: int = 1
    negative_prompt: str | None = None


def load_model_for_sampling(path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu",
                            merge: bool = False, dtype: torch.dtype = torch.float32):
    """The checkpoint's model (EMA weights by default), built on the meta device and filled one tensor at a
    time from the checkpoint (``checkpoint/sliced.py``) in ``dtype``: the model is the only copy in memory, and
    never in float32 when ``dtype`` is bf16 (hth-5b: 10 GB, not 20). A LoRA run's checkpoint is its base
    (``init_from``) with the run's adapters applied (``merge``: folded in) in float32."""
    from megassm.checkpoint.sliced import fill_meta_model
    from megassm.checkpoint.sources import open_checkpoint

    ckpt = open_checkpoint(Path(path))
    cfg = _stored_config(ckpt.config, path)
    if cfg.finetune.lora is not None and ckpt.kind == "deepspeed":
        return _load_lora_run(path, Path(ckpt.path), cfg, use_ema, device, merge)
    with torch.device("meta"):
        model = build_model(cfg.model)
    ema = use_ema and ckpt.ema is not None
    fill_meta_model(model, ckpt.ema if ema else ckpt.model, str(path), dtype)
    model.to(device).eval()
    return model, cfg, {"weights": "ema" if ema else "model", "step": ckpt.step,
                        "source": f"{ckpt.kind}:{ckpt.path}"}


def sampling_config(path: str | Path) -> RunConfig:
    """The run config stored with a checkpoint (no weights read): what ``load_model_for_sampling`` builds from."""
    from megassm.checkpoint.sources import open_checkpoint

    return _stored_config(open_checkpoint(Path(path)).config, path)


def _stored_config(config: dict | None, path) -> RunConfig:
    if config is None:
        raise CheckpointError(f"{path}: no config.yaml/config.json stored with the checkpoint; cannot rebuild "
                              "the model. Copy the training run's config.yaml next to the weights")
    return from_dict(config)


def training_latent_shape(cfg: RunConfig) -> tuple[tuple[int, int, int] | None, str]:
    """(latent (T, h, w), where it came from) of the training run that ``cfg`` is the config of: its previews'
    shape, the procedural data's size, its heaviest bucket, or the most common shape in its datasets'
    manifests (when they are readable here); (None, why not) otherwise."""
    t, d = cfg.train, cfg.data
    if t.preview_latent_shape is not None:
        return tuple(t.preview_latent_shape), "train.preview_latent_shape"  # type: ignore[return-value]
    if d.kind == "procedural":
        return (d.frames, d.image_size, d.image_size), "data.image_size"
    if d.buckets:
        b = max(d.buckets, key=lambda b: b.weight)
        return tuple(b.shape), f"data.buckets ({b.name or b.shape})"  # type: ignore[return-value]
    from megassm.data.manifest import most_common_latent_shape

    try:
        shape = most_common_latent_shape(list(d.paths))
    except (ValueError, OSError) as e:
        return None, f"the training data's manifests are not readable here ({str(e).splitlines()[0]})"
    return (shape, "the most common latent shape of data.paths") if shape else (None, "no shape in the manifests")


def _load_lora_run(path, tag_dir: Path, cfg: RunConfig, use_ema: bool, device, merge: bool):
    """A LoRA run's step: the base's raw weights (``init_from``, as training read them) + the step's exported
    adapters (``lora_ema/`` with ``use_ema`` where the run kept an EMA, else ``lora/``)."""
    from megassm.lora import load_adapters, merge_lora

    adapters = tag_dir / ("lora_ema" if use_ema and (tag_dir / "lora_ema").is_dir() else "lora")
    base = cfg.init_from
    if not adapters.is_dir() or not base or not Path(base).exists():
        raise CheckpointError(
            f"{path} is a LoRA run: its step holds adapters over the base init_from={base!r}"
            f"{'' if base and Path(base).exists() else ', which is not on this machine'}"
            f"{'' if adapters.is_dir() else f', and {adapters} is missing'}. With the base checkpoint at BASE, "
            f"run `megassm sample BASE --lora {adapters} ...` or `megassm convert merge-lora BASE {adapters} OUT` "
            "(a plain checkpoint for every other command)")
    model, _, info = load_model_for_sampling(base, use_ema=False, device=device)
    report = load_adapters(model, adapters)
    if merge:
        merge_lora(model)
    model.to(device).eval()
    cfg.finetune.lora = None  # the model is the base's architecture (plus unmerged adapters, unless merged)
    return model, cfg, {**info, "lora": str(adapters), "lora_report": report,
                        "weights": f"base model + {adapters.name}"}


def merge_lora_checkpoint(base: str | Path, adapters: str | Path, out: str | Path, *, use_ema: bool = True,
                          force: bool = False) -> tuple[dict, list[str]]:
    """Base checkpoint (any layout) + adapter directory -> consolidated checkpoint with the adapters folded in."""
    from megassm.checkpoint.writers import save_consolidated
    from megassm.lora import load_adapters, merge_lora

    model, cfg, info = load_model_for_sampling(base, use_ema=use_ema)
    report = load_adapters(model, adapters)
    n = merge_lora(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = save_consolidated(Path(out), state, to_dict(cfg), force=force,
                             meta={"merged_lora": str(adapters), "base_weights": info["weights"]})
    return {**meta, "step": info["step"], "parameters": sum(v.numel() for v in state.values()),
            "tensors": len(state)}, [report, f"merged {n} adapters into {info['weights']} weights of {base}"]


def default_latent_hw(cfg: RunConfig) -> tuple[int, int]:
    """Latent (h, w) when none is asked for: the training size (``training_latent_shape``), else 32 x 32."""
    shape, _ = training_latent_shape(cfg)
    return (shape[1], shape[2]) if shape else (32, 32)


def latent_frames(pixel_frames: int, temporal_factor: int) -> int:
    """Output (pixel) frames -> latent frames of a VAE that compresses time by ``temporal_factor`` (causal: the
    first frame alone, then ``temporal_factor`` frames per latent frame, as in preprocessing)."""
    if pixel_frames < 1 or (pixel_frames - 1) % temporal_factor:
        k = max(1, (pixel_frames - 1) // temporal_factor)
        raise ConfigError(f"frames={pixel_frames}: this VAE compresses time by {temporal_factor}, so videos have "
                          f"1 + k*{temporal_factor} frames (e.g. {1 + k * temporal_factor} or "
                          f"{1 + (k + 1) * temporal_factor}); or give --latent-frames")
    return 1 + (pixel_frames - 1) // temporal_factor


def initial_noise(specs: list[SampleSpec], channels: int, latent_shape: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, T, h, w) float32 standard normal noise, each sample from its spec's own seed (CPU generator)."""
    T, h, w = latent_shape
    return torch.stack([torch.randn(channels, T, h, w, generator=torch.Generator().manual_seed(s.seed))
                        for s in specs])


@torch.no_grad()
def denoise(model: HTHModel, cfg: RunConfig, noise: torch.Tensor, text: torch.Tensor, mask: torch.Tensor,
            steps: int, cfg_scale: float, neg_text: torch.Tensor | None = None, neg_mask: torch.Tensor | None = None,
            progress=None, device: torch.device | None = None, dtype=torch.float32) -> torch.Tensor:
    """noise (B, C, T, h, w) -> latents (B, C, T, h, w) float32: the Euler sampler at the training timestep shift.

    text (B, L, text_dim) and mask (B, L) as the encoder gives them; ``dtype`` is the model's compute dtype
    (its inputs x and text), the sampler's state stays float32.
    """
    assert noise.dim() == 5 and text.shape[:2] == mask.shape and text.shape[0] == noise.shape[0], \
        (noise.shape, text.shape, mask.shape)
    device = device or torch.device("cpu")
    shift = resolution_shift(cfg.diffusion, math.prod(model.patch_embed.grid(tuple(noise.shape))))
    fn = lambda x, t, y, m: model(x, t, y, m)  # noqa: E731
    x = euler_sample(fn, noise.to(device, torch.float32), text.to(device, dtype), mask.to(device), steps, cfg_scale,
                     shift, None if neg_text is None else neg_text.to(device, dtype),
                     None if neg_mask is None else neg_mask.to(device), progress, model_dtype=dtype)
    return x.float()


@torch.no_grad()
def generate(model: HTHModel, cfg: RunConfig, specs: list[SampleSpec], encoder: TextEncoder,
             steps: int, cfg_scale: float, latent_hw: tuple[int, int], frames: int = 1,
             progress=None, device: torch.device | None = None, dtype=torch.float32) -> torch.Tensor:
    """Latents (B, C, T, h, w) float32 for a batch of prompts; noise from each spec's own seed."""
    return generate_encoded(model, cfg, specs, encode_prompts(encoder, specs), steps, cfg_scale, latent_hw, frames,
                            progress, device, dtype)


def encode_prompts(encoder: TextEncoder, specs: list[SampleSpec]) -> tuple:
    """(text, mask, neg_text, neg_mask) of a batch of prompts, on the CPU; the negatives None when no spec has one
    (a spec without a negative prompt gets the unconditional branch: its negative mask is all False)."""
    text, mask = encoder([s.prompt for s in specs])
    neg_text = neg_mask = None
    if any(s.negative_prompt for s in specs):
        neg_text, neg_mask = encoder([s.negative_prompt or "" for s in specs])
        neg_mask = neg_mask & torch.tensor([bool(s.negative_prompt) for s in specs], device=neg_mask.device)[:, None]
    return tuple(None if t is None else t.cpu() for t in (text, mask, neg_text, neg_mask))


@torch.no_grad()
def generate_encoded(model: HTHModel, cfg: RunConfig, specs: list[SampleSpec], encoded: tuple, steps: int,
                     cfg_scale: float, latent_hw: tuple[int, int], frames: int = 1, progress=None,
                     device: torch.device | None = None, dtype=torch.float32) -> torch.Tensor:
    """``generate`` from prompts already encoded (``encode_prompts``)."""
    noise = initial_noise(specs, cfg.model.in_channels, (frames, *latent_hw))
    text, mask, neg_text, neg_mask = encoded
    return denoise(model, cfg, noise, text, mask, steps, cfg_scale, neg_text, neg_mask, progress, device, dtype)


def save_image(pixels: torch.Tensor, path: Path) -> None:
    """pixels (3, H, W) in [0, 1] -> PNG."""
    from PIL import Image

    arr = (pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(path)


def save_video(frames: torch.Tensor, path: Path, fps: int) -> None:
    """frames (T, 3, H, W) in [0, 1] -> H.264 MP4 (dimensions padded to even)."""
    import av

    T, _, H, W = frames.shape
    arr = (frames.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    arr = np.pad(arr, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)), mode="edge")
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = arr.shape[2], arr.shape[1], "yuv420p"
        for f in arr:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _outputs(out: Path, n: int) -> list[Path]:
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]


def _context_parallel(model: HTHModel, device: torch.device, env) -> int:
    """Under a multi-rank launch, shard the model's sequence over all ranks (Ulysses CP); returns the rank."""
    if env.world == 1:
        return 0
    from megassm.parallel.apply import parallelize_hth
    from megassm.parallel.mesh import ParallelDims, ParallelMesh, init_distributed

    init_distributed("nccl" if device.type == "cuda" else "gloo")
    parallelize_hth(model, ParallelMesh(ParallelDims(env.world, cp=env.world)))
    return env.rank


def _latent_frames(item: dict, args, temporal_factor: int, trained: tuple[int, int, int] | None) -> int:
    """A prompt's latent frames: its ``frames`` (output frames, as ``preprocess --frames``) or ``latent_frames``,
    else --frames / --latent-frames, else the training data's."""
    for source in (item, vars(args)):
        if source.get("latent_frames") is not None:
            return int(source["latent_frames"])
        if source.get("frames") is not None:
            return latent_frames(int(source["frames"]), temporal_factor)
    return trained[0] if trained else 1


def run_sample_command(args, prompts: list[dict], size: tuple[int, int] | None) -> int:
    """``megassm sample``: see ``megassm sample --help``."""
    from tqdm import tqdm

    from megassm.parallel.mesh import read_dist_env

    env = read_dist_env()
    device = torch.device(args.device) if args.device else default_device(env.local_rank)
    dtype = compute_dtype(args.precision, device)
    t0 = time.perf_counter()
    cfg = sampling_config(args.checkpoint)  # the stored run config: the encoders come before the model
    if args.vae:
        cfg.encoders.vae = args.vae
    if args.text_encoder:
        cfg.encoders.text_encoder = args.text_encoder
    # T5 and the VAE in the compute dtype: T5-XXL in float32 would take 19 GB of the GPU
    encoder = TextEncoder(cfg.encoders, cfg.model, device, dtype)
    decoder = LatentDecoder(cfg.encoders, device, dtype)
    timing = {"load_s": round(time.perf_counter() - t0, 1), "encode_s": 0.0, "denoise_s": 0.0, "decode_s": 0.0}
    steps = args.steps or cfg.diffusion.sample_steps
    scale = cfg.diffusion.cfg_scale if args.cfg_scale is None else args.cfg_scale
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    trained, source = training_latent_shape(cfg)
    if env.rank == 0 and size is None and not all(item.get("size") for item in prompts):
        print(f"size: {trained[1] * decoder.factor}x{trained[2] * decoder.factor} (latent {trained[1]}x{trained[2]}, "
              f"from {source})" if trained else f"size: 256x256 by default ({source}); give --size HxW")
    specs = _sample_specs(args, prompts, size, decoder.temporal_factor, trained)
    paths = _outputs(out, len(specs))
    groups = []  # batches of --batch-size prompts, split by shape (one batch must share (h, w, frames))
    for start in range(0, len(specs), args.batch_size):
        chunk = specs[start : start + args.batch_size]
        for key in sorted({(s.height, s.width, s.frames) for s, _ in chunk}, key=str):
            groups.append((key, [(j, s) for j, (s, _) in enumerate(chunk, start)
                                 if (s.height, s.width, s.frames) == key]))
    # every prompt is encoded (kept on the host) and the text encoder freed before the model is loaded: T5-XXL's
    # 9.5 GB (bf16) and hth-5b's 10.2 GB are never on the GPU together
    t0 = _synced_time(device)
    encoded = [encode_prompts(encoder, [s for _, s in group]) for _, group in groups]
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    timing["encode_s"] = round(_synced_time(device) - t0, 2)
    t0 = time.perf_counter()
    model, _, info = load_model_for_sampling(args.checkpoint, use_ema=not args.no_ema, device=device, dtype=dtype)
    if getattr(args, "lora", None):  # before the CP split below: ParallelHydra / attention keep the adapters
        from megassm.lora import load_adapters

        report = load_adapters(model, args.lora)
        if env.rank == 0:
            print(report)
        model.to(device).eval()
        info["lora"] = str(args.lora)
    rank = _context_parallel(model, device, env)  # several ranks (torchrun / srun): Ulysses CP over all
    model.to(dtype)
    timing["load_s"] = round(timing["load_s"] + time.perf_counter() - t0, 1)
    run = {"precision": str(dtype).replace("torch.", ""), "device": device.type, "checkpoint": str(args.checkpoint),
           **info, "vae": cfg.encoders.vae, "text_encoder": cfg.encoders.text_encoder}
    for (key, group), enc in zip(groups, encoded):
        frames = key[2]
        lh, lw = _latent_hw(cfg, decoder.factor, *key)
        t0 = _synced_time(device)
        lat = generate_encoded(model, cfg, [s for _, s in group], enc, steps, scale, (lh, lw), frames,
                               progress=(lambda r: tqdm(r, desc="denoise", unit="step")) if rank == 0 else None,
                               device=device, dtype=dtype)
        t1 = _synced_time(device)
        if rank != 0:  # every CP rank holds the same latents; rank 0 decodes and writes
            continue
        pix = decoder(lat)  # (B, T, 3, H, W)
        timing["denoise_s"] += round(t1 - t0, 2)
        timing["decode_s"] += round(_synced_time(device) - t1, 2)
        n_tokens = math.prod(model.patch_embed.grid((1, cfg.model.in_channels, frames, lh, lw)))
        shift = resolution_shift(cfg.diffusion, n_tokens)
        for k, ((j, s), p) in enumerate(zip(group, pix)):
            side = {"prompt": s.prompt, "negative_prompt": s.negative_prompt, "seed": s.seed,
                    "latent_size": [frames, lh, lw], "pixels": list(p.shape[-2:]), "frames": int(p.shape[0]),
                    "steps": steps, "cfg_scale": scale, "shift": shift, **run}
            _write_sample(paths[j], p, lat[k] if args.save_latents else None, side, args.fps)
    if rank == 0:
        if device.type == "cuda":
            timing["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        print("timing " + json.dumps(timing))  # one line, read by benchmarks/full_size_sample_cli.py
    return 0


def _synced_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _sample_specs(args, prompts: list[dict], size: tuple[int, int] | None, temporal_factor: int,
                  trained: tuple[int, int, int] | None) -> list[tuple[SampleSpec, dict]]:
    """One (SampleSpec, prompt item) per prompt: its size ("HxW" or a pair), seed and frames, else the flags'
    (frames: ``_latent_frames``)."""
    specs = []
    for i, item in enumerate(prompts):
        hw = item.get("size") or size
        if isinstance(hw, str):
            hw = tuple(int(v) for v in hw.lower().split("x"))
        specs.append((SampleSpec(item["prompt"], int(item.get("seed", args.seed + i)), *(hw or (None, None)),
                                 _latent_frames(item, args, temporal_factor, trained), args.negative_prompt),
                      item))
    return specs


def _latent_hw(cfg: RunConfig, factor: int, h: int | None, w: int | None, frames: int) -> tuple[int, int]:
    """The latent (height, width) for pixels h x w (None: the config's default); checks the size and frames."""
    pf = cfg.model.patch_size
    if h is None:
        hw = default_latent_hw(cfg)
    else:
        if h % (factor * pf[1]) or w % (factor * pf[2]):
            raise ConfigError(f"size {h}x{w} is not a multiple of VAE factor x patch = "
                              f"{factor * pf[1]}x{factor * pf[2]}")
        hw = h // factor, w // factor
    if frames < 1 or frames % pf[0]:
        raise ConfigError(f"frames={frames} must be a positive multiple of the temporal patch {pf[0]}")
    return hw


def _write_sample(path: Path, pixels: torch.Tensor, latents: torch.Tensor | None, side: dict, fps: int) -> None:
    """pixels (T, 3, H, W): one frame an image (.png, whatever the suffix), else a video (.mp4); the side
    file (.json, with a demo prompt's prompt-following score) and, when given, the latents."""
    if pixels.shape[0] == 1:
        path = path.with_suffix(".png")
        save_image(pixels[0], path)
    else:
        path = path.with_suffix(".mp4")
        save_video(pixels, path, fps)
    if side["vae"] == "builtin:pixels" and pixels.shape[0] == 1:
        from megassm.data.procedural import parse_caption, prompt_following

        if parse_caption(side["prompt"]) and pixels.shape[-1] == pixels.shape[-2]:  # a demo prompt: score it
            side["prompt_following"] = prompt_following(pixels[0], side["prompt"])
    path.with_suffix(".json").write_text(json.dumps(side, indent=2))
    if latents is not None:
        from safetensors.torch import save_file

        save_file({"latents": latents.contiguous()}, str(path.with_suffix(".latents.safetensors")))
    print(f"wrote {path}")
