"""Structured configuration for megassm.

Each builder receives only its own sub-config (``ModelConfig`` for the model,
``DataConfig`` for the data pipeline, ...). ``RunConfig`` is only the container that
YAML files and ``key=value`` overrides are merged into; ``megassm.config.load``
validates it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# SDPA kernel choices for self-attention (megassm/models/attention.py)
ATTENTION_BACKENDS = ("auto", "default", "flash", "cudnn", "efficient", "math", "fa4")
# Hydra's path -> the layers' ``fused`` argument: auto = the fused Triton kernels (megassm/ops/hydra_fused.py)
# on CUDA when they import; fused = always (on CPU only in Triton's interpreter, TRITON_INTERPRET=1);
# reference = the PyTorch reference parts (megassm/ops/hydra_mix.py)
HYDRA_PATHS = {"auto": None, "fused": True, "reference": False}
# model.fp8: torchao's float8 training recipes (megassm/ops/fp8.py), and the torchao CI is proven with
FP8_RECIPES = ("none", "tensorwise", "rowwise")
TORCHAO_PIN = "torchao==0.18.0"
CP_IMPLS = ("ulysses", "state_passing", "auto")  # parallel.cp_impl: how Hydra blocks run under cp > 1


@dataclass
class ModelConfig:
    """HTH backbone hyper-parameters (docs/architecture.md §2)."""

    name: str = "hth-tiny"
    in_channels: int = 4  # latent channels C; data.kind=shards: from the manifests when the config leaves it out
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])  # (pt, ph, pw)
    d_model: int = 128
    pattern: str = "hvAh"  # one mixer symbol per block (megassm/models/mixers/: h, v, t Hydra; A attention)
    # Hydra (defaults are the public reference's)
    d_state: int = 64
    d_conv: int = 7
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    # attention (self and cross)
    num_heads: int = 4
    qk_norm: bool = True
    rope_theta: float = 10000.0
    # SDPA kernel for self-attention on CUDA: auto (cuDNN first on Hopper+) | default | flash | cudnn |
    # efficient | math (megassm/models/attention.py)
    attention_backend: str = "auto"
    # torch.compile the blocks' LayerNorm/modulation/residual glue on CUDA (eager on CPU; both tested equal)
    fuse_elementwise: bool = True
    # fixed 3D sin-cos absolute position embedding added after patchify (no parameters). Off for the
    # paper's HTH (Hydra needs none); the demo's prompts name absolute positions ("top left").
    abs_pos_embed: bool = False
    # FFN
    mlp_ratio: float = 4.0
    # text conditioning
    text_dim: int = 64  # data.kind=shards: from the manifests when the config leaves it out
    max_text_len: int = 32
    # which SSD implementation: auto (Triton on CUDA if mamba-ssm is installed), ref, triton
    ssd_impl: str = "auto"
    # Hydra's path: auto | fused | reference (HYDRA_PATHS); the SSD scan inside the fused one follows ssd_impl
    hydra_path: str = "auto"
    # FP8 linears in training: none | tensorwise | rowwise (torchao float8; megassm/ops/fp8.py says which)
    fp8: str = "none"
    # torch.compile: none | blocks (each HTHBlock's forward, static shapes; megassm/models/block.py)
    compile: str = "none"


@dataclass
class BucketConfig:
    """One shape of a joint image + video mix (megassm/data/token_budget.py, docs/training.md).

    Each train step draws one bucket (probability proportional to ``weight``, from a generator keyed on
    (train.seed, step): the same bucket on every rank) and trains ``samples`` samples of its shape."""

    name: str = ""
    shape: list[int] = field(default_factory=lambda: [1, 32, 32])  # latent [frames, height, width]
    weight: float = 1.0
    # samples in the step's global batch (all data-parallel replicas and accumulation micro-batches);
    # None: as many as fit data.tokens_per_step
    samples: int | None = None


@dataclass
class DataConfig:
    """Where training samples come from."""

    kind: str = "procedural"  # procedural | shards
    # procedural (built-in coloured-shapes data set)
    image_size: int = 16
    frames: int = 1  # > 1: short clips of the square sliding one pixel per frame
    # shards (WebDataset latent shards written by `megassm preprocess`): local directories or
    # URLs -- s3://, gs://, http(s)://, file:///, pipe:CMD-with-{path} (docs/shard_format.md)
    paths: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    resampled: bool = True
    shuffle_buffer: int = 1000
    num_workers: int = 0
    prefetch: int = 2  # batches prefetched per DataLoader worker (shards)
    # shards: global = sample g of the run is a function of (seed, g) and the datasets alone, each rank reading
    # its own samples by byte offset, so dp may change on resume (single-shape datasets, no buckets); rank =
    # per-(dp rank, worker) streams with a shuffle buffer and a shape bucketer, exact only at the same layout
    # (docs/shard_format.md §6)
    order: str = "rank"
    window_shards: int = 8  # order=global: consecutive shards whose samples are permuted together
    # resume over a dataset whose shards changed (re-split, rewritten, shards added: its fingerprint differs):
    # off = refused, naming the dataset; on = continue at the same position in the new order (logged)
    allow_dataset_change: bool = False
    # order=global, pipe: datasets (no seeking): each loader worker plans this many samples ahead and streams
    # each shard once for all of them, holding them in memory until used (more: fewer passes over a shard)
    read_ahead_samples: int = 256
    # shards: the trainer waiting longer than this for one batch is an error naming the shard each loader
    # worker was reading (a hung pipe:/remote read, a shard the reader cannot get through)
    stall_timeout_s: float = 600.0
    # dtype of batch["text"]: bfloat16 (as stored; half the host memory traffic of float32 for
    # T5-XXL's 4096 x text_len per sample) or float32; the model casts to its compute dtype anyway
    text_dtype: str = "bfloat16"
    # latent normalisation applied on load: (latent - shift) * scale, with scale/shift from
    # latent_norm=manifest: each dataset's manifest (the VAE's own values, per channel for Wan)
    # latent_norm=config: latent_scale / latent_shift below, for every dataset
    latent_norm: str = "manifest"
    latent_scale: float = 1.0
    latent_shift: float = 0.0
    # joint image + video training: one bucket per step (empty: every batch is train.micro_batch_size samples
    # of whatever shape comes next). With buckets, a step's global batch is the drawn bucket's samples, split
    # over train.grad_accum micro-batches x the data-parallel replicas; train.micro_batch_size is not used.
    buckets: list[BucketConfig] = field(default_factory=list)
    tokens_per_step: int | None = None  # global tokens per step, for buckets without an explicit ``samples``
    # recorded at load from the datasets' manifests, not set by hand: {"vae": fingerprint, "text_encoder": ...},
    # so that a checkpoint's config says what latents it was trained on (megassm/data/config_checks.py)
    encoded_with: dict[str, str] = field(default_factory=dict)


@dataclass
class EncoderConfig:
    """How pixels and captions become latents and text embeddings (for sampling and previews).

    ``builtin:pixels`` / ``builtin:words`` are the demo's stand-ins (latents are pixels in [-1, 1];
    text is a fixed word-embedding table). Otherwise local directories loadable with diffusers /
    transformers ``from_pretrained`` -- nothing is downloaded.
    """

    vae: str = "builtin:pixels"
    text_encoder: str = "builtin:words"
    tokenizer: str | None = None  # defaults to text_encoder's directory
    # latents fed to the model = (vae_latent - vae_shift) * vae_scale; None: from the VAE's config
    # (scaling_factor / shift_factor, or per-channel latents_mean / latents_std), as preprocessing does
    vae_scale: float | None = None
    vae_shift: float | None = None


@dataclass
class DiffusionConfig:
    """Rectified flow / flow matching (docs/architecture.md §4)."""

    logit_mean: float = 0.0
    logit_std: float = 1.0
    # Timestep shift s: t' = s t / (1 + (s - 1) t). None -> from token count (sqrt(L / base_tokens)).
    shift: float | None = None
    shift_base_tokens: int = 256
    caption_dropout: float = 0.1
    sample_steps: int = 30
    cfg_scale: float = 4.0


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine
    grad_clip: float = 1.0


@dataclass
class ParallelConfig:
    """Parallel layout. world = pp * dp * cp * tp; dp is derived."""

    tp: int = 1
    cp: int = 1
    pp: int = 1
    # how a Hydra block runs under cp > 1 (docs/parallelism.md §3): "ulysses" (all-to-all of activations),
    # "state_passing" (each rank scans its slice; scan states all-gathered, halos sent to neighbours) or
    # "auto" (state passing where the block's scan order keeps each rank's tokens contiguous and the
    # communication model says it moves fewer bytes, else Ulysses); attention always runs Ulysses
    cp_impl: str = "ulysses"
    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    micro_batches: int = 1  # pipeline micro-batches per step (pp > 1)
    virtual_stages: int = 1  # > 1: interleaved 1F1B with this many model chunks per pipeline rank
    # extra DeepSpeed zero_optimization keys (ZERO_OPTIONS in megassm/config/validate.py), e.g.
    # {stage3_param_persistence_threshold: 1.0e+9} keeps every parameter gathered on a single rank
    zero_options: dict = field(default_factory=dict)


@dataclass
class ProfileConfig:
    """torch.profiler over whole train steps (megassm/train/profiling.py); steps=0 disables it.

    Steps are numbered from 1, as in metrics.jsonl: start_step=10, steps=3 profiles steps 10, 11, 12
    (step 9 is the profiler's warm-up). Traces go to run_dir/profile/.
    """

    start_step: int = 10
    steps: int = 0
    ranks: list[int] = field(default_factory=lambda: [0])  # global ranks that profile
    # record allocations: the profiler's memory view, plus a CUDA memory snapshot (pickle) on GPU
    memory: bool = False


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch_size: int = 8  # per data-parallel rank
    grad_accum: int = 1
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    activation_checkpointing: str = "none"  # none | all | every_k
    checkpoint_every_k: int = 2
    ema_decay: float = 0.0  # 0 disables EMA
    log_every: int = 10
    ckpt_every: int = 100
    keep_last: int = 3  # complete checkpoints kept, the newest in commit order; 0 keeps every one
    # resume from this checkpoint of run_dir/checkpoints (e.g. step_00000400) instead of the one `latest` names
    # (a rollback); it must be complete and whole. Drop it once the run has saved: a restart would roll back again
    resume_from: str | None = None
    # periodic checkpoints snapshotted to host memory and written by a background thread while training
    # goes on (megassm/train/checkpoint_writer.py); the final and signal saves stay synchronous
    async_save: bool = False
    # false: checkpoints hold the model (fp32 masters), EMA, LoRA adapters and trainer state but no Adam moments
    # (~1/3 of a ZeRO checkpoint's optimizer files); a resume from one restarts the optimizer (docs/checkpoints.md)
    save_optimizer_state: bool = True
    sample_every: int = 0  # 0 disables periodic sample images
    # every eval_every steps: the held-out loss, plus CLIP score / KID on eval.prompts when eval.clip_model /
    # eval.inception + eval.reference are set (megassm/train/evaluation.py); 0 disables it
    eval_every: int = 0
    # Training previews (every sample_every steps; megassm/train/preview.py). Prompts: this list, else one
    # prompt per line of preview_prompts_file (blank lines and '#' comments skipped), else the demo's
    # coloured-square prompts (procedural data only). Split across data-parallel replicas; seed = index.
    preview_prompts: list[str] | None = None
    preview_prompts_file: str | None = None
    # latent [frames, height, width] of a preview; None: the data's (procedural: data.frames x
    # data.image_size^2; shards: the most common latent shape in the datasets' manifests)
    preview_latent_shape: list[int] | None = None
    max_consecutive_nonfinite: int = 5
    # the step's loss: "sample" = mean over its samples of each sample's mean squared error, "token" = mean over
    # all its tokens (docs/training.md: they differ only where one step mixes token counts)
    loss_reduction: str = "sample"
    # resume at another layout with another global batch (micro_batch x grad_accum x dp); off: refused
    allow_batch_change: bool = False
    peak_tflops: float | None = None  # per device, for MFU; None: datasheet bf16 peak by GPU name
    progress_bar: bool = True
    profile: ProfileConfig = field(default_factory=ProfileConfig)


@dataclass
class EvalConfig:
    """Evaluation of a stage (``megassm eval`` and train.eval_every; megassm/eval/). Nothing is downloaded:
    every model path is a local file or directory."""

    # held-out flow-matching loss: validation datasets written by `megassm preprocess` (empty: the procedural
    # data at a held-out seed); the first ``samples`` samples, at fixed timesteps / noise drawn from ``seed``
    paths: list[str] = field(default_factory=list)
    samples: int = 64
    batch_size: int = 8
    seed: int = 1234
    # prompts that are generated for CLIP score / KID (one per line in prompts_file); None: the previews'
    prompts: list[str] | None = None
    prompts_file: str | None = None
    clip_model: str | None = None  # local transformers CLIP directory (CLIPModel + tokenizer)
    inception: str | None = None  # InceptionV3 weights file, pytorch-fid layout (megassm/eval/inception.py)
    reference: str | None = None  # reference set for KID / FID: an image directory or a shard dataset
    video_features: str | None = None  # TorchScript video feature model for FVD (videos only)
    kid_subset_size: int = 1000  # clipped to the smaller set
    kid_subsets: int = 100


WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class WandbConfig:
    """Weights & Biases run (optional extra: pip install megassm[wandb]); rank 0 logs what TensorBoard gets."""

    project: str = "megassm"
    entity: str | None = None  # team or user; None: the logged-in user's default
    mode: str = "online"  # online | offline (files under run_dir/wandb, `wandb sync` later) | disabled
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    """Where metrics go besides metrics.jsonl and TensorBoard (megassm/train/metrics.py)."""

    wandb: WandbConfig | None = None  # None: no W&B; `logging.wandb={}` turns it on with the defaults


LORA_TARGETS = ("hydra", "attention", "cross_attention", "ffn")  # lora/adapters.py::target_kinds


@dataclass
class LoRAConfig:
    """Low-rank adapters (megassm/lora/): y = W x + (alpha / rank) B A x, the base W frozen."""

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    # module kinds: hydra (in_proj, out_proj), attention (qkv, proj), cross_attention (q, kv, proj), ffn (fc1, fc2)
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


@dataclass
class FinetuneConfig:
    """Fine-tuning of a trained model (its weights from ``init_from``)."""

    lora: LoRAConfig | None = None  # None: full fine-tuning; `finetune.lora={}` turns LoRA on with the defaults


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    encoders: EncoderConfig = field(default_factory=EncoderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    stage: str = "smoke"
    run_dir: str = "runs/${stage}"
    init_from: str | None = None  # checkpoint of the previous stage to warm-start from
