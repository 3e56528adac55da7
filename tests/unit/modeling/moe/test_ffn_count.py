"""FFN evaluations per token (gem_d2.modeling.moe.ffn_count) against hand counts for every kind of router."""
import copy

import pytest
import torch

import gem_d2  # noqa: F401  (shims before detectron2)
from gem_d2.modeling.moe import MoEFFN
from gem_d2.modeling.moe.context import MoESpec, RoutingContext
from gem_d2.modeling.moe.ffn_count import CountingExpertBank, count_ffn_evaluations
from gem_d2.planner.mapping import GemMapping

C, FH = 6, 12
STAT = "ffn_evals_per_token"


def counted(router, num_experts=4, layer="decoder.0", seed=0, **kwargs):
    torch.manual_seed(seed)
    moe = MoEFFN(layer, C, FH, 0.0, "relu", MoESpec([layer], num_experts, router, kwargs)).double()
    assert count_ffn_evaluations(moe) == 1 and count_ffn_evaluations(moe) == 1  # idempotent
    assert isinstance(moe.experts, CountingExpertBank)
    return moe


def test_gem_two_experts_per_unit_with_padding():
    tables = GemMapping.create(["u0", "u1"], [[0, 1], [2]], num_experts=3).router_tables(["u0", "u1"])
    moe = counted("gem", 3, layer="encoder.0", tables=tables)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    ctx = RoutingContext(dataset_ids=torch.tensor([0, 1]), key_padding_mask=pad)
    moe(torch.randn(2, 5, C, dtype=torch.float64), ctx)
    # per-image dispatch: image 0 (u0): 5 tokens x 2 experts; image 1 (u1): all 5 rows x 1 expert (its 2 padded
    # rows are computed, then zeroed); 8 valid tokens
    assert float(ctx.stats[f"encoder.0/{STAT}"]) == pytest.approx(15 / 8)
    ctx = RoutingContext(dataset_ids=torch.tensor([1, 1]))  # a second call starts from zero again
    moe(torch.randn(2, 5, C, dtype=torch.float64), ctx)
    assert float(ctx.stats[f"encoder.0/{STAT}"]) == pytest.approx(1.0)


def test_topk_dropped_tokens_are_not_evaluated():
    moe = counted("topk", 4, k=1, capacity_factor=0.5)
    ctx = RoutingContext(dataset_ids=torch.tensor([0, 1]))
    moe(torch.randn(2, 8, C, dtype=torch.float64), ctx)
    kept = 16 * (1 - float(ctx.stats["decoder.0/dropped_fraction"]))
    assert kept < 16 and float(ctx.stats[f"decoder.0/{STAT}"]) == pytest.approx(kept / 16)


def test_remoe_counts_open_gates_and_the_cap_bounds_them():
    x = torch.randn(2, 4, C, dtype=torch.float64)
    moe = counted("remoe", 4, seed=3)
    gates = torch.relu(x.reshape(-1, C) @ moe.router.gate.weight.T)
    open_gates = int((gates > 0).sum())
    assert open_gates > 8  # a fresh ReLU gate opens about half of the experts
    ctx = RoutingContext(dataset_ids=torch.tensor([0, 1]))
    moe.eval()(x, ctx)
    assert float(ctx.stats[f"decoder.0/{STAT}"]) == pytest.approx(open_gates / 8)

    capped = counted("remoe", 4, seed=3, active_cap=1.0)
    ctx = RoutingContext(dataset_ids=torch.tensor([0, 1]))
    out = capped.eval()(x, ctx)
    assert float(ctx.stats[f"decoder.0/{STAT}"]) == pytest.approx(1.0)  # floor(1.0 * 8) of the open gates
    assert float(ctx.stats["decoder.0/remoe_capped_fraction"]) == pytest.approx((open_gates - 8) / open_gates)
    # the 8 largest gate values of the call are the ones computed
    keep = torch.zeros_like(gates, dtype=torch.bool).reshape(-1)
    keep[gates.reshape(-1).topk(8).indices] = True
    keep = keep.reshape(gates.shape)
    b = capped.experts
    want = torch.zeros(8, C, dtype=torch.float64)
    for t, e in keep.nonzero().tolist():
        h = torch.relu(x.reshape(-1, C)[t] @ b.w1[e].T + b.b1[e])
        want[t] += gates[t, e] * (h @ b.w2[e].T + b.b2[e])
    torch.testing.assert_close(out.reshape(-1, C), want)


def test_moepp_zero_copy_constant_routes_are_not_ffn_evaluations():
    moe = counted("moepp", 2, k=1, num_zero=1, num_copy=1, num_constant=2)
    with torch.no_grad():
        moe.router.gate.weight.mul_(10)  # spread the top-1 choices over all six routes
    x = torch.randn(3, 6, C, dtype=torch.float64)
    ctx = RoutingContext(dataset_ids=torch.tensor([0, 1, 0]))
    moe(x, ctx)
    top = (x.reshape(-1, C) @ moe.router.gate.weight.T).argmax(-1)
    to_ffn = int((top < 2).sum())
    assert 0 < to_ffn < 18
    assert float(ctx.stats[f"decoder.0/{STAT}"]) == pytest.approx(to_ffn / 18)


def test_softmoe_counts_slots_and_dense_counts_one():
    moe = counted("softmoe", 3, slots_per_expert=2)
    segments = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 2])  # two DN groups + the matching queries: 3 groups
    ctx = RoutingContext(dataset_ids=torch.tensor([0, 1]), segments=segments)
    moe(torch.randn(2, 10, C, dtype=torch.float64), ctx)
    assert float(ctx.stats[f"decoder.0/{STAT}"]) == pytest.approx(2 * 3 * 3 * 2 / 20)  # N x groups x E x P

    dense = copy.deepcopy(counted("dense", 1))  # a copy of a counted layer keeps counting
    ctx = RoutingContext(dataset_ids=torch.tensor([0]))
    dense(torch.randn(1, 7, C, dtype=torch.float64), ctx)
    assert float(ctx.stats[f"decoder.0/{STAT}"]) == pytest.approx(1.0)
