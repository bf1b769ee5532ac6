"""parallel.cp_impl: which Hydra blocks can pass scan states between CP ranks (models.scan) and which ones
``auto`` picks from the communication model (parallel.comm_model.block_cp_impl)."""

from __future__ import annotations

import pytest
import torch

from megassm.models.scan import keeps_slices_contiguous, scan_permutation, slice_scan_permutation
from megassm.parallel.comm_model import block_collectives, block_cp_impl, wire_bytes
from megassm.run_config import load_config

STAGE3 = (33, 22, 40)  # configs/stage3_video.yaml: 29,040 tokens


@pytest.mark.parametrize("order,grid,cp,want", [
    ("row", (3, 2, 5), 2, True),  # any equal cut of the canonical order
    ("row", (1, 1, 7), 7, True),
    ("col", (4, 2, 3), 2, True), ("col", (4, 2, 3), 4, True),  # cuts between frames
    ("col", (3, 2, 3), 2, False), ("col", (4, 2, 3), 8, False),  # a frame cut in two
    ("col", (3, 1, 5), 5, True),  # H = 1: the column scan is the row scan
    ("temporal", (1, 4, 4), 4, True), ("temporal", (2, 2, 4), 2, False),
])
def test_which_orders_keep_slices_contiguous(order, grid, cp, want):
    assert keeps_slices_contiguous(order, grid, cp) == want


def test_slice_permutations_compose_to_the_scan_order():
    """Each rank reordering its own slice gives, concatenated over ranks, the block's scan order."""
    grid, cp = (4, 3, 5), 2
    L = 60
    tokens = torch.arange(L).view(1, L)
    perm, _ = scan_permutation("col", grid)
    parts = []
    for r in range(cp):
        local = tokens[:, r * L // cp:(r + 1) * L // cp]
        p = slice_scan_permutation("col", grid, cp, r)
        parts.append(local[:, p[0]])
        assert torch.equal(parts[-1][:, p[1]], local)  # the inverse undoes it
    assert torch.equal(torch.cat(parts, dim=1)[0], perm)
    with pytest.raises(ValueError, match="does not keep 2 slices contiguous"):
        slice_scan_permutation("col", (3, 2, 3), 2, 0)


def test_auto_per_block_choice_for_stage3():
    """Stage 3 at cp 4: 8.25 frames per rank, so only 'h' passes states; with 32 frames 'v' does too;
    't' and attention always run Ulysses. State passing moves fewer bytes per rank there."""
    m = load_config("configs/stage3_video.yaml", []).model
    got = {s: block_cp_impl(m, s, "auto", STAGE3, 1, 4) for s in "hvtA"}
    assert got == {"h": "state_passing", "v": "ulysses", "t": "ulysses", "A": "ulysses"}
    assert block_cp_impl(m, "v", "auto", (32, 22, 40), 1, 4) == "state_passing"
    assert block_cp_impl(m, "h", "ulysses", STAGE3, 1, 4) == "ulysses"
    sizes = {"tp": 1, "cp": 4, "tpcp": 4}
    cost = {impl: wire_bytes(block_collectives(m, "h", 1, 29040, 0, 1, 4, cp_impl=impl), sizes)
            for impl in ("ulysses", "state_passing")}
    assert cost["state_passing"] < cost["ulysses"] / 10


def test_auto_keeps_ulysses_where_it_is_cheaper():
    """At a few hundred tokens the state summaries (p x n per head) outweigh Ulysses' all-to-alls:
    'auto' keeps Ulysses, 'state_passing' passes states anyway."""
    m = load_config("configs/stage3_video.yaml", []).model
    assert block_cp_impl(m, "h", "auto", (1, 16, 16), 1, 4) == "ulysses"
    assert block_cp_impl(m, "h", "state_passing", (1, 16, 16), 1, 4) == "state_passing"
