"""Expert dispatch: per token (gather each expert's tokens, one call per used expert, scatter-add weighted
outputs) or per image (each expert on an image's contiguous tokens, when all tokens of an image share experts)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from gem_d2.modeling.moe.experts import ExpertBank


def grouped_dispatch(x: torch.Tensor, expert_index: torch.Tensor, combine_weight: torch.Tensor,
                     active: torch.Tensor, experts: ExpertBank) -> Tuple[torch.Tensor, bool]:
    """``out[t] = sum_j active[t,j] * combine_weight[t,j] * FFN_{expert_index[t,j]}(x[t])``.

    x (T, C); expert_index, combine_weight, active (T, k). Assignments to routes >= E (non-FFN routes)
    are skipped. Returns (out (T, C), whether any expert ran). Tokens are sorted by expert so each used
    expert is called once on a contiguous block (several share :meth:`ExpertBank.weights_of`'s views); when
    every token goes to one and the same expert (k = 1), the expert runs on ``x`` directly without
    gather/scatter.
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

    weights_per_expert = experts.weights_of(used)
    tokens = torch.arange(T, device=x.device)[:, None].expand(T, k)[active]
    weights = combine_weight[active]
    order = torch.argsort(flat_e, stable=True)
    tokens, weights = tokens[order], weights[order]
    chunks = x.index_select(0, tokens).split(counts)
    y = torch.cat([experts.forward_expert(e, chunks[e], weights_per_expert) for e in used])
    y = y * weights[:, None].to(y.dtype)
    return y.new_zeros(T, y.shape[1]).index_add_(0, tokens, y), True


def plan_token_load(expert_index: torch.Tensor, active: torch.Tensor, num_routes: int) -> torch.Tensor:
    """(T, R) float: how many of token t's active assignments go to route r (for statistics)."""
    load = torch.zeros(expert_index.shape[0], num_routes, device=expert_index.device)
    return load.scatter_add_(1, expert_index, active.float())


def per_image_dispatch(x: torch.Tensor, routes: Sequence[Tuple[Tuple[int, float], ...]], experts: ExpertBank,
                       padding: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, bool]:
    """``out[n] = sum_(e, w) in routes[n] of w * FFN_e(x[n])`` for images ``x`` (N, L, C); 0 where ``padding``.

    ``routes``: per image its ``(expert, weight)`` pairs (experts < E). Consecutive images with the same route
    form one slice of ``x`` (a view: nothing is gathered or scattered); each of its experts runs once on it, its
    weight folded into the expert's second linear (``forward_expert(..., scale=w)``), and a second expert's output
    is added in place. Several experts share one view of each stacked weight (:meth:`ExpertBank.weights_of`).
    When every image has one expert and the batch has several runs (a mixed batch, k = 1), the runs go through
    :meth:`ExpertBank.forward_segments` instead, which writes them all into one output (fp32/fp64 without
    autocast; under autocast the per-run path, whose linears autocast).
    ``padding`` (N, L) bool (True = padded) or None: padded tokens' outputs (and so their gradients) are
    multiplied by 0, as the grouped dispatch never computes them (a non-finite output stays non-finite there, as
    with the dense FFN, which computes padded tokens too). Returns (out (N, L, C), whether any expert ran).
    Equals :func:`grouped_dispatch` on the same plan up to float rounding.
    """
    N, L, C = x.shape
    if len(routes) != N:
        raise ValueError(f"per_image_dispatch: {len(routes)} routes for {N} images")
    runs = [0] + [n for n in range(1, N) if routes[n] != routes[n - 1]] + [N]  # starts of runs of equal routes
    if len(runs) > 2 and all(len(routes[a]) == 1 for a in runs[:-1]) and x.dtype == experts.w1.dtype \
            and not torch.is_autocast_enabled(x.device.type):
        # one expert per image and several runs: every run written into one output (no cat, no split backward)
        segments = [(routes[a][0][0], a * L, b * L) for a, b in zip(runs[:-1], runs[1:])]
        scales = [routes[a][0][1] for a in runs[:-1]]
        out, ran = experts.forward_segments(x.reshape(N * L, C), segments, scales), True
    else:
        out, ran = _per_run_outputs(x, routes, runs, experts)
    if padding is not None:
        # In place (out is a fresh tensor, not a view: in place on a view would make the backward copy whole
        # slices) and a multiply, not masked_fill, the slower of the two on the CPU.
        out = out.mul_(padding.reshape(-1, 1).logical_not())
    return out.view(N, L, -1), ran


def _per_run_outputs(x: torch.Tensor, routes: Sequence[Tuple[Tuple[int, float], ...]], runs: Sequence[int],
                     experts: ExpertBank) -> Tuple[torch.Tensor, bool]:
    """:func:`per_image_dispatch` without padding, expert by expert on each run of images: (N * L, C), ran."""
    C = x.shape[2]
    # split, not indexing: its backward writes the input's gradient once (a slice's would zero-fill it per slice)
    slices = x.split([b - a for a, b in zip(runs[:-1], runs[1:])]) if len(runs) > 2 else (x,)
    weights_per_expert = experts.weights_of(sorted({e for start in runs[:-1] for e, _ in routes[start]}))
    pieces, ran = [], False
    for start, xs in zip(runs, slices):
        tokens = xs.reshape(-1, C)  # 2-d, so an expert's output is its matmul's own tensor, not a view of it
        y = None
        for e, w in routes[start]:
            ye = experts.forward_expert(e, tokens, weights_per_expert, scale=w)
            y = ye if y is None else y.add_(ye)  # y: a matmul's output, which its backward does not need
        ran = ran or y is not None
        pieces.append(tokens.new_zeros(tokens.shape) if y is None else y)
    return (pieces[0] if len(pieces) == 1 else torch.cat(pieces)), ran
