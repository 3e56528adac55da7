"""A linear layer computed one output block at a time (class heads over a block-structured label space)."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BlockwiseLinear", "block_split_sizes"]


def block_split_sizes(blocks: Sequence[Sequence[int]], out_features: int) -> Tuple[int, ...]:
    """Row counts of the contiguous ``(start, stop)`` blocks, with uncovered rows as blocks of their own.

    Raises ValueError when the blocks overlap, are empty or leave ``[0, out_features)``.
    """
    sizes, at = [], 0
    for start, stop in sorted((int(a), int(b)) for a, b in blocks):
        if start < at or stop > out_features or start >= stop:
            raise ValueError(f"class blocks {[list(b) for b in blocks]} must be disjoint, non-empty and within "
                             f"[0, {out_features})")
        if start > at:
            sizes.append(start - at)
        sizes.append(stop - start)
        at = stop
    if at < out_features:
        sizes.append(out_features - at)
    return tuple(sizes)


class BlockwiseLinear(nn.Linear):
    """nn.Linear whose output rows are computed in blocks (one matmul per ``(start, stop)`` block).

    Same parameters and result as nn.Linear; one matmul per class block makes a block's logits bit-identical
    whatever other blocks the layer has (a GEMM's rounding depends on its output width), so appending a
    dataset's class block (few-shot adaptation) leaves the old datasets' outputs exactly unchanged.
    ``blocks=()`` is one block of all rows.
    """

    def __init__(self, in_features: int, out_features: int, blocks: Sequence[Sequence[int]] = ()):
        super().__init__(in_features, out_features)
        self.split_sizes: Tuple[int, ...] = block_split_sizes(blocks, out_features) if len(blocks) else (
            out_features,)

    def forward(self, x: Tensor) -> Tensor:
        if len(self.split_sizes) == 1:
            return super().forward(x)
        return torch.cat([F.linear(x, w, b) for w, b in zip(self.weight.split(self.split_sizes),
                                                              self.bias.split(self.split_sizes))], dim=-1)
