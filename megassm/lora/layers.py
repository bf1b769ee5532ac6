"""``LoRALinear``: y = x W^T + b + (alpha / r) * dropout(x) A^T B^T, with W, b frozen and A (r, in), B (out, r).

It is an ``nn.Linear`` holding the base's own weight and bias Parameters, so the base's state-dict names
(``blocks.0.mlp.fc1.weight``) do not change; the adapters add ``<name>.lora_A.weight`` and
``<name>.lora_B.weight``, the names peft writes (without its ``base_model.model.`` prefix).
B starts at zero: an attached adapter leaves the model's function unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        assert type(base) is nn.Linear, f"LoRALinear wraps a plain nn.Linear, got {type(base).__name__}"
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the base's Parameters, frozen by attach_lora
        self.rank, self.scaling = rank, alpha / rank
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's default init
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in_features) -> (..., out_features)."""
        return super().forward(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + (alpha / r) B A folded in (computed in fp32)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scaling  # (out, in)
        out.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"
