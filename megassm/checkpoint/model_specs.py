"""What a model config implies for a checkpoint: tensor names/shapes, and fresh initial values.

``expected_specs`` builds the model on the meta device (no memory). ``FreshInit`` gives new
parameters (a stage that adds or changes a block, an import that fills unmapped blocks) the values
``HTHModel``'s own constructor and ``initialize_weights`` give them, building one block at a time
(a one-block HTHModel with the same config) so that memory stays one block, not the model. The
values are drawn from ``seed`` and the block index; they follow the model's init rules but are not
the numbers a whole-model ``build_model`` with the same seed would draw.
"""

from __future__ import annotations

import copy
import re

import torch

from megassm.checkpoint.errors import CheckpointError
from megassm.checkpoint.safetensors_io import TensorSpec

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _build(model_cfg, device: str | None = None):
    from megassm.models import build_model

    cfg = copy.deepcopy(model_cfg)
    if device == "meta":
        with torch.device("meta"):
            return build_model(cfg)
    return build_model(cfg)


def expected_specs(model_cfg, lora=None) -> dict[str, TensorSpec]:
    """Names -> (shape, fp32) of every tensor in ``HTHModel(model_cfg).state_dict()``; ``lora`` (a LoRAConfig):
    with its adapters attached (``<module>.lora_A`` / ``.lora_B`` beside the base's names)."""
    model = _build(model_cfg, "meta")
    if lora is not None:
        from megassm.lora import attach_lora

        attach_lora(model, lora)
    return {n: TensorSpec(tuple(t.shape), torch.float32) for n, t in model.state_dict().items()}


def is_adapter(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


def compare_specs(found: dict[str, TensorSpec], expected: dict[str, TensorSpec]) -> list[str]:
    """Human-readable differences (missing / unexpected names, shape mismatches); empty if they agree."""
    problems = []
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    bad = [f"{n}: {found[n].shape} vs config {expected[n].shape}" for n in expected
           if n in found and found[n].shape != expected[n].shape]
    if missing:
        problems.append(f"{len(missing)} tensors the config needs are missing, e.g. {missing[:4]}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors the config does not have, e.g. {unexpected[:4]}")
    if bad:
        problems.append(f"{len(bad)} shapes differ from the config: " + "; ".join(bad[:4]))
    return problems


def check_specs(found: dict[str, TensorSpec], model_cfg, where: str) -> None:
    problems = compare_specs(found, expected_specs(model_cfg))
    if problems:
        m = model_cfg
        raise CheckpointError(
            f"{where} does not match the model config ({m.name}: d_model={m.d_model}, pattern={m.pattern!r}, "
            f"d_state={m.d_state}, expand={m.expand}, headdim={m.headdim}): " + " | ".join(problems)
            + ". Pass the config the checkpoint was trained with (--config)")


class FreshInit:
    """Initial value of any tensor of ``model_cfg``'s model, built block by block (see module doc)."""

    def __init__(self, model_cfg, seed: int = 0):
        self.cfg, self.seed = model_cfg, seed
        self._cache: tuple[int | None, dict[str, torch.Tensor]] = (None, {})

    def _one_block(self, block: int | None) -> dict[str, torch.Tensor]:
        if self._cache[0] != block or not self._cache[1]:
            cfg = copy.deepcopy(self.cfg)
            cfg.pattern = self.cfg.pattern[block] if block is not None else self.cfg.pattern[0]
            gen_state = torch.get_rng_state()
            torch.manual_seed(self.seed * 1_000_003 + (block + 1 if block is not None else 0))
            try:
                sd = _build(cfg).state_dict()
            finally:
                torch.set_rng_state(gen_state)
            self._cache = (block, {n: t.detach() for n, t in sd.items()})
        return self._cache[1]

    def tensor(self, name: str) -> torch.Tensor:
        m = _BLOCK.match(name)
        block, local = (int(m.group(1)), f"blocks.0.{m.group(2)}") if m else (None, name)
        sd = self._one_block(block)
        if local not in sd:
            raise CheckpointError(f"fresh init: the model config has no tensor {name!r}")
        return sd[local].float().clone()
