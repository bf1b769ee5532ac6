"""``megassm eval CHECKPOINT --prompts FILE [--reference DIR_OR_SHARDS]``: every metric of one checkpoint.

The checkpoint's EMA weights (``load_model_for_sampling``, as ``megassm sample``); under torchrun / srun the
ranks form ``--cp`` sized context-parallel groups (default: all of them) and the prompts are split over the
data-parallel replicas that leaves, generated with the sampler of ``megassm sample`` and training previews
(``megassm.train.preview.Previews``), decoded on rank 0. Rank 0 computes the metrics, writes OUT/<metric>.json
and OUT/metrics.json, and prints a table.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from megassm.config.validate import ConfigError, read_prompt_lines

log = logging.getLogger("megassm.eval")


def add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="held-out loss, CLIP score, FID / KID (FVD) of a checkpoint", description=(
        "Evaluate a checkpoint: the held-out flow-matching loss on validation shards (fixed timesteps and noise), "
        "and for the generated prompts CLIP score (--clip-model), FID and KID against --reference (--inception), "
        "FVD for videos (--video-features). Nothing is downloaded: every model is a local path. Writes "
        "OUT/<metric>.json and prints a table. Under torchrun/srun: context parallel over --cp ranks, prompts "
        "split across the data-parallel replicas."))
    e.add_argument("checkpoint", help="run directory, DeepSpeed checkpoint (step_*) or consolidated directory")
    e.add_argument("--prompts", default=None, help="prompts to generate, one per line ('#' comments skipped)")
    e.add_argument("--reference", default=None, help="reference set for FID / KID / FVD: a directory of images "
                   "or videos, or a shard dataset (default: the checkpoint config's eval.reference)")
    e.add_argument("--heldout", action="append", default=None, help="validation dataset for the held-out loss "
                   "(repeatable; default eval.paths, or the procedural demo's held-out seed)")
    e.add_argument("--no-heldout", action="store_true", help="skip the held-out loss")
    e.add_argument("--samples", type=int, default=None, help="held-out samples (default eval.samples)")
    e.add_argument("--clip-model", default=None, help="local transformers CLIP directory (default eval.clip_model)")
    e.add_argument("--inception", default=None, help="InceptionV3 weights file, pytorch-fid layout "
                   "(default eval.inception)")
    e.add_argument("--video-features", default=None, help="TorchScript video network for FVD "
                   "(default eval.video_features)")
    e.add_argument("--out", default="eval", help="directory of the JSON results")
    e.add_argument("--steps", type=int, default=None, help="sampling steps (default diffusion.sample_steps)")
    e.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default diffusion.cfg_scale)")
    e.add_argument("--latent-shape", default=None, help="latent FRAMESxHEIGHTxWIDTH of the generations "
                   "(default: the checkpoint's preview shape)")
    e.add_argument("--cp", type=int, default=None, help="context-parallel ranks per replica (default: all)")
    e.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA weights")
    e.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    e.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    e.set_defaults(func=run_eval_command)


def _apply_args(cfg, args) -> None:
    e = cfg.eval
    for key in ("reference", "clip_model", "inception", "video_features"):
        if getattr(args, key) is not None:
            setattr(e, key, getattr(args, key))
    if args.heldout is not None:
        e.paths = list(args.heldout)
    if args.samples is not None:
        e.samples = args.samples
    if args.steps is not None:
        cfg.diffusion.sample_steps = args.steps
    if args.cfg_scale is not None:
        cfg.diffusion.cfg_scale = args.cfg_scale
    _check_paths(e)


def _check_paths(e) -> None:
    """Every model / reference path given (on the command line or in ``e``) exists."""
    for key in ("clip_model", "inception", "reference", "video_features"):
        path = getattr(e, key)
        if path is not None and not Path(path).exists():
            raise ConfigError(f"--{key.replace('_', '-')} / eval.{key}={path!r}: no such file or directory "
                              f"({Path(path).resolve()}); nothing is downloaded, give a local path "
                              "(README: Evaluation)")


def _mesh(model, device: torch.device, cp: int | None):
    from megassm.parallel.mesh import ParallelDims, ParallelMesh, init_distributed, read_dist_env

    world = read_dist_env().world
    cp = cp or world
    if world % cp:
        raise ConfigError(f"--cp {cp} does not divide the {world} ranks")
    init_distributed("nccl" if device.type == "cuda" else "gloo")
    mesh = ParallelMesh(ParallelDims(world, cp=cp))
    if cp > 1:
        from megassm.parallel.apply import parallelize_hth

        parallelize_hth(model, mesh)
    return mesh


def _latent_shape(text: str | None):
    if text is None:
        return None
    try:
        T, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--latent-shape {text!r} must look like FRAMESxHEIGHTxWIDTH, e.g. 1x32x32") from None
    return T, h, w


def run_eval_command(args) -> int:
    from megassm.eval.heldout import HeldOutLoss, heldout_batches
    from megassm.eval.suite import FeatureModels, compute, table, wanted
    from megassm.sample import load_model_for_sampling
    from megassm.train.preview import Previews

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.prompts is not None and not Path(args.prompts).is_file():
        raise ConfigError(f"--prompts {args.prompts} does not exist; give a text file with one prompt per line")
    _check_paths(args)  # before the checkpoint loads: a wrong path fails at once
    default = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device or default)
    model, cfg, info = load_model_for_sampling(args.checkpoint, use_ema=not args.no_ema, device=device)
    _apply_args(cfg, args)
    mesh = _mesh(model, device, args.cp)
    rank, leader = mesh.rank, mesh.coords["tp"] == 0 and mesh.coords["cp"] == 0
    dp_rank, dp_size = mesh.get_data_parallel_rank(), mesh.get_data_parallel_world_size()
    dtype = torch.bfloat16 if args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda") \
        else torch.float32
    model.to(dtype)
    results: dict[str, dict] = {}
    if not args.no_heldout:
        batches = heldout_batches(cfg)
        loss = HeldOutLoss(batches, cfg.diffusion, cfg.eval.seed, device, dtype, dp_rank, dp_size, leader)(model)
        results["heldout_loss"] = {"value": loss, "samples": sum(len(b["index"]) for b in batches),
                                   "seed": cfg.eval.seed, "datasets": list(cfg.eval.paths) or "procedural"}
    if args.prompts is not None:
        prompts = read_prompt_lines(args.prompts)
        previews = Previews(cfg, device, dtype, dp_rank, dp_size, leader, prompts=prompts,
                            latent_shape=_latent_shape(args.latent_shape))
        clips = previews.pixels(model)  # rank 0: (T, 3, H, W) per prompt
        if rank == 0:
            names = wanted(cfg.eval, videos=clips[0].shape[0] > 1, offline=True)
            if not names:
                log.warning("eval: no --clip-model / --inception + --reference given: only the held-out loss")
            results.update(compute(names, FeatureModels(cfg.eval, device, cfg), clips, prompts))
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"checkpoint": str(args.checkpoint), **info, "sample_steps": cfg.diffusion.sample_steps,
                "cfg_scale": cfg.diffusion.cfg_scale, "precision": str(dtype).replace("torch.", "")}
        for name, r in results.items():
            (out / f"{name}.json").write_text(json.dumps({"metric": name, **r, **meta}, indent=2))
        (out / "metrics.json").write_text(json.dumps({"metrics": results, **meta}, indent=2))
        print(table(results))
    return 0
