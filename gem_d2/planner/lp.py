"""The LP relaxation of docs/design/planner.md and its exact integer version (the MILP).

    maximise   sum_u sum_j a_u w_uj x_uj
    subject to sum_j x_uj = k_u               (coverage)
               sum_u s_u x_uj <= C_j          (capacity)
               sum_u x_uj >= 1  when m >= n   (no dead expert)
               0 <= x_uj <= 1                 (x_uj in {0, 1} for the MILP)

Variables are flattened row-major: ``x[u * n + j]``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import scipy.sparse as sp

from gem_d2.planner.problem import PlanInfeasibleError, PlanProblem
from gem_d2.planner.solvers import INFEASIBLE, OPTIMAL, TIME_LIMIT, LinearModel, solve_model

__all__ = ["LPSolution", "MILPSolution", "build_model", "solve_lp", "solve_milp"]

logger = logging.getLogger(__name__)


@dataclass
class LPSolution:
    """Optimal LP relaxation: ``x`` (m, n) in [0, 1], ``value`` its objective, ``seconds`` the solve time."""

    x: np.ndarray
    value: float
    seconds: float
    backend: str


@dataclass
class MILPSolution:
    """Exact integer model outcome.

    ``status`` is "optimal", "infeasible", "time_limit" (``x`` is then the best incumbent, or None) or "failed";
    ``x`` is a 0/1 (m, n) matrix or None; ``value`` its objective or None.
    """

    status: str
    x: Optional[np.ndarray]
    value: Optional[float]
    seconds: float
    backend: str


def build_model(p: PlanProblem, integer: bool = False) -> LinearModel:
    """The LP (or MILP) of the module docstring for ``p`` in matrix form."""
    m, n = p.m, p.n
    num = m * n
    rows = np.repeat(np.arange(m), n)
    a_eq = sp.csr_matrix((np.ones(num), (rows, np.arange(num))), shape=(m, num))
    cols_by_expert = np.arange(num).reshape(m, n).T.ravel()  # expert-major order of the variables
    exp_rows = np.repeat(np.arange(n), m)
    cap = sp.csr_matrix((np.tile(p.loads, n), (exp_rows, cols_by_expert)), shape=(n, num))
    blocks, rhs = [cap], [p.capacities]
    if p.no_dead:
        blocks.append(sp.csr_matrix((-np.ones(num), (exp_rows, cols_by_expert)), shape=(n, num)))
        rhs.append(-np.ones(n))
    return LinearModel(c=p.gain.ravel(), a_eq=a_eq, b_eq=p.k.astype(np.float64), a_ub=sp.vstack(blocks).tocsr(),
                       b_ub=np.concatenate(rhs), lo=np.zeros(num), hi=np.ones(num),
                       integer=np.full(num, bool(integer)))


def solve_lp(p: PlanProblem, solver: str = "CBC") -> LPSolution:
    """Solve the LP relaxation.

    Returns:
        :class:`LPSolution` with a vertex solution (simplex) ``x`` of shape (m, n).
    Raises:
        PlanInfeasibleError: the LP is infeasible; the message names the violated constraint family and the
            smallest total violation (computed by an elastic LP).
        RuntimeError: the solver failed for another reason.
    """
    res = solve_model(build_model(p), solver)
    if res.status == OPTIMAL:
        x = res.x.reshape(p.m, p.n)
        x[np.abs(x) < 1e-12] = 0.0
        return LPSolution(x=x, value=p.value(x), seconds=res.seconds, backend=res.backend)
    if res.status == INFEASIBLE:
        raise diagnose_infeasibility(p, solver)
    raise RuntimeError(f"LP solver {res.backend} ended with status {res.status!r} on a {p.m}x{p.n} plan")


def solve_milp(p: PlanProblem, solver: str = "CBC", time_limit: Optional[float] = None) -> MILPSolution:
    """Solve the exact integer model (same objective and constraints, x in {0, 1}); never raises on infeasibility."""
    res = solve_model(build_model(p, integer=True), solver, time_limit=time_limit)
    x = None if res.x is None else (res.x.reshape(p.m, p.n) > 0.5).astype(np.float64)
    value = None if x is None else p.value(x)
    status = res.status
    if status == OPTIMAL and x is not None and not _integral_feasible(p, x):
        status = "failed"  # a solver reporting optimal for a point that violates the model: do not trust it
    if status not in (OPTIMAL, INFEASIBLE, TIME_LIMIT):
        logger.warning("MILP solver %s ended with status %r", res.backend, status)
    return MILPSolution(status=status, x=x, value=value, seconds=res.seconds, backend=res.backend)


def _integral_feasible(p: PlanProblem, x: np.ndarray) -> bool:
    ok = np.array_equal(x.sum(axis=1), p.k) and not p.overflow(x).any()
    return ok and (not p.no_dead or bool(np.all(x.sum(axis=0) >= 1)))


def diagnose_infeasibility(p: PlanProblem, solver: str = "CBC") -> PlanInfeasibleError:
    """Explain an infeasible LP: solve it with elastic capacity and no-dead-expert rows and report the least violation.

    Capacity violations are measured in load, no-dead-expert violations in (fractional) unit counts; the elastic
    LP minimises their sum with capacity normalised by the mean unit load.
    """
    base = build_model(p)
    m_cap = p.n
    n_ub = base.a_ub.shape[0]
    num = base.c.shape[0]
    scale = float(p.loads.mean())
    # One elastic variable per inequality row: a_ub x - e <= b_ub, e >= 0.
    a_ub = sp.hstack([base.a_ub, -sp.identity(n_ub, format="csr")]).tocsr()
    a_eq = sp.hstack([base.a_eq, sp.csr_matrix((base.a_eq.shape[0], n_ub))]).tocsr()
    cost = np.concatenate([np.zeros(num), -np.concatenate([np.full(m_cap, 1.0 / scale), np.ones(n_ub - m_cap)])])
    model = LinearModel(c=cost, a_eq=a_eq, b_eq=base.b_eq, a_ub=a_ub, b_ub=base.b_ub,
                        lo=np.zeros(num + n_ub), hi=np.concatenate([np.ones(num), np.full(n_ub, np.inf)]),
                        integer=np.zeros(num + n_ub, dtype=bool))
    res = solve_model(model, solver)
    if res.status != OPTIMAL:
        return PlanInfeasibleError("unknown", f"LP infeasible ({p.m} units x {p.n} experts) and the elastic "
                                              f"diagnosis ended with status {res.status!r}")
    e = res.x[num:]
    cap_short, dead_short = e[:m_cap], e[m_cap:]
    parts = []
    if cap_short.sum() > p.capacity_tol:
        worst = int(np.argmax(cap_short))
        parts.append(("capacity", float(cap_short.sum()),
                      f"capacity constraints short by {cap_short.sum():.6g} load in total (largest: expert {worst} "
                      f"needs {cap_short[worst]:.6g} above its capacity {p.capacities[worst]:.6g})"))
    if dead_short.sum() > 1e-7:
        worst = int(np.argmax(dead_short))
        parts.append(("no_dead_expert", float(dead_short.sum()),
                      f"no-dead-expert constraints short by {dead_short.sum():.6g} units in total (expert {worst} "
                      f"can only receive {1 - dead_short[worst]:.6g} of a unit)"))
    if not parts:
        return PlanInfeasibleError("unknown", f"LP reported infeasible ({p.m}x{p.n}) but the elastic LP found "
                                              "no violation; numerical trouble in the solver")
    msg = "LP infeasible: " + "; ".join(t for _, _, t in parts) + ". Raise slack or the capacities."
    return PlanInfeasibleError(parts[0][0], msg, required=parts[0][1])
