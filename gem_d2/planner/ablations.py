"""Planner ablations: other mappings for the same problem, to measure whether GEM's plan matters.

Each is selected by a ``MODEL.GEM.ROUTER`` value (:data:`ROUTER_VARIANTS`). The router dispatches exactly like
``gem`` (the mapping's experts and weights, no gate, no loss); only the planner's answer differs. The mapping is
planned before training like GEM's (``gem_d2.engine.planning``, ``plan_from_cfg``) and stored as a
:class:`~gem_d2.planner.mapping.GemMapping`. Every variant sees the same affinity, loads, ``k``, capacities
(``PLANNER.SLACK``) and importance (``PLANNER.BETA``) as GEM:

- ``gem_random`` (variant ``random``): a mapping drawn uniformly from the mappings that meet GEM's
  constraints (each unit ``k_u`` distinct experts, no dead expert when ``m >= n``, capacities), seeded by
  ``PLANNER.SEED``. When no mapping meets the capacities (e.g. 5 units of which 4 large on 4 experts), the
  least-overflowing ones (smallest largest overflow) take their place, which is what GEM's compiler delivers then.
  Small problems (:data:`MAX_ENUMERATED` mappings) are enumerated; larger ones are rejection-sampled (uniform
  over the capacity-feasible mappings; an error when none is found).
- ``gem_inverse`` (``inverse``): the plan that MINIMISES the objective ``sum a_u w_uj x_uj`` under the same LP
  constraints, compiled by the same compiler (``PLANNER.ROUNDING``). Solved as GEM's maximisation of
  ``w'_uj = max_j w_uj - w_uj``: since every unit takes exactly ``k_u`` experts, the two objectives differ by a
  constant.
- ``gem_k2`` (``affinity`` with ``EXPERTS_PER_UNIT: 2``): GEM's plan with two experts per unit, combined with the
  plan's weights (the affinity renormalised over the two).
- ``gem_nocap`` (``nocap``): the same LP without the capacity and no-dead-expert constraints: every unit on its
  ``k_u`` most similar experts (ties: lower expert id), however unbalanced.
- ``gem_worst`` (``worst``): the worst grouping. Experts start exchangeable, so what a mapping decides is which
  units share an expert; renaming the experts of a mapping changes GEM's objective but not the training. Among
  the mappings that meet GEM's constraints (the ``random`` variant's set), the one whose best renaming
  (``max_pi sum_u a_u sum_{e in S(u)} w_{u, pi(e)}``, a linear assignment) scores lowest, i.e. units grouped so
  that no expert key suits a group. ``inverse`` is not that: with 2 experts (equal capacities, softmax affinity
  rows, k = 1) its optimum is GEM's with the two experts' names swapped (the same grouping), and in general
  similar units, whose affinity rows are alike, still land together. Enumerated problems only
  (:data:`MAX_ENUMERATED` mappings).

The returned :class:`~gem_d2.planner.plan.ExpertPlan` keeps GEM's problem (so its report shows each
expert's load against GEM's capacities and the objective in GEM's terms); ``x_lp``/``lp_value`` are the GEM LP's
for ``random`` and ``worst`` (the bound they are measured against), the variant's own LP otherwise.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from typing import Optional, Sequence

import numpy as np

from gem_d2.planner.lp import solve_lp, solve_milp
from gem_d2.planner.plan import ExpertPlan, compile_assignment, plan_mapping
from gem_d2.planner.problem import PlanInfeasibleError, PlanProblem, build_problem

__all__ = ["ROUTER_VARIANTS", "PLANNED_ROUTERS", "VARIANTS", "planner_variant", "check_router_cfg", "plan_variant",
           "random_assignment", "MAX_ENUMERATED"]

logger = logging.getLogger(__name__)

ROUTER_VARIANTS = {"gem": "affinity", "gem_k2": "affinity", "gem_random": "random", "gem_inverse": "inverse",
                   "gem_nocap": "nocap", "gem_worst": "worst"}
PLANNED_ROUTERS = tuple(ROUTER_VARIANTS)  # routers whose mapping is planned before training
VARIANTS = ("affinity", "random", "inverse", "nocap", "worst")
ROUTER_EXPERTS_PER_UNIT = {"gem_k2": 2}
MAX_ENUMERATED = 1 << 20  # random: enumerate every mapping up to this many, else rejection-sample
MAX_DRAWS = 1 << 20  # random: rejection-sampling draws before giving up


def planner_variant(router: str) -> str:
    """The planner variant of ``MODEL.GEM.ROUTER`` (``affinity``, GEM's own plan, for any router not listed)."""
    return ROUTER_VARIANTS.get(str(router), "affinity")


def check_router_cfg(cfg) -> None:
    """Raise when ``MODEL.GEM.EXPERTS_PER_UNIT`` contradicts the router (``gem_k2`` plans two experts per unit)."""
    g = cfg.MODEL.GEM
    need = ROUTER_EXPERTS_PER_UNIT.get(str(g.ROUTER))
    if need is not None and int(g.EXPERTS_PER_UNIT) != need:
        raise ValueError(f"MODEL.GEM.ROUTER={g.ROUTER!r} plans {need} experts per unit: set "
                         f"MODEL.GEM.EXPERTS_PER_UNIT {need} (got {g.EXPERTS_PER_UNIT})")


def _expert_sets(p: PlanProblem):
    return [list(itertools.combinations(range(p.n), int(k))) for k in p.k]


def _incidence(sets, n: int) -> np.ndarray:
    inc = np.zeros((len(sets), n))
    for i, s in enumerate(sets):
        inc[i, list(s)] = 1.0
    return inc


def _assignment(p: PlanProblem, sets, choice) -> np.ndarray:
    x = np.zeros((p.m, p.n))
    for u, c in enumerate(choice):
        x[u, list(sets[u][int(c)])] = 1.0
    return x


def _feasible_pool(p: PlanProblem, sets, incs, what: str):
    """Every mapping as (total, m) choice indices, and the indices of those meeting the constraints (or, when none
    meets the capacities, of the least-overflowing ones)."""
    sizes = [len(s) for s in sets]
    choice = np.indices(sizes).reshape(p.m, -1).T  # (total, m), row-major: deterministic order
    load = sum(p.loads[u] * incs[u][choice[:, u]] for u in range(p.m))  # (total, n)
    ok = np.ones(len(choice), dtype=bool)
    if p.no_dead:
        ok &= (sum(incs[u][choice[:, u]] for u in range(p.m)) > 0).all(axis=1)
    if not ok.any():
        raise PlanInfeasibleError("no_dead_expert", f"{what}: no mapping of {p.m} units onto {p.n} experts uses "
                                                    "every expert")
    over = np.clip(load - p.capacities, 0.0, None).max(axis=1)
    best = over[ok].min()
    pool = np.flatnonzero(ok & (over <= best + p.capacity_tol))
    if best > p.capacity_tol:
        logger.warning("%s: no mapping meets the capacities; choosing among the %d whose largest overflow is the "
                       "smallest possible (%.4g)", what, pool.size, best)
    return choice, pool


def random_assignment(p: PlanProblem, seed: int) -> np.ndarray:
    """A 0/1 (m, n) mapping drawn uniformly from those meeting ``p``'s constraints (see the module docstring)."""
    rng = np.random.default_rng(int(seed))
    sets = _expert_sets(p)
    sizes = [len(s) for s in sets]
    incs = [_incidence(s, p.n) for s in sets]
    total = math.prod(sizes)
    if total <= MAX_ENUMERATED:
        choice, pool = _feasible_pool(p, sets, incs, "random mapping")
        return _assignment(p, sets, choice[rng.choice(pool)])
    batch = 4096
    for _ in range(0, MAX_DRAWS, batch):
        choice = np.stack([rng.integers(0, size, batch) for size in sizes], axis=1)
        load = sum(p.loads[u] * incs[u][choice[:, u]] for u in range(p.m))
        ok = (load - p.capacities <= p.capacity_tol).all(axis=1)
        if p.no_dead:
            ok &= (sum(incs[u][choice[:, u]] for u in range(p.m)) > 0).all(axis=1)
        hits = np.flatnonzero(ok)
        if hits.size:
            return _assignment(p, sets, choice[hits[0]])
    raise PlanInfeasibleError("capacity", f"random mapping: none of {MAX_DRAWS} uniform draws of a {p.m} x {p.n} "
                                          "mapping met the capacities; raise PLANNER.SLACK")


def worst_grouping(p: PlanProblem) -> np.ndarray:
    """The 0/1 (m, n) mapping meeting ``p``'s constraints whose best renaming of the experts scores lowest,
    returned under that best renaming (see the module docstring); ties: the first in enumeration order."""
    from scipy.optimize import linear_sum_assignment

    sets = _expert_sets(p)
    incs = [_incidence(s, p.n) for s in sets]
    if math.prod(len(s) for s in sets) > MAX_ENUMERATED:
        raise ValueError(f"gem_worst enumerates every mapping; {p.m} units x {p.n} experts are too many")
    choice, pool = _feasible_pool(p, sets, incs, "worst grouping")
    gain = p.gain
    renamable = bool(np.allclose(p.capacities, p.capacities[0]))  # renaming keeps capacities only if all equal
    best_value, best_x = None, None
    for c in choice[pool]:
        x = _assignment(p, sets, c)
        score = x.T @ gain  # score[e, j]: the gain of the units on expert e if e were renamed j
        cols = linear_sum_assignment(-score)[1] if renamable else np.arange(p.n)
        value = float(score[np.arange(p.n), cols].sum())
        if best_value is None or value < best_value - 1e-12:
            best_value, best_x = value, x[:, np.argsort(cols)]  # expert e renamed cols[e]
    return best_x


def _top_k(p: PlanProblem) -> np.ndarray:
    x = np.zeros((p.m, p.n))
    for u in range(p.m):
        order = np.argsort(-p.affinity[u], kind="stable")
        x[u, order[: int(p.k[u])]] = 1.0
    return x


def plan_variant(variant: str, affinity, loads, k=1, slack: float = 0.1, beta: float = 0.5, capacities=None,
                 solver: str = "CBC", rounding: str = "hierarchical", unit_names: Optional[Sequence[str]] = None,
                 seed: int = 0, milp: Optional[bool] = None, milp_time_limit: Optional[float] = 10.0) -> ExpertPlan:
    """The plan of ``variant`` (:data:`VARIANTS`) for the problem :func:`~gem_d2.planner.plan.plan_mapping` takes;
    ``affinity`` is GEM's own plan (``plan_mapping`` itself), ``seed`` drives ``random``."""
    if variant not in VARIANTS:
        raise ValueError(f"planner variant {variant!r}: expected one of {VARIANTS}")
    if variant == "affinity":
        return plan_mapping(affinity, loads, k=k, slack=slack, beta=beta, capacities=capacities, solver=solver,
                            rounding=rounding, unit_names=unit_names, milp=milp, milp_time_limit=milp_time_limit)
    p = build_problem(affinity, loads, k=k, slack=slack, beta=beta, capacities=capacities, unit_names=unit_names)
    if variant == "random":
        lp = solve_lp(p, solver)
        assign, x_lp, label = random_assignment(p, seed), lp.x, f"random(seed={int(seed)})"
    elif variant == "worst":
        lp = solve_lp(p, solver)
        assign, x_lp, label = worst_grouping(p), lp.x, "worst-grouping"
    elif variant == "inverse":
        flipped = dataclasses.replace(p, affinity=p.affinity.max(axis=1, keepdims=True) - p.affinity)
        lp = solve_lp(flipped, solver)
        exact = solve_milp(flipped, solver, time_limit=milp_time_limit) if rounding == "exact" else None
        assign, x_lp, label = compile_assignment(flipped, lp.x, rounding, exact), lp.x, f"inverse+{rounding}"
    else:
        free = dataclasses.replace(p, capacities=np.full(p.n, float(np.dot(p.loads, p.k))), no_dead=False)
        x_lp = solve_lp(free, solver).x
        assign, label = _top_k(p), "nocap(top-k)"
    plan = ExpertPlan(problem=p, assignment=assign, x_lp=x_lp, lp_value=p.value(x_lp),
                      rounded_value=p.value(assign), milp_value=None, milp_status="skipped", rounding=label,
                      solver=solver, times={})
    if plan.overflow.any():
        logger.warning("%s mapping exceeds GEM's capacity on %d expert(s) by up to %.4g", label,
                       int((plan.overflow > 0).sum()), float(plan.overflow.max()))
    return plan
