"""Grouped dispatch: gather each expert's tokens, one call per used expert, scatter-add weighted outputs."""
from __future__ import annotations

from typing import Tuple

import torch

from gem_d2.modeling.moe.experts import ExpertBank


def grouped_dispatch(x: torch.Tensor, expert_index: torch.Tensor, combine_weight: torch.Tensor,
                     active: torch.Tensor, experts: ExpertBank) -> Tuple[torch.Tensor, bool]:
    """``out[t] = sum_j active[t,j] * combine_weight[t,j] * FFN_{expert_index[t,j]}(x[t])``.

    x (T, C); expert_index, combine_weight, active (T, k). Assignments to routes >= E (non-FFN routes)
    are skipped. Returns (out (T, C), whether any expert ran). Tokens are sorted by expert so each used
    expert is called once on a contiguous block; when every token goes to one and the same expert
    (k = 1), the expert runs on ``x`` directly without gather/scatter.
    """
    T, k = expert_index.shape
    E = experts.num_experts
    active = active & (expert_index < E)
    flat_e = expert_index[active]
    if flat_e.numel() == 0:
        return x.new_zeros(x.shape), False
    counts = torch.bincount(flat_e, minlength=E).tolist()  # one host sync: group sizes are needed anyway
    used = [e for e in range(E) if counts[e]]
    if k == 1 and len(used) == 1 and counts[used[0]] == T:
        y = experts.forward_expert(used[0], x)
        return y * combine_weight.to(y.dtype), True

    tokens = torch.arange(T, device=x.device)[:, None].expand(T, k)[active]
    weights = combine_weight[active]
    order = torch.argsort(flat_e, stable=True)
    tokens, weights = tokens[order], weights[order]
    chunks = x.index_select(0, tokens).split(counts)
    y = torch.cat([experts.forward_expert(e, chunks[e]) for e in used])
    y = y * weights[:, None].to(y.dtype)
    return y.new_zeros(T, y.shape[1]).index_add_(0, tokens, y), True


def plan_token_load(expert_index: torch.Tensor, active: torch.Tensor, num_routes: int) -> torch.Tensor:
    """(T, R) float: how many of token t's active assignments go to route r (for statistics)."""
    load = torch.zeros(expert_index.shape[0], num_routes, device=expert_index.device)
    return load.scatter_add_(1, expert_index, active.float())
