"""The transformer FFN and the one factory every encoder/decoder layer builds its FFN through.

A layer calls ``self.ffn(x, ctx)`` with ``x`` (N, L, C) and a :class:`RoutingContext` describing the
tokens (which dataset each image comes from, padding, query segments). A dense FFN ignores ``ctx``;
an MoE layer (gem_d2.modeling.moe) routes with it and records auxiliary losses/statistics in it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import torch
from torch import nn


@dataclass
class RoutingContext:
    """What a router may know about the tokens of one forward pass.

    dataset_ids: (N,) long, index of each image's dataset in the unified label space order.
    key_padding_mask: (N, L) bool or None, True = padded token (encoder only).
    segments: (L,) long or None, decoder only: the segment of each query, 0..G-1 for the G
        denoising groups and G for the matching queries (SoftMoE never mixes segments).
    query_labels: (N, L) long or None, decoder only: the unified class each query is taken to be
        (DN queries: their noised label; matching queries: argmax within the image's class block of
        the previous layer's logits). Class-level GEM routing uses it.
    aux_losses: filled by routers, name -> scalar tensor (e.g. "loss_balance_decoder.0").
    stats: filled by routers, name -> tensor (e.g. tokens per expert per dataset).
    prev_router_logits: stack ("encoder"/"decoder") -> (N, L, R) logits of that stack's latest MoE layer
        whose router exports them (MoE++ gating residuals: the next MoE layer of the stack adds them).
    """

    dataset_ids: torch.Tensor
    key_padding_mask: Optional[torch.Tensor] = None
    segments: Optional[torch.Tensor] = None
    query_labels: Optional[torch.Tensor] = None
    aux_losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    stats: Dict[str, torch.Tensor] = field(default_factory=dict)
    prev_router_logits: Dict[str, torch.Tensor] = field(default_factory=dict)


def _activation(name: str) -> nn.Module:
    acts = {"relu": nn.ReLU, "gelu": nn.GELU}
    if name not in acts:
        raise ValueError(f"MODEL.DINO.ACTIVATION={name!r}: expected one of {sorted(acts)}")
    return acts[name]()


class FFN(nn.Module):
    """Linear(d_model, d_ffn) -> activation -> dropout -> Linear(d_ffn, d_model). (N, L, C) -> (N, L, C)."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float = 0.0, activation: str = "relu"):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)

    def forward(self, x: torch.Tensor, ctx: Optional[RoutingContext] = None) -> torch.Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


@dataclass
class MoESpec:
    """Which FFNs are expert banks and how they route (built from MODEL.GEM by the meta-arch).

    layers: names like "encoder.3" / "decoder.0" of the FFNs that become MoE layers.
    router: ROUTER_REGISTRY name; router_kwargs: its keyword arguments (num_experts excluded).
    num_datasets: rows of the per-dataset routing statistics; None = max(ctx.dataset_ids) + 1.
    """

    layers: Sequence[str]
    num_experts: int
    router: str
    router_kwargs: dict = field(default_factory=dict)
    num_datasets: Optional[int] = None


def build_ffn(layer_name: str, d_model: int, d_ffn: int, dropout: float, activation: str,
              moe: Optional[MoESpec] = None) -> nn.Module:
    """The FFN of layer ``layer_name`` ("encoder.i" / "decoder.i"): an MoE bank if ``moe`` lists it."""
    if moe is None or layer_name not in moe.layers:
        return FFN(d_model, d_ffn, dropout, activation)
    from .moe import MoEFFN  # local import: the MoE package builds on this module

    return MoEFFN(layer_name, d_model, d_ffn, dropout, activation, moe)
