"""Command-line front ends: ``megassm preprocess`` and ``megassm inspect data``.

``add_preprocess_parser(subparsers)`` / ``add_inspect_data_parser(subparsers)`` attach the
sub-commands to any argparse subparsers object and set ``func(args) -> exit code``.
``python -m megassm.data.cli {preprocess,inspect-data} ...`` runs them standalone.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from megassm.data.buckets import DEFAULT_ASPECT_RATIOS

_EPILOG_PRE = """\
examples:
  # 256px image stage, sidecar captions, 4 decoding workers, one GPU
  megassm preprocess --input /data/imgs --output /data/lat256 --vae /ckpt/sdxl-vae \\
      --text-encoder /ckpt/t5-v1_1-xxl --resolution 256
  # 360p video stage with a Wan VAE, 129 frames at 16 fps, one task per GPU under SLURM
  srun --ntasks=16 --gpus-per-task=1 megassm preprocess --input /data/clips.jsonl \\
      --output /data/lat360p --vae /ckpt/wan2.1/vae --text-encoder /ckpt/umt5-xxl \\
      --resolution 352x640 --frames 129 --fps 16

Re-running the same command resumes: finished shards are kept, the rest is redone.
Ranks come from --rank/--world-size, RANK/WORLD_SIZE, or SLURM_PROCID/SLURM_NTASKS.
Bad inputs are skipped and listed in OUTPUT/skipped.json; see docs/shard_format.md."""


def add_preprocess_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "preprocess", help="encode images/videos + captions into latent shards",
        description="Encode images/videos and their captions with a VAE and a text encoder (local "
        "directories; nothing is downloaded) into WebDataset latent shards with a manifest.",
        epilog=_EPILOG_PRE, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input / output")
    g.add_argument("--input", "-i", action="append", required=True, metavar="PATH",
                   help="folder of images/videos (+ sidecar captions), a .csv/.jsonl manifest (columns path, "
                   "caption), or a folder/file of WebDataset .tar shards; repeatable")
    g.add_argument("--output", "-o", required=True,
                   help="dataset directory to write (shards + manifest.json): a local path, or s3://bucket/prefix, "
                   "gs://bucket/prefix (shards are staged locally and uploaded one by one; credentials from the "
                   "usual AWS_* / GOOGLE_* environment)")
    g.add_argument("--staging", help="local directory for shards before upload when --output is a URL "
                   "(default: a folder in the system temp directory named after the URL)")
    g.add_argument("--caption-ext", default="txt", help="sidecar caption extension (default: txt)")
    g.add_argument("--missing-caption", choices=["skip", "empty"], default="skip",
                   help="skip samples without caption (default) or encode them with an empty caption")
    g.add_argument("--samples-per-shard", type=int, default=1000,
                   help="inputs per output shard for folder/manifest inputs (tar inputs: one shard per tar)")
    g = p.add_argument_group("encoders")
    g.add_argument("--vae", required=True, help="diffusers VAE directory (AutoencoderKL, AutoencoderKLWan, ...)")
    g.add_argument("--text-encoder", required=True, help="transformers text encoder directory (e.g. T5)")
    g.add_argument("--tokenizer", help="tokenizer directory if not inside --text-encoder")
    g.add_argument("--text-max-length", type=int, default=512, help="token limit; longer captions are cut")
    g.add_argument("--keep-text-padding", action="store_true",
                   help="store padded text embeddings (default: only the valid tokens)")
    g.add_argument("--latent-scale", type=float, help="override the VAE's scaling factor in the manifest")
    g.add_argument("--latent-shift", type=float, help="override the VAE's shift factor in the manifest")
    g.add_argument("--vae-tiling", action="store_true", help="enable the VAE's tiled encoding (large frames)")
    g = p.add_argument_group("resolution and frames")
    g.add_argument("--resolution", default="256", help="base bucket size: SIDE or HEIGHTxWIDTH (default 256)")
    g.add_argument("--aspect-ratios", default=DEFAULT_ASPECT_RATIOS,
                   help=f"W:H ratios of the buckets, all of the base area (default {DEFAULT_ASPECT_RATIOS})")
    g.add_argument("--bucket-multiple", type=int, default=16,
                   help="bucket sides are multiples of this: VAE stride x patch size (default 16 = 8 x 2)")
    g.add_argument("--frames", type=int, default=1,
                   help="frames per video after resampling (1 + k * VAE temporal stride, e.g. 129)")
    g.add_argument("--fps", type=float, default=16.0, help="target frame rate of videos (default 16)")
    g.add_argument("--min-side", type=int, default=0, help="skip media whose shorter side is below this")
    g = p.add_argument_group("compute")
    g.add_argument("--batch-size", type=int, default=16, help="images per encoder batch")
    g.add_argument("--video-batch-size", type=int, default=1, help="videos per encoder batch")
    g.add_argument("--num-workers", type=int, default=4, help="decoding processes per rank")
    g.add_argument("--decode-isolation", choices=["process", "none"], default="process",
                   help="process (default): decode each file in a child process, so a crash or hang in "
                   "PyAV/Pillow skips that file only; none: decode in the worker (faster, a crash ends the run)")
    g.add_argument("--decode-timeout", type=float, default=300.0,
                   help="seconds one file may take to decode before it is skipped as decode_timeout (default 300)")
    g.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if present, else cpu), cpu, cuda:N")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="compute dtype (auto: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--store-dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="dtype of stored latents and text embeddings")
    g.add_argument("--rank", type=int, help="this process's rank (default: RANK or SLURM_PROCID or 0)")
    g.add_argument("--world-size", type=int, help="number of ranks (default: WORLD_SIZE or SLURM_NTASKS or 1)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=preprocess_main)
    return p


def _setup_logging(rank: int = 0) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")


def preprocess_main(args: argparse.Namespace) -> int:
    from megassm.data.preprocess import PreprocessOptions, rank_and_world, run_preprocess
    from megassm.data.remote import join

    try:
        rank, world = rank_and_world(args.rank, args.world_size)
        _setup_logging(rank)
        o = PreprocessOptions(
            inputs=args.input, output=args.output, vae=args.vae, text_encoder=args.text_encoder,
            tokenizer=args.tokenizer, resolution=args.resolution, aspect_ratios=args.aspect_ratios,
            bucket_multiple=args.bucket_multiple, frames=args.frames, fps=args.fps, min_side=args.min_side,
            text_max_length=args.text_max_length, keep_text_padding=args.keep_text_padding,
            missing_caption=args.missing_caption, caption_ext=args.caption_ext,
            samples_per_shard=args.samples_per_shard, batch_size=args.batch_size,
            video_batch_size=args.video_batch_size, num_workers=args.num_workers,
            decode_isolation=args.decode_isolation, decode_timeout=args.decode_timeout, device=args.device,
            dtype=args.dtype, store_dtype=args.store_dtype, latent_scale=args.latent_scale,
            latent_shift=args.latent_shift, vae_tiling=args.vae_tiling, rank=rank, world_size=world,
            staging=args.staging,
            progress=not args.no_progress)
        r = run_preprocess(o)
    except (ValueError, OSError) as e:  # InputError, EncoderError, FormatError are ValueErrors
        print(f"megassm preprocess: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"megassm preprocess: interrupted; finished shards are kept: re-run the same command to resume "
              f"({args.output})", file=sys.stderr)
        return 130
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(r["skipped"].items())) or "none"
    print(f"rank {r['rank']}/{r['world_size']}: {r['processed']} shards written, {r['done_before']} already done "
          f"(of {r['tasks']} in total); skipped inputs: {skipped}")
    if r["manifest"]:
        m = r["manifest"]
        if not m["num_samples"]:
            print(f"megassm preprocess: error: no sample was written: every one of the "
                  f"{m['inputs']['items_seen']} inputs was skipped ({skipped}); see "
                  f"{join(args.output, 'skipped.json')} for each input's reason", file=sys.stderr)
            return 1
        print(f"dataset complete: {m['num_samples']} samples in {m['num_shards']} shards -> "
              f"{join(args.output, 'manifest.json')} (skip report: {join(args.output, 'skipped.json')})")
    else:
        print("other ranks' shards are not finished yet; the last rank to finish writes manifest.json")
    return 0


def add_inspect_data_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "data", help="summarise a latent dataset (counts, shapes, encoders); decode samples to PNG",
        description="Print a latent dataset's sample and shard counts, latent-shape histogram, encoder "
        "identities and normalisation; optionally verify every sample and decode a few through the VAE.")
    p.add_argument("path", help="dataset directory (with manifest.json)")
    p.add_argument("--vae", help="VAE directory: decode --samples samples to PNG (video: frames side by side)")
    p.add_argument("--samples", type=int, default=4, help="how many samples to decode (default 4)")
    p.add_argument("--out", help="folder for the PNGs (default: ./inspect_<dataset name>)")
    p.add_argument("--verify", action="store_true", help="read and check every sample of every shard")
    p.add_argument("--device", default="auto", help="device for decoding (default: auto)")
    p.set_defaults(func=inspect_data_main)
    return p


def inspect_data_main(args: argparse.Namespace) -> int:
    from megassm.data.inspect import decode_previews, describe, verify
    from megassm.data.manifest import load_manifest

    try:
        m = load_manifest(args.path)
        print(describe(m, args.path))
        rc = 0
        if args.verify:
            good, problems = verify(args.path, m)
            print(f"verified {good} samples of {m['num_samples']}; {len(problems)} problems")
            for msg in problems[:20]:
                print(f"  {msg}")
            rc = 1 if problems else 0
        if args.vae:
            out = Path(args.out or f"inspect_{Path(args.path).resolve().name}")
            written = decode_previews(args.path, m, args.vae, args.samples, out, args.device)
            print(f"decoded {len(written)} samples to {out}/")
        return rc
    except (ValueError, OSError) as e:
        print(f"megassm inspect data: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None, prog: str = "python -m megassm.data.cli") -> int:
    parser = argparse.ArgumentParser(prog=prog)
    sub = parser.add_subparsers(dest="command", required=True)
    add_preprocess_parser(sub)
    inspect = sub.add_parser("inspect", help="inspect things").add_subparsers(dest="what", required=True)
    add_inspect_data_parser(inspect)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
