"""The rules of a config, checked before any process group or model exists.

``validate(cfg, rules)``   the rules that hold for any stored config (also run when a checkpoint's config is
                    read back): values, combinations, the parallel regimes, previews, evaluation, LoRA; and, at
                    their place in that order, the rules that need a package's knowledge (``PackageRules``:
                    ModelConfig's, next to the models; the model sizes each parallel degree must divide; data
                    locations and buckets);
``check_run(cfg, world, rules)``  what a config loaded to run must also satisfy: the world size fits the
                    degrees, optional packages are installed, and the files it names exist.

config/ imports no other megassm package: the gate that runs both with every package's rules is
``megassm/run_config.py`` (``load_config``, ``from_dict``). Every error is a ``ConfigError`` naming the key and
what would be valid.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megassm.config.schema import (
    CP_IMPLS,
    LORA_TARGETS,
    WANDB_MODES,
    DataConfig,
    ModelConfig,
    ParallelConfig,
    RunConfig,
)
from megassm.config.tags import COMPLETE, complete_tags


class ConfigError(ValueError):
    """A config value, key or combination is invalid. The message says what would be valid."""


@dataclass(frozen=True)
class PackageRules:
    """The rules that need a package's knowledge, run by ``validate`` / ``check_run`` at their place in the
    order; each raises ``ConfigError`` (``data_location``: ``ValueError``, named as the key's ``ConfigError`` here).
    ``megassm/run_config.py`` passes the packages' own."""

    model: Callable[[ModelConfig], None]  # ModelConfig's rules (models/rules.py: the mixer registry's)
    data_location: Callable[[str, str], None]  # (location, key): a data.paths entry's form (ValueError)
    parallel_model: Callable[[RunConfig], None]  # the model sizes the degrees divide (parallel/rules.py)
    buckets: Callable[[RunConfig, bool], None]  # data.buckets; with the manifests when True (data/)
    world: Callable[[ParallelConfig, int], None]  # tp x cp x pp fits the world size (parallel/rules.py)


def check_run(cfg: RunConfig, world: int | None, rules: PackageRules) -> None:
    """The rules of a config loaded to run (module doc); ``world``: the launch's world size, when known."""
    if world is not None:
        rules.world(cfg.parallel, world)
    check_extras(cfg)
    check_resume_from(cfg)
    rules.buckets(cfg, True)  # again, now with the datasets' manifests
    check_preview_sources(cfg)
    check_eval_sources(cfg)


def check_extras(cfg: RunConfig) -> None:
    """Optional packages the config asks for must be installed (checked when a config is loaded to run,
    not when a checkpoint's stored config is read back)."""
    if cfg.logging.wandb is not None and not _importable("wandb"):
        raise ConfigError("logging.wandb is set but the wandb package is not installed: "
                          "pip install megassm[wandb] (or drop logging.wandb / set logging.wandb=null)")


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {list(allowed)}")


def validate(cfg: RunConfig, rules: PackageRules) -> None:
    """The rules of any stored config (module doc), the packages' (``rules``) at their place."""
    rules.model(cfg.model)
    validate_data(cfg.data, rules)
    check_choice("optim.schedule", cfg.optim.schedule, ["constant", "cosine"])
    check_choice("train.precision", cfg.train.precision, ["auto", "fp32", "bf16"])
    check_choice("train.activation_checkpointing", cfg.train.activation_checkpointing, ["none", "all", "every_k"])
    if not 0.0 <= cfg.diffusion.caption_dropout < 1.0:
        raise ConfigError(f"diffusion.caption_dropout={cfg.diffusion.caption_dropout} must be in [0, 1)")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay={cfg.train.ema_decay} must be in [0, 1) (0 disables EMA)")
    validate_parallel(cfg, rules)
    if cfg.train.micro_batch_size < 1 or cfg.train.grad_accum < 1 or cfg.train.steps < 0:
        raise ConfigError("train.micro_batch_size and train.grad_accum must be >= 1, train.steps >= 0")
    validate_profile(cfg.train.profile, cfg.train.steps)
    validate_checkpointing(cfg.train)
    if cfg.logging.wandb is not None:
        check_choice("logging.wandb.mode", cfg.logging.wandb.mode, list(WANDB_MODES))
        if not cfg.logging.wandb.project:
            raise ConfigError("logging.wandb.project must be a non-empty W&B project name")

    check_choice("train.loss_reduction", cfg.train.loss_reduction, ["sample", "token"])
    rules.buckets(cfg, False)
    validate_previews(cfg)
    validate_eval(cfg)
    validate_finetune(cfg)


def validate_data(d: DataConfig, rules: PackageRules) -> None:
    check_choice("data.kind", d.kind, ["procedural", "shards"])
    if d.kind == "shards" and not d.paths:
        raise ConfigError("data.kind=shards needs data.paths (dataset directories written by `megassm preprocess`)")
    if d.weights and len(d.weights) != len(d.paths):
        raise ConfigError(f"data.weights has {len(d.weights)} entries but data.paths has {len(d.paths)}")
    if d.kind == "shards":
        for i, p in enumerate(d.paths):
            try:
                rules.data_location(str(p), f"data.paths[{i}]")
            except ValueError as e:
                raise ConfigError(str(e)) from None
    check_choice("data.latent_norm", d.latent_norm, ["manifest", "config"])
    check_choice("data.text_dtype", d.text_dtype, ["float32", "bfloat16"])
    if d.frames < 1 or d.prefetch < 1 or d.num_workers < 0:
        raise ConfigError("data.frames and data.prefetch must be >= 1 and data.num_workers >= 0")
    check_choice("data.order", d.order, ["global", "rank"])
    if d.window_shards < 1:
        raise ConfigError(f"data.window_shards={d.window_shards} must be >= 1")
    if d.read_ahead_samples < 1:
        raise ConfigError(f"data.read_ahead_samples={d.read_ahead_samples} must be >= 1 (samples each loader worker "
                          "reads ahead from pipe: datasets in data.order=global; default 256)")
    if not isinstance(d.stall_timeout_s, (int, float)) or not d.stall_timeout_s > 0:
        raise ConfigError(f"data.stall_timeout_s={d.stall_timeout_s!r} must be a number of seconds > 0 (the longest "
                          "the trainer waits for one batch before it fails naming the shard being read; "
                          "default 600)")


def validate_parallel(cfg: RunConfig, rules: PackageRules) -> None:
    """The degrees, the two regimes (ZeRO-3 + TP + CP; PP + TP + CP + ZeRO-1), the pipeline's schedule rules,
    and the model sizes the degrees must divide."""
    check_choice("parallel.zero_stage", cfg.parallel.zero_stage, [0, 1, 2, 3])
    check_choice("parallel.cp_impl", cfg.parallel.cp_impl, CP_IMPLS)
    p = cfg.parallel
    for k in ("tp", "cp", "pp"):
        if getattr(p, k) < 1:
            raise ConfigError(f"parallel.{k}={getattr(p, k)} must be >= 1")
    if p.pp > 1 and p.zero_stage != 1:
        raise ConfigError(
            f"parallel.pp={p.pp} with parallel.zero_stage={p.zero_stage} is not supported. megassm has two "
            "regimes: (a) ZeRO-3 + TP + CP (+DP), pp=1 -- the default for hth-5b; (b) PP + TP + CP with "
            "zero_stage=1 (DeepSpeed's ZeRO-2/3 do not run under a pipeline, and ZeRO-0's gradient clipping "
            "would leave the later stages out of the gradient norm). Set parallel.zero_stage=1 or parallel.pp=1."
        )
    if p.pp > 1 and cfg.train.grad_accum != 1:
        raise ConfigError(f"train.grad_accum={cfg.train.grad_accum} with parallel.pp={p.pp}: the pipeline accumulates "
                          f"its micro-batches; set parallel.micro_batches (now {p.micro_batches}) instead and "
                          "train.grad_accum=1")
    if p.micro_batches < 1 or p.virtual_stages < 1:
        raise ConfigError(f"parallel.micro_batches={p.micro_batches} and parallel.virtual_stages={p.virtual_stages} "
                          "must be >= 1")
    if p.virtual_stages > 1:
        if p.pp == 1:
            raise ConfigError(f"parallel.virtual_stages={p.virtual_stages} needs parallel.pp > 1 (interleaved 1F1B)")
        if p.micro_batches % p.pp:
            raise ConfigError(f"parallel.virtual_stages={p.virtual_stages}: interleaved 1F1B needs "
                              f"parallel.micro_batches ({p.micro_batches}) to be a multiple of parallel.pp ({p.pp})")
    if p.pp * p.virtual_stages > len(cfg.model.pattern):
        raise ConfigError(f"parallel.pp={p.pp} x parallel.virtual_stages={p.virtual_stages} stages exceed the "
                          f"number of blocks ({len(cfg.model.pattern)}, model.pattern={cfg.model.pattern!r})")
    rules.parallel_model(cfg)
    if p.offload_params and p.zero_stage != 3:
        raise ConfigError("parallel.offload_params needs parallel.zero_stage=3")
    validate_zero_options(p)
    if cfg.model.fp8 != "none" and p.tp > 1:
        raise ConfigError(f"model.fp8={cfg.model.fp8} with parallel.tp={p.tp}: FP8 linears are not wired into the "
                          "tensor-parallel linears yet; set model.fp8=none or parallel.tp=1")
    if cfg.model.compile != "none" and cfg.finetune.lora is not None:
        raise ConfigError("model.compile=blocks with finetune.lora is not proven (LoRA's ZeRO-3 leaves and the "
                          "compiled blocks' leaves differ); set model.compile=none for LoRA fine-tuning")
    if cfg.model.fp8 != "none" and cfg.finetune.lora is not None:
        raise ConfigError(f"model.fp8={cfg.model.fp8} with finetune.lora: LoRA wraps the linears FP8 would take; "
                          "set model.fp8=none for LoRA fine-tuning")


# DeepSpeed zero_optimization keys megassm passes through (parallel.zero_options) and their kind
ZERO_OPTIONS = {"stage3_param_persistence_threshold": "count", "stage3_prefetch_bucket_size": "count",
                "stage3_max_live_parameters": "count", "stage3_max_reuse_distance": "count",
                "reduce_bucket_size": "count", "allgather_bucket_size": "count", "overlap_comm": "bool",
                "contiguous_gradients": "bool", "memory_efficient_linear": "bool"}


def validate_zero_options(p) -> None:
    for key, value in p.zero_options.items():
        kind = ZERO_OPTIONS.get(key)
        if kind is None:
            raise ConfigError(f"parallel.zero_options.{key} is not a key megassm passes to DeepSpeed; valid: "
                              f"{sorted(ZERO_OPTIONS)}")
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = isinstance(value, bool) if kind == "bool" else number and value >= 0 and float(value).is_integer()
        if not ok:
            want = "true or false" if kind == "bool" else "a whole number >= 0 (1.0e+9 is fine)"
            raise ConfigError(f"parallel.zero_options.{key}={value!r} must be {want}")
        if p.zero_stage != 3 and key.startswith("stage3_"):
            raise ConfigError(f"parallel.zero_options.{key} applies to ZeRO-3 only; parallel.zero_stage="
                              f"{p.zero_stage}")


def validate_finetune(cfg: RunConfig) -> None:
    lora = cfg.finetune.lora
    if lora is None:
        return
    if lora.rank < 1 or lora.alpha <= 0 or not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"finetune.lora: rank={lora.rank} must be >= 1, alpha={lora.alpha} > 0 and "
                          f"dropout={lora.dropout} in [0, 1)")
    bad = [t for t in lora.targets if t not in LORA_TARGETS]
    if bad or not lora.targets:
        raise ConfigError(f"finetune.lora.targets={lora.targets}: unknown or empty; valid kinds: {list(LORA_TARGETS)}")
    p = cfg.parallel
    if p.pp > 1:
        raise ConfigError(f"finetune.lora with parallel.pp={p.pp} is not supported yet (the pipeline trainer "
                          "does not export adapters); use pp=1: LoRA runs under dp, tp, cp and every ZeRO stage")
    if p.tp > 1 and lora.dropout > 0:
        # a column-parallel adapter's replicated A x would see a different dropout mask on each TP rank
        raise ConfigError(f"finetune.lora.dropout={lora.dropout} with parallel.tp={p.tp}: adapter dropout needs "
                          "the same mask on every TP rank, which megassm does not draw; use dropout=0.0 under TP")


def validate_checkpointing(t) -> None:
    """train.keep_last / ckpt_every / resume_from (``TrainConfig``): values only; whether resume_from names a
    checkpoint of the run directory is checked when the run starts (``check_resume_from``)."""
    if t.keep_last < 0:
        raise ConfigError(f"train.keep_last={t.keep_last} must be >= 0: N keeps the newest N checkpoints, "
                          "0 keeps every checkpoint")
    if t.ckpt_every < 1:
        raise ConfigError(f"train.ckpt_every={t.ckpt_every} must be >= 1 (steps between checkpoints)")


def check_resume_from(cfg: RunConfig) -> None:
    """train.resume_from names a complete checkpoint of run_dir/checkpoints (whether its files are whole is
    checked when the run resumes: ``megassm/train/checkpoint.py: resume_tag``)."""
    tag = cfg.train.resume_from
    if not tag:
        return
    ckpt_dir = Path(cfg.run_dir) / "checkpoints"
    if Path(tag).name != tag or tag in (".", ".."):
        raise ConfigError(f"train.resume_from={tag!r} must be the name of a checkpoint directory in {ckpt_dir}, "
                          "e.g. step_00000400, not a path")
    if not (ckpt_dir / tag / COMPLETE).is_file():
        valid = complete_tags(ckpt_dir) if ckpt_dir.is_dir() else []
        why = "has no COMPLETE file (a partial save)" if (ckpt_dir / tag).is_dir() else "does not exist"
        raise ConfigError(f"train.resume_from={tag}: {ckpt_dir / tag} {why}; the complete checkpoints of this run, "
                          f"oldest first: {', '.join(valid) or 'none'}")


def validate_profile(p, train_steps: int) -> None:
    if p.steps < 0:
        raise ConfigError(f"train.profile.steps={p.steps} must be >= 0 (0 disables profiling)")
    if p.start_step < 1:
        raise ConfigError(f"train.profile.start_step={p.start_step} must be >= 1 (steps are numbered from 1)")
    if not p.ranks or any(r < 0 for r in p.ranks) or len(set(p.ranks)) != len(p.ranks):
        raise ConfigError(f"train.profile.ranks={list(p.ranks)} must be a non-empty list of distinct global "
                          "ranks >= 0, e.g. [0] or [0, 8]")
    last = p.start_step + p.steps - 1
    if p.steps and last > train_steps:
        raise ConfigError(f"train.profile covers steps {p.start_step}..{last} but train.steps={train_steps}; "
                          f"lower train.profile.start_step or train.profile.steps")


# -- training previews (megassm/train/preview.py) ------------------------------------------------------


def read_prompt_lines(path: str | Path) -> list[str]:
    """The prompts of a preview prompts file: one per line, blank lines and '#' comments skipped."""
    lines = (line.strip() for line in Path(path).read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def validate_previews(cfg: RunConfig) -> None:
    """The preview fields' own rules (those that hold for a stored config too)."""
    t = cfg.train
    if t.preview_prompts is not None and t.preview_prompts_file is not None:
        raise ConfigError(f"train.preview_prompts ({len(t.preview_prompts)} prompts) and train.preview_prompts_file="
                          f"{t.preview_prompts_file!r} are both set; give one of them")
    if t.preview_prompts is not None:
        if not t.preview_prompts:
            raise ConfigError("train.preview_prompts=[] is empty; list at least one prompt, or leave it unset "
                              "(null) for train.preview_prompts_file or the demo's prompts")
        for i, p in enumerate(t.preview_prompts):
            if not p.strip():
                raise ConfigError(f"train.preview_prompts[{i}] is blank; every preview prompt needs some text")
    shape = t.preview_latent_shape
    if shape is not None:
        pf = list(cfg.model.patch_size)
        if len(shape) != 3 or any(s < 1 for s in shape) or any(s % p for s, p in zip(shape, pf)):
            raise ConfigError(f"train.preview_latent_shape={list(shape)} must be three positive ints [frames, "
                              f"height, width] of the latent, each a multiple of model.patch_size={pf}")


def check_preview_sources(cfg: RunConfig) -> None:
    """At load (not for a checkpoint's stored config): the prompts file exists and holds prompts, and a run
    that previews data other than the demo's names its prompts."""
    t = cfg.train
    if t.preview_prompts_file is not None:
        path = Path(t.preview_prompts_file)
        if not path.is_file():
            raise ConfigError(f"train.preview_prompts_file={t.preview_prompts_file!r}: no such file "
                              f"({path.resolve()}); give a text file with one prompt per line")
        if not read_prompt_lines(path):
            raise ConfigError(f"train.preview_prompts_file={t.preview_prompts_file!r} holds no prompts (only "
                              "blank lines or '#' comments); write one prompt per line")
    if t.sample_every > 0 and cfg.data.kind != "procedural" and t.preview_prompts is None \
            and t.preview_prompts_file is None:
        raise ConfigError(f"train.sample_every={t.sample_every} with data.kind={cfg.data.kind} needs "
                          "train.preview_prompts or train.preview_prompts_file (the built-in prompts describe "
                          "only the procedural demo data); or set train.sample_every=0")


# -- evaluation (megassm/eval/) ------------------------------------------------------------------------


def validate_eval(cfg: RunConfig) -> None:
    """The eval fields' own rules (those that hold for a stored config too)."""
    e, t = cfg.eval, cfg.train
    if t.eval_every < 0:
        raise ConfigError(f"train.eval_every={t.eval_every} must be >= 0 (0 disables evaluation during training)")
    for k in ("samples", "batch_size", "kid_subset_size", "kid_subsets"):
        if getattr(e, k) < 1:
            raise ConfigError(f"eval.{k}={getattr(e, k)} must be >= 1")
    if e.prompts is not None and e.prompts_file is not None:
        raise ConfigError(f"eval.prompts ({len(e.prompts)} prompts) and eval.prompts_file={e.prompts_file!r} are "
                          "both set; give one of them")
    if e.prompts is not None and (not e.prompts or any(not p.strip() for p in e.prompts)):
        raise ConfigError("eval.prompts must list non-blank prompts, or be null for the previews' prompts")
    if (e.inception is None) != (e.reference is None) and t.eval_every > 0:
        raise ConfigError(f"train.eval_every={t.eval_every}: KID needs both eval.inception ({e.inception!r}) and "
                          f"eval.reference ({e.reference!r}); set both, or neither")
    if t.eval_every > 0 and cfg.parallel.pp > 1:
        raise ConfigError(f"train.eval_every={t.eval_every} with parallel.pp={cfg.parallel.pp}: evaluation during "
                          "training runs without pipeline parallelism; set train.eval_every=0 and run `megassm eval`")


def check_eval_sources(cfg: RunConfig) -> None:
    """At load (not for a checkpoint's stored config): the files train.eval_every will read exist."""
    e = cfg.eval
    if cfg.train.eval_every <= 0:
        return
    if not e.paths and cfg.data.kind != "procedural":
        raise ConfigError(f"train.eval_every={cfg.train.eval_every} with data.kind={cfg.data.kind} needs eval.paths "
                          "(validation datasets written by `megassm preprocess`) for the held-out loss")
    for key in ("clip_model", "inception", "reference", "prompts_file", "video_features"):
        path = getattr(e, key)
        if path is not None and not Path(path).exists():
            raise ConfigError(f"eval.{key}={path!r}: no such file or directory ({Path(path).resolve()}); nothing is "
                              "downloaded, give a local path (README: Evaluation)")
    for p in e.paths:
        if not Path(p).is_dir():
            raise ConfigError(f"eval.paths: {p!r} is not a dataset directory written by `megassm preprocess`")
