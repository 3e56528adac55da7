"""MoE++ (Jin et al. 2024): FFN experts plus zero, copy and constant experts, with gating residuals."""
from __future__ import annotations

import math
from typing import List

import torch
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
from gem_d2.modeling.moe.gating import switch_balance_loss


@register_router("moepp")
class MoEPlusPlusRouter(Router):
    """Routes over R = E + Z + Cp + Ct experts: E FFN experts (indices 0..E-1), then Z zero experts
    (output 0), Cp copy experts (output x), Ct constant experts (output ``a1 x + a2 v_j``, v_j learned,
    [a1, a2] = softmax(W_j x)).

    logits = W_g x (fp32) + W_res * prev_logits when ``tokens.prev_logits`` (T, R) comes from the previous
    MoE++ layer of the stack (gating residual; W_res starts at 0); p = softmax(logits); each
    token takes its top-k routes with weights renormalised over the k (a zero expert's share is
    discarded, as the paper's zero expert outputs 0); with k = 1 the weight is the raw probability (Switch's
    choice: renormalised it would always be 1 and the task loss would never reach the gate). The public code
    (inference only) instead zeroes the zero expert's weight before renormalising. Aux loss "balance" =
    ``balance_coef * R * sum_r f_r P_r`` over all routes (f_r: share of the valid tokens' k choices); the
    paper's heterogeneous weighting is not public and is not used. The router exports its logits for the next layer.
    """

    def __init__(self, d_model: int, num_experts: int, k: int = 2, num_zero: int = 1, num_copy: int = 1,
                 num_constant: int = 2, balance_coef: float = 0.01):
        super().__init__(d_model, num_experts)
        counts = {"NUM_ZERO": num_zero, "NUM_COPY": num_copy, "NUM_CONSTANT": num_constant}
        for key, value in counts.items():
            if isinstance(value, bool) or int(value) != value or int(value) < 0:
                raise ValueError(f"MODEL.GEM.MOEPP.{key}={value!r}: expected an integer >= 0")
        self.num_zero, self.num_copy, self.num_constant = int(num_zero), int(num_copy), int(num_constant)
        self.k = check_positive_int(k, "MODEL.GEM.MOEPP.K")
        if self.k > self.num_routes:
            raise ValueError(f"MODEL.GEM.MOEPP.K={k}: expected <= number of experts incl. zero-computation "
                             f"ones ({self.num_routes})")
        self.balance_coef = check_nonnegative(balance_coef, "MODEL.GEM.MOEPP.BALANCE_COEF")
        R = self.num_routes
        self.gate = nn.Linear(d_model, R, bias=False)
        self.residual = nn.Linear(R, R, bias=False)
        nn.init.zeros_(self.residual.weight)
        self.const_vectors = nn.Parameter(torch.randn(self.num_constant, d_model))
        self.const_gate = nn.Parameter(torch.empty(self.num_constant, 2, d_model))
        nn.init.uniform_(self.const_gate, -1 / math.sqrt(d_model), 1 / math.sqrt(d_model))

    @property
    def num_routes(self) -> int:
        return self.num_experts + self.num_zero + self.num_copy + self.num_constant

    @classmethod
    def kwargs_from_cfg(cls, cfg, dataset_names: List[str]) -> dict:
        m = cfg.MODEL.GEM.MOEPP
        return dict(k=m.K, num_zero=m.NUM_ZERO, num_copy=m.NUM_COPY, num_constant=m.NUM_CONSTANT,
                    balance_coef=m.BALANCE_COEF)

    def route(self, tokens: TokenBatch) -> RoutingPlan:
        x, valid = tokens.x, tokens.valid
        T, R = x.shape[0], self.num_routes
        logits = router_logits_fp32(self.gate, x)
        prev = tokens.prev_logits
        if prev is not None and prev.shape == (T, R):
            with torch.autocast(device_type=x.device.type, enabled=False):
                logits = logits + self.residual(prev.to(logits.dtype))
        probs = logits.softmax(-1)
        top_p, top_i = probs.topk(self.k, dim=-1)
        weight = top_p if self.k == 1 else top_p / top_p.sum(-1, keepdim=True)
        dropped = ~valid[:, None].expand(T, self.k)
        aux = {"balance": self.balance_coef * switch_balance_loss(probs, top_i, valid)}
        return RoutingPlan(top_i, weight, dropped, aux, extra_output=self._non_ffn_output(x, top_i, weight, valid),
                           router_logits=logits)

    def _non_ffn_output(self, x: torch.Tensor, top_i: torch.Tensor, weight: torch.Tensor,
                        valid: torch.Tensor) -> torch.Tensor:
        """(T, C): the weighted outputs of the copy and constant experts (zero experts add nothing)."""
        per_route = weight.new_zeros(x.shape[0], self.num_routes).scatter_add_(1, top_i, weight * valid[:, None])
        start = self.num_experts + self.num_zero
        copy_w = per_route[:, start:start + self.num_copy].sum(1)  # (T,)
        const_w = per_route[:, start + self.num_copy:]  # (T, Ct)
        xf = x.to(per_route.dtype)
        out = copy_w[:, None] * xf
        if self.num_constant:
            with torch.autocast(device_type=x.device.type, enabled=False):
                a = torch.einsum("tc,jac->tja", xf, self.const_gate.to(xf.dtype)).softmax(-1)  # (T, Ct, 2)
                out = out + (const_w * a[..., 0]).sum(1, keepdim=True) * xf
                out = out + (const_w * a[..., 1]) @ self.const_vectors.to(xf.dtype)
        return out.to(x.dtype)
