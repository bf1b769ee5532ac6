"""``megassm convert <subcommand>`` and ``megassm inspect checkpoint`` (registered by megassm.cli)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SOURCE_HELP = ("checkpoint: run directory (uses checkpoints/latest), checkpoints/ directory, step_* directory, "
               "consolidated directory or TP-sharded directory")


def parse_size(text: str) -> int:
    from megassm.checkpoint.safetensors_io import parse_size as parse

    return parse(text)


def _config(args) -> dict | None:
    """--config FILE [--set k=v ...] -> RunConfig dict, or None."""
    if not getattr(args, "config", None):
        if getattr(args, "set", None):
            from megassm.config.validate import ConfigError

            raise ConfigError("--set needs --config")
        return None
    from megassm.config.load import to_dict
    from megassm.run_config import load_config

    return to_dict(load_config(args.config, args.set or []))


def print_result(meta: dict, notes: list[str], out: str) -> None:
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    if meta.get("nonfinite_tensors"):
        bad = meta["nonfinite_tensors"]
        print(f"warning: {len(bad)} tensors hold NaN/Inf: {bad[:5]}", file=sys.stderr)
    extra = f", step {meta['step']}" if meta.get("step") is not None else ""
    print(f"wrote {out}: {meta.get('parameters', 0):,} parameters in {meta.get('tensors')} tensors{extra}"
          + (" + EMA" if meta.get("ema") else ""))


def _cmd_zero(args) -> int:
    from megassm.checkpoint.convert import zero_to_consolidated

    meta, notes = zero_to_consolidated(args.source, args.out, tag=args.tag, config=_config(args), dtype=args.dtype,
                                       ema=not args.no_ema, max_shard_bytes=parse_size(args.max_shard_size),
                                       force=args.force)
    print_result(meta, notes, args.out)
    return 0


def _cmd_reshard(args) -> int:
    from megassm.checkpoint.convert import reshard

    meta, notes = reshard(args.source, args.out, tp=args.tp, pp=args.pp, virtual=args.virtual, seq_len=args.seq_len,
                          tag=args.tag, config=_config(args),
                          ema=not args.no_ema, max_shard_bytes=parse_size(args.max_shard_size), force=args.force)
    print_result(meta, notes, args.out)
    return 0


def _cmd_stage(args) -> int:
    from megassm.checkpoint.convert import stage
    from megassm.config.load import to_dict
    from megassm.run_config import load_config

    target = to_dict(load_config(args.target_config, args.set or []))
    meta, report = stage(args.source, target, args.out, tag=args.tag, seed=args.seed, ema=not args.no_ema,
                         max_shard_bytes=parse_size(args.max_shard_size), force=args.force)
    print("\n".join(report))
    print_result(meta, [], args.out)
    return 0


def _cmd_ema(args) -> int:
    from megassm.checkpoint.convert import extract_ema

    meta, notes = extract_ema(args.source, args.out, tag=args.tag, config=_config(args),
                              max_shard_bytes=parse_size(args.max_shard_size), force=args.force)
    print_result(meta, notes, args.out)
    return 0


def _cmd_import_hydra(args) -> int:
    from megassm.checkpoint.hydra_import import import_hydra

    meta, report = import_hydra(args.reference, _config(args), args.out, mapping=args.map, base=args.base,
                                seed=args.seed, max_shard_bytes=parse_size(args.max_shard_size), force=args.force)
    print("\n".join(report))
    print_result(meta, [], args.out)
    return 0


def _cmd_inspect(args) -> int:
    from megassm.checkpoint.inspection import format_report, inspect_checkpoint
    from megassm.checkpoint.load import CheckpointError

    try:
        summary, problems = inspect_checkpoint(args.checkpoint, tag=args.tag, config=_config(args),
                                               scan=not args.no_scan, crc=args.crc)
    except (CheckpointError, OSError) as e:
        if not Path(args.checkpoint).exists():
            raise
        # a checkpoint that is there but unreadable (truncated, corrupt) is a problem found: status 1
        problems = [f"unreadable: {e}"]
        print(json.dumps({"path": str(args.checkpoint), "problems": problems}, indent=1) if args.json else
              f"checkpoint  {args.checkpoint}\nPROBLEM     {problems[0]}")
        return 1
    if args.json:
        print(json.dumps({**summary, "problems": problems}, indent=1, default=str))
    else:
        print(format_report(summary, problems))
    return 1 if problems else 0


def add_source_out(p: argparse.ArgumentParser, source: bool = True, source_help: str = SOURCE_HELP,
                   between: tuple[tuple[str, str], ...] = ()) -> None:
    """What every converter takes (cli.py's too): the ``source`` positional, any positionals ``between`` (name,
    help), the ``out`` directory, and ``--force``."""
    if source:
        p.add_argument("source", help=source_help)
    for name, help_text in between:
        p.add_argument(name, help=help_text)
    p.add_argument("out", help="output directory (written atomically; must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing output")


def _common(p: argparse.ArgumentParser, source: bool = True, config: bool = True) -> None:
    add_source_out(p, source)
    p.add_argument("--tag", default=None, help="step_* directory to read from a run/checkpoints directory "
                   "(default: the one 'latest' names)")
    if config:
        p.add_argument("--config", default=None, help="stage config YAML to use instead of the one stored with the "
                       "checkpoint (needed when none is stored)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override for --config (repeatable)")
    p.add_argument("--max-shard-size", default="5GB", help="split safetensors files above this size (default 5GB)")


def add_convert_parser(sub):
    """``megassm convert`` and its checkpoint converters; returns the converters' subparsers (cli.py adds the
    ones of the packages above checkpoint/: to-diffusers, merge-lora)."""
    c = sub.add_parser("convert", help="convert checkpoints (DeepSpeed -> safetensors, TP reshard, stages, Hydra)",
                       description="Checkpoint converters. Every output is written to a temporary directory beside "
                       "it and renamed into place when complete. docs/checkpoints.md describes the layouts.")
    csub = c.add_subparsers(dest="converter", metavar="CONVERTER")
    csub.required = True
    for add in (_add_zero_to_consolidated, _add_reshard, _add_stage, _add_extract_ema, _add_import_hydra):
        add(csub)
    return csub


def _add_zero_to_consolidated(csub) -> None:
    z = csub.add_parser("zero-to-consolidated", help="DeepSpeed checkpoint (ZeRO-1/2/3, TP) -> consolidated dir",
                        description="Stream a DeepSpeed checkpoint into model.safetensors (+ ema.safetensors, "
                        "config.yaml/json, meta.json). Peak memory: about one tensor.")
    _common(z)
    z.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="output dtype (default fp32)")
    z.add_argument("--no-ema", action="store_true", help="leave the EMA weights out")
    z.set_defaults(func=_cmd_zero)


def _add_reshard(csub) -> None:
    r = csub.add_parser("reshard", help="any checkpoint -> consolidated (--tp 1 --pp 1) or TP x PP sharded layout",
                        description="Rewrite a checkpoint for another layout: one directory per (pp, tp) rank "
                        "holding its pipeline stage's tensors cut for its TP rank; --tp 1 --pp 1 writes a "
                        "consolidated directory. Bit-exact in both directions.")
    _common(r)
    r.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of the output")
    r.add_argument("--pp", type=int, default=1, help="pipeline stages (blocks split as the pipeline trainer does)")
    r.add_argument("--virtual", type=int, default=1, help="virtual stages per pipeline rank (interleaved 1F1B)")
    r.add_argument("--seq-len", type=int, default=None, help="tokens per sample for the stage cost balance "
                   "(default: from the config's data, as the pipeline trainer computes it)")
    r.add_argument("--no-ema", action="store_true", help="leave the EMA weights out")
    r.set_defaults(func=_cmd_reshard)


def _add_stage(csub) -> None:
    s = csub.add_parser("stage", help="warm-start checkpoint for a new stage (e.g. image -> video scan orders)",
                        description="Apply the target stage config's model (scan-order revisions from model.pattern, "
                        "new blocks) to a checkpoint; new parameters get the model's own init. Prints the changes.")
    s.add_argument("source", help=SOURCE_HELP)
    s.add_argument("target_config", help="target stage config YAML, e.g. configs/stage3_video.yaml")
    _common(s, source=False, config=False)
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override for the target config")
    s.add_argument("--seed", type=int, default=None, help="seed of new parameters (default: target train.seed)")
    s.add_argument("--no-ema", action="store_true", help="leave the EMA weights out")
    s.set_defaults(func=_cmd_stage)


def _add_extract_ema(csub) -> None:
    e = csub.add_parser("extract-ema", help="consolidated dir whose model weights are the EMA weights")
    _common(e)
    e.set_defaults(func=_cmd_ema)


def _add_import_hydra(csub) -> None:
    h = csub.add_parser("import-hydra", help="public-reference Hydra weights (goombalab/hydra) -> megassm blocks",
                        description="Map reference Hydra layers (<prefix>in_proj.weight, conv1d.*, dt_bias, A_log, D, "
                        "fc_D.weight, norm.weight, out_proj.weight) onto megassm Hydra blocks' mixers. Other "
                        "tensors come from --base or a fresh init of --config.")
    h.add_argument("reference", help=".safetensors / .pt / .bin state dict, or a directory with model.safetensors")
    _common(h, source=False)
    h.add_argument("--map", action="append", metavar="REF=BLOCK",
                   help="reference layer (the number in its prefix, or the prefix) -> megassm block index; "
                        "repeatable or comma-separated. Default: i-th reference layer -> i-th Hydra block")
    h.add_argument("--base", default=None, help="megassm checkpoint supplying all other tensors")
    h.add_argument("--seed", type=int, default=None, help="seed of fresh tensors (default: config train.seed)")
    h.set_defaults(func=_cmd_import_hydra)


def add_inspect_checkpoint_parser(isub) -> None:
    i = isub.add_parser("checkpoint", help="contents and integrity of a checkpoint (any layout)",
                        description="Print config, step, parameter counts and dtypes; check shapes against the config "
                        "and scan for NaN/Inf. Exit status 1 if a problem is found.")
    i.add_argument("checkpoint", help=SOURCE_HELP)
    i.add_argument("--tag", default=None, help="step_* directory inside a run/checkpoints directory")
    i.add_argument("--config", default=None, help="check against this config instead of the stored one")
    i.add_argument("--set", action="append", metavar="KEY=VALUE", help="override for --config")
    i.add_argument("--no-scan", action="store_true", help="skip the NaN/Inf scan (reads every tensor)")
    i.add_argument("--crc", action="store_true", help="also verify CRC-32 of every DeepSpeed file record")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=_cmd_inspect)
