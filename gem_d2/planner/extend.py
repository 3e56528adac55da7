"""Extending a plan with new units while the planned units keep their experts (few-shot adaptation).

The planner's LP (docs/design/planner.md) with the old units' rows fixed as constraints (``x_uj = 1``
for their experts, 0 elsewhere) separates: the fixed rows contribute a constant to the objective and a
constant load ``L_j`` to every capacity row, so the new units' problem is the same LP over the new rows
only, with residual capacities ``C_j - L_j``. :func:`plan_new_units` solves exactly that with
:func:`~gem_d2.planner.plan.plan_mapping` and the same rounding. Capacities ``C_j`` follow the slack
formula over all units (old and new) unless given.

Experts appended for the new units (``num_new_experts``) hold no old unit; they would be dead unless a
new unit takes them, so their number may not exceed the new units' total ``k``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from gem_d2.planner.plan import ExpertPlan, plan_mapping
from gem_d2.planner.problem import PlanInfeasibleError, slack_capacities

__all__ = ["ExtensionPlan", "plan_new_units", "expert_keys_from_mapping"]


@dataclass
class ExtensionPlan:
    """New units' experts, planned around fixed old rows.

    Attributes:
        experts: per new unit, its expert ids (ascending, indexing all ``n`` experts).
        weights: per new unit, combination weights of its experts (summing to 1).
        plan: the :class:`ExpertPlan` of the new rows (columns = all experts; capacities = residual).
        capacities: (n,) full capacities ``C_j``; fixed_load: (n,) the old units' load ``L_j`` on each expert.
    """

    experts: List[List[int]]
    weights: List[List[float]]
    plan: ExpertPlan
    capacities: np.ndarray
    fixed_load: np.ndarray


def plan_new_units(affinity_new, loads_new, fixed_experts: Sequence[Sequence[int]], fixed_loads, k=1,
                   slack: float = 0.1, beta: float = 0.5, capacities=None, num_new_experts: int = 0,
                   solver: str = "CBC", rounding: str = "hierarchical",
                   unit_names: Optional[Sequence[str]] = None) -> ExtensionPlan:
    """Plan experts for new units; the old units' mapping rows are constraints, not variables.

    Args:
        affinity_new: (m_new, n) affinity of each new unit for every expert (n includes appended experts).
        loads_new: (m_new,) positive loads of the new units (same scale as ``fixed_loads``).
        fixed_experts: per old unit, its expert ids (the existing mapping rows); ids < n - num_new_experts.
        fixed_loads: (m_old,) loads of the old units.
        k: experts per new unit (int or (m_new,) ints).
        slack, beta, solver, rounding: as in :func:`plan_mapping`; capacities over all units when not given.
        capacities: optional (n,) explicit capacities ``C_j``.
        num_new_experts: experts appended at the end of the n columns for the new units.
    Returns:
        :class:`ExtensionPlan`.
    Raises:
        ValueError: malformed inputs, or more appended experts than the new units can use.
        PlanInfeasibleError: not enough spare capacity for the new units (names the shortfall).
    """
    w = np.asarray(affinity_new, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] < 1:
        raise ValueError(f"affinity_new must be a non-empty (m_new, n) array, got shape {w.shape}")
    m_new, n = w.shape
    s_new = np.asarray(loads_new, dtype=np.float64).reshape(-1)
    s_old = np.asarray(fixed_loads, dtype=np.float64).reshape(-1)
    if len(fixed_experts) != s_old.size:
        raise ValueError(f"fixed_experts has {len(fixed_experts)} rows but fixed_loads has {s_old.size} entries")
    n_old = n - int(num_new_experts)
    if num_new_experts < 0 or n_old < 1:
        raise ValueError(f"num_new_experts={num_new_experts} must be in [0, n={n})")
    k_new = np.broadcast_to(np.asarray(k, dtype=np.int64), (m_new,))
    if num_new_experts > int(k_new.sum()):
        raise ValueError(f"num_new_experts={num_new_experts} (MODEL.GEM.ADAPT.NEW_EXPERTS) exceeds the experts the "
                         f"new units take in all ({int(k_new.sum())} = EXPERTS_PER_UNIT x {m_new} new units): the "
                         f"extra experts would never be used")
    fixed_load = np.zeros(n, dtype=np.float64)
    k_old = []
    for u, row in enumerate(fixed_experts):
        row = [int(j) for j in row]
        if not row or any(not 0 <= j < n_old for j in row) or len(set(row)) != len(row):
            raise ValueError(f"fixed_experts[{u}] = {row}: expected distinct expert ids in [0, {n_old})")
        fixed_load[row] += s_old[u]
        k_old.append(len(row))
    if capacities is None:
        loads_all = np.concatenate([s_old, s_new])
        cap = slack_capacities(loads_all, np.concatenate([np.asarray(k_old, dtype=np.int64), k_new]), n, slack)
    else:
        cap = np.asarray(capacities, dtype=np.float64)
        if cap.shape != (n,):
            raise ValueError(f"capacities must have shape ({n},), got {cap.shape}")
    residual = np.clip(cap - fixed_load, 0.0, None)
    try:
        plan = plan_mapping(w, s_new, k=k_new, beta=beta, capacities=residual, solver=solver, rounding=rounding,
                            unit_names=unit_names, milp=False if rounding != "exact" else None)
    except PlanInfeasibleError as e:
        raise PlanInfeasibleError(e.constraint, f"no spare capacity for the new units around the fixed mapping: "
                                  f"{e} (residual capacities {np.round(residual, 6).tolist()}; raise "
                                  f"MODEL.GEM.PLANNER.SLACK or MODEL.GEM.ADAPT.NEW_EXPERTS)",
                                  e.required, e.available) from e
    experts, weights = [], []
    for u in range(m_new):
        cols = [int(j) for j in np.flatnonzero(plan.assignment[u] > 0.5)]
        experts.append(cols)
        weights.append([1.0 / len(cols)] * len(cols))
    return ExtensionPlan(experts=experts, weights=weights, plan=plan, capacities=cap, fixed_load=fixed_load)


def expert_keys_from_mapping(prototypes_old, fixed_experts: Sequence[Sequence[int]], num_experts: int,
                             fill=None) -> np.ndarray:
    """Expert keys in a feature space: key_j = mean prototype of the old units mapped to expert j.

    Args:
        prototypes_old: (m_old, C) unit prototypes (the same feature space as the new units').
        fixed_experts: per old unit, its expert ids.
        num_experts: n, the number of key rows.
        fill: (C,) row used for experts no old unit is mapped to (e.g. the new unit's prototype, so appended
            experts attract it); required when such experts exist.
    Returns:
        (n, C) float64 keys.
    """
    p = np.asarray(prototypes_old, dtype=np.float64)
    p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    keys = np.zeros((num_experts, p.shape[1]), dtype=np.float64)
    count = np.zeros(num_experts)
    for u, row in enumerate(fixed_experts):
        for j in row:
            keys[int(j)] += p[u]
            count[int(j)] += 1
    empty = count == 0
    if empty.any():
        if fill is None:
            raise ValueError(f"experts {np.flatnonzero(empty).tolist()} have no old unit and no fill row was given")
        keys[empty] = np.asarray(fill, dtype=np.float64)
    keys[~empty] /= count[~empty, None]
    return keys
