"""The standalone planner API: ``plan_mapping(affinity, loads, ...) -> ExpertPlan``.

Usable on any affinity matrix (datasets x experts here, but also for other MoE models): solves the LP relaxation,
compiles it into an integral mapping with the chosen rounding, and solves the exact MILP for the report.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np

from gem_d2.planner.lp import MILPSolution, solve_lp, solve_milp
from gem_d2.planner.problem import PlanInfeasibleError, PlanProblem, build_problem
from gem_d2.planner.repair import repair_assignment
from gem_d2.planner.rounding import hierarchical_round
from gem_d2.planner.shmoys_tardos import shmoys_tardos_round
from gem_d2.planner.solvers import check_solver

__all__ = ["ROUNDINGS", "ExpertPlan", "plan_mapping", "compile_assignment"]

logger = logging.getLogger(__name__)

ROUNDINGS = ("hierarchical", "shmoys_tardos", "exact")
MILP_AUTO_MAX_VARS = 20_000  # milp=None solves the report's MILP only up to this many variables (m * n)


@dataclass
class ExpertPlan:
    """A planned unit -> experts mapping with its LP, rounding and MILP figures.

    Attributes:
        problem: the validated :class:`PlanProblem` (affinity, loads, k, capacities, importance, unit names).
        assignment: (m, n) 0/1 final mapping.
        x_lp: (m, n) LP relaxation solution.
        lp_value: LP objective (an upper bound on any capacity-feasible mapping).
        rounded_value: objective of ``assignment`` (same importance weights as the LP).
        milp_value: exact integer optimum, or None when the MILP was skipped, infeasible or not solved in time.
        milp_status: "optimal" | "infeasible" | "time_limit" | "failed" | "skipped".
        rounding: the compiler used ("hierarchical", "shmoys_tardos" or "exact").
        solver: the LP/MILP solver name.
        times: seconds per stage ("lp", "rounding", "milp", "total").
    """

    problem: PlanProblem
    assignment: np.ndarray
    x_lp: np.ndarray
    lp_value: float
    rounded_value: float
    milp_value: Optional[float]
    milp_status: str
    rounding: str
    solver: str
    times: dict = field(default_factory=dict)

    @property
    def unit_names(self) -> List[str]:
        return list(self.problem.unit_names)

    @property
    def mapping(self) -> List[List[int]]:
        """Per unit, its expert ids (ascending)."""
        return [np.flatnonzero(row > 0.5).tolist() for row in self.assignment]

    @property
    def weights(self) -> List[List[float]]:
        """Per unit, combination weights of its experts (affinity renormalised over them; [1.0] when k = 1)."""
        out = []
        for row, experts in zip(self.problem.affinity, self.mapping):
            w = np.clip(row[experts], 0.0, None)
            out.append((w / w.sum()).tolist() if w.sum() > 0 else [1.0 / len(experts)] * len(experts))
        return out

    @property
    def expert_loads(self) -> np.ndarray:
        """(n,) load per expert under the final mapping."""
        return self.problem.expert_loads(self.assignment)

    @property
    def overflow(self) -> np.ndarray:
        """(n,) load above capacity per expert under the final mapping (0 = within capacity)."""
        return self.problem.overflow(self.assignment)

    @property
    def dead_experts(self) -> List[int]:
        """Experts that no unit uses."""
        return np.flatnonzero(self.assignment.sum(axis=0) == 0).tolist()

    def report(self) -> dict:
        """JSON-serialisable summary: objective values and ratios, per-expert load vs capacity, times, mapping."""
        from gem_d2.planner.report import plan_summary

        return plan_summary(self)

    def format_report(self) -> str:
        """The report as a printable text table."""
        from gem_d2.planner.report import format_plan_table

        return format_plan_table(self)


def compile_assignment(p: PlanProblem, x_lp: np.ndarray, rounding: str, milp: Optional[MILPSolution] = None,
                       repair: bool = True) -> np.ndarray:
    """Turn an LP solution into a 0/1 mapping with the named compiler.

    "hierarchical": docs/design/planner.md steps 1-3 then the capacity-repair and improvement passes (:mod:`.repair`;
    ``repair=False`` skips both);
    "shmoys_tardos": the yardstick rounding, unrepaired; "exact": the MILP optimum (``milp`` must be given).
    """
    if rounding == "hierarchical":
        assign = hierarchical_round(p, x_lp)
        return repair_assignment(p, assign) if repair else assign
    if rounding == "shmoys_tardos":
        return shmoys_tardos_round(p, x_lp)
    if rounding == "exact":
        if milp is None or milp.x is None:
            status = "not run" if milp is None else milp.status
            cause = ("the integer problem is infeasible (no capacity-respecting mapping exists)"
                     if status == "infeasible" else f"the MILP ended with status {status!r} and no solution")
            raise PlanInfeasibleError("exact", f"ROUNDING=exact: {cause}; use ROUNDING=hierarchical (which reports "
                                               "the overflow) or raise SLACK / MILP_TIME_LIMIT")
        return milp.x.copy()
    raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


def plan_mapping(affinity, loads, k=1, slack: float = 0.1, beta: float = 0.5, capacities=None, solver: str = "CBC",
                 rounding: str = "hierarchical", unit_names: Optional[Sequence[str]] = None,
                 milp: Optional[bool] = None, milp_time_limit: Optional[float] = 10.0) -> ExpertPlan:
    """Plan a unit -> experts mapping (docs/design/planner.md).

    Args:
        affinity: (m, n) affinity ``w_uj`` of unit u for expert j.
        loads: (m,) positive unit loads ``s_u``.
        k: experts per unit: int or (m,) ints in [1, n].
        slack: capacity slack, ``C_j = (1 + slack) sum_u s_u k_u / n`` (ignored if ``capacities`` is given).
        beta: importance exponent, ``a_u = s_u^-beta`` normalised to mean 1.
        capacities: optional (n,) explicit per-expert load capacities.
        solver: "CBC" (PuLP's bundled CBC), "HIGHS" (scipy) or another available PuLP solver name.
        rounding: "hierarchical" (default), "shmoys_tardos" or "exact" (the MILP optimum).
        unit_names: optional m unique names.
        milp: solve the exact MILP for the report: True, False, or None = only when m * n <= 20000 (beyond, CBC
            rarely finds even a feasible point in seconds). Always solved when ``rounding="exact"``.
        milp_time_limit: seconds for the MILP (None = no limit); past it the report marks the MILP "time_limit".
    Returns:
        :class:`ExpertPlan`.
    Raises:
        ValueError: malformed inputs.
        PlanInfeasibleError: infeasible constraints (message names the constraint and the shortfall), or
            ``rounding="exact"`` with an infeasible integer problem.
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    check_solver(solver)
    t_start = time.perf_counter()
    p = build_problem(affinity, loads, k=k, slack=slack, beta=beta, capacities=capacities, unit_names=unit_names)
    t0 = time.perf_counter()
    lp = solve_lp(p, solver)
    times = {"lp": time.perf_counter() - t0}
    milp_sol = None
    if milp is None:
        milp = p.m * p.n <= MILP_AUTO_MAX_VARS
    if milp or rounding == "exact":
        milp_sol = solve_milp(p, solver, time_limit=milp_time_limit)
        times["milp"] = milp_sol.seconds
    t0 = time.perf_counter()
    assign = compile_assignment(p, lp.x, rounding, milp_sol)
    times["rounding"] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - t_start
    milp_value = milp_sol.value if milp_sol is not None and milp_sol.status == "optimal" else None
    plan = ExpertPlan(problem=p, assignment=assign, x_lp=lp.x, lp_value=lp.value, rounded_value=p.value(assign),
                      milp_value=milp_value, milp_status="skipped" if milp_sol is None else milp_sol.status,
                      rounding=rounding, solver=solver, times=times)
    if plan.overflow.any():
        j = int(np.argmax(plan.overflow))
        logger.warning("planned mapping exceeds capacity on %d expert(s); largest: expert %d by %.4g (capacity %.4g)",
                       int((plan.overflow > 0).sum()), j, plan.overflow[j], p.capacities[j])
    return plan
