"""Hierarchical rounding of the LP solution (docs/design/planner.md, compiler steps 1-3).

1. Commit every ``x*_uj >= 1 - 1e-9``.
2. For levels l = 1..L (L = ceil(log2 m), at least 1) take the pairs whose l-th binary digit,
   ``floor(x* 2^l) mod 2``, is 1, in order of x* desc, a*w desc (ties: unit, then expert index), and commit
   each while its unit still needs experts and the unit's load fits in the expert's residual capacity.
3. Fallback: a unit still short takes its best a*w expert with room; if none has room, the one whose overflow
   would be smallest. Overflow is left for the repair pass (:mod:`.repair`) and reported, never hidden.
"""
from __future__ import annotations

import math

import numpy as np

from gem_d2.planner.problem import PlanProblem

__all__ = ["hierarchical_round"]

INTEGRAL_TOL = 1e-9


def hierarchical_round(p: PlanProblem, x_lp: np.ndarray) -> np.ndarray:
    """Round an LP solution to a 0/1 assignment in which every unit u has exactly k_u distinct experts.

    Args:
        p: the problem.
        x_lp: (m, n) fractional solution in [0, 1].
    Returns:
        (m, n) float64 0/1 matrix (may exceed capacities; see :func:`PlanProblem.overflow`).
    """
    x_lp = np.asarray(x_lp, dtype=np.float64)
    if x_lp.shape != (p.m, p.n):
        raise ValueError(f"x_lp must have shape ({p.m}, {p.n}), got {x_lp.shape}")
    gain = p.gain
    assign = np.zeros((p.m, p.n), dtype=bool)
    load = np.zeros(p.n)
    need = p.k.copy()
    tol = p.capacity_tol

    def commit(u: int, j: int) -> None:
        assign[u, j] = True
        load[j] += p.loads[u]
        need[u] -= 1

    # Step 1: the LP's integral part (row-major order = unit index, then expert index).
    for u, j in zip(*np.nonzero(x_lp >= 1.0 - INTEGRAL_TOL)):
        if need[u] > 0:
            commit(int(u), int(j))

    # Step 2: binary-digit levels.
    levels = max(1, math.ceil(math.log2(p.m))) if p.m > 1 else 1
    units, experts = np.meshgrid(np.arange(p.m), np.arange(p.n), indexing="ij")
    for level in range(1, levels + 1):
        digit = np.floor(x_lp * 2.0 ** level + INTEGRAL_TOL).astype(np.int64) % 2 == 1
        cand = digit & ~assign & (x_lp > INTEGRAL_TOL)
        cu, cj = units[cand], experts[cand]
        order = np.lexsort((cj, cu, -gain[cu, cj], -x_lp[cu, cj]))
        for u, j in zip(cu[order], cj[order]):
            if need[u] > 0 and not assign[u, j] and load[j] + p.loads[u] <= p.capacities[j] + tol:
                commit(int(u), int(j))

    # Step 3: fallback for units still short.
    for u in np.flatnonzero(need > 0):
        while need[u] > 0:
            free = ~assign[u]
            fits = free & (load + p.loads[u] <= p.capacities + tol)
            if fits.any():
                cands = np.flatnonzero(fits)
                j = cands[np.argmax(gain[u, cands])]  # argmax returns the first (lowest index) of ties
            else:
                cands = np.flatnonzero(free)
                over = load[cands] + p.loads[u] - p.capacities[cands]
                j = cands[np.lexsort((cands, -gain[u, cands], over))[0]]
            commit(int(u), int(j))
    return assign.astype(np.float64)
