"""Ulysses context parallelism: the all-to-all re-layouts between sequence- and head-sharding.

Activations between mixers hold a contiguous 1/cp slice of the tokens in canonical order (all
heads). A mixer trades that for the full sequence of 1/cp of its heads, runs on the full sequence
(scan permutation, conv, SSD scan or attention with RoPE), and trades back:

    seq_to_heads: (B, L/cp, ..., h, ...) -> (B, L, ..., h/cp, ...)      rank c gets heads [c*h/cp, (c+1)*h/cp)
    heads_to_seq: the inverse
"""

from __future__ import annotations

from torch import Tensor

from megassm.parallel.comm import all_to_all, gather_along


def seq_to_heads(x: Tensor, group, head_dim: int) -> Tensor:
    """x: (B, L/cp, ...) with heads along ``head_dim`` -> (B, L, ...) with 1/cp of the heads."""
    return all_to_all(x, group, scatter_dim=head_dim, gather_dim=1)


def heads_to_seq(x: Tensor, group, head_dim: int) -> Tensor:
    """x: (B, L, ...) with 1/cp of the heads along ``head_dim`` -> (B, L/cp, ...) with all heads."""
    return all_to_all(x, group, scatter_dim=1, gather_dim=head_dim)


def gather_seq(x: Tensor, group) -> Tensor:
    """(B, L/cp, ...) -> (B, L, ...) for a tensor every head needs (Hydra's shared B/C);
    the backward sums the ranks' gradients and returns each its slice."""
    return gather_along(x, group, dim=1)
