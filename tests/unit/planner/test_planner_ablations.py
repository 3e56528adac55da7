"""Planner ablations (gem_d2.planner.ablations): random capacity-respecting mappings, the affinity-minimising LP
(checked against scipy's HiGHS), two experts per unit, no capacities; and how a run selects them."""
import itertools
from collections import Counter

import numpy as np
import pytest

import gem_d2  # noqa: F401  (shims before detectron2)
from gem_d2.engine.planning import needs_planning
from gem_d2.planner import ablations
from gem_d2.planner.ablations import plan_variant, random_assignment
from gem_d2.planner.affinity import AffinityResult
from gem_d2.planner.pipeline import plan_from_cfg
from gem_d2.planner.problem import build_problem
from tests.conftest import make_cfg
from tests.unit.planner.reference_lp import reference_lp


def instance(seed, m, n):
    rng = np.random.default_rng(seed)
    w = rng.dirichlet(np.ones(n), size=m)
    loads = rng.uniform(0.2, 1.0, size=m)
    return w, loads


@pytest.mark.parametrize("seed,m,n,k", [(0, 5, 2, 1), (1, 5, 4, 1), (2, 6, 3, 2), (3, 3, 5, 1), (4, 8, 4, 2)])
def test_inverse_lp_value_is_the_minimiser(seed, m, n, k):
    w, loads = instance(seed, m, n)
    inverse = plan_variant("inverse", w, loads, k=k, slack=0.3, beta=0.5, milp=False)
    gem = plan_variant("affinity", w, loads, k=k, slack=0.3, beta=0.5, milp=False)
    status, minimum = reference_lp(w, loads, k, 0.3, 0.5, maximize=False)
    assert status == 0
    assert inverse.lp_value == pytest.approx(minimum, rel=1e-7, abs=1e-9)
    if not inverse.overflow.any():  # a capacity-respecting integral point is never below the LP minimum
        assert inverse.lp_value <= inverse.rounded_value + 1e-9
    assert inverse.rounded_value < gem.rounded_value
    assert (inverse.assignment.sum(axis=1) == k).all()


def brute_force_feasible(p):
    rows = [list(itertools.combinations(range(p.n), int(k))) for k in p.k]
    out = []
    for choice in itertools.product(*rows):
        x = np.zeros((p.m, p.n))
        for u, experts in enumerate(choice):
            x[u, list(experts)] = 1
        if not p.overflow(x).any() and (not p.no_dead or (x.sum(axis=0) >= 1).all()):
            out.append(tuple(map(tuple, x.astype(int))))
    return out


def test_random_mappings_respect_capacity_are_seeded_and_uniform():
    p = build_problem(np.full((4, 2), 0.5), np.ones(4), k=1, slack=0.1)  # capacity 2.2: two units per expert
    feasible = set(brute_force_feasible(p))
    assert len(feasible) == 6
    draws = Counter(tuple(map(tuple, random_assignment(p, seed).astype(int))) for seed in range(600))
    assert set(draws) == feasible  # every capacity-respecting mapping, and nothing else
    assert min(draws.values()) > 60 and max(draws.values()) < 140  # ~100 each
    np.testing.assert_array_equal(random_assignment(p, 7), random_assignment(p, 7))
    for seed, (m, n, k) in enumerate([(5, 2, 1), (6, 4, 2), (7, 3, 1)]):
        w, loads = instance(seed, m, n)
        q = build_problem(w, loads, k=k, slack=0.5)
        for s in range(5):
            x = random_assignment(q, s)
            assert tuple(map(tuple, x.astype(int))) in set(brute_force_feasible(q))


def test_random_rejection_sampling_for_large_problems(monkeypatch):
    monkeypatch.setattr(ablations, "MAX_ENUMERATED", 10)
    w, loads = instance(9, 6, 3)
    p = build_problem(w, loads, k=1, slack=0.5)
    feasible = set(brute_force_feasible(p))
    seen = {tuple(map(tuple, random_assignment(p, s).astype(int))) for s in range(40)}
    assert seen <= feasible and len(seen) > 5
    np.testing.assert_array_equal(random_assignment(p, 3), random_assignment(p, 3))


def test_random_without_a_capacity_feasible_mapping_takes_the_least_overflowing():
    # 4 large units and a small one on 4 experts: the small one must overflow whichever expert it joins
    loads = np.array([0.235, 0.235, 0.06, 0.235, 0.235])
    p = build_problem(np.full((5, 4), 0.25), loads, k=1, slack=0.1)
    for s in range(20):
        x = random_assignment(p, s)
        assert (x[[0, 1, 3, 4]].sum(axis=0) == 1).all()  # the large units on four different experts
        assert p.overflow(x).max() == pytest.approx(0.06 + 0.235 - 1.1 / 4)


def test_nocap_puts_every_unit_on_its_most_similar_experts():
    w = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.1, 0.1, 0.8]])
    plan = plan_variant("nocap", w, np.ones(4), k=1, slack=0.1, milp=False)
    assert plan.mapping == [[0], [0], [0], [2]] and plan.overflow.max() > 0  # unbalanced, expert 1 dead
    assert plan.lp_value == pytest.approx(plan.rounded_value)  # the capacity-free LP is integral here
    two = plan_variant("nocap", w, np.ones(4), k=2, slack=0.1, milp=False)
    assert two.mapping == [[0, 1], [0, 1], [0, 2], [0, 2]]  # ties go to the lower expert id
    k2 = plan_variant("affinity", w, np.ones(4), k=2, slack=0.5, milp=False)
    for row, experts, weights in zip(w, k2.mapping, k2.weights):
        assert weights == pytest.approx(row[experts] / row[experts].sum())


def fake_affinity(datasets, n, seed=0):
    rng = np.random.default_rng(seed)
    m = len(datasets)
    return AffinityResult(list(datasets), list(datasets), np.ones(m), rng.normal(size=(m, 8)),
                          rng.normal(size=(n, 8)), rng.dirichlet(np.ones(n), size=m), np.full(m, 4), 0.0, 1.0)


def test_runs_plan_ablation_routers_through_plan_from_cfg(small_synth, tmp_path):
    from gem_d2.data import synthetic

    datasets = synthetic.train_dataset_names()
    aff = fake_affinity(datasets, 2)
    mappings = {}
    for router in ("gem", "gem_random", "gem_inverse", "gem_nocap", "gem_worst", "gem_k2"):
        cfg = make_cfg(datasets)
        cfg.MODEL.GEM.ROUTER, cfg.MODEL.GEM.NUM_EXPERTS = router, 2
        assert needs_planning(cfg)
        if router == "gem_k2":
            with pytest.raises(ValueError, match="EXPERTS_PER_UNIT 2"):
                plan_from_cfg(cfg, None, affinity=aff)
            cfg.MODEL.GEM.EXPERTS_PER_UNIT = 2
        plan, mapping = plan_from_cfg(cfg, str(tmp_path / router), affinity=aff)
        mapping.validate_cfg(mapping.to_cfg(cfg))
        mappings[router] = plan
        assert (tmp_path / router / "plan.yaml").is_file()
    assert mappings["gem_inverse"].rounded_value < mappings["gem"].rounded_value
    assert mappings["gem_k2"].mapping == [[0, 1]] * 5
    assert mappings["gem_nocap"].mapping == [[int(np.argmax(r))] for r in aff.affinity]
    assert not mappings["gem_random"].overflow.any() and not mappings["gem_worst"].overflow.any()
    # the worst grouping, even under its best renaming, scores no higher than any other grouping under its best
    from scipy.optimize import linear_sum_assignment

    def best_renamed(plan):
        score = plan.assignment.T @ plan.problem.gain
        rows, cols = linear_sum_assignment(-score)
        return score[rows, cols].sum()

    worst = best_renamed(mappings["gem_worst"])
    assert worst == pytest.approx(mappings["gem_worst"].rounded_value)
    assert all(worst <= best_renamed(mappings[r]) + 1e-12 for r in ("gem", "gem_random", "gem_inverse"))
    cfg = make_cfg(datasets)
    cfg.MODEL.GEM.ROUTER = "topk"
    assert not needs_planning(cfg)


def test_ablation_routers_dispatch_with_the_stored_mapping_like_gem():
    import torch

    from gem_d2.modeling.moe import moe_spec_from_cfg
    from gem_d2.modeling.moe.context import RoutingContext
    from gem_d2.modeling.moe.layer import build_ffn
    from gem_d2.modeling.moe.router_gem import GEMRouter

    cfg = make_cfg(["abl_a", "abl_b"])
    cfg.MODEL.GEM.NUM_EXPERTS, cfg.MODEL.GEM.MOE_LAYERS = 3, ["decoder.0"]
    cfg.MODEL.GEM.UNITS, cfg.MODEL.GEM.MAPPING = ["abl_b", "abl_a"], [[2, 0], [1, 2]]
    cfg.MODEL.GEM.MAPPING_WEIGHTS = [[0.75, 0.25], [0.5, 0.5]]
    cfg.MODEL.GEM.ROUTER = "gem_k2"
    with pytest.raises(ValueError, match="EXPERTS_PER_UNIT 2"):
        moe_spec_from_cfg(cfg, ["abl_a", "abl_b"])
    cfg.MODEL.GEM.EXPERTS_PER_UNIT = 2
    outputs = {}
    for router in ("gem", "gem_k2", "gem_random", "gem_inverse", "gem_nocap", "gem_worst"):
        cfg.MODEL.GEM.ROUTER = router
        spec = moe_spec_from_cfg(cfg, ["abl_a", "abl_b"])
        torch.manual_seed(0)
        layer = build_ffn("decoder.0", 4, 8, 0.0, "relu", spec)
        assert isinstance(layer.router, GEMRouter) and not list(layer.router.parameters())
        ctx = RoutingContext(dataset_ids=torch.tensor([0, 1]))
        outputs[router] = layer(torch.ones(2, 3, 4), ctx)
        assert ctx.aux_losses == {}
    for router, out in outputs.items():
        torch.testing.assert_close(out, outputs["gem"], msg=router)


def groups(x):
    """The units sharing each expert, whatever the experts' names."""
    return sorted(sorted(np.flatnonzero(col).tolist()) for col in np.asarray(x).T)


def test_worst_grouping_pairs_dissimilar_units_where_inverse_only_renames_experts():
    # units 0, 1 prefer expert 0's key; units 2, 3 expert 1's; capacity: two units per expert
    w = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.1, 0.9]])
    gem = plan_variant("affinity", w, np.ones(4), k=1, slack=0.1, milp=False)
    inverse = plan_variant("inverse", w, np.ones(4), k=1, slack=0.1, milp=False)
    worst = plan_variant("worst", w, np.ones(4), k=1, slack=0.1, milp=False)
    assert groups(gem.assignment) == [[0, 1], [2, 3]]
    assert groups(inverse.assignment) == groups(gem.assignment)  # the same grouping, the experts' names swapped
    assert inverse.mapping == [[1], [1], [0], [0]]
    assert groups(worst.assignment) == [[0, 3], [1, 2]]  # no expert key suits either group
    assert not worst.overflow.any() and worst.rounded_value < gem.rounded_value
    # its best renaming was taken: no other renaming of the same grouping scores higher
    swapped = worst.assignment[:, ::-1]
    assert worst.rounded_value >= worst.problem.value(swapped)
