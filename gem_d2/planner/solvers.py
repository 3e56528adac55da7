"""Solver backends for the planner's LP and MILP: PuLP (CBC by default, or any PuLP solver) and
scipy's HiGHS (``solver="HIGHS"``).

Models are given in matrix form (maximise ``c @ x`` subject to ``A_eq x = b_eq``, ``A_ub x <= b_ub``,
``lo <= x <= hi``) so that both backends read the same model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import scipy.sparse as sp

__all__ = ["LinearModel", "SolveResult", "solve_model", "check_solver"]

# Statuses returned in SolveResult.status.
OPTIMAL, INFEASIBLE, UNBOUNDED, TIME_LIMIT, FAILED = "optimal", "infeasible", "unbounded", "time_limit", "failed"


@dataclass
class LinearModel:
    """maximise ``c @ x`` s.t. ``a_eq @ x == b_eq``, ``a_ub @ x <= b_ub``, ``lo <= x <= hi``; x integral where
    ``integer``."""

    c: np.ndarray
    a_eq: sp.csr_matrix
    b_eq: np.ndarray
    a_ub: sp.csr_matrix
    b_ub: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    integer: np.ndarray  # (N,) bool


@dataclass
class SolveResult:
    """Solver outcome: ``x`` is None unless a solution was found (optimal, or time limit with an incumbent)."""

    status: str
    x: Optional[np.ndarray]
    objective: Optional[float]
    seconds: float
    backend: str


def check_solver(solver: str) -> str:
    """Validate a solver name; returns the backend label ("scipy-highs" or "pulp-<NAME>").

    "CBC" is PuLP's bundled CBC; "HIGHS" is scipy's HiGHS; any other name must be a PuLP solver available here.
    """
    if not isinstance(solver, str) or not solver:
        raise ValueError(f"solver must be a non-empty string (CBC, HIGHS or a PuLP solver name), got {solver!r}")
    if solver.upper() == "HIGHS":
        return "scipy-highs"
    if solver.upper() == "CBC":
        return "pulp-PULP_CBC_CMD"
    import pulp

    available = pulp.listSolvers(onlyAvailable=True)
    if solver not in available:
        raise ValueError(f"MODEL.GEM.PLANNER.SOLVER={solver!r} is not available; expected CBC, HIGHS (scipy) or one "
                         f"of the PuLP solvers available here: {available}")
    return f"pulp-{solver}"


def solve_model(model: LinearModel, solver: str = "CBC", time_limit: Optional[float] = None) -> SolveResult:
    """Solve ``model`` with the named backend (see :func:`check_solver`); never raises on infeasibility.

    ``time_limit`` in seconds; None or <= 0 means no limit.
    """
    backend = check_solver(solver)
    if time_limit is not None and time_limit <= 0:
        time_limit = None
    t0 = time.perf_counter()
    if backend == "scipy-highs":
        status, x = _solve_scipy(model, time_limit)
    else:
        status, x = _solve_pulp(model, backend[len("pulp-"):], time_limit)
    seconds = time.perf_counter() - t0
    if x is not None:
        x = np.clip(x, model.lo, model.hi)
        if model.integer.any():
            x = np.where(model.integer, np.round(x), x)
    objective = float(model.c @ x) if x is not None else None
    return SolveResult(status=status, x=x, objective=objective, seconds=seconds, backend=backend)


def _solve_scipy(model: LinearModel, time_limit: Optional[float]):
    from scipy.optimize import Bounds, LinearConstraint, linprog, milp

    if not model.integer.any():
        opts = {"time_limit": float(time_limit)} if time_limit else {}
        # Dual simplex returns a vertex, which the rounding relies on (an interior point would be all fractional).
        res = linprog(-model.c, A_ub=model.a_ub, b_ub=model.b_ub, A_eq=model.a_eq, b_eq=model.b_eq,
                      bounds=np.stack([model.lo, model.hi], axis=1), method="highs-ds", options=opts)
        status = {0: OPTIMAL, 1: TIME_LIMIT, 2: INFEASIBLE, 3: UNBOUNDED}.get(res.status, FAILED)
        return status, (res.x if res.status == 0 else None)
    cons = []
    if model.a_eq.shape[0]:
        cons.append(LinearConstraint(model.a_eq, model.b_eq, model.b_eq))
    if model.a_ub.shape[0]:
        cons.append(LinearConstraint(model.a_ub, -np.inf, model.b_ub))
    opts = {"time_limit": float(time_limit)} if time_limit else {}
    res = milp(-model.c, constraints=cons, integrality=model.integer.astype(np.int8),
               bounds=Bounds(model.lo, model.hi), options=opts)
    if res.status == 0:
        return OPTIMAL, res.x
    if res.status == 1:
        return TIME_LIMIT, res.x  # x is None when no incumbent was found in time
    return {2: INFEASIBLE, 3: UNBOUNDED}.get(res.status, FAILED), None


def _solve_pulp(model: LinearModel, name: str, time_limit: Optional[float]):
    import pulp

    prob = pulp.LpProblem("gem_plan", pulp.LpMaximize)
    num = model.c.shape[0]
    def bound(v):
        return float(v) if np.isfinite(v) else None  # PuLP spells "unbounded" None

    xs = [pulp.LpVariable(f"x{i}", lowBound=bound(model.lo[i]), upBound=bound(model.hi[i]),
                          cat=pulp.LpInteger if model.integer[i] else pulp.LpContinuous) for i in range(num)]
    nz = np.flatnonzero(model.c)
    prob += pulp.LpAffineExpression([(xs[i], float(model.c[i])) for i in nz])
    for tag, mat, rhs, sense in (("e", model.a_eq, model.b_eq, pulp.LpConstraintEQ),
                                 ("u", model.a_ub, model.b_ub, pulp.LpConstraintLE)):
        mat = sp.csr_matrix(mat)
        for r in range(mat.shape[0]):
            lo, hi = mat.indptr[r], mat.indptr[r + 1]
            expr = pulp.LpAffineExpression([(xs[i], float(v)) for i, v in zip(mat.indices[lo:hi], mat.data[lo:hi])])
            prob += pulp.LpConstraint(expr, sense=sense, rhs=float(rhs[r]), name=f"{tag}{r}")
    if name == "PULP_CBC_CMD":
        solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit)
    else:
        solver = pulp.getSolver(name, msg=False, timeLimit=time_limit)
    prob.solve(solver)
    has_solution = prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)
    x = None
    if has_solution:
        x = np.array([v.varValue if v.varValue is not None else 0.0 for v in xs], dtype=np.float64)
    if prob.sol_status == pulp.LpSolutionOptimal and prob.status == pulp.LpStatusOptimal:
        return OPTIMAL, x
    if prob.sol_status == pulp.LpSolutionIntegerFeasible or (time_limit and prob.status == pulp.LpStatusNotSolved):
        return TIME_LIMIT, x
    if prob.status == pulp.LpStatusInfeasible or prob.sol_status == pulp.LpSolutionInfeasible:
        return INFEASIBLE, None
    if prob.status == pulp.LpStatusUnbounded or prob.sol_status == pulp.LpSolutionUnbounded:
        return UNBOUNDED, None
    return FAILED, None
