"""The router interface, its registry and the records that pass between a router and :class:`MoEFFN`.

A router is an ``nn.Module`` registered in ``ROUTER_REGISTRY`` and selected by ``MODEL.GEM.ROUTER``.
:class:`MoEFFN` builds it as ``cls(d_model=C, num_experts=E, **spec.router_kwargs)`` and then builds
``router.num_experts`` FFN experts (``dense`` asks for 1). Two ways to implement one:

1. ``route(tokens: TokenBatch) -> RoutingPlan`` (per-token routing; the default ``forward_moe`` runs
   the grouped dispatch of :mod:`.dispatch` on the plan). ``expert_index`` values lie in
   ``[0, num_routes)``; routes ``>= num_experts`` are not FFN experts (MoE++'s zero/copy/constant):
   the dispatch skips them and the router adds their contribution as ``plan.extra_output``.
2. ``forward_moe(tokens, experts) -> MoEResult`` for routers that do not fit a per-token plan
   (SoftMoE mixes tokens into slots).

Padded tokens (``tokens.valid`` False) must not count in auxiliary losses; the layer never computes
them (their output is 0) and leaves them out of the statistics. ``kwargs_from_cfg(cfg, dataset_names)``
turns ``MODEL.GEM.*`` into the constructor's keyword arguments (see :func:`.spec.moe_spec_from_cfg`).

Example, a user router (selected with ``MODEL.GEM.ROUTER: FirstExpert``)::

    @ROUTER_REGISTRY.register()
    class FirstExpert(Router):
        def route(self, tokens):
            T = tokens.x.shape[0]
            idx = torch.zeros(T, 1, dtype=torch.long, device=tokens.x.device)
            return RoutingPlan(idx, torch.ones(T, 1, device=tokens.x.device))
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import torch
from detectron2.utils.registry import Registry
from torch import nn

from gem_d2.modeling.moe.context import RoutingContext

if TYPE_CHECKING:  # pragma: no cover
    from gem_d2.modeling.moe.experts import ExpertBank

ImageRoute = Tuple[Tuple[int, float], ...]  # (expert id, combination weight) pairs every token of an image uses

ROUTER_REGISTRY = Registry("GEM_ROUTER")
ROUTER_REGISTRY.__doc__ = """
Routers of gem_d2's MoE layers (subclasses of gem_d2.modeling.moe.Router), selected by
MODEL.GEM.ROUTER and built with ``cls(d_model=..., num_experts=..., **router_kwargs)``.
``@ROUTER_REGISTRY.register()`` registers a class under its class name; ``@register_router("name")``
under a short name (the built-ins: gem, dense, topk, softmoe, remoe, moepp, damex).
"""


def register_router(name: str):
    """Class decorator: register a router in ROUTER_REGISTRY under ``name`` (not the class name)."""

    def deco(cls):
        ROUTER_REGISTRY._do_register(name, cls)  # fvcore's public register() only uses __name__
        return cls

    return deco


@dataclass
class TokenBatch:
    """The tokens of one MoE layer call, flattened to T = N * L.

    x: (T, C) features; dataset: (T,) long dataset index of each token's image; labels: (T,) long
    unified class id per token (decoder queries, ``ctx.query_labels``) or None; valid: (T,) bool,
    False = padded; shape: (N, L); ctx: the layer's RoutingContext (segments...); prev_logits: (T, R)
    router logits of the previous MoE layer of the same stack that exported them, or None.
    """

    x: torch.Tensor
    dataset: torch.Tensor
    labels: Optional[torch.Tensor]
    valid: torch.Tensor
    shape: Tuple[int, int]
    ctx: RoutingContext
    prev_logits: Optional[torch.Tensor] = None


@dataclass
class RoutingPlan:
    """Per-token routing: token t goes to routes ``expert_index[t]`` with weights ``combine_weight[t]``.

    expert_index: (T, k) long in [0, num_routes); combine_weight: (T, k) float; dropped: (T, k) bool
    or None, True = this assignment is not computed (capacity overflow, inactive gate).
    aux_losses: short name -> scalar (e.g. "balance"), stored as ``loss_<name>_<layer>``.
    extra_output: (T, C) or None, contribution of non-FFN routes (index >= num_experts).
    router_logits: (T, R) or None, exported to ``ctx.prev_router_logits[stack]`` (gating residuals).
    stats: short name -> 0-dim tensor, stored detached as ``<layer>/<name>``.
    """

    expert_index: torch.Tensor
    combine_weight: torch.Tensor
    dropped: Optional[torch.Tensor] = None
    aux_losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    extra_output: Optional[torch.Tensor] = None
    router_logits: Optional[torch.Tensor] = None
    stats: Dict[str, torch.Tensor] = field(default_factory=dict)

    def check(self, num_tokens: int, num_routes: int, router_name: str) -> None:
        """Raise a clear error if the plan's shapes do not fit ``num_tokens`` tokens.

        Expert ids are not range-checked here (reading a tensor's values synchronises with the device on every
        forward): a router must return ids in ``[0, num_routes)``; the tests of each router check it."""
        idx = self.expert_index
        if idx.dim() != 2 or idx.shape[0] != num_tokens or idx.dtype != torch.long:
            raise ValueError(f"router {router_name}: expert_index must be (T={num_tokens}, k) long, "
                             f"got {tuple(idx.shape)} {idx.dtype}")
        if self.combine_weight.shape != idx.shape:
            raise ValueError(f"router {router_name}: combine_weight shape {tuple(self.combine_weight.shape)} "
                             f"!= expert_index shape {tuple(idx.shape)}")
        if self.dropped is not None and (self.dropped.shape != idx.shape or self.dropped.dtype != torch.bool):
            raise ValueError(f"router {router_name}: dropped must be bool of shape {tuple(idx.shape)}")


@dataclass
class MoEResult:
    """What ``forward_moe`` returns.

    output: (T, C); token_load: (T, R) float, how much of each token route r took (1 per assignment
    for hard routing, fractional for SoftMoE), used for the per-dataset statistics;
    experts_ran: whether any FFN expert was called (else the layer anchors the expert parameters
    for DDP); aux_losses / stats / router_logits as in :class:`RoutingPlan`.
    """

    output: torch.Tensor
    token_load: torch.Tensor
    experts_ran: bool
    aux_losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    stats: Dict[str, torch.Tensor] = field(default_factory=dict)
    router_logits: Optional[torch.Tensor] = None


class Router(nn.Module):
    """Base class of routers; see the module docstring for the interface.

    Attributes: ``d_model`` (C); ``num_experts`` (FFN experts the layer builds); ``num_routes``
    (columns of plans and statistics, = num_experts unless the router has non-FFN routes).
    """

    def __init__(self, d_model: int, num_experts: int):
        super().__init__()
        if int(d_model) < 1:
            raise ValueError(f"router d_model={d_model}: expected a positive integer")
        if int(num_experts) < 1:
            raise ValueError(f"MODEL.GEM.NUM_EXPERTS={num_experts}: expected a positive integer")
        self.d_model = int(d_model)
        self.num_experts = int(num_experts)

    @property
    def num_routes(self) -> int:
        return self.num_experts

    @classmethod
    def kwargs_from_cfg(cls, cfg, dataset_names: List[str]) -> dict:
        """Constructor keyword arguments from ``cfg.MODEL.GEM`` (none by default)."""
        return {}

    def route(self, tokens: TokenBatch) -> RoutingPlan:
        raise NotImplementedError(f"router {type(self).__name__} implements neither route() nor forward_moe()")

    def image_routes(self, ctx: RoutingContext, num_images: int) -> Optional[List[ImageRoute]]:
        """Per image, the ``(expert, weight)`` pairs that every one of its tokens uses, when this call's routing is
        per image; then :class:`MoEFFN` runs each expert on the image's contiguous tokens (no gather, no scatter)
        and ``route``/``forward_moe`` are not called. None (the default): per-token routing. Such a router has no
        auxiliary losses, statistics or exported logits, and uses only FFN experts (ids < ``num_experts``)."""
        return None

    def forward_moe(self, tokens: TokenBatch, experts: ExpertBank) -> MoEResult:
        """Default: ``route`` then grouped dispatch. Output (T, C)."""
        from gem_d2.modeling.moe.dispatch import grouped_dispatch, plan_token_load

        plan = self.route(tokens)
        plan.check(tokens.x.shape[0], self.num_routes, type(self).__name__)
        active = tokens.valid[:, None].expand_as(plan.expert_index)
        if plan.dropped is not None:
            active = active & ~plan.dropped
        out, ran = grouped_dispatch(tokens.x, plan.expert_index, plan.combine_weight, active, experts)
        if plan.extra_output is not None:
            out = out + plan.extra_output.to(out.dtype)
        load = plan_token_load(plan.expert_index, active, self.num_routes)
        return MoEResult(out, load, ran, plan.aux_losses, plan.stats, plan.router_logits)


def router_logits_fp32(gate: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``gate(x)`` in float32 (float64 for a float64 model) even under autocast: routing is precision-sensitive."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        bias = None if gate.bias is None else gate.bias.to(dtype)
        return nn.functional.linear(x.to(dtype), gate.weight.to(dtype), bias)


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (T, ...) over rows where ``valid`` (T,) is True; 0 (with graph) if none are."""
    n = valid.sum()
    summed = (values * valid.reshape(-1, *([1] * (values.dim() - 1))).to(values.dtype)).sum(0)
    return summed / n.clamp(min=1).to(values.dtype)


def check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ValueError(f"{name}={value!r}: expected a positive integer")
    return int(value)


def check_nonnegative(value, name: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r}: expected a finite number >= 0")
    return value
