"""Shmoys–Tardos rounding (Math. Programming 62, 1993) of the LP solution: the yardstick for the compiler.

Each expert j is split into ``ceil(sum_u x*_uj)`` unit-size slots, filled by the units with x*_uj > 0 in
decreasing load (ties: unit index); a unit whose mass crosses a slot boundary is adjacent to both slots. The LP
solution is then a fractional matching that covers every unit, so a maximum-weight integral matching of units to
slots exists with objective >= the LP value, and each expert's load exceeds its capacity by at most the largest
unit load.

For k = 1 the matching is scipy's ``linear_sum_assignment``. For k > 1 a unit must take k_u slots of *distinct*
experts, which a plain assignment cannot express; that case is solved as the equivalent min-cost flow
(unit -> (unit, expert) with capacity 1 -> slot), whose constraint matrix is a network matrix, so scipy's HiGHS
returns an integral optimum.
"""
from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, linear_sum_assignment, milp

from gem_d2.planner.problem import PlanProblem

__all__ = ["shmoys_tardos_round"]

MASS_TOL = 1e-9


def _slot_edges(p: PlanProblem, x: np.ndarray):
    """Edges (unit, expert, slot id) of the slot graph and the number of slots."""
    edges = []
    slot_base = 0
    for j in range(p.n):
        col = x[:, j]
        units = np.flatnonzero(col > MASS_TOL)
        if units.size == 0:
            continue
        units = units[np.lexsort((units, -p.loads[units]))]
        num_slots = max(1, math.ceil(col[units].sum() - 1e-7))
        filled = 0.0
        for u in units:
            first = min(int(math.floor(filled + MASS_TOL)), num_slots - 1)
            filled += col[u]
            last = min(int(math.ceil(filled - MASS_TOL)) - 1, num_slots - 1)
            for t in range(first, max(first, last) + 1):
                edges.append((int(u), j, slot_base + t))
        slot_base += num_slots
    return edges, slot_base


def shmoys_tardos_round(p: PlanProblem, x_lp: np.ndarray) -> np.ndarray:
    """Round an LP solution by Shmoys–Tardos.

    Args:
        p: the problem.
        x_lp: (m, n) LP solution (must satisfy the coverage constraints).
    Returns:
        (m, n) float64 0/1 matrix with k_u distinct experts per unit.
    """
    x = np.asarray(x_lp, dtype=np.float64)
    if x.shape != (p.m, p.n):
        raise ValueError(f"x_lp must have shape ({p.m}, {p.n}), got {x.shape}")
    edges, num_slots = _slot_edges(p, x)
    eu = np.array([e[0] for e in edges])
    ej = np.array([e[1] for e in edges])
    es = np.array([e[2] for e in edges])
    gain = p.gain[eu, ej]
    assign = np.zeros((p.m, p.n))
    if np.all(p.k == 1):
        # Non-edges cost more than any matching of real edges can gain, so they are only used if unavoidable.
        big = 1.0 + 2.0 * p.m * (np.abs(gain).max() + 1.0)
        cost = np.full((p.m, num_slots), big)
        np.minimum.at(cost, (eu, es), -gain)
        rows, cols = linear_sum_assignment(cost)
        slot_expert = np.zeros(num_slots, dtype=np.int64)
        slot_expert[es] = ej
        if np.any(cost[rows, cols] >= big) or rows.size != p.m:
            raise RuntimeError("Shmoys-Tardos: no matching covers every unit; x_lp does not satisfy coverage")
        assign[rows, slot_expert[cols]] = 1.0
        return assign
    return _flow_matching(p, eu, ej, es, gain, num_slots)


def _flow_matching(p, eu, ej, es, gain, num_slots) -> np.ndarray:
    # Variables: one per edge (u, j, slot). Constraints: each unit takes k_u edges; each (u, j) pair at most one
    # edge; each slot at most one edge. Interval matrix of a bipartite flow: the LP optimum is integral.
    num = eu.shape[0]
    idx = np.arange(num)
    unit_rows = sp.csr_matrix((np.ones(num), (eu, idx)), shape=(p.m, num))
    pair_id = eu * p.n + ej
    pairs, pair_rows_idx = np.unique(pair_id, return_inverse=True)
    pair_rows = sp.csr_matrix((np.ones(num), (pair_rows_idx, idx)), shape=(pairs.size, num))
    slot_rows = sp.csr_matrix((np.ones(num), (es, idx)), shape=(num_slots, num))
    cons = [LinearConstraint(unit_rows, p.k, p.k), LinearConstraint(sp.vstack([pair_rows, slot_rows]), -np.inf, 1.0)]
    res = milp(-gain, constraints=cons, integrality=np.ones(num, dtype=np.int8), bounds=Bounds(0, 1))
    if res.status != 0:
        raise RuntimeError(f"Shmoys-Tardos (k > 1): the slot matching failed ({res.message})")
    chosen = res.x > 0.5
    assign = np.zeros((p.m, p.n))
    assign[eu[chosen], ej[chosen]] = 1.0
    return assign
