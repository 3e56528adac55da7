"""The planning problem of docs/design/planner.md: validated inputs, derived capacities and importance weights.

A :class:`PlanProblem` holds everything the LP, the compilers and the MILP need, with every input
checked once here (shapes, finiteness, ranges) and the infeasibility that can be seen without a
solver reported with the constraint that fails and by how much.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

__all__ = ["PlanInfeasibleError", "PlanProblem", "build_problem", "importance_weights", "slack_capacities"]

# Relative tolerance for capacity comparisons (loads are sums of floats).
CAPACITY_RTOL = 1e-9


class PlanInfeasibleError(ValueError):
    """The planning constraints cannot all hold.

    Attributes:
        constraint: which constraint family fails: "coverage", "capacity" or "no_dead_expert".
        required: what the constraint needs (a load or a count of experts); for an LP found infeasible by the
            solver, the smallest total shortfall of the named constraint family.
        available: what the inputs provide (NaN when not a single number).
    """

    def __init__(self, constraint: str, message: str, required: float = float("nan"), available: float = float("nan")):
        super().__init__(message)
        self.constraint = constraint
        self.required = required
        self.available = available


def importance_weights(loads: np.ndarray, beta: float) -> np.ndarray:
    """Importance ``a_u = s_u^-beta`` normalised to mean 1 (so beta=0 gives all ones).

    Args:
        loads: (m,) positive unit loads ``s_u``.
        beta: exponent; 0.5 by default so rare units are not crowded out.
    Returns:
        (m,) float64 array with mean 1.
    """
    a = np.power(np.asarray(loads, dtype=np.float64), -float(beta))
    return a * (len(a) / a.sum())


def slack_capacities(loads: np.ndarray, k: np.ndarray, n: int, slack: float) -> np.ndarray:
    """Expert capacities ``C_j = (1 + slack) * sum_u s_u k_u / n``, the same for every expert; (n,) array."""
    total = float(np.dot(np.asarray(loads, dtype=np.float64), np.asarray(k, dtype=np.float64)))
    return np.full(n, (1.0 + float(slack)) * total / n, dtype=np.float64)


@dataclass(frozen=True)
class PlanProblem:
    """A validated instance. Arrays are float64 (k is int64) and must not be modified.

    Attributes:
        affinity: (m, n) ``w_uj``.
        loads: (m,) ``s_u`` > 0.
        k: (m,) experts per unit, 1 <= k_u <= n.
        capacities: (n,) ``C_j`` >= 0.
        importance: (m,) ``a_u``.
        unit_names: m unique names.
        no_dead: whether the no-dead-expert constraint applies (m >= n).
    """

    affinity: np.ndarray
    loads: np.ndarray
    k: np.ndarray
    capacities: np.ndarray
    importance: np.ndarray
    unit_names: tuple
    no_dead: bool

    @property
    def m(self) -> int:
        return self.affinity.shape[0]

    @property
    def n(self) -> int:
        return self.affinity.shape[1]

    @property
    def gain(self) -> np.ndarray:
        """(m, n) objective coefficients ``a_u * w_uj``."""
        return self.importance[:, None] * self.affinity

    @property
    def capacity_tol(self) -> float:
        """Absolute slack allowed on a capacity comparison (float noise only)."""
        return CAPACITY_RTOL * max(1.0, float(self.loads.sum()))

    def value(self, x: np.ndarray) -> float:
        """Objective ``sum_uj a_u w_uj x_uj`` of a fractional or 0/1 (m, n) matrix."""
        return float(np.sum(self.gain * x))

    def expert_loads(self, x: np.ndarray) -> np.ndarray:
        """(n,) load ``sum_u s_u x_uj`` per expert."""
        return self.loads @ x

    def overflow(self, x: np.ndarray) -> np.ndarray:
        """(n,) load above capacity per expert (0 where within capacity up to float noise)."""
        over = self.expert_loads(x) - self.capacities
        return np.where(over > self.capacity_tol, over, 0.0)


def _as_matrix(affinity) -> np.ndarray:
    w = np.asarray(affinity, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
        raise ValueError(f"affinity must be a 2-D (units, experts) array with both sizes >= 1, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("affinity contains NaN or infinite values")
    return w


def _as_k(k, m: int, n: int, names: Sequence[str]) -> np.ndarray:
    if np.isscalar(k):
        if int(k) != k:
            raise ValueError(f"k must be an integer number of experts per unit, got {k!r}")
        karr = np.full(m, int(k), dtype=np.int64)
    else:
        raw = np.asarray(k)
        if raw.shape != (m,) or not np.all(np.mod(raw, 1) == 0):
            raise ValueError(f"k must be an int or an integer array of shape ({m},), got {raw!r}")
        karr = raw.astype(np.int64)
    bad = np.flatnonzero(karr < 1)
    if bad.size:
        raise ValueError(f"k must be >= 1 for every unit; unit {names[bad[0]]!r} has k={karr[bad[0]]}")
    over = np.flatnonzero(karr > n)
    if over.size:
        u = over[0]
        raise PlanInfeasibleError(
            "coverage",
            f"coverage constraint infeasible: unit {names[u]!r} needs k={karr[u]} experts but only n={n} exist",
            required=float(karr[u]), available=float(n))
    return karr


def build_problem(affinity, loads, k=1, slack: float = 0.1, beta: float = 0.5, capacities=None,
                  unit_names: Optional[Sequence[str]] = None) -> PlanProblem:
    """Validate inputs and derive capacities and importance (docs/design/planner.md).

    Args:
        affinity: (m, n) array-like ``w_uj`` (finite).
        loads: (m,) positive unit loads ``s_u`` (any scale; only ratios matter).
        k: experts per unit, an int or an (m,) integer array, each in [1, n].
        slack: capacity slack (> -1) used when ``capacities`` is None.
        beta: importance exponent, ``a_u = s_u^-beta`` normalised to mean 1.
        capacities: optional (n,) explicit per-expert load capacities (>= 0) instead of the slack formula.
        unit_names: optional m unique names (default "unit0", "unit1", ...).
    Returns:
        A :class:`PlanProblem`.
    Raises:
        ValueError: malformed inputs (the message names the argument and what was expected).
        PlanInfeasibleError: constraints that cannot hold whatever the solver does (coverage k > n,
            total capacity below the required load, an expert too small for any unit under no-dead-expert).
    """
    w = _as_matrix(affinity)
    m, n = w.shape
    names = tuple(f"unit{i}" for i in range(m)) if unit_names is None else tuple(str(s) for s in unit_names)
    if len(names) != m:
        raise ValueError(f"unit_names has {len(names)} entries but affinity has {m} rows")
    if len(set(names)) != m:
        dup = sorted({s for s in names if names.count(s) > 1})
        raise ValueError(f"unit_names must be unique; repeated: {dup}")
    s = np.asarray(loads, dtype=np.float64)
    if s.shape != (m,):
        raise ValueError(f"loads must have shape ({m},) (one per affinity row), got {s.shape}")
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        bad = int(np.flatnonzero(~np.isfinite(s) | (s <= 0))[0])
        raise ValueError(f"loads must be finite and > 0; unit {names[bad]!r} has load {float(s[bad])!r}")
    if not math.isfinite(float(beta)):
        raise ValueError(f"beta must be finite, got {beta!r}")
    karr = _as_k(k, m, n, names)
    if capacities is None:
        if not (math.isfinite(float(slack)) and float(slack) > -1.0):
            raise ValueError(f"slack must be a finite number > -1, got {slack!r}")
        cap = slack_capacities(s, karr, n, slack)
    else:
        cap = np.asarray(capacities, dtype=np.float64)
        if cap.shape != (n,):
            raise ValueError(f"capacities must have shape ({n},) (one per expert), got {cap.shape}")
        if not np.all(np.isfinite(cap)) or np.any(cap < 0):
            raise ValueError(f"capacities must be finite and >= 0, got {cap.tolist()}")
    problem = PlanProblem(affinity=w, loads=s, k=karr, capacities=cap, importance=importance_weights(s, beta),
                          unit_names=names, no_dead=m >= n)
    _check_obvious_infeasibility(problem)
    return problem


def _check_obvious_infeasibility(p: PlanProblem) -> None:
    required = float(np.dot(p.loads, p.k))
    total = float(p.capacities.sum())
    if total + p.capacity_tol < required:
        raise PlanInfeasibleError(
            "capacity",
            f"capacity constraint infeasible: total capacity {total:.6g} < required load {required:.6g} "
            f"(sum_u s_u k_u; short by {required - total:.6g}); raise slack or the capacities",
            required=required, available=total)
    if p.no_dead:
        smallest = float(p.loads.min())
        small = np.flatnonzero(p.capacities + p.capacity_tol < smallest)
        if small.size:
            j = int(small[0])
            raise PlanInfeasibleError(
                "no_dead_expert",
                f"no-dead-expert constraint infeasible (m={p.m} >= n={p.n}): expert {j} has capacity "
                f"{p.capacities[j]:.6g} < smallest unit load {smallest:.6g} (short by "
                f"{smallest - p.capacities[j]:.6g}), so it cannot host any unit",
                required=smallest, available=float(p.capacities[j]))
