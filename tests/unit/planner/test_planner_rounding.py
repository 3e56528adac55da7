"""Compilers: hierarchical rounding (hand-computed steps), repair pass, improvement pass (against brute force),
Shmoys–Tardos guarantees, exact MILP, every unit assigned, k > 1, m < n and m > n, overflow reported,
determinism."""
import itertools

import gem_d2  # noqa: F401  (shims before detectron2)

# isort: split
import numpy as np
import pytest

from gem_d2.planner import GemMapping, PlanInfeasibleError, build_problem, plan_mapping, solve_lp
from gem_d2.planner.repair import assignment_key, improve_assignment, repair_assignment
from gem_d2.planner.rounding import hierarchical_round
from gem_d2.planner.shmoys_tardos import shmoys_tardos_round

INTEGRAL_W = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])


@pytest.mark.parametrize("rounding", ["hierarchical", "shmoys_tardos", "exact"])
def test_integral_lp_optimum_assigns_every_unit(rounding):
    plan = plan_mapping(INTEGRAL_W, np.ones(3), capacities=[2.0, 2.0], rounding=rounding)
    assert plan.lp_value == pytest.approx(3.0)
    assert plan.rounded_value == pytest.approx(3.0)
    assert plan.milp_value == pytest.approx(3.0)
    assert plan.mapping == [[0], [0], [1]]


def test_hierarchical_step1_commits_integral_lp_without_repair():
    p = build_problem(INTEGRAL_W, np.ones(3), capacities=[2.0, 2.0])
    x = solve_lp(p).x
    np.testing.assert_array_equal(hierarchical_round(p, x), INTEGRAL_W)


def _hand_problem(capacities):
    w = np.array([[1.0, 0.0], [0.4, 0.6], [0.3, 0.7]])
    return build_problem(w, np.ones(3), capacities=capacities, beta=0.0)


def test_hierarchical_levels_order_and_residual_capacity():
    x = np.array([[1.0, 0.0], [0.5, 0.5], [0.25, 0.75]])
    # Step 1 commits (0, 0). Level 1 digits: 0.5 -> 1, 0.75 -> 1, 0.25 -> 0; order x desc then a*w desc:
    # (2, 1) [0.75], then (1, 1) [0.5, gain 0.6] before (1, 0) [0.5, gain 0.4].
    got = hierarchical_round(_hand_problem([2.0, 2.0]), x)
    np.testing.assert_array_equal(got, [[1, 0], [0, 1], [0, 1]])
    # Expert 1 has room for one unit only: (2, 1) takes it, (1, 1) does not fit, (1, 0) does.
    got = hierarchical_round(_hand_problem([2.0, 1.0]), x)
    np.testing.assert_array_equal(got, [[1, 0], [1, 0], [0, 1]])


def test_hierarchical_fallback_takes_smallest_overflow_then_best_gain():
    p = build_problem(np.array([[0.3, 0.7]]), [1.0], capacities=[0.5, 0.5], beta=0.0)
    x = np.array([[0.5, 0.5]])  # level 1 candidates, neither fits: fallback, equal overflow -> higher gain
    np.testing.assert_array_equal(hierarchical_round(p, x), [[0, 1]])
    plan = plan_mapping(np.array([[0.3, 0.7]]), [1.0], capacities=[0.5, 0.5], beta=0.0)
    assert plan.mapping == [[1]]
    assert plan.overflow.tolist() == [0.0, pytest.approx(0.5)]  # reported, not hidden
    assert plan.report()["max_overflow_over_max_load"] == pytest.approx(0.5)


def test_repair_ejection_chain_by_hand():
    # u0 gains 0.5 on expert 1 but that overflows it unless u1 leaves for expert 2 (-0.05): only a chain helps.
    p = build_problem(np.array([[0.5, 1.0, 0.0], [0.0, 0.6, 0.55]]), [1.0, 1.5], capacities=[2, 2, 2], beta=0.0)
    start = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    np.testing.assert_array_equal(repair_assignment(p, start), [[0, 1, 0], [0, 0, 1]])


def test_repair_prefers_cheaper_swap_over_costlier_move():
    # 5 units x 2 experts, expert 0 over capacity. Moving unit 0 (gain -0.87) or swapping units 1 and 4 (-0.48)
    # both remove the overflow; the swap keeps more objective.
    w = np.array([[0.9, 0.03], [0.31, 0.65], [0.33, 0.6], [0.36, 0.88], [0.16, 0.02]])
    s = np.array([0.65, 1.29, 1.39, 1.75, 1.93])
    p = build_problem(w, s, slack=0.1, beta=0.0)
    start = np.zeros((5, 2))
    start[[0, 1, 2, 3, 4], [0, 1, 0, 1, 0]] = 1
    assert p.overflow(start).sum() > 0
    got = repair_assignment(p, start)
    np.testing.assert_array_equal(got.argmax(axis=1), [0, 0, 0, 1, 1])
    assert p.overflow(got).sum() == 0


def test_improvement_trades_total_overflow_for_objective_below_worst_overflow():
    # Loads 1, 1, 1, 1, 0.5 on 3 experts of capacity 1.5: no feasible mapping; the least total overflow (0.5) pairs
    # two unit loads on one expert and puts the 0.5 unit with a 1. Each unit's preferred expert gives two pairs
    # (overflow 0.5 on two experts): the same worst overflow, objective 5 instead of 4.
    w = np.array([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    s = np.array([1.0, 1.0, 1.0, 1.0, 0.5])
    p = build_problem(w, s, capacities=[1.5] * 3, beta=0.0)
    raw = hierarchical_round(p, solve_lp(p).x)
    repaired = repair_assignment(p, raw, improve=False)
    assert p.overflow(repaired).sum() == pytest.approx(0.5) and p.value(repaired) == pytest.approx(4.0)
    got = repair_assignment(p, raw)
    np.testing.assert_array_equal(got.argmax(axis=1), [0, 0, 1, 1, 2])
    np.testing.assert_allclose(p.overflow(got), [0.5, 0.5, 0.0])
    # tolerance=0 asks for capacity first: the overflow stays at the least total, objective cannot rise.
    assert p.overflow(improve_assignment(p, repaired, tolerance=0.0)).sum() == pytest.approx(0.5)


def _loads_by_loop(a, s, n):
    out = [0.0] * n
    for u, row in enumerate(a):
        for j in range(n):
            if row[j] > 0.5:
                out[j] += float(s[u])
    return np.array(out)


def _brute(w, s, ceiling, no_dead):
    """Every k=1 assignment (as expert index tuples) within the ceilings and with no dead expert when required."""
    m, n = w.shape
    for choice in itertools.product(range(n), repeat=m):
        a = np.zeros((m, n))
        a[np.arange(m), choice] = 1
        if np.all(_loads_by_loop(a, s, n) <= ceiling + 1e-9) and not (no_dead and len(set(choice)) < n):
            yield choice, float(np.sum(w[np.arange(m), choice]))


def test_improvement_pass_against_brute_force():
    """On tiny instances (k = 1, beta = 0, so the objective is the summed affinity), checked independently of the
    planner's own bookkeeping: the pass keeps every expert within capacity + the repaired plan's worst overflow,
    never lowers the objective nor revives / kills experts wrongly, ends where no single move or pairwise swap
    improves within those ceilings, never beats the brute-force optimum and mostly reaches it."""
    optimal = total = 0
    for w, s in random_instances(40, seed=7, m_range=(3, 8), n_range=(2, 4)):
        m, n = w.shape
        p = build_problem(w, s, slack=0.1, beta=0.0)
        raw = hierarchical_round(p, solve_lp(p).x)
        repaired = repair_assignment(p, raw, improve=False)
        a = repair_assignment(p, raw)
        np.testing.assert_array_equal(a.sum(axis=1), 1)
        cap = np.full(n, 1.1 * s.sum() / n)
        tolerance = max(0.0, float((_loads_by_loop(repaired, s, n) - cap).max()))
        ceiling = cap + tolerance
        assert np.all(_loads_by_loop(a, s, n) <= ceiling + 1e-9)
        no_dead = m >= n

        def dead(x, no_dead=no_dead):
            return int(no_dead and (x.sum(axis=0) == 0).sum())

        assert dead(a) <= dead(repaired)
        value = float(np.sum(w * a))
        assert value >= float(np.sum(w * repaired)) - 1e-12 or dead(a) < dead(repaired)
        # Local optimum: no single move or pairwise swap improves within the ceilings (dead experts not increased).
        choice = a.argmax(axis=1)
        neighbours = [(u, q, None, None) for u in range(m) for q in range(n) if q != choice[u]]
        neighbours += [(u, choice[v], v, choice[u])
                       for u in range(m) for v in range(u + 1, m) if choice[u] != choice[v]]
        for u, q, v, r in neighbours:
            c = choice.copy()
            c[u] = q
            if v is not None:
                c[v] = r
            b = np.zeros((m, n))
            b[np.arange(m), c] = 1
            if np.all(_loads_by_loop(b, s, n) <= ceiling + 1e-9) and dead(b) <= dead(a):
                assert float(np.sum(w * b)) <= value + 1e-9, (u, q, v, r)
        if dead(a) == 0:
            best = max(v for _, v in _brute(w, s, ceiling, no_dead))
            assert value <= best + 1e-9
            optimal += value >= best - 1e-9
            total += 1
    assert total >= 30 and optimal >= 0.85 * total, (optimal, total)


def test_improvement_kicks_never_hurt_and_sometimes_help():
    helped = 0
    for w, s in random_instances(30, seed=11):
        p = build_problem(w, s, slack=0.1, beta=0.0)
        repaired = repair_assignment(p, hierarchical_round(p, solve_lp(p).x), improve=False)
        plain = improve_assignment(p, repaired, kicks=0)
        kicked = improve_assignment(p, repaired)
        assert p.value(kicked) >= p.value(plain) - 1e-12 >= p.value(repaired) - 2e-12
        assert p.overflow(kicked).max() <= p.overflow(repaired).max() + 1e-9
        helped += p.value(kicked) > p.value(plain) + 1e-9
    assert helped >= 1


def random_instances(count, seed, m_range=(4, 16), n_range=(2, 9)):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        m, n = int(rng.integers(*m_range)), int(rng.integers(*n_range))
        yield rng.uniform(0, 1, (m, n)), rng.uniform(0.5, 2.0, m)


def test_shmoys_tardos_guarantees():
    for w, s in random_instances(25, seed=3):
        p = build_problem(w, s, slack=0.1, beta=0.0)
        lp = solve_lp(p)
        a = shmoys_tardos_round(p, lp.x)
        np.testing.assert_array_equal(a.sum(axis=1), 1)
        assert p.value(a) >= lp.value - 1e-7  # at least the LP value
        assert np.all(p.expert_loads(a) <= p.capacities + s.max() + 1e-9)  # overflow <= largest unit load


def test_hierarchical_feasible_or_reported_and_never_worse_than_rounding():
    for w, s in random_instances(25, seed=4):
        p = build_problem(w, s, slack=0.1, beta=0.0)
        lp = solve_lp(p)
        raw = hierarchical_round(p, lp.x)
        repaired = repair_assignment(p, raw, improve=False)
        assert assignment_key(p, repaired) <= assignment_key(p, raw)  # repair never worsens the rounding
        plan = plan_mapping(w, s, slack=0.1, beta=0.0, milp=False)
        a = plan.assignment
        np.testing.assert_array_equal(a, repair_assignment(p, raw))  # the default compiler = rounding + both passes
        np.testing.assert_array_equal(a.sum(axis=1), 1)  # every unit assigned
        assert plan.overflow.max() <= s.max() + 1e-9  # within the largest unit load
        assert plan.overflow.max() <= p.overflow(repaired).max() + 1e-9  # improvement keeps the worst overflow
        assert p.value(a) >= p.value(repaired) - 1e-12
        report = plan.report()
        assert report["total_overflow"] == pytest.approx(float(plan.overflow.sum()))
        assert report["all_units_assigned"]


def test_overflow_reported_when_integer_problem_infeasible():
    # 3 equal units, 2 experts of capacity 1.65: one expert must hold 2 (load 2), so 0.35 over.
    plan = plan_mapping(np.full((3, 2), 0.5), np.ones(3), slack=0.1, beta=0.0)
    assert plan.milp_status == "infeasible" and plan.milp_value is None
    assert plan.overflow.sum() == pytest.approx(0.35)
    assert sorted(len(plan.mapping[u]) for u in range(3)) == [1, 1, 1]
    with pytest.raises(PlanInfeasibleError, match=r"ROUNDING=exact: the integer problem is infeasible"):
        plan_mapping(np.full((3, 2), 0.5), np.ones(3), slack=0.1, beta=0.0, rounding="exact")


@pytest.mark.parametrize("rounding", ["hierarchical", "shmoys_tardos", "exact"])
def test_k_greater_than_one(rounding):
    rng = np.random.default_rng(5)
    w, s = rng.uniform(0, 1, (9, 6)), rng.uniform(0.5, 2.0, 9)
    plan = plan_mapping(w, s, k=2, slack=0.3, rounding=rounding)
    for u, experts in enumerate(plan.mapping):
        assert len(experts) == 2 and len(set(experts)) == 2
        np.testing.assert_allclose(plan.weights[u], w[u, experts] / w[u, experts].sum())
    assert plan.overflow.max() <= s.max() + 1e-9
    np.testing.assert_allclose(plan.x_lp.sum(axis=1), 2, atol=1e-7)
    if rounding == "exact":
        assert plan.rounded_value == pytest.approx(plan.milp_value)
    else:
        assert plan.milp_value is None or plan.rounded_value <= plan.milp_value + 1e-9 or plan.overflow.any()


def test_per_unit_k():
    plan = plan_mapping(np.random.default_rng(0).uniform(size=(4, 4)), np.ones(4), k=[1, 2, 3, 1], slack=0.5)
    assert [len(e) for e in plan.mapping] == [1, 2, 3, 1]


@pytest.mark.parametrize("m, n", [(3, 8), (20, 4)])
def test_fewer_and_more_units_than_experts(m, n):
    rng = np.random.default_rng(m * n)
    w, s = rng.uniform(0, 1, (m, n)), rng.uniform(0.5, 2.0, m)
    plan = plan_mapping(w, s, slack=0.5)
    assert all(len(e) == 1 for e in plan.mapping)
    assert plan.problem.no_dead == (m >= n)
    if m >= n:
        assert plan.dead_experts == []  # the LP requires every expert, the repair keeps it when it can
        assert np.all(plan.x_lp.sum(axis=0) >= 1 - 1e-7)
    else:
        assert len(plan.dead_experts) >= n - m
    assert plan.rounded_value <= plan.lp_value + 1e-9 or plan.overflow.any()


def test_same_inputs_give_byte_identical_yaml():
    rng = np.random.default_rng(11)
    w, s = rng.uniform(0, 1, (12, 5)), rng.uniform(0.5, 2.0, 12)
    names = [f"d{i}" for i in range(12)]
    for solver in ("CBC", "HIGHS"):
        texts = [GemMapping.from_plan(plan_mapping(w, s, k=2, unit_names=names, solver=solver)).to_yaml().encode()
                 for _ in range(2)]
        assert texts[0] == texts[1]
