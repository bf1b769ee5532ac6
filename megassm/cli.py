"""``megassm <command>``: train, sample, eval, preprocess, inspect, convert, plan."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn

from megassm.config.validate import ConfigError

OVERRIDES_HELP = "config overrides as dotted key=value pairs, e.g. train.steps=200 model.d_model=256"


def _cmd_train(args) -> int:
    from megassm.train.signals import install_for_process, uninstall_for_process

    # first: a SIGUSR1 / SIGTERM / SIGINT during the minutes before training is recorded, not fatal
    install_for_process()
    try:
        return _train(args)
    finally:
        uninstall_for_process()


def _train(args) -> int:
    import logging

    from megassm.parallel.mesh import read_dist_env
    from megassm.run_config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    env = read_dist_env()
    # the world size from the launcher's variables: the layout is checked before any process group exists
    cfg = load_config(args.config, args.overrides, world=env.world, quiet=env.rank != 0, training=True)
    from megassm.runtime import check_deepspeed

    try:
        check_deepspeed()
    except RuntimeError as e:
        raise ConfigError(str(e)) from None
    from megassm.train.loop import train

    return train(cfg)


def _parse_size(s: str | None) -> tuple[int, int] | None:
    if not s:
        return None
    try:
        h, w = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size {s!r} must look like HEIGHTxWIDTH in pixels, e.g. 1024x1024") from None
    return h, w


def _read_prompts(args) -> list[dict]:
    items = [{"prompt": p} for p in args.prompt or []]
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise ConfigError(f"--prompts-file {path} does not exist")
        for i, line in enumerate(path.read_text().splitlines()):
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{i + 1}: not valid JSON ({e})") from None
                if "prompt" not in item:
                    raise ConfigError(f"{path}:{i + 1}: JSONL entries need a 'prompt' key")
                items.append(item)
            else:
                items.append({"prompt": line})
    if not items:
        raise ConfigError("no prompt given: use --prompt TEXT (repeatable) or --prompts-file FILE")
    return items


def _cmd_sample(args) -> int:
    from megassm.sample import run_sample_command

    return run_sample_command(args, _read_prompts(args), _parse_size(args.size))


def _cmd_inspect_model(args) -> int:
    from megassm.models.accounting import forward_flops, param_counts
    from megassm.run_config import load_config

    cfg = load_config(args.config, args.overrides)
    m = cfg.model
    counts = param_counts(m)
    print(f"model {m.name}: d_model={m.d_model}, {len(m.pattern)} blocks, pattern {m.pattern}")
    width = max(len(k) for k in counts)
    for k, v in counts.items():
        print(f"  {k:<{width}}  {v:>15,}  ({v / 1e6:,.2f} M)")
    if args.seq_len:
        f = forward_flops(m, args.seq_len)
        print(f"forward FLOPs per sample at L={args.seq_len}: {f:.4g} ({f / args.seq_len:.4g} per token); "
              f"train step x3: {3 * f:.4g}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megassm", description="Train and sample HTH (Hydra + attention) "
                                "diffusion models. Each command has its own --help.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("train", help="train a model from a stage config", description=(
        "Train from a YAML config (configs/*.yaml). Runs as one process without a launcher, under torchrun, "
        "or under srun (SLURM). Resumes automatically from RUN_DIR/checkpoints/latest (train.resume_from=TAG "
        "picks another); SIGUSR1/SIGTERM/SIGINT write a checkpoint and exit (0; 130 after SIGINT), before "
        "training starts they exit at once; a second Ctrl-C aborts without a checkpoint."))
    t.add_argument("config", help="stage config YAML, e.g. configs/smoke.yaml")
    t.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    t.set_defaults(func=_cmd_train)

    s = sub.add_parser("sample", help="generate images/videos from a checkpoint", description=(
        "Text to image/video with the Euler flow-matching sampler and classifier-free guidance. Writes PNG "
        "(images) or MP4 (videos) plus a JSON sidecar with every setting. Under torchrun/srun with N ranks the "
        "token sequence is split over all N (Ulysses context parallel) and rank 0 writes the outputs."))
    s.add_argument("checkpoint", help="run directory, DeepSpeed checkpoint (step_*) or consolidated directory")
    s.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    s.add_argument("--prompts-file", help="file with one prompt per line, or JSONL with prompt/seed/size/frames "
                   "(or latent_frames)")
    s.add_argument("--negative-prompt", default=None, help="negative prompt for the unconditional branch")
    s.add_argument("--out", default="sample.png", help="output file (.png / .mp4); several prompts get _N suffixes")
    s.add_argument("--size", default=None, help="HEIGHTxWIDTH in pixels (default: the model's training size, "
                   "from its run config: previews / buckets / the datasets' most common shape)")
    s.add_argument("--frames", type=int, default=None, help="output frames, as `preprocess --frames`: 1 = an "
                   "image, videos 1 + k * the VAE's temporal stride (e.g. 33 for Wan's 4); default: the model's "
                   "training shape")
    s.add_argument("--latent-frames", type=int, default=None, help="the same in latent frames (instead of --frames)")
    s.add_argument("--fps", type=int, default=16, help="frames per second of written videos")
    s.add_argument("--steps", type=int, default=None, help="sampling steps (default: config diffusion.sample_steps)")
    s.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default: diffusion.cfg_scale)")
    s.add_argument("--seed", type=int, default=0, help="base seed; prompt i uses seed+i unless its JSONL sets one")
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    s.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    s.add_argument("--vae", default=None, help="override encoders.vae (local diffusers directory)")
    s.add_argument("--text-encoder", default=None, help="override encoders.text_encoder (local directory)")
    s.add_argument("--lora", default=None, metavar="DIR", help="apply LoRA adapters (unmerged) from DIR, e.g. "
                   "RUN/checkpoints/step_N/lora, to the checkpoint's weights")
    s.add_argument("--save-latents", action="store_true", help="also write each sample's final latents "
                   "(.latents.safetensors) next to it")
    s.set_defaults(func=_cmd_sample)

    i = sub.add_parser("inspect", help="inspect a model config, a data set or a checkpoint")
    isub = i.add_subparsers(dest="what", metavar="WHAT")
    isub.required = True
    im = isub.add_parser("model", help="parameter count per component (and FLOPs) of a config")
    im.add_argument("config")
    im.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    im.add_argument("--seq-len", type=int, default=None, help="also print FLOPs at this token count")
    im.set_defaults(func=_cmd_inspect_model)
    _optional_commands(sub, isub)
    return p


def _optional_commands(sub, isub) -> None:
    """Commands whose parsers live beside their code (data, checkpoint tools, planning, evaluation)."""
    from megassm.checkpoint.cli import add_convert_parser, add_inspect_checkpoint_parser
    from megassm.data.cli import add_inspect_data_parser, add_preprocess_parser
    from megassm.evaluate import add_eval_parser
    from megassm.plan import add_plan_parser

    add_preprocess_parser(sub)
    add_inspect_data_parser(isub)
    csub = add_convert_parser(sub)
    _add_to_diffusers(csub)  # converters of the packages above checkpoint/, after its own (the help's order)
    _add_merge_lora(csub)
    add_plan_parser(sub)
    add_inspect_checkpoint_parser(isub)
    add_eval_parser(sub)


# -- `megassm convert` subcommands that use the packages above checkpoint/ (diffusers, sample + lora) --------------
def _cmd_to_diffusers(args) -> int:
    from megassm.checkpoint.cli import print_result
    from megassm.diffusers.convert import to_diffusers

    meta, notes = to_diffusers(args.source, args.out, use_ema=not args.no_ema, vae=args.vae,
                               text_encoder=args.text_encoder, tokenizer=args.tokenizer, dtype=args.dtype,
                               force=args.force)
    print_result(meta, notes, args.out)
    return 0


def _cmd_merge_lora(args) -> int:
    from megassm.checkpoint.cli import print_result
    from megassm.sample import merge_lora_checkpoint

    meta, notes = merge_lora_checkpoint(args.source, args.adapters, args.out, use_ema=not args.no_ema,
                                        force=args.force)
    print_result(meta, notes, args.out)
    return 0


def _add_to_diffusers(csub) -> None:
    from megassm.checkpoint.cli import add_source_out

    d = csub.add_parser("to-diffusers", help="any checkpoint -> diffusers pipeline directory (HTHPipeline)",
                        description="Write model_index.json, transformer/ (megassm.diffusers.HTHTransformerModel), "
                        "vae/, text_encoder/, tokenizer/ and scheduler/ for megassm.diffusers.HTHPipeline."
                        "from_pretrained(OUT). With builtin encoders only transformer/ is written.")
    add_source_out(d)
    d.add_argument("--no-ema", action="store_true", help="use the model weights even if EMA weights are stored")
    d.add_argument("--vae", default=None, help="override encoders.vae (local diffusers directory)")
    d.add_argument("--text-encoder", default=None, help="override encoders.text_encoder (local directory)")
    d.add_argument("--tokenizer", default=None, help="override encoders.tokenizer (local directory)")
    d.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="transformer dtype")
    d.set_defaults(func=_cmd_to_diffusers)


def _add_merge_lora(csub) -> None:
    from megassm.checkpoint.cli import SOURCE_HELP, add_source_out

    m = csub.add_parser("merge-lora", help="base checkpoint + LoRA adapters -> consolidated dir, adapters folded in",
                        description="Fold LoRA adapters (a checkpoints/step_*/lora directory, peft layout) into the "
                        "base weights: W += alpha / rank * B A. The base's EMA weights are used when stored.")
    add_source_out(m, source_help="base " + SOURCE_HELP,
                   between=(("adapters", "adapter directory (adapter_config.json + adapter_model.safetensors)"),))
    m.add_argument("--no-ema", action="store_true", help="merge into the base's model weights, not its EMA")
    m.set_defaults(func=_cmd_merge_lora)


def _close_process_group() -> None:
    """After a command that ran distributed returned: destroy its process group (the groups DeepSpeed still
    holds live on, threads and all: ``entry`` therefore ends such a process through ``end_process``)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        global _RAN_COLLECTIVES
        _RAN_COLLECTIVES = True


_RAN_COLLECTIVES = False  # this process had a process group: entry() ends it without the finalization


def _ran_collectives() -> bool:
    dist = sys.modules.get("torch.distributed")
    return _RAN_COLLECTIVES or bool(dist is not None and dist.is_available() and dist.is_initialized())


def end_process(code: int) -> NoReturn:
    """End a process that ran collectives, skipping the interpreter's finalization.

    destroy_process_group does not free the groups that DeepSpeed still holds (its mpu, the engine kept
    by its hooks), so their C++ threads (gloo's run loops, NCCL's watchdog) live on into finalization.
    A thread that finishes a collective then and needs the GIL -- to run a future's Python callback or
    release a tensor's Python object -- is stopped by CPython mid-destructor, and the C++ runtime aborts
    the process: "terminate called without an active exception", SIGABRT, after everything was written
    (rank 0 of a 2-rank run stopped by a signal during start-up, in CI). So this does what finalization
    would that matters -- stops idle pool workers and waits for non-daemon threads, runs the atexit
    handlers (logging's flush, multiprocessing's children, W&B, Inductor's worker pools), flushes stdio --
    while the interpreter is whole, then leaves with ``os._exit``.
    """
    import atexit
    import os
    import threading

    # CPython's finalization calls these two first: the threading module's exit hooks (which stop idle
    # thread-pool workers) then a join of the non-daemon threads; then the atexit handlers
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can reach it
            pass
    os._exit(code)


def _config_keys(node=None, prefix: str = "") -> list[str]:
    """Every dotted key of RunConfig (nested sections' defaults included)."""
    import dataclasses

    from megassm.config.load import _field_default
    from megassm.config.schema import RunConfig

    node = RunConfig() if node is None else node
    keys = []
    for f in dataclasses.fields(node):
        sub = _field_default(node, f.name)
        keys += _config_keys(sub, f"{prefix}{f.name}.") if dataclasses.is_dataclass(sub) else [prefix + f.name]
    return keys


def _unknown_args_hint(command: str, unknown: list[str]) -> str:
    """Flags given where config overrides go (``megassm train cfg.yaml --steps 10``): the key=value spelling."""
    hints = []
    keys = _config_keys()
    for i, tok in enumerate(unknown):
        if not tok.startswith("--"):
            continue
        name, _, value = tok[2:].partition("=")
        name = name.replace("-", "_")
        if not value and i + 1 < len(unknown) and not unknown[i + 1].startswith("--"):
            value = unknown[i + 1]
        if name in ("resume", "resume_from", "auto_resume"):
            hints.append("resuming is automatic: megassm train continues from RUN_DIR/checkpoints/latest "
                         "(a new run_dir=... starts afresh; init_from=CKPT warm-starts from another run)")
            continue
        found = [k for k in keys if k == name or k.endswith("." + name)]
        if found:
            hints.append(f"config values are overrides written key=value: {found[0]}={value or 'VALUE'}"
                         + (f" (or one of {', '.join(found[1:4])})" if len(found) > 1 else ""))
    if command in ("train", "plan") or (command == "inspect" and hints):
        hints = hints or [f"config values are overrides written key=value, e.g. train.steps=10 ({OVERRIDES_HELP})"]
    return "".join(f"  hint: {h}\n" for h in hints)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.exit(2, f"megassm {args.command}: error: unrecognized arguments: {' '.join(unknown)}\n"
                    f"{_unknown_args_hint(args.command, unknown)}")
    try:
        code = int(args.func(args) or 0)
        _close_process_group()
        return code
    except ConfigError as e:
        print(f"megassm {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        if type(e).__module__.startswith("megassm") or isinstance(e, FileNotFoundError):
            print(f"megassm {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


def entry() -> NoReturn:
    """The ``megassm`` console script and ``python -m megassm``: ``main()``, then the process ends --
    through ``end_process`` where it ran collectives (an exception's traceback is printed first)."""
    try:
        code = main()
    except Exception:
        if not _ran_collectives():
            raise
        import traceback

        traceback.print_exc()
        code = 1
    if _ran_collectives():
        end_process(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
