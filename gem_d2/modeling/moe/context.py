"""What a router sees of one forward pass (:class:`RoutingContext`) and which FFNs are MoE (:class:`MoESpec`).

A transformer layer calls ``self.ffn(x, ctx)`` with ``x`` (N, L, C) and a :class:`RoutingContext`
describing the tokens (which dataset each image comes from, padding, query segments). A dense FFN
ignores ``ctx``; an MoE layer routes with it and records auxiliary losses/statistics in it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch


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
    _host_ids: Optional[Tuple[torch.Tensor, List[int]]] = field(default=None, init=False, repr=False, compare=False)

    def dataset_id_list(self) -> List[int]:
        """``dataset_ids`` as Python ints, read from the device once per context (per-image routing)."""
        if self._host_ids is None or self._host_ids[0] is not self.dataset_ids:
            self._host_ids = (self.dataset_ids, [int(i) for i in self.dataset_ids.tolist()])
        return self._host_ids[1]


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
