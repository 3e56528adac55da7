"""A bank of E FFN experts with stacked weights, each shaped like the dense :class:`~gem_d2.layers.mlp.FFN`."""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from gem_d2.layers.mlp import FFN
from gem_d2.layers.mlp import activation_layer as _activation
from gem_d2.layers.segmented_linear import Segment, segmented_linear

ExpertWeights = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class _ExpertViews(torch.autograd.Function):
    """``stacked`` (E, ...) -> ``stacked[e]`` for each of ``experts`` (distinct); the backward writes the stacked
    gradient with one zero-fill and one copy per expert that got a gradient."""

    @staticmethod
    def forward(ctx, stacked: torch.Tensor, experts: Tuple[int, ...]):
        ctx.experts, ctx.shape = experts, stacked.shape
        ctx.set_materialize_grads(False)
        return tuple(stacked[e] for e in experts)

    @staticmethod
    def backward(ctx, *grads):
        grad = None
        for e, g in zip(ctx.experts, grads):
            if g is not None:
                if grad is None:
                    grad = g.new_zeros(ctx.shape)
                grad[e] = g
        return grad, None


class ExpertBank(nn.Module):
    """E experts ``Linear(C, F) -> activation -> dropout -> Linear(F, C)`` stored stacked.

    Parameters use nn.Linear's (out, in) layout so one expert computes exactly like the dense FFN:
    ``w1`` (E, F, C), ``b1`` (E, F), ``w2`` (E, C, F), ``b2`` (E, C). Because each kind of weight is
    one Parameter, calling any expert gives every expert's slice a gradient (zero for unused ones).
    """

    def __init__(self, num_experts: int, d_model: int, d_ffn: int, dropout: float = 0.0,
                 activation: str = "relu"):
        super().__init__()
        self.num_experts, self.d_model, self.d_ffn = int(num_experts), int(d_model), int(d_ffn)
        E, C, Fh = self.num_experts, self.d_model, self.d_ffn
        self.w1 = nn.Parameter(torch.empty(E, Fh, C))
        self.b1 = nn.Parameter(torch.empty(E, Fh))
        self.w2 = nn.Parameter(torch.empty(E, C, Fh))
        self.b2 = nn.Parameter(torch.empty(E, C))
        self.activation = _activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert as the dense FFN of a DINO transformer starts.

        The references Xavier-initialise every >1-d transformer parameter and leave the 1-d ones at
        nn.Linear's default. So per expert: ``w1[e]`` (F, C) and ``w2[e]`` (C, F) Xavier-uniform with the
        dense Linear's fans, ``U(-sqrt(6 / (C + F)), +sqrt(6 / (C + F)))``; ``b1[e]`` and ``b2[e]``
        ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with ``fan_in`` C and F. (A 3-d tensor must not be given
        to ``xavier_uniform_`` whole: it would count the expert axis into the fans.)
        """
        for e in range(self.num_experts):
            nn.init.xavier_uniform_(self.w1[e])
            nn.init.xavier_uniform_(self.w2[e])
        for p, fan_in in ((self.b1, self.d_model), (self.b2, self.d_ffn)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(p, -bound, bound)

    def weights_of(self, experts: Sequence[int]) -> Optional[Dict[int, ExpertWeights]]:
        """``{e: (w1 (F, C), b1 (F,), w2 (C, F), b2 (C,))}`` for the distinct ``experts`` one layer call runs, or
        None when indexing per call is as cheap (one expert, or no gradient).

        Indexing ``w1[e]`` per expert call makes each call's backward allocate and zero-fill a whole (E, F, C)
        gradient, and several calls sum those; these views share one backward per stacked parameter that
        zero-fills it once and copies in each expert's gradient.
        """
        if len(experts) < 2 or not torch.is_grad_enabled():
            return None
        experts = tuple(int(e) for e in experts)
        if len(set(experts)) != len(experts):
            raise ValueError(f"ExpertBank.weights_of: repeated experts in {list(experts)}")
        views = [_ExpertViews.apply(p, experts) for p in (self.w1, self.b1, self.w2, self.b2)]
        return {e: tuple(v[j] for v in views) for j, e in enumerate(experts)}

    def forward_expert(self, e: int, x: torch.Tensor, weights: Optional[Dict[int, ExpertWeights]] = None,
                       scale: float = 1.0) -> torch.Tensor:
        """``scale`` x expert ``e`` on tokens ``x`` (..., C) -> (..., C); ``weights``: :meth:`weights_of`'s views,
        or None to index the stacked parameters.

        A ``scale`` other than 1 multiplies the second linear's weight and bias, (C, F) + (C,) numbers, not the
        (..., C) output: forward and backward then make no pass over the output for it."""
        w1, b1, w2, b2 = weights[e] if weights is not None else (self.w1[e], self.b1[e], self.w2[e], self.b2[e])
        if scale != 1.0:
            w2, b2 = w2 * scale, b2 * scale
        return F.linear(self.dropout(self.activation(F.linear(x, w1, b1))), w2, b2)

    def forward_segments(self, x: torch.Tensor, segments: Sequence[Segment],
                         scales: Optional[Sequence[float]] = None) -> torch.Tensor:
        """Each segment ``(e, start, end)``'s expert on its rows of ``x`` (T, C), times its scale -> (T, C).

        The segments cover the rows in order (:func:`~gem_d2.layers.segmented_linear.check_segments`). Equals
        ``forward_expert`` per segment, concatenated, but writes every segment into one output and one input
        gradient and the stacked weights' gradients with one zero-fill each
        (:func:`~gem_d2.layers.segmented_linear.segmented_linear`). ``x`` must have the parameters' dtype."""
        h = self.dropout(self.activation(segmented_linear(x, self.w1, self.b1, segments)))
        return segmented_linear(h, self.w2, self.b2, segments, scales)

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on its own tokens in one batched matmul: ``x`` (E, S, C) -> (E, S, C)."""
        if x.dim() != 3 or x.shape[0] != self.num_experts:
            raise ValueError(f"ExpertBank.forward_all expects (E={self.num_experts}, S, C), got {tuple(x.shape)}")
        h = torch.baddbmm(self.b1[:, None, :].to(x.dtype), x, self.w1.transpose(1, 2).to(x.dtype))
        h = self.dropout(self.activation(h))
        return torch.baddbmm(self.b2[:, None, :].to(h.dtype), h, self.w2.transpose(1, 2).to(h.dtype))

    @torch.no_grad()
    def load_from_ffn(self, ffn: FFN, experts: Optional[Sequence[int]] = None) -> None:
        """Copy a dense FFN's weights into ``experts`` (default: all), e.g. to start from a dense model."""
        if ffn.linear1.weight.shape != self.w1.shape[1:] or ffn.linear2.weight.shape != self.w2.shape[1:]:
            raise ValueError(f"load_from_ffn: FFN has linear1 {tuple(ffn.linear1.weight.shape)}, linear2 "
                             f"{tuple(ffn.linear2.weight.shape)}; experts expect {tuple(self.w1.shape[1:])}, "
                             f"{tuple(self.w2.shape[1:])}")
        for e in range(self.num_experts) if experts is None else experts:
            self.w1[e].copy_(ffn.linear1.weight)
            self.b1[e].copy_(ffn.linear1.bias)
            self.w2[e].copy_(ffn.linear2.weight)
            self.b2[e].copy_(ffn.linear2.bias)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_ffn={self.d_ffn}"
