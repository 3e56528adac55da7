"""ReMoE (Wang, Chen, Zhu 2024): ReLU gates with an adaptive load-weighted L1 sparsity penalty."""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist
from torch import nn

from gem_d2.modeling.moe.base import (
    Router,
    RoutingPlan,
    TokenBatch,
    check_nonnegative,
    check_positive_int,
    register_router,
    router_logits_fp32,
)


@register_router("remoe")
class ReMoERouter(Router):
    """g = ReLU(W_g x) (fp32); a token uses every expert with g_e > 0, weighted by g_e.

    Aux loss "remoe_l1" = ``lambda * E * sum_e (sum_t g_te / T) * (n_e / (T * k))`` over the T valid
    tokens (n_e = tokens with g_te > 0, k = target_k). ``lambda`` is a persistent (checkpointed) buffer:
    after each training-mode forward it is multiplied by ``l1_multiplier`` while the measured sparsity
    (share of zero gates among valid tokens) is below the target ``1 - k/E``, divided otherwise. Under
    torch.distributed the sparsity is all-reduced in training mode (one small collective per layer),
    so every rank applies the same update. Stats: "remoe_sparsity", "remoe_l1_coef".

    ``active_cap`` > 0 (not in ReMoE; for compute-matched comparisons) bounds the computed assignments of a layer
    call to ``floor(active_cap * T)``: when more gates are open, only the largest ``floor(active_cap * T)`` gate
    values of the whole call are computed (each token keeps a variable number of experts, the batch at most
    ``active_cap`` FFN evaluations per token on average); the loss and the sparsity controller still see every
    open gate. Stat "remoe_capped_fraction": open gates left out / open gates.
    """

    def __init__(self, d_model: int, num_experts: int, l1_init: float = 1e-8, l1_multiplier: float = 1.2,
                 target_k: int = 1, active_cap: float = 0.0):
        super().__init__(d_model, num_experts)
        self.active_cap = check_nonnegative(active_cap, "MODEL.GEM.REMOE.ACTIVE_CAP")
        if not float(l1_init) > 0:
            raise ValueError(f"MODEL.GEM.REMOE.L1_INIT={l1_init!r}: expected > 0")
        if not float(l1_multiplier) > 1:
            raise ValueError(f"MODEL.GEM.REMOE.L1_MULTIPLIER={l1_multiplier!r}: expected > 1")
        self.target_k = check_positive_int(target_k, "MODEL.GEM.REMOE.TARGET_K")
        if self.target_k > self.num_experts:
            raise ValueError(f"MODEL.GEM.REMOE.TARGET_K={target_k}: expected <= MODEL.GEM.NUM_EXPERTS={num_experts}")
        self.l1_multiplier = float(l1_multiplier)
        self.register_buffer("l1_coef", torch.tensor(float(l1_init), dtype=torch.float64))
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    @property
    def target_sparsity(self) -> float:
        return 1.0 - self.target_k / self.num_experts

    @classmethod
    def kwargs_from_cfg(cls, cfg, dataset_names: List[str]) -> dict:
        r = cfg.MODEL.GEM.REMOE
        return dict(l1_init=r.L1_INIT, l1_multiplier=r.L1_MULTIPLIER, target_k=r.TARGET_K, active_cap=r.ACTIVE_CAP)

    def route(self, tokens: TokenBatch) -> RoutingPlan:
        gates = torch.relu(router_logits_fp32(self.gate, tokens.x))  # (T, E)
        T, E = gates.shape
        valid = tokens.valid
        on = (gates > 0) & valid[:, None]
        n_valid = valid.sum().clamp(min=1).to(gates.dtype)
        mean_gate = (gates * valid[:, None]).sum(0) / n_valid
        load = on.sum(0).to(gates.dtype) / (n_valid * self.target_k)
        coef = self.l1_coef.detach().clone()
        loss = coef.to(gates.dtype) * E * (mean_gate * load).sum()
        counts = torch.stack([on.sum(), valid.sum() * E]).to(torch.float64)  # active gates, all gates
        if self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)  # every rank measures the global sparsity, so lambda stays identical
        sparsity = 1.0 - counts[0] / counts[1].clamp(min=1)
        if self.training and float(counts[1]) > 0:
            with torch.no_grad():
                factor = self.l1_multiplier if float(sparsity) < self.target_sparsity else 1.0 / self.l1_multiplier
                self.l1_coef.mul_(factor)
        index = torch.arange(E, device=gates.device).expand(T, E)
        stats = {"remoe_sparsity": sparsity.float(), "remoe_l1_coef": coef.float()}
        computed = on
        if self.active_cap > 0:
            computed = self._capped(gates, on, int(self.active_cap * int(valid.sum())))
            stats["remoe_capped_fraction"] = (on.sum() - computed.sum()).float() / on.sum().clamp(min=1).float()
        return RoutingPlan(index, gates, ~computed, {"remoe_l1": loss}, stats=stats)

    @staticmethod
    def _capped(gates: torch.Tensor, on: torch.Tensor, budget: int) -> torch.Tensor:
        """(T, E) bool: the ``budget`` largest open gates of the call (all of them when they fit)."""
        if int(on.sum()) <= budget:
            return on
        flat = gates.detach().masked_fill(~on, float("-inf")).reshape(-1)
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.topk(budget).indices] = True
        return keep.reshape(on.shape) & on
