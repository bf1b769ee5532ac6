"""The validation gate: every rule a config must satisfy, checked before any process group or model exists.

``validate(cfg)``   the rules that hold for any stored config (also run when a checkpoint's config is read
                    back): values, combinations, the parallel regimes, the model sizes each parallel degree
                    must divide (``ParallelDims.check_model``, pure arithmetic), previews, evaluation, LoRA;
``check_run(cfg, world)``  what a config loaded to run must also satisfy: the world size fits the degrees,
                    optional packages are installed, and the files it names exist.

``load_config`` (load.py) runs both. Every error is a ``ConfigError`` naming the key and what would be valid.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megassm.config.schema import (
    ATTENTION_BACKENDS,
    CP_IMPLS,
    FP8_RECIPES,
    HYDRA_PATHS,
    LORA_TARGETS,
    TORCHAO_PIN,
    WANDB_MODES,
    DataConfig,
    ParallelConfig,
    RunConfig,
)


class ConfigError(ValueError):
    """A config value, key or combination is invalid. The message says what would be valid."""


def check_run(cfg: RunConfig, world: int | None = None) -> None:
    """The rules of a config loaded to run (module doc); ``world``: the launch's world size, when known."""
    if world is not None:
        check_world(cfg.parallel, world)
    check_extras(cfg)
    check_resume_from(cfg)
    validate_buckets(cfg)  # again, now with the datasets' manifests
    check_preview_sources(cfg)
    check_eval_sources(cfg)


def check_world(p: ParallelConfig, world: int) -> None:
    """tp x cp x pp must divide the world size (dp = world / (tp x cp x pp)); ``ParallelDims``'s own rule."""
    from megassm.parallel.mesh import MeshError, ParallelDims

    try:
        ParallelDims(world=world, tp=p.tp, cp=p.cp, pp=p.pp)
    except MeshError as e:
        raise ConfigError(f"parallel.tp={p.tp} cp={p.cp} pp={p.pp} on {world} processes: {e}") from None


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


def _choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {list(allowed)}")


def validate_model(m) -> None:
    from megassm.models.mixers import pattern_errors, spec_errors  # the registry of mixer kinds

    for msg in pattern_errors(m.pattern):
        raise ConfigError(msg)
    if len(m.patch_size) != 3 or any(p < 1 for p in m.patch_size):
        raise ConfigError(f"model.patch_size={list(m.patch_size)} must be three positive ints (pt, ph, pw)")
    if m.d_model % m.num_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}")
    for msg in spec_errors(m):  # each kind's own rules (Hydra's widths, RoPE's even head dim, ...)
        raise ConfigError(msg)
    _choice("model.ssd_impl", m.ssd_impl, ["auto", "ref", "triton"])
    _choice("model.attention_backend", m.attention_backend, list(ATTENTION_BACKENDS))
    _choice("model.hydra_path", m.hydra_path, list(HYDRA_PATHS))
    _choice("model.fp8", m.fp8, list(FP8_RECIPES))
    _choice("model.compile", m.compile, ["none", "blocks"])
    if m.fp8 != "none" and not _importable("torchao"):
        raise ConfigError(f"model.fp8={m.fp8} needs torchao, which is not installed: pip install {TORCHAO_PIN} "
                          "(or set model.fp8=none)")
    for k in ("d_model", "d_state", "chunk_size", "text_dim", "max_text_len"):
        if getattr(m, k) < 1:
            raise ConfigError(f"model.{k}={getattr(m, k)} must be >= 1")


def validate(cfg: RunConfig) -> None:
    validate_model(cfg.model)
    validate_data(cfg.data)
    _choice("optim.schedule", cfg.optim.schedule, ["constant", "cosine"])
    _choice("train.precision", cfg.train.precision, ["auto", "fp32", "bf16"])
    _choice("train.activation_checkpointing", cfg.train.activation_checkpointing, ["none", "all", "every_k"])
    if not 0.0 <= cfg.diffusion.caption_dropout < 1.0:
        raise ConfigError(f"diffusion.caption_dropout={cfg.diffusion.caption_dropout} must be in [0, 1)")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay={cfg.train.ema_decay} must be in [0, 1) (0 disables EMA)")
    validate_parallel(cfg)
    if cfg.train.micro_batch_size < 1 or cfg.train.grad_accum < 1 or cfg.train.steps < 0:
        raise ConfigError("train.micro_batch_size and train.grad_accum must be >= 1, train.steps >= 0")
    validate_profile(cfg.train.profile, cfg.train.steps)
    validate_checkpointing(cfg.train)
    if cfg.logging.wandb is not None:
        _choice("logging.wandb.mode", cfg.logging.wandb.mode, list(WANDB_MODES))
        if not cfg.logging.wandb.project:
            raise ConfigError("logging.wandb.project must be a non-empty W&B project name")

    _choice("train.loss_reduction", cfg.train.loss_reduction, ["sample", "token"])
    validate_buckets(cfg, manifests=False)
    validate_previews(cfg)
    validate_eval(cfg)
    validate_finetune(cfg)


def validate_data(d: DataConfig) -> None:
    _choice("data.kind", d.kind, ["procedural", "shards"])
    if d.kind == "shards" and not d.paths:
        raise ConfigError("data.kind=shards needs data.paths (dataset directories written by `megassm preprocess`)")
    if d.weights and len(d.weights) != len(d.paths):
        raise ConfigError(f"data.weights has {len(d.weights)} entries but data.paths has {len(d.paths)}")
    if d.kind == "shards":
        from megassm.data.remote import check_location

        for i, p in enumerate(d.paths):
            try:
                check_location(str(p), f"data.paths[{i}]")
            except ValueError as e:
                raise ConfigError(str(e)) from None
    _choice("data.latent_norm", d.latent_norm, ["manifest", "config"])
    _choice("data.text_dtype", d.text_dtype, ["float32", "bfloat16"])
    if d.frames < 1 or d.prefetch < 1 or d.num_workers < 0:
        raise ConfigError("data.frames and data.prefetch must be >= 1 and data.num_workers >= 0")
    _choice("data.order", d.order, ["global", "rank"])
    if d.window_shards < 1:
        raise ConfigError(f"data.window_shards={d.window_shards} must be >= 1")
    if d.read_ahead_samples < 1:
        raise ConfigError(f"data.read_ahead_samples={d.read_ahead_samples} must be >= 1 (samples each loader worker "
                          "reads ahead from pipe: datasets in data.order=global; default 256)")
    if not isinstance(d.stall_timeout_s, (int, float)) or not d.stall_timeout_s > 0:
        raise ConfigError(f"data.stall_timeout_s={d.stall_timeout_s!r} must be a number of seconds > 0 (the longest "
                          "the trainer waits for one batch before it fails naming the shard being read; "
                          "default 600)")


def validate_parallel(cfg: RunConfig) -> None:
    """The degrees, the two regimes (ZeRO-3 + TP + CP; PP + TP + CP + ZeRO-1), the pipeline's schedule rules,
    and the model sizes the degrees must divide."""
    _choice("parallel.zero_stage", cfg.parallel.zero_stage, [0, 1, 2, 3])
    _choice("parallel.cp_impl", cfg.parallel.cp_impl, CP_IMPLS)
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
    _check_parallel_model(cfg)
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


def validate_buckets(cfg: RunConfig, manifests: bool = True) -> None:
    """data.buckets / data.tokens_per_step (megassm/data/token_budget.py): every bucket's tokens split over
    cp x tp; with ``manifests`` (at load, not for a checkpoint's stored config) the local datasets' shape
    histograms hold the buckets' shapes (or, without buckets, only shapes that split)."""
    from megassm.data.format import FormatError
    from megassm.data.token_budget import BucketError, check_config

    try:
        check_config(cfg, manifests)
    except (BucketError, FormatError) as e:
        raise ConfigError(str(e)) from None


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


def _check_parallel_model(cfg: RunConfig) -> None:
    """The model sizes that tp / cp must divide, and the procedural data's tokens over cp, before any process
    group or model exists (the same checks ``parallelize_hth`` makes)."""
    from megassm.parallel.mesh import MeshError, ParallelDims

    p = cfg.parallel
    try:
        ParallelDims(world=p.tp * p.cp * p.pp, tp=p.tp, cp=p.cp, pp=p.pp).check_model(cfg.model)
    except MeshError as e:
        raise ConfigError(str(e)) from None
    if cfg.data.kind == "procedural" and p.cp * p.tp > 1 and not cfg.data.buckets:  # buckets: validate_buckets
        pt, ph, pw = cfg.model.patch_size
        tokens = max(1, cfg.data.frames // pt) * (cfg.data.image_size // ph) * (cfg.data.image_size // pw)
        if tokens % (p.cp * p.tp):
            raise ConfigError(f"data.image_size={cfg.data.image_size}, data.frames={cfg.data.frames}: {tokens} tokens "
                              f"per sample do not split over parallel.cp x tp = {p.cp * p.tp} ranks")
        halo = cfg.model.d_conv // 2
        if p.cp > 1 and p.cp_impl != "ulysses" and tokens // p.cp < halo:
            raise ConfigError(f"parallel.cp_impl={p.cp_impl} with parallel.cp={p.cp}: {tokens // p.cp} tokens per CP "
                              f"rank, fewer than the conv halo (model.d_conv - 1) / 2 = {halo} that state passing "
                              "takes from each neighbour; use parallel.cp_impl=ulysses, a smaller cp or larger images")


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
    from megassm.checkpoint.tags import COMPLETE, complete_tags

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
