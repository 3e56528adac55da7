"""A linear layer whose weight changes along the rows: each contiguous block of rows uses its own weight of a stack.

Computing the blocks separately and concatenating costs a pass over the output (the concatenation) and one over
the input gradient (the backward of the split that made the blocks), and indexing a weight stack per block makes
each block's backward allocate a zero-filled gradient of the whole stack. :func:`segmented_linear` writes every
block straight into one output, every block's input gradient into one input gradient, and the stack's gradient
with one zero-fill.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

__all__ = ["Segment", "check_segments", "segmented_linear"]

Segment = Tuple[int, int, int]  # (index into the weight stack, first row, end row)


def check_segments(segments: Sequence[Segment], rows: int, stack: int) -> Tuple[Segment, ...]:
    """``segments`` as int tuples, checked to cover ``[0, rows)`` in order, without gaps, overlaps or empty blocks,
    each with a weight index in ``[0, stack)``; ValueError naming the first bad segment otherwise."""
    out, at = [], 0
    for segment in segments:
        index, start, end = (int(v) for v in segment)
        if start != at or end <= start or end > rows or not 0 <= index < stack:
            raise ValueError(f"segmented_linear: segment {tuple(segment)} must start at row {at}, be non-empty, end "
                             f"by row {rows} and name a weight in [0, {stack}); segments {list(segments)}")
        out.append((index, start, end))
        at = end
    if at != rows:
        raise ValueError(f"segmented_linear: segments {list(segments)} cover rows [0, {at}), not [0, {rows})")
    return tuple(out)


class _SegmentedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, segments, scales):
        out = x.new_empty(x.shape[0], weight.shape[1])
        for (index, start, end), scale in zip(segments, scales):
            torch.addmm(bias[index], x[start:end], weight[index].t(), beta=scale, alpha=scale, out=out[start:end])
        ctx.save_for_backward(x, weight)
        ctx.segments, ctx.scales = segments, scales
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        blocks = [(index, start, end, scale) for (index, start, end), scale in zip(ctx.segments, ctx.scales)]
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x)
            for index, start, end, scale in blocks:
                torch.mm(grad[start:end], weight[index], out=grad_x[start:end])
                if scale != 1.0:
                    grad_x[start:end].mul_(scale)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros_like(weight)
            for index, start, end, scale in blocks:
                grad_weight[index].addmm_(grad[start:end].t(), x[start:end], alpha=scale)
        if ctx.needs_input_grad[2]:
            grad_bias = weight.new_zeros(weight.shape[:2])
            for index, start, end, scale in blocks:
                grad_bias[index].add_(grad[start:end].sum(0), alpha=scale)
        return grad_x, grad_weight, grad_bias, None, None


def segmented_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, segments: Sequence[Segment],
                     scales: Optional[Sequence[float]] = None) -> torch.Tensor:
    """``out[a:b] = scale * (x[a:b] @ weight[i].T + bias[i])`` for each segment ``(i, a, b)``.

    x (T, C_in); weight (S, C_out, C_in) and bias (S, C_out), a stack of S nn.Linear-layout weights; ``segments``
    cover the T rows in order (:func:`check_segments`); ``scales`` one float per segment (default 1). Returns
    (T, C_out). Equals one ``F.linear`` per segment, concatenated, to float rounding, gradients included (not
    twice differentiable). All tensors of one dtype: under autocast, cast them first.
    """
    if x.dim() != 2 or weight.dim() != 3 or bias.shape != weight.shape[:2] or x.shape[1] != weight.shape[2]:
        raise ValueError(f"segmented_linear: x (T, C_in), weight (S, C_out, C_in), bias (S, C_out) expected, got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)}, {tuple(bias.shape)}")
    segments = check_segments(segments, x.shape[0], weight.shape[0])
    scales = (1.0,) * len(segments) if scales is None else tuple(float(s) for s in scales)
    if len(scales) != len(segments):
        raise ValueError(f"segmented_linear: {len(scales)} scales for {len(segments)} segments")
    return _SegmentedLinear.apply(x, weight, bias, segments, scales)
