"""Learned softmax gates: ``topk`` (Switch k=1 / GShard k=2 with balance loss) and ``damex`` (dataset-aware)."""
from __future__ import annotations

from typing import List, Optional, Sequence

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
from gem_d2.modeling.moe.gating import capacity_dropped, expert_capacity, switch_balance_loss
from gem_d2.modeling.moe.router_gem import gem_tables_from_cfg


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

    Routing always follows the learned gate (training and test), with the gate probability as the
    combine weight and capacity ``ceil(cf * T_valid / E)`` (cf <= 0: unlimited), as DAMEX's tutel
    layer does. In training mode, aux loss "damex" = ``loss_coef * CE(logits, dataset_to_expert[dataset])``
    over valid tokens. dataset_to_expert: dataset index -> expert (default: dataset i -> expert i mod E).
    """

    def __init__(self, d_model: int, num_experts: int, dataset_to_expert: Optional[Sequence[int]] = None,
                 loss_coef: float = 0.1, capacity_factor: float = 1.25):
        super().__init__(d_model, num_experts)
        self.loss_coef = check_nonnegative(loss_coef, "MODEL.GEM.DAMEX.LOSS_COEF")
        self.capacity_factor = float(capacity_factor)
        if dataset_to_expert is not None:
            dataset_to_expert = list(dataset_to_expert)
            for d, e in enumerate(dataset_to_expert):
                if isinstance(e, bool) or int(e) != e or not 0 <= int(e) < num_experts:
                    raise ValueError(f"damex router dataset_to_expert[{d}] = {e!r}: expected an expert id in "
                                     f"[0, MODEL.GEM.NUM_EXPERTS={num_experts})")
            dataset_to_expert = torch.tensor([int(e) for e in dataset_to_expert], dtype=torch.long)
        self.register_buffer("dataset_to_expert", dataset_to_expert, persistent=False)
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    @classmethod
    def kwargs_from_cfg(cls, cfg, dataset_names: List[str]) -> dict:
        d = cfg.MODEL.GEM.DAMEX
        dataset_to_expert = None
        if len(cfg.MODEL.GEM.MAPPING):
            tables = gem_tables_from_cfg(cfg, dataset_names)
            dataset_to_expert = [tables.index[u][0] for u in tables.unit_of_dataset]
        return dict(dataset_to_expert=dataset_to_expert, loss_coef=d.LOSS_COEF,
                    capacity_factor=d.CAPACITY_FACTOR)

    def target_experts(self, dataset: torch.Tensor) -> torch.Tensor:
        """(T,) the expert each token's dataset is mapped to."""
        if self.dataset_to_expert is None:
            return dataset % self.num_experts
        return self.dataset_to_expert[dataset]

    def route(self, tokens: TokenBatch) -> RoutingPlan:
        logits = router_logits_fp32(self.gate, tokens.x)
        probs = logits.softmax(-1)
        top_p, top_i = probs.max(-1, keepdim=True)
        valid = tokens.valid
        capacity = expert_capacity(self.capacity_factor, int(valid.sum()), 1, self.num_experts)
        dropped = capacity_dropped(top_i, valid, self.num_experts, capacity)
        aux = {}
        if self.training:
            ce = F.cross_entropy(logits, self.target_experts(tokens.dataset), reduction="none")
            aux["damex"] = self.loss_coef * masked_mean(ce, valid)
        return RoutingPlan(top_i, top_p, dropped, aux)
