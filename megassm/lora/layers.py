"""``LoRALinear``: y = x W^T + b + (alpha / r) * dropout(x) A^T B^T, with W, b frozen and A (r, in), B (out, r).

It is an ``nn.Linear`` holding the base's own weight and bias Parameters, so the base's state-dict names
(``blocks.0.mlp.fc1.weight``) do not change; the adapters add ``<name>.lora_A`` and ``<name>.lora_B``
(written to files under peft's names, ``base_model.model.<name>.lora_A.weight``).
B starts at zero: an attached adapter leaves the model's function unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def lora_down(x: Tensor, layer) -> Tensor:
    """dropout(x) A^T: (..., in) -> (..., r). ``layer``: anything holding ``lora_A``, ``dropout``, ``training``."""
    h = nn.functional.dropout(x, layer.dropout, layer.training) if layer.dropout > 0 else x
    return nn.functional.linear(h, layer.lora_A)


def lora_up(a: Tensor, layer) -> Tensor:
    """(alpha / r) a B^T: (..., r) -> (..., out)."""
    return nn.functional.linear(a, layer.lora_B) * layer.scaling


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        assert type(base) is nn.Linear, f"LoRALinear wraps a plain nn.Linear, got {type(base).__name__}"
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the base's Parameters, frozen by attach_lora
        self.rank, self.scaling = rank, alpha / rank
        dev, dt = base.weight.device, base.weight.dtype
        # the adapters are this module's own Parameters, not child Linears: ZeRO-3 gathers a module's
        # direct parameters in its hooks, and nested adapter modules were missed in the backward re-gather
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's default init
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in_features) -> (..., out_features)."""
        return super().forward(x) + lora_up(lora_down(x, self), self)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + (alpha / r) B A folded in (computed in fp32)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        delta = self.lora_B.float() @ self.lora_A.float() * self.scaling  # (out, in)
        out.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"
