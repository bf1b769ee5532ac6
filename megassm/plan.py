"""``megassm plan``: predict per-GPU memory and step time of a stage config, and pick a layout that fits.

    megassm plan configs/stage3_video.yaml --gpus 8

Memory per GPU (bytes), ZeRO-3 sharding over DP x CP (docs/architecture.md §3) and TP dividing the weights:
  params 2P, grads 2P (bf16), fp32 master 4P and Adam m, v 8P, each / (tp * dp * cp);
  ZeRO-3 working set: the gathered bf16 weights of the block running and the one prefetched, and the
  fp32 gradient copy of one optimizer sub-group during the step (sub_group_size 1e9);
  activations from ``accounting.activation_bytes_per_token`` (measured within 1% per block on an H100),
  tokens per GPU = micro_batch * seq_len / cp, per checkpointing mode:
    none      every block keeps all its activations;
    all       every block keeps its input; one block's activations are live again in its recompute;
    every_k   blocks i % k == 0 as 'all', the others as 'none';
  plus the backward's working set (activation gradients, one block's unsharded weight gradients) and
  a fixed allowance for CUDA / cuBLAS / Triton workspaces and allocator rounding.
Training previews (train.sample_every > 0) run between steps, beside the resident state: the larger of the
text encoder in bf16 (first preview only), the sampler's forward (one block's transient working set at a
time, half its training activations as measured for `megassm plan --sample`; both CFG branches of this
replica's prompts) and the VAE decode (rank 0), plus one copy of the local weights while the EMA weights
are swapped in.
Step time: model FLOPs (accounting.train_flops, x4/3 for recomputed blocks) / (tp x cp x peak x MFU) with an
assumed MFU, plus TP (all-gather / reduce-scatter) and Ulysses all-to-all volumes at an assumed link
bandwidth, not overlapped. The recommended layout is the fastest per sample among those that fit.
Joint-shape configs (data.buckets): one row per bucket at its largest micro-batch (ceil(samples / (grad_accum x
dp))), the memory of the largest as the configured layout's, and the spread of step times over the buckets.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from dataclasses import asdict, dataclass

from megassm.config.schema import ModelConfig, RunConfig
from megassm.models.accounting import activation_bytes_per_token, param_counts, train_flops
from megassm.parallel.mesh import MeshError, ParallelDims
from megassm.sample_plan import INFERENCE_SHARE, encoder_sizes, safetensors_params

# tokens per sample of each stage (docs/architecture.md §7); other configs pass --seq-len
STAGE_SEQ_LEN = {"stage0_256px": 256, "stage1_1k": 4096, "stage2_2k": 16384, "stage3_video": 29040}
GiB = 1024**3
GB = 1e9
SUB_GROUP = 1e9  # DeepSpeed ZeRO-3 default sub_group_size (elements)
# optimizer offload (parallel.offload_optimizer), per GPU's host share: Adam updates per second on the host
# and the host <-> GPU copy rate (bf16 gradients down, bf16 weights up); docs/performance.md has the measurement
CPU_ADAM_PARAMS_PER_S = 1.0e9
HOST_LINK_GBPS = 20.0
REDUCE_BUCKET = 5e8  # DeepSpeed default reduce_bucket_size (elements)
WORKSPACE = 0.25 * GB  # cuBLAS / Triton workspaces in torch's allocator
HEADROOM = 0.9  # fit predicted allocated bytes into this share of the budget (fragmentation, CUDA context)
# previews (the encoders' assumed sizes, when not on this machine: sample_plan.encoder_sizes):
VAE_DECODE_WORKSPACE = 4 * GB  # tiled VAE decode of one preview batch (an allowance)
ASSUMED_CLIP_PARAMS = 4.28e8  # CLIP ViT-L/14, when eval.clip_model is not on this machine
INCEPTION_PARAMS = 2.18e7  # InceptionV3 up to pool3 (megassm/eval/inception.py)


@dataclass
class Layout:
    gpus: int = 1
    tp: int = 1
    cp: int = 1
    micro_batch: int = 1
    checkpointing: str = "all"  # none | all | every_k
    every_k: int = 2
    zero_stage: int = 3
    offload_optimizer: bool = False  # parallel.offload_optimizer: fp32 masters, Adam and fp32 grads on the host

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.cp)

    def checkpointed(self, i: int) -> bool:
        return self.checkpointing == "all" or (self.checkpointing == "every_k" and i % self.every_k == 0)

    def describe(self) -> str:
        ck = f"every_{self.every_k}" if self.checkpointing == "every_k" else self.checkpointing
        return f"tp={self.tp} cp={self.cp} dp={self.dp} micro_batch={self.micro_batch} checkpointing={ck}"


@dataclass
class PreviewLoad:
    """What a training preview adds on a GPU (train.sample_every > 0; megassm/train/preview.py)."""

    prompts: int  # over all data-parallel replicas, which split them
    seq_len: int  # tokens of one preview sample
    text_encoder_params: float  # loaded once in bf16 at the first preview, freed after encoding
    vae_params: float  # loaded on rank 0 for the decode
    ema: bool  # the EMA weights are swapped in: the training weights' local copy is kept meanwhile
    # train.eval_every: CLIP / Inception, loaded once in bf16 on rank 0 and kept there (megassm/eval/)
    eval_extractor_params: float = 0.0

    def bytes_per_gpu(self, m: ModelConfig, layout: Layout, local_weight_bytes: float) -> float:
        d = m.d_model
        tokens = 2 * math.ceil(self.prompts / layout.dp) * self.seq_len / layout.cp  # both CFG branches
        # no autograd graph: one block's transient working set at a time (INFERENCE_SHARE of what training keeps
        # for that block's backward, measured at full size: sample_plan.py), beside the residual stream in and out
        block = max(activation_bytes_per_token(m, s) for s in set(m.pattern)) / layout.tp
        sampler = tokens * (INFERENCE_SHARE * block + 2 * 2 * d + 2 * m.in_channels * math.prod(m.patch_size))
        encoder = 2 * self.text_encoder_params
        vae = 2 * self.vae_params + VAE_DECODE_WORKSPACE if self.vae_params else 0.0
        extractors = 2 * self.eval_extractor_params  # resident on rank 0 from the first evaluation on
        return (local_weight_bytes if self.ema else 0.0) + extractors + max(encoder, sampler, vae)


def preview_load(cfg: RunConfig, seq_len: int) -> tuple[PreviewLoad | None, dict[str, str]]:
    """The preview of ``cfg`` (None without train.sample_every / train.eval_every, whose generations are
    previews too) and where the encoder sizes came from."""
    t = cfg.train
    if t.sample_every <= 0 and t.eval_every <= 0:
        return None, {}
    from megassm.train.preview import preview_prompts

    text, vae, source = encoder_sizes(cfg)
    if t.preview_latent_shape is not None:
        pt, ph, pw = cfg.model.patch_size
        T, h, w = t.preview_latent_shape
        seq_len = (T // pt) * (h // ph) * (w // pw)
    prompts = len(t.preview_prompts) if t.preview_prompts is not None else len(preview_prompts(cfg))
    extractors = 0.0
    if t.eval_every > 0:
        from megassm.train.evaluation import eval_prompts

        e = cfg.eval
        if e.clip_model is not None or e.inception is not None:
            prompts = max(prompts, len(eval_prompts(cfg)))
        if e.inception is not None:
            extractors += INCEPTION_PARAMS
        if e.clip_model is not None:
            found = safetensors_params(e.clip_model)
            extractors += found if found is not None else ASSUMED_CLIP_PARAMS
            source["clip_model"] = e.clip_model if found is not None else "assumed CLIP ViT-L/14"
    return PreviewLoad(prompts, seq_len, text, vae, t.ema_decay > 0, extractors), source


def _block_params(m: ModelConfig, symbol: str) -> int:
    one = copy.deepcopy(m)
    one.pattern = symbol
    p = param_counts(one)
    mixers = sum(v for k, v in p.items() if k.endswith("_mixers"))
    return mixers + p["cross_attention"] + p["ffn"] + p["modulation_tables"]


def predict_memory(m: ModelConfig, seq_len: int, layout: Layout, engine: str = "deepspeed",
                   preview: PreviewLoad | None = None) -> dict[str, float]:
    """Peak bytes allocated per GPU, by component (and 'total'), for a micro-batch step of ``m`` at ``seq_len``.

    engine="deepspeed": ZeRO-``layout.zero_stage`` with bf16 weights and fp32 master/Adam (megassm.train);
    engine="torch": bf16 weights, grads and Adam states, nothing sharded (benchmarks/bench_step.py --engine torch).
    The peak is the static part plus the largest of phases that never overlap: forward/backward
    (activations and the backward's working set), the optimizer step (fp32 gradient copy) and, with
    ``preview``, a training preview between steps.
    """
    P = param_counts(m)["total"] / layout.tp
    shard = layout.dp * layout.cp
    d = m.d_model
    big_block = max(_block_params(m, s) for s in set(m.pattern)) / layout.tp
    out: dict[str, float] = {}
    if engine == "torch":
        out.update(params=2 * P, grads=2 * P, optimizer=4 * P)
        step_phase = 0.0
    else:
        z, off = layout.zero_stage, layout.offload_optimizer
        out["params"] = 2 * P / (shard if z >= 3 else 1)
        # offloaded: reduced gradients go to the host's fp32 partition, the GPU keeps only the buckets
        out["grads"] = 0.0 if off else 2 * P / (shard if z >= 2 else 1)
        out["optimizer"] = 0.0 if off else 12 * P / shard  # fp32 master + m + v
        out["zero_buckets"] = 2 * min(REDUCE_BUCKET, P)  # the reduce bucket (bf16), allocated once
        out["zero_gathered"] = 2 * 2 * big_block if (z >= 3 and shard > 1) else 0.0
        # fp32 grads of one sub-group during optimizer.step() (on the host when offloaded)
        step_phase = 0.0 if off else 4 * min(P / shard, SUB_GROUP)
    tokens = layout.micro_batch * seq_len / layout.cp
    per_block = [activation_bytes_per_token(m, s) / layout.tp for s in m.pattern]
    kept = sum(2 * d if layout.checkpointed(i) else per_block[i] for i in range(len(per_block)))
    recomputed = max((per_block[i] for i in range(len(per_block)) if layout.checkpointed(i)), default=0.0)
    act = {
        "activations": tokens * (kept + recomputed),
        # gradients w.r.t. activations inside one block (~5 d per token in bf16 beyond what it keeps) and
        # that block's unsharded weight gradients before ZeRO reduces them
        "backward": tokens * 10 * d / layout.tp + 2 * big_block,
        # patch embedding input/output (the head's activations are freed before the blocks' backward);
        # text embeddings and their per-block k/v
        "embed_text": tokens * (2 * m.in_channels * math.prod(m.patch_size) + 2 * d)
        + layout.micro_batch * m.max_text_len * (2 * m.text_dim + 2 * d * (1 + 2 * len(m.pattern))),
        "workspace": WORKSPACE,
    }
    act_phase = sum(act.values())
    out.update(act)
    out["optimizer_step"] = step_phase
    local_weights = out["params"] if engine == "deepspeed" else 2 * P
    out["preview"] = preview.bytes_per_gpu(m, layout, local_weights) if preview is not None else 0.0
    phases = ("optimizer_step", "preview")
    out["total"] = sum(v for k, v in out.items() if k not in act and k not in phases) + max(
        act_phase, step_phase, out["preview"])
    return out


def predict_step_seconds(m: ModelConfig, seq_len: int, layout: Layout, mfu: float, peak_tflops: float,
                         link_gbps: float) -> dict[str, float]:
    """Compute time from FLOPs at an assumed MFU, plus Ulysses all-to-all time; per micro-batch."""
    n = len(m.pattern)
    ck = sum(layout.checkpointed(i) for i in range(n)) / n
    flops = train_flops(m, seq_len, layout.micro_batch) * (1 + ck / 3)  # recompute: one more forward
    compute = flops / (layout.tp * layout.cp) / (peak_tflops * 1e12 * mfu)
    comm = 0.0
    tokens = layout.micro_batch * seq_len / layout.cp
    if layout.tp > 1:
        # Megatron TP + SP: an all-gather before and a reduce-scatter after mixer, cross-attention and FFN,
        # in the forward, the backward and the recomputed forward, of (tokens, d) bf16 each
        per = tokens * 2 * m.d_model * (layout.tp - 1) / layout.tp
        comm += n * 6 * per * (2 + ck) / (link_gbps * 1e9)
    if layout.cp > 1:
        # per mixer: 2 all-to-alls forward, 2 backward (+2 recomputed), of (tokens, d_mixer) bf16 each,
        # (cp-1)/cp of it leaving the GPU; Hydra's in/out widths are ~2 d, attention's ~3 d and d
        per = tokens * 2 * (4 * m.d_model) * (layout.cp - 1) / layout.cp
        comm += n * per * (2 + 2 + 2 * ck) / (link_gbps * 1e9)
    out = {"compute_s": compute, "comm_s": comm, "total_s": compute + comm}
    if layout.offload_optimizer:  # once per optimizer step, not per micro-batch: Adam on the host + the copies
        P = param_counts(m)["total"] / (layout.tp * layout.dp * layout.cp)
        out["offload_optimizer_s"] = P / CPU_ADAM_PARAMS_PER_S + 2 * 2 * P / (HOST_LINK_GBPS * 1e9)
    return out


def candidate_layouts(m: ModelConfig, seq_len: int, gpus: int, micro_batch: int, every_k: int,
                      offload_optimizer: bool = False) -> list[Layout]:
    out = []
    for tp in (1, 2, 4, 8):
        for cp in range(1, gpus + 1):
            if gpus % (tp * cp) or seq_len % cp:
                continue
            try:  # TP / Ulysses split heads (every mixer kind's, and cross-attention's), groups, widths
                ParallelDims(world=tp * cp, tp=tp, cp=cp).check_model(m)
            except MeshError:
                continue
            for ck in ("none", "every_k", "all"):
                out.append(Layout(gpus, tp, cp, micro_batch, ck, every_k, offload_optimizer=offload_optimizer))
    return out


def choose_layout(m: ModelConfig, seq_len: int, gpus: int, micro_batch: int, budget_bytes: float, mfu: float,
                  peak_tflops: float, link_gbps: float, every_k: int = 2, preview: PreviewLoad | None = None,
                  offload_optimizer: bool = False):
    """The fastest candidate (predicted step time per sample) whose predicted memory fits the budget."""
    best = None
    for lay in candidate_layouts(m, seq_len, gpus, micro_batch, every_k, offload_optimizer):
        mem = predict_memory(m, seq_len, lay, preview=preview)["total"]
        if mem > HEADROOM * budget_bytes:
            continue
        t = predict_step_seconds(m, seq_len, lay, mfu, peak_tflops, link_gbps)["total_s"] / lay.dp
        key = (t, lay.tp, lay.cp)
        if best is None or key < best[0]:
            best = (key, lay, mem)
    return None if best is None else (best[1], best[2])


def plan(cfg: RunConfig, gpus: int, seq_len: int, gpu_mem_gb: float, mfu: float, peak_tflops: float,
         link_gbps: float, ckpt_write_gbps: float = 1.0) -> dict:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    configured = Layout(gpus, p.tp, p.cp, t.micro_batch_size, t.activation_checkpointing, t.checkpoint_every_k,
                        p.zero_stage, p.offload_optimizer)
    budget = gpu_mem_gb * GB
    preview, sources = preview_load(cfg, seq_len)
    res = {"model": m.name, "params": param_counts(m)["total"], "seq_len": seq_len, "gpus": gpus,
           "budget_gb": gpu_mem_gb, "assumed_mfu": mfu, "peak_tflops": peak_tflops}
    if preview is not None:
        res["preview"] = {**asdict(preview), "sizes_from": sources}
    if gpus % (p.tp * p.cp) == 0:
        mem = predict_memory(m, seq_len, configured, preview=preview)
        step = predict_step_seconds(m, seq_len, configured, mfu, peak_tflops, link_gbps)
        res["configured"] = {"layout": asdict(configured), "memory_gb": {k: v / GB for k, v in mem.items()},
                             "fits": mem["total"] <= HEADROOM * budget, "step": step,
                             "cp_traffic": _cp_traffic(cfg, seq_len),
                             "tokens_per_s_per_gpu": t.micro_batch_size * seq_len / step["total_s"] / configured.tp
                             / configured.cp}
    from megassm.host_plan import predict_host

    res["host"] = predict_host(cfg, gpus, ckpt_write_gbps)
    pick = choose_layout(m, seq_len, gpus, t.micro_batch_size, budget, mfu, peak_tflops, link_gbps,
                         t.checkpoint_every_k, preview, p.offload_optimizer)
    if pick is not None:
        lay, mem = pick
        res["recommended"] = {"layout": asdict(lay), "describe": lay.describe(), "memory_gb": mem / GB,
                              "step": predict_step_seconds(m, seq_len, lay, mfu, peak_tflops, link_gbps)}
    return res


def _cp_traffic(cfg: RunConfig, seq_len: int) -> dict | None:
    """Bytes per rank and training step of one micro-batch under the configured TP x CP, Ulysses against
    state passing and the configured parallel.cp_impl (comm_model; the grid is unknown here, so only
    'h' blocks count as able to pass states)."""
    from megassm.parallel.comm_model import step_wire_bytes

    p, mb = cfg.parallel, cfg.train.micro_batch_size
    if p.cp == 1:
        return None
    out = {"cp_impl": p.cp_impl}
    for impl in ("ulysses", "state_passing", p.cp_impl):
        nbytes, passing = step_wire_bytes(cfg.model, seq_len, p.tp, p.cp, impl, batch=mb)
        out[impl] = {"gib": nbytes / GiB, "state_passing_blocks": passing}
    return out


def plan_buckets(cfg: RunConfig, gpus: int, gpu_mem_gb: float, mfu: float, peak_tflops: float,
                 link_gbps: float) -> dict:
    """data.buckets: each bucket's micro-batch, memory and step time at the configured layout; the largest
    bucket's memory is the configured layout's, and the step-time spread over the buckets."""
    from megassm.data.token_budget import BucketTable

    m, p, t = cfg.model, cfg.parallel, cfg.train
    table = BucketTable.from_config(cfg.data, m.patch_size)
    dp = gpus // (p.tp * p.cp)
    preview, _ = preview_load(cfg, max(b.tokens for b in table.buckets))
    rows = []
    for b in table.buckets:
        mb = table.max_micro_batch(b, t.grad_accum, dp)
        lay = Layout(gpus, p.tp, p.cp, mb, t.activation_checkpointing, t.checkpoint_every_k, p.zero_stage)
        mem = predict_memory(m, b.tokens, lay, preview=preview)
        step = predict_step_seconds(m, b.tokens, lay, mfu, peak_tflops, link_gbps)
        rows.append({"name": b.name, "shape": list(b.shape), "tokens": b.tokens, "weight": float(b.weight),
                     "samples_per_step": b.samples, "tokens_per_step": b.step_tokens, "micro_batch": mb,
                     "memory_gb": mem["total"] / GB, "activations_gb": mem["activations"] / GB,
                     "fits": mem["total"] <= HEADROOM * gpu_mem_gb * GB,
                     "step_s": t.grad_accum * step["total_s"]})  # the replica with the largest slots
    times = [r["step_s"] for r in rows]
    w = [r["weight"] for r in rows]
    largest = max(rows, key=lambda r: r["memory_gb"])
    return {"rows": rows, "largest": largest["name"], "grad_accum": t.grad_accum, "dp": dp,
            "step_s": {"min": min(times), "max": max(times), "max_over_min": max(times) / min(times),
                       "weighted_mean": sum(a * b for a, b in zip(w, times)) / sum(w)}}


def _print_buckets(bk: dict) -> None:
    print(f"\nbuckets (one per step; micro-batch = ceil(samples / (grad_accum {bk['grad_accum']} x dp {bk['dp']}))):")
    print(f"  {'bucket':<10} {'latent':<12} {'tokens':>7} {'weight':>6} {'samples':>7} {'micro':>5} "
          f"{'memory GB':>9} {'step s':>7}")
    for r in bk["rows"]:
        mark = " <- largest" if r["name"] == bk["largest"] else ""
        print(f"  {r['name']:<10} {'x'.join(map(str, r['shape'])):<12} {r['tokens']:>7,} {r['weight']:>6.2f} "
              f"{r['samples_per_step']:>7} {r['micro_batch']:>5} {r['memory_gb']:>9.2f} {r['step_s']:>7.2f}"
              f"{'' if r['fits'] else ' DOES NOT FIT'}{mark}")
    st = bk["step_s"]
    print(f"  step time over buckets: {st['min']:.2f} .. {st['max']:.2f} s (x{st['max_over_min']:.2f}), "
          f"weighted mean {st['weighted_mean']:.2f} s")


def _print(res: dict) -> None:
    print(f"{res['model']}: {res['params'] / 1e9:.2f}B parameters, {res['seq_len']:,} tokens/sample, "
          f"{res['gpus']} GPU(s), budget {res['budget_gb']:.0f} GB/GPU, assumed MFU {res['assumed_mfu']:.0%}")
    pv = res.get("preview")
    if pv:
        sizes = ", ".join(f"{k} from {v}" for k, v in pv["sizes_from"].items())
        print(f"previews: {pv['prompts']} prompts of {pv['seq_len']:,} tokens{' (' + sizes + ')' if sizes else ''}")
        if pv.get("eval_extractor_params"):
            print(f"eval extractors (CLIP / Inception, bf16 on rank 0): {pv['eval_extractor_params'] / 1e6:,.0f} M "
                  "parameters")
    c = res.get("configured")
    if c:
        lay = Layout(**c["layout"])
        print(f"\nconfigured layout: {lay.describe()}  ->  {'fits' if c['fits'] else 'DOES NOT FIT'}")
        for k, v in c["memory_gb"].items():
            print(f"  {k:<15} {v:8.2f} GB")
        print(f"  step (one micro-batch): {c['step']['total_s'] * 1e3:.0f} ms "
              f"(compute {c['step']['compute_s'] * 1e3:.0f}, TP/CP communication {c['step']['comm_s'] * 1e3:.0f}); "
              f"{c['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU")
        if "offload_optimizer_s" in c["step"]:
            print(f"  + offloaded optimizer step (Adam on the host, copies): {c['step']['offload_optimizer_s']:.1f} s "
                  "per optimizer step")
        cpt = c.get("cp_traffic")
        if cpt:
            u, sp, mine = cpt["ulysses"], cpt["state_passing"], cpt[cpt["cp_impl"]]
            print(f"  TP/CP bytes sent per rank and step: Ulysses {u['gib']:.2f} GiB, state passing "
                  f"{sp['gib']:.2f} GiB ({sp['state_passing_blocks']} 'h' blocks); parallel.cp_impl="
                  f"{cpt['cp_impl']}: {mine['gib']:.2f} GiB")
    if res.get("host"):
        from megassm.host_plan import print_host

        print_host(res["host"])
    if res.get("buckets"):
        _print_buckets(res["buckets"])
    r = res.get("recommended")
    if r:
        print(f"\nrecommended: {r['describe']}  ({r['memory_gb']:.1f} GB/GPU, "
              f"{r['step']['total_s'] * 1e3:.0f} ms per micro-batch)")
    else:
        print("\nno layout fits: more GPUs, a smaller micro-batch or optimizer offload are needed")


def seq_len_of(cfg: RunConfig) -> tuple[int | None, str]:
    """(tokens per sample, where from) of a config without data.buckets: a shipped stage's; else the data's --
    the procedural set's size, or the largest latent shape in the local datasets' shape histograms (each batch
    has one shape, so the largest sets the memory); (None, why) when neither is known."""
    from megassm.data import remote
    from megassm.data.format import FormatError, parse_shape_key
    from megassm.data.manifest import load_manifest
    from megassm.data.token_budget import tokens_of

    if cfg.stage in STAGE_SEQ_LEN:
        return STAGE_SEQ_LEN[cfg.stage], f"stage {cfg.stage}"
    pf = cfg.model.patch_size
    d = cfg.data
    if d.kind == "procedural":
        shape = (d.frames, d.image_size, d.image_size)
        return tokens_of(shape, pf), f"the procedural data's latent {'x'.join(map(str, shape))}"
    shapes: set[tuple[int, int, int]] = set()
    unread = []
    for p in d.paths:
        try:
            if not remote.is_local(str(p)):
                raise FormatError("not local")
            shapes |= {tuple(parse_shape_key(k)[1:]) for k in load_manifest(str(p)).get("shape_histogram", {})}
        except (FormatError, OSError):
            unread.append(str(p))
    if not shapes:
        where = f"no readable manifest in data.paths ({', '.join(unread) or 'empty'})"
        return None, f"no known sequence length: not a shipped stage, and {where}"
    big = max(shapes, key=lambda sh: tokens_of(sh, pf))
    return tokens_of(big, pf), (f"the largest of {len(shapes)} latent shapes in data.paths' manifests, "
                                f"{'x'.join(map(str, big))}")


def _cmd_plan(args) -> int:
    from megassm.config.validate import ConfigError
    from megassm.run_config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.micro_batch:
        cfg.train.micro_batch_size = args.micro_batch
    if cfg.data.buckets:  # the configured layout at the bucket that needs the most memory
        bk = plan_buckets(cfg, args.gpus, args.gpu_mem_gb, args.mfu, args.peak_tflops, args.link_gbps)
        big = next(r for r in bk["rows"] if r["name"] == bk["largest"])
        cfg.train.micro_batch_size = big["micro_batch"]
        res = plan(cfg, args.gpus, big["tokens"], args.gpu_mem_gb, args.mfu, args.peak_tflops, args.link_gbps)
        res["buckets"] = bk
        print(json.dumps(res, indent=1)) if args.json else _print(res)
        return 0
    seq_len, source = (args.seq_len, "--seq-len") if args.seq_len else seq_len_of(cfg)
    if seq_len is None:
        raise ConfigError(f"stage {cfg.stage!r}: {source}; pass --seq-len (tokens per sample; the shipped stages: "
                          f"{', '.join(f'{k}={v}' for k, v in STAGE_SEQ_LEN.items())})")
    if not args.json:
        print(f"sequence length {seq_len} tokens per sample ({source})")
    if args.gpus < 1:
        raise ConfigError(f"--gpus {args.gpus}: need at least one GPU")
    res = plan(cfg, args.gpus, seq_len, args.gpu_mem_gb, args.mfu, args.peak_tflops, args.link_gbps,
               args.ckpt_write_gbps)
    if args.sample:
        from megassm.sample_plan import predict_sampling

        res["sampling"] = predict_sampling(cfg, seq_len, args.gpus, args.peak_tflops, args.gpu_mem_gb)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        _print(res)
        if args.sample:
            from megassm.sample_plan import print_sampling

            print_sampling(res["sampling"])
    return 0


def add_plan_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help="predict per-GPU memory / step time and pick a parallel layout",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="stage config YAML, e.g. configs/stage3_video.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.micro_batch_size=2")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: a shipped stage's, else "
                   "the data's: the procedural size or the largest shape in data.paths' manifests)")
    p.add_argument("--micro-batch", type=int, default=None, help="override train.micro_batch_size")
    p.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory per GPU to fit in, GB (default 80)")
    p.add_argument("--mfu", type=float, default=0.35, help="assumed model-FLOP utilisation (default 0.35, "
                   "measured for a reduced-depth hth-5b on one H100: docs/performance.md)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak per GPU (H100/H200: 989)")
    p.add_argument("--link-gbps", type=float, default=150.0, help="all-to-all bandwidth per GPU, GB/s")
    p.add_argument("--ckpt-write-gbps", type=float, default=1.0, help="the job's aggregate checkpoint write rate, "
                   "GB/s (measure it: benchmarks/bench_init.py --phases save); sets the save time and SIGUSR1 grace")
    p.add_argument("--json", action="store_true", help="print the prediction as JSON")
    p.add_argument("--sample", action="store_true", help="also predict `megassm sample` at this length "
                   "(memory per GPU with --gpus as the CP degree, time per denoising step; megassm/sample_plan.py)")
    p.set_defaults(func=_cmd_plan)
