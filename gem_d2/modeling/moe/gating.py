"""Shared pieces of learned gates: expert capacity, capacity dropping, the Switch/GShard balance loss."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from gem_d2.modeling.moe.base import masked_mean


def expert_capacity(capacity_factor: float, num_tokens: int, k: int, num_experts: int) -> int:
    """``ceil(cf * T * k / E)`` assignments per expert; ``cf <= 0`` means unlimited (returns T * k)."""
    if capacity_factor <= 0:
        return num_tokens * k
    return int(math.ceil(capacity_factor * num_tokens * k / num_experts))


def tutel_capacity(capacity_factor: float, num_tokens: int, k: int, num_experts: int) -> int:
    """tutel's capacity, ``k * int(cf * ceil(T / E))`` assignments per expert; ``cf <= 0`` means unlimited."""
    if capacity_factor <= 0:
        return num_tokens * k
    return k * int(capacity_factor * math.ceil(num_tokens / num_experts))


def capacity_dropped(expert_index: torch.Tensor, valid: torch.Tensor, num_experts: int,
                     capacity: int, priority: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(T, k) bool: assignments beyond an expert's ``capacity``, plus every assignment of an invalid token.

    Priority is GShard's: all first choices in token order, then all second choices, and so on. With
    ``priority`` (T,) (batch-prioritised routing, tutel's ``batch_prioritized_routing``), the tokens of each
    round are taken in descending priority instead (ties in token order), e.g. the top gate probability.
    """
    if priority is not None:
        order = torch.argsort(priority, descending=True, stable=True)
        ranked = capacity_dropped(expert_index[order], valid[order], num_experts, capacity)
        return torch.empty_like(ranked).index_copy_(0, order, ranked)
    T, k = expert_index.shape
    onehot = F.one_hot(expert_index.t(), num_experts) * valid[None, :, None].long()  # (k, T, E)
    position = onehot.reshape(k * T, num_experts).cumsum(0).reshape(k, T, num_experts) - 1
    position = (position * onehot).sum(-1).t()  # (T, k): rank of this assignment in its expert's queue
    return ~((position < capacity) & valid[:, None])


def switch_balance_loss(probs: torch.Tensor, expert_index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``E * sum_e f_e * P_e`` (1 when uniform) over valid tokens.

    probs (T, E) gate probabilities; expert_index (T, k): f_e = share of the valid tokens' k choices
    that go to e (k = 1: Switch's fraction of top-1 choices); P_e = mean gate probability of e.
    """
    E = probs.shape[1]
    k = expert_index.shape[1]
    chosen = F.one_hot(expert_index, E).sum(1).to(probs.dtype)  # (T, E)
    f = masked_mean(chosen, valid) / k
    P = masked_mean(probs, valid)
    return E * (f * P).sum()
