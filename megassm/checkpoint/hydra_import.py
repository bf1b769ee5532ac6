"""Import public-reference Hydra weights (goombalab/hydra ``Hydra`` modules) into megassm Hydra blocks.

A reference layer is any group of tensors sharing a prefix P (possibly empty, e.g. ``layers.3.mixer.``
or ``bert.encoder.layer.3.mixer.``) with the reference's parameter names; each maps unchanged onto
megassm block b's mixer:

    P + in_proj.weight   -> blocks.{b}.mixer.in_proj.weight    [z | x | B_f | C_f | B_b | C_b | dt_f | dt_b]
    P + conv1d.weight    -> blocks.{b}.mixer.conv1d.weight     (conv_dim, 1, d_conv)
    P + conv1d.bias      -> blocks.{b}.mixer.conv1d.bias
    P + dt_bias, A_log, D -> blocks.{b}.mixer.dt_bias / A_log / D   (nheads,)
    P + fc_D.weight      -> blocks.{b}.mixer.fc_D.weight       (nheads, d_inner)
    P + norm.weight      -> blocks.{b}.mixer.norm.weight       (d_inner,)
    P + out_proj.weight  -> blocks.{b}.mixer.out_proj.weight   (d_model, d_inner)

The reference's ``in_proj.bias`` / ``out_proj.bias`` (``bias=True``) and ``init_states``
(``learnable_init_states=True``) have no megassm counterpart and are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from megassm.checkpoint.errors import CheckpointError
from megassm.checkpoint.model_specs import FreshInit, check_specs, expected_specs
from megassm.checkpoint.safetensors_io import DEFAULT_MAX_SHARD_BYTES, SafetensorsDir, SafetensorsFile, check_output
from megassm.checkpoint.sources import open_checkpoint
from megassm.checkpoint.writers import write_consolidated
from megassm.models.mixers import mixer_for_symbol
from megassm.models.mixers.hydra import HYDRA

HYDRA_PARAMS = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "fc_D.weight",
                "norm.weight", "out_proj.weight")
UNSUPPORTED = {"in_proj.bias": "bias=True", "out_proj.bias": "bias=True", "init_states": "learnable_init_states=True"}


@dataclass
class RefLayer:
    prefix: str
    number: int | None  # the last integer in the prefix (layers.3.mixer. -> 3), if any


def read_reference(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a reference checkpoint: .safetensors, a directory of them, or a torch state dict
    (.pt/.pth/.bin, read with ``torch.load(weights_only=True)``: tensors and containers only)."""
    path = Path(path)
    if path.is_dir():
        for stem in ("model", "pytorch_model"):
            if SafetensorsDir.exists(path, stem):
                d = SafetensorsDir(path, stem)
                return {n: d.read(n) for n in d.specs}
        raise CheckpointError(f"{path}: no model.safetensors (or index) inside")
    if path.suffix == ".safetensors":
        f = SafetensorsFile(path)
        return {n: f.read(n) for n in f.specs}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not loadable as a weights-only torch file ({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model", "module"):  # common wrappers of training scripts
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a state dict")
    return {k: v for k, v in obj.items() if torch.is_tensor(v)}


def find_layers(names: list[str]) -> list[RefLayer]:
    """Reference Hydra layers (prefixes with an ``in_proj.weight`` and ``A_log``), in natural order."""
    prefixes = [n[: -len("in_proj.weight")] for n in names if n.endswith("in_proj.weight")]
    prefixes = [p for p in prefixes if p + "A_log" in names and (p == "" or p.endswith("."))]

    def natural(p: str):
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p)]

    out = []
    for p in sorted(prefixes, key=natural):
        nums = re.findall(r"\d+", p)
        out.append(RefLayer(p, int(nums[-1]) if nums else None))
    return out


def parse_mapping(items: list[str], layers: list[RefLayer], hydra_blocks: list[int], pattern: str) -> dict[str, int]:
    """``REF=BLOCK`` items (REF: the layer number in the prefix, or the prefix itself) -> {prefix: block}.

    Without items, the i-th reference layer goes to the i-th Hydra block (counts must agree).
    """
    if not items:
        if len(layers) != len(hydra_blocks):
            raise CheckpointError(
                f"the reference has {len(layers)} Hydra layers ({[lay.prefix for lay in layers][:6]}...) and the "
                f"config's pattern {pattern!r} has {len(hydra_blocks)} Hydra blocks {hydra_blocks}; say which goes "
                "where with --map REF=BLOCK (e.g. --map 3=0 --map 5=2)")
        return {lay.prefix: b for lay, b in zip(layers, hydra_blocks)}
    mapping: dict[str, int] = {}
    for item in items:
        for part in item.split(","):
            ref, sep, block = part.partition("=")
            if not sep or not block.strip().lstrip("-").isdigit():
                raise CheckpointError(f"--map {part!r} must look like REF=BLOCK, e.g. 3=0 or layers.3.mixer.=0")
            ref, b = ref.strip(), int(block)
            match = [lay for lay in layers if lay.prefix == ref or (ref.isdigit() and lay.number == int(ref))]
            if len(match) != 1:
                found = [lay.prefix for lay in layers]
                raise CheckpointError(f"--map {part!r}: reference layer {ref!r} matches {len(match)} layers; "
                                      f"reference layers are {found[:8]}{' ...' if len(found) > 8 else ''}")
            if b not in hydra_blocks:
                raise CheckpointError(f"--map {part!r}: block {b} is not a Hydra block of pattern {pattern!r} "
                                      f"(Hydra blocks: {hydra_blocks})")
            if b in mapping.values():
                raise CheckpointError(f"--map: block {b} is the target of two reference layers")
            mapping[match[0].prefix] = b
    return mapping


def _shape_error(ref: dict[str, torch.Tensor], prefix: str, block: int, cfg, problems: list[str]) -> CheckpointError:
    w_in, conv, a = ref[prefix + "in_proj.weight"], ref[prefix + "conv1d.weight"], ref[prefix + "A_log"]
    d_model, nheads, d_inner = w_in.shape[1], a.shape[0], ref[prefix + "out_proj.weight"].shape[-1]
    bc = (conv.shape[0] - d_inner) // 2
    seen = (f"d_model={d_model}, d_inner={d_inner} (expand {d_inner / d_model:g}), nheads={nheads} (headdim "
            f"{d_inner // max(nheads, 1)}), B/C width per direction {bc}, d_conv={conv.shape[-1]}")
    want = (f"d_model={cfg.d_model}, expand={cfg.expand}, headdim={cfg.headdim}, d_state={cfg.d_state}, "
            f"ngroups={cfg.ngroups}, d_conv={cfg.d_conv}")
    return CheckpointError(f"reference layer {prefix or '<no prefix>'} does not fit megassm block {block}: "
                           + "; ".join(problems[:4]) + f". The reference looks like {seen}; the config has {want}")


def import_hydra(reference: str | Path, config: dict, out: str | Path, *, mapping: list[str] | None = None,
                 base: str | Path | None = None, seed: int | None = None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, force: bool = False) -> tuple[dict, list[str]]:
    """Write a consolidated checkpoint for ``config`` whose mapped Hydra blocks hold the reference weights.

    Other tensors come from ``base`` (a megassm checkpoint of the same config) or a fresh init.
    Returns (meta, report lines).
    """
    from megassm.run_config import from_dict

    check_output(Path(out), force)
    run = from_dict(config)
    cfg = run.model
    ref = read_reference(reference)
    layers = find_layers(list(ref))
    if not layers:
        raise CheckpointError(f"{reference}: no Hydra layers found (looked for <prefix>in_proj.weight with "
                              f"<prefix>A_log beside it); names start {list(ref)[:5]}")
    hydra_blocks = [i for i, s in enumerate(cfg.pattern) if mixer_for_symbol(s) is HYDRA]
    plan = parse_mapping(mapping or [], layers, hydra_blocks, cfg.pattern)
    specs = expected_specs(cfg)
    taken: dict[str, torch.Tensor] = {}
    report = []
    for prefix, block in plan.items():
        for leaf, why in UNSUPPORTED.items():
            if prefix + leaf in ref:
                raise CheckpointError(f"reference {prefix}{leaf} exists: the reference was built with {why}, which "
                                      "megassm's Hydra does not have")
        missing = [prefix + leaf for leaf in HYDRA_PARAMS if prefix + leaf not in ref]
        if missing:
            raise CheckpointError(f"reference layer {prefix!r} lacks {missing}")
        problems = []
        for leaf in HYDRA_PARAMS:
            want, got = specs[f"blocks.{block}.mixer.{leaf}"].shape, tuple(ref[prefix + leaf].shape)
            if got != want:
                problems.append(f"{leaf} is {got}, block {block} needs {want}")
        if problems:
            raise _shape_error(ref, prefix, block, cfg, problems)
        for leaf in HYDRA_PARAMS:
            taken[f"blocks.{block}.mixer.{leaf}"] = ref[prefix + leaf].float()
        report.append(f"{prefix or '<no prefix>'}* -> blocks.{block}.mixer.* ('{cfg.pattern[block]}')")
    unmapped = [b for b in hydra_blocks if b not in plan.values()]
    if base is not None:
        base_ckpt = open_checkpoint(base)
        check_specs(base_ckpt.model.specs, cfg, f"--base {base}")
        others, origin = base_ckpt.model, f"--base {base}"
    else:
        others, origin = None, f"fresh init (seed {run.train.seed if seed is None else seed})"
    fresh = FreshInit(cfg, run.train.seed if seed is None else seed)
    report.append(f"{len(plan)} reference layers imported; other tensors ({len(specs) - len(taken)}) from {origin}"
                  + (f"; Hydra blocks {unmapped} keep them" if unmapped else ""))

    class _Weights:
        def __init__(self):
            self.specs = specs

        def read(self, name: str) -> torch.Tensor:
            if name in taken:
                return taken[name]
            return others.read(name).float() if others is not None else fresh.tensor(name)

    meta = {"source": str(reference), "source_format": "hydra-reference", "converted_by": "import-hydra",
            "stage": run.stage, "step": None, "mapping": {p: b for p, b in plan.items()}, "others_from": origin}
    written = write_consolidated(Path(out), _Weights(), None, config, meta, max_shard_bytes=max_shard_bytes,
                                 force=force)
    return written, report
