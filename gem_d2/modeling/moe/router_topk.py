"""Learned softmax gates: ``topk`` (Switch k=1 / GShard k=2 with balance loss) and ``damex`` (dataset-aware)."""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gem_d2.modeling.moe.base import (
    Router,
    RoutingPlan,
    TokenBatch,
    check_nonnegative,
    check_positive_int,
    masked_mean,
    register_router,
    router_logits_fp32,
)
from gem_d2.modeling.moe.damex_map import damex_dataset_to_expert
from gem_d2.modeling.moe.gating import capacity_dropped, expert_capacity, switch_balance_loss, tutel_capacity


@register_router("topk")
class TopKRouter(Router):
    """p = softmax(W_g x) in fp32; each token goes to its top-k experts.

    Weights: k = 1 keeps the raw probability (Switch, so the gate gets gradients), k >= 2 renormalises
    over the top-k (GShard). Capacity ``ceil(cf * T_valid * k / E)`` per expert (cf <= 0: unlimited);
    overflow assignments are dropped (output 0: the transformer residual carries the token).
    Aux losses: "balance" = ``balance_coef * E * sum_e f_e P_e`` (f_e: share of top-1 choices);
    "zloss" = ``z_loss_coef * mean_t logsumexp(logits_t)^2`` when z_loss_coef > 0.
    Stats: "dropped_fraction" of valid assignments.
    """

    def __init__(self, d_model: int, num_experts: int, k: int = 1, capacity_factor: float = 1.25,
                 balance_coef: float = 0.01, z_loss_coef: float = 0.0):
        super().__init__(d_model, num_experts)
        self.k = check_positive_int(k, "MODEL.GEM.TOPK.K")
        if self.k > self.num_experts:
            raise ValueError(f"MODEL.GEM.TOPK.K={k}: expected <= MODEL.GEM.NUM_EXPERTS={num_experts}")
        self.capacity_factor = float(capacity_factor)
        self.balance_coef = check_nonnegative(balance_coef, "MODEL.GEM.TOPK.BALANCE_COEF")
        self.z_loss_coef = check_nonnegative(z_loss_coef, "MODEL.GEM.TOPK.Z_LOSS_COEF")
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    @classmethod
    def kwargs_from_cfg(cls, cfg, dataset_names: List[str]) -> dict:
        t = cfg.MODEL.GEM.TOPK
        return dict(k=t.K, capacity_factor=t.CAPACITY_FACTOR, balance_coef=t.BALANCE_COEF, z_loss_coef=t.Z_LOSS_COEF)

    def route(self, tokens: TokenBatch) -> RoutingPlan:
        logits = router_logits_fp32(self.gate, tokens.x)
        probs = logits.softmax(-1)
        top_p, top_i = probs.topk(self.k, dim=-1)
        weight = top_p if self.k == 1 else top_p / top_p.sum(-1, keepdim=True)
        valid = tokens.valid
        capacity = expert_capacity(self.capacity_factor, int(valid.sum()), self.k, self.num_experts)
        dropped = capacity_dropped(top_i, valid, self.num_experts, capacity)
        aux = {"balance": self.balance_coef * switch_balance_loss(probs, top_i[:, :1], valid)}
        if self.z_loss_coef > 0:
            aux["zloss"] = self.z_loss_coef * masked_mean(torch.logsumexp(logits, -1) ** 2, valid)
        n_assign = (valid.sum() * self.k).clamp(min=1)
        stats = {"dropped_fraction": (dropped & valid[:, None]).sum() / n_assign}
        return RoutingPlan(top_i, weight, dropped, aux, stats=stats)


@register_router("damex")
class DAMEXRouter(Router):
    """DAMEX: a top-1 softmax gate (fp32) trained with cross-entropy toward each token's dataset's expert.

    Routing follows the learned gate (training and test), as DAMEX's tutel layer does: in training, tutel's
    gate noise ``logits + gate_noise * N(0, 1) / E`` (``gate_noise`` 0: none) picks the expert and gives the
    combine weight (its softmax probability); capacity is tutel's ``int(cf * ceil(T_valid / E))``
    (cf <= 0: unlimited) with batch-prioritised routing when ``batch_prioritized`` (tokens claim capacity in
    descending top probability, else in token order). In training mode, aux loss "damex" =
    ``loss_coef / num_moe_layers * CE(logits, dataset_to_expert[dataset])`` over valid tokens with the noise-free
    logits, so the losses of all MoE layers add up to ``loss_coef`` times their mean, as DAMEX averages its layers.
    dataset_to_expert: dataset index -> expert (required; :func:`~.damex_map.damex_dataset_to_expert`).
    Stats: "dropped_fraction" of valid tokens.
    """

    def __init__(self, d_model: int, num_experts: int, dataset_to_expert: Sequence[int], loss_coef: float = 0.1,
                 capacity_factor: float = 1.25, gate_noise: float = 1.0, batch_prioritized: bool = True,
                 num_moe_layers: int = 1):
        super().__init__(d_model, num_experts)
        self.loss_coef = check_nonnegative(loss_coef, "MODEL.GEM.DAMEX.LOSS_COEF")
        self.gate_noise = check_nonnegative(gate_noise, "MODEL.GEM.DAMEX.GATE_NOISE")
        self.num_moe_layers = check_positive_int(num_moe_layers, "number of MODEL.GEM.MOE_LAYERS")
        self.capacity_factor = float(capacity_factor)
        self.batch_prioritized = bool(batch_prioritized)
        if dataset_to_expert is None or len(dataset_to_expert) == 0:
            raise ValueError("damex router: dataset_to_expert is required (MODEL.GEM.DAMEX.DATASET_TO_EXPERT, or "
                             "DAMEX's UODB map for the UODB datasets)")
        for d, e in enumerate(dataset_to_expert):
            if isinstance(e, bool) or int(e) != e or not 0 <= int(e) < num_experts:
                raise ValueError(f"damex router dataset_to_expert[{d}] = {e!r}: expected an expert id in "
                                 f"[0, MODEL.GEM.NUM_EXPERTS={num_experts})")
        table = torch.tensor([int(e) for e in dataset_to_expert], dtype=torch.long)
        self.register_buffer("dataset_to_expert", table, persistent=False)
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    @classmethod
    def kwargs_from_cfg(cls, cfg, dataset_names: List[str]) -> dict:
        g = cfg.MODEL.GEM
        d = g.DAMEX
        return dict(dataset_to_expert=damex_dataset_to_expert(d.DATASET_TO_EXPERT, dataset_names, int(g.NUM_EXPERTS)),
                    loss_coef=d.LOSS_COEF, capacity_factor=d.CAPACITY_FACTOR, gate_noise=d.GATE_NOISE,
                    batch_prioritized=d.BATCH_PRIORITIZED, num_moe_layers=max(1, len(g.MOE_LAYERS)))

    def target_experts(self, dataset: torch.Tensor) -> torch.Tensor:
        """(T,) the expert each token's dataset is mapped to."""
        return self.dataset_to_expert[dataset]

    def route(self, tokens: TokenBatch) -> RoutingPlan:
        logits = router_logits_fp32(self.gate, tokens.x)
        noisy = logits
        if self.training and self.gate_noise > 0:
            noisy = logits + self.gate_noise * torch.randn_like(logits) / self.num_experts
        top_p, top_i = noisy.softmax(-1).max(-1, keepdim=True)
        valid = tokens.valid
        capacity = tutel_capacity(self.capacity_factor, int(valid.sum()), 1, self.num_experts)
        priority = top_p[:, 0].detach() if self.batch_prioritized else None
        dropped = capacity_dropped(top_i, valid, self.num_experts, capacity, priority)
        aux = {}
        if self.training:
            ce = F.cross_entropy(logits, self.target_experts(tokens.dataset), reduction="none")
            aux["damex"] = (self.loss_coef / self.num_moe_layers) * masked_mean(ce, valid)
        stats = {"dropped_fraction": (dropped & valid[:, None]).sum() / valid.sum().clamp(min=1)}
        return RoutingPlan(top_i, top_p, dropped, aux, stats=stats)
