"""Planner LP and MILP: against scipy's HiGHS and brute force; documented errors for infeasible or bad inputs."""
import itertools

import gem_d2  # noqa: F401  (shims before detectron2)

# isort: split
import numpy as np
import pytest

from gem_d2.planner import PlanInfeasibleError, build_problem, plan_mapping, solve_lp, solve_milp
from tests.unit.planner.reference_lp import reference_lp

SOLVERS = ("CBC", "HIGHS")


def random_cases(count, seed):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        m, n = int(rng.integers(2, 14)), int(rng.integers(2, 9))
        k = int(rng.integers(1, min(n, 3) + 1))
        yield rng.uniform(0, 1, (m, n)), rng.uniform(0.3, 3.0, m), k, float(rng.choice([0.0, 0.1, 0.5])), \
            float(rng.choice([0.0, 0.5, 1.0]))


@pytest.mark.parametrize("solver", SOLVERS)
def test_lp_matches_scipy_highs(solver):
    checked = infeasible = 0
    for w, s, k, slack, beta in random_cases(25, seed=1):
        status, ref = reference_lp(w, s, k, slack, beta)
        if status == 2:
            with pytest.raises(PlanInfeasibleError):
                solve_lp(build_problem(w, s, k=k, slack=slack, beta=beta), solver)
            infeasible += 1
            continue
        p = build_problem(w, s, k=k, slack=slack, beta=beta)
        lp = solve_lp(p, solver)
        assert lp.value == pytest.approx(ref, abs=1e-6)
        x = lp.x
        assert np.all(x >= -1e-9) and np.all(x <= 1 + 1e-9)
        np.testing.assert_allclose(x.sum(axis=1), k, atol=1e-7)
        assert np.all(s @ x <= p.capacities + 1e-7)
        if p.no_dead:
            assert np.all(x.sum(axis=0) >= 1 - 1e-7)
        checked += 1
    assert checked >= 15  # the random set must mostly exercise the feasible path


def brute_force_milp(w, s, capacities, beta=0.0):
    """Best integral k=1 mapping by enumeration (None if none satisfies capacity and no-dead-expert)."""
    m, n = w.shape
    a = s ** (-beta)
    a = a * m / a.sum()
    best = None
    for choice in itertools.product(range(n), repeat=m):
        load = np.zeros(n)
        np.add.at(load, list(choice), s)
        if np.any(load > capacities + 1e-9) or (m >= n and len(set(choice)) < n):
            continue
        value = sum(a[u] * w[u, j] for u, j in enumerate(choice))
        best = value if best is None else max(best, value)
    return best


@pytest.mark.parametrize("solver", SOLVERS)
def test_milp_matches_brute_force(solver):
    rng = np.random.default_rng(7)
    seen = {"feasible": 0, "infeasible": 0}
    for _ in range(12):
        m, n = int(rng.integers(2, 6)), int(rng.integers(2, 4))
        w, s = rng.uniform(0, 1, (m, n)), rng.uniform(0.5, 2.0, m)
        p = build_problem(w, s, slack=0.1, beta=0.5)
        ref = brute_force_milp(w, s, p.capacities, beta=0.5)
        sol = solve_milp(p, solver)
        if ref is None:
            assert sol.status == "infeasible"
            seen["infeasible"] += 1
        else:
            assert sol.status == "optimal"
            assert sol.value == pytest.approx(ref, abs=1e-6)
            seen["feasible"] += 1
    assert seen["feasible"] and seen["infeasible"]


def test_importance_and_capacity_formulas():
    p = build_problem(np.ones((3, 2)), [1.0, 4.0, 16.0], k=1, slack=0.1, beta=0.5)
    a = np.array([1.0, 0.5, 0.25])
    np.testing.assert_allclose(p.importance, a * 3 / a.sum())
    np.testing.assert_allclose(p.capacities, [1.1 * 21 / 2] * 2)
    p2 = build_problem(np.ones((3, 2)), [1.0, 4.0, 16.0], capacities=[5.0, 30.0])
    np.testing.assert_allclose(p2.capacities, [5.0, 30.0])


def test_coverage_infeasible_names_k():
    with pytest.raises(PlanInfeasibleError, match=r"coverage.*'b' needs k=3 experts but only n=2") as e:
        build_problem(np.ones((2, 2)), [1, 1], k=[1, 3], unit_names=["a", "b"])
    assert e.value.constraint == "coverage"


def test_capacity_too_small_says_by_how_much():
    with pytest.raises(PlanInfeasibleError, match=r"total capacity 1.5 < required load 3 .*short by 1.5") as e:
        plan_mapping(np.ones((3, 2)), [1, 1, 1], slack=-0.5)
    assert e.value.constraint == "capacity"
    assert e.value.required == pytest.approx(3.0) and e.value.available == pytest.approx(1.5)


def test_no_dead_expert_infeasible():
    with pytest.raises(PlanInfeasibleError, match=r"no-dead-expert.*expert 1 has capacity 0.2 < smallest unit load"):
        build_problem(np.ones((3, 2)), [0.5, 1, 1], capacities=[5.0, 0.2])


def test_lp_infeasible_diagnosed_by_elastic_lp():
    # Passes the pre-checks (total capacity 10.1 >= 2) but unit 0 must put its whole load on both experts.
    with pytest.raises(PlanInfeasibleError, match=r"capacity constraints short by 0.9 .*expert 1") as e:
        plan_mapping(np.ones((1, 2)), [1.0], k=2, capacities=[10.0, 0.1])
    assert e.value.constraint == "capacity"
    assert e.value.required == pytest.approx(0.9)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"affinity": np.ones(3)}, r"affinity must be a 2-D"),
    ({"affinity": np.array([[np.nan, 1.0]])}, r"affinity contains NaN"),
    ({"loads": [1.0, -1.0]}, r"loads must be finite and > 0; unit 'unit1' has load -1"),
    ({"loads": [1.0]}, r"loads must have shape \(2,\)"),
    ({"capacities": [1.0]}, r"capacities must have shape \(2,\)"),
    ({"k": 0}, r"k must be >= 1"),
    ({"k": 1.5}, r"k must be an integer"),
    ({"slack": -1.0}, r"slack must be a finite number > -1"),
    ({"unit_names": ["a", "a"]}, r"unit_names must be unique"),
    ({"rounding": "greedy"}, r"rounding must be one of"),
    ({"solver": "NOPE"}, r"SOLVER='NOPE' is not available"),
])
def test_bad_inputs_raise_clear_errors(kwargs, pattern):
    args = {"affinity": np.ones((2, 2)), "loads": [1.0, 1.0]}
    args.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        plan_mapping(**args)
