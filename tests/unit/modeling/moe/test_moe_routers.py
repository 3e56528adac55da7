"""Per-token routers (gem, topk, damex, remoe, moepp) against float64 references and closed forms."""
import math

import pytest
import torch

import gem_d2  # noqa: F401  (shims before detectron2)
from gem_d2.modeling.moe import ROUTER_REGISTRY, MoEFFN, Router, RoutingPlan, TokenBatch, register_router
from gem_d2.modeling.moe.context import MoESpec, RoutingContext
from gem_d2.modeling.moe.router_gem import GEMRouter
from gem_d2.planner.mapping import GemMapping, RouterTables

C, FH = 6, 12


def make_moe(router, num_experts=4, layer="decoder.0", num_datasets=None, seed=0, **kwargs):
    torch.manual_seed(seed)
    spec = MoESpec([layer], num_experts, router, kwargs, num_datasets=num_datasets)
    return MoEFFN(layer, C, FH, 0.0, "relu", spec).double()


def expert_ref(moe: MoEFFN, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e applied directly in float64: relu(x W1^T + b1) W2^T + b2."""
    b = moe.experts
    h = torch.relu(x.double() @ b.w1[e].double().T + b.b1[e].double())
    return h @ b.w2[e].double().T + b.b2[e].double()


def tokens_of(x, dataset_ids, labels=None, valid=None, ctx=None):
    N, L, Cx = x.shape
    valid = torch.ones(N * L, dtype=torch.bool) if valid is None else valid.reshape(-1)
    labels = None if labels is None else labels.reshape(-1)
    return TokenBatch(x.reshape(-1, Cx), dataset_ids.repeat_interleave(L), labels, valid, (N, L),
                      ctx or RoutingContext(dataset_ids=dataset_ids))


# ----------------------------------------------------------------------------------------------- gem

MAPPING = [[1, 3], [0], [2, 1]]
WEIGHTS = [[0.25, 0.75], [1.0], [0.5, 0.5]]
# units u0, u1, u2 are rows 0..2; the label space's datasets are u2, u0, u1: dataset -> row [2, 0, 1]
TABLES = GemMapping.create(["u0", "u1", "u2"], MAPPING, WEIGHTS, num_experts=4).router_tables(["u2", "u0", "u1"])


def test_gem_plan_sends_each_unit_exactly_to_its_experts():
    router = GEMRouter(C, 4, TABLES)
    x = torch.randn(3, 5, C, dtype=torch.float64)
    plan = router.route(tokens_of(x, torch.tensor([0, 1, 2])))
    rows = [2, 0, 1]  # dataset -> unit
    for t in range(15):
        unit = rows[t // 5]
        active = (~plan.dropped[t]).nonzero().squeeze(1)
        assert plan.expert_index[t, active].tolist() == MAPPING[unit]
        want_w = WEIGHTS[unit]
        assert plan.combine_weight[t, active].tolist() == pytest.approx(want_w)


def test_gem_outputs_equal_mapped_experts_and_stats_count_tokens():
    moe = make_moe("gem", tables=TABLES, num_datasets=4)
    x = torch.randn(3, 5, C, dtype=torch.float64)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1, 3:] = True
    ctx = RoutingContext(dataset_ids=torch.tensor([0, 1, 1]), key_padding_mask=pad)
    out = moe(x, ctx)
    for n, unit in enumerate([2, 0, 0]):
        w = WEIGHTS[unit]
        want = sum(wj * expert_ref(moe, e, x[n]) for e, wj in zip(MAPPING[unit], w))
        valid = ~pad[n]
        torch.testing.assert_close(out[n][valid], want[valid])
        assert torch.equal(out[n][~valid], torch.zeros_like(out[n][~valid]))
    assert ctx.aux_losses == {}
    want_stats = torch.zeros(4, 4)
    want_stats[0, [2, 1]] = 5  # dataset 0 -> unit 2 -> experts 2, 1; 5 tokens
    want_stats[1, [1, 3]] = 5 + 3  # dataset 1 -> unit 0; 5 + 3 valid tokens
    assert torch.equal(ctx.stats["decoder.0/tokens_per_expert"], want_stats)


def test_gem_class_level_routes_decoder_queries_by_label():
    # classes 0..2 (dataset 0), 3..4 (dataset 1); class 1 has no unit (-1) -> dataset row
    tables = RouterTables([[0], [1], [2], [3]], [[1.0]] * 4, [[False]] * 4, [0, 3], [1, -1, 2, 3, 0])
    router = GEMRouter(C, 4, tables)
    x = torch.randn(2, 4, C)
    labels = torch.tensor([[0, 1, 2, -1], [3, 4, 0, -1]])
    plan = router.route(tokens_of(x, torch.tensor([0, 1]), labels))
    assert plan.expert_index[:, 0].tolist() == [1, 0, 2, 0, 3, 0, 1, 3]
    plan = router.route(tokens_of(x, torch.tensor([0, 1])))  # encoder: no labels -> dataset rows
    assert plan.expert_index[:, 0].tolist() == [0] * 4 + [3] * 4


def test_gem_router_rejects_expert_ids_outside_the_bank():
    tables = RouterTables([[0], [5]], [[1.0], [1.0]], [[False], [False]], [0, 1])
    with pytest.raises(ValueError, match=r"expert ids \[5\] outside \[0, MODEL.GEM.NUM_EXPERTS=4\)"):
        GEMRouter(C, 4, tables)


# ---------------------------------------------------------------------------------------------- topk

def gate_probs(moe, x):
    logits = x.reshape(-1, C).double() @ moe.router.gate.weight.double().T
    return logits, logits.softmax(-1)


def test_topk_balance_and_z_loss_equal_closed_form_with_padding():
    E = 4
    moe = make_moe("topk", E, k=1, capacity_factor=0.0, balance_coef=0.01, z_loss_coef=0.001)
    x = torch.randn(2, 9, C, dtype=torch.float64)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0, 6:] = True
    ctx = RoutingContext(dataset_ids=torch.tensor([0, 1]), key_padding_mask=pad)
    out = moe(x, ctx)
    logits, probs = gate_probs(moe, x)
    valid = ~pad.reshape(-1)
    T = int(valid.sum())
    top1 = probs.argmax(-1)
    f = [sum(1 for t in range(18) if valid[t] and top1[t] == e) / T for e in range(E)]
    P = [sum(float(probs[t, e]) for t in range(18) if valid[t]) / T for e in range(E)]
    want = 0.01 * E * sum(fe * pe for fe, pe in zip(f, P))
    assert float(ctx.aux_losses["loss_balance_decoder.0"]) == pytest.approx(want, rel=1e-9)
    z = sum(float(torch.logsumexp(logits[t], 0)) ** 2 for t in range(18) if valid[t]) / T
    assert float(ctx.aux_losses["loss_zloss_decoder.0"]) == pytest.approx(0.001 * z, rel=1e-9)
    flat = out.reshape(-1, C)
    xf = x.reshape(-1, C)
    for t in range(18):  # k = 1: weight is the raw top-1 probability, no capacity limit
        want_t = probs[t, top1[t]] * expert_ref(moe, int(top1[t]), xf[t]) if valid[t] else torch.zeros(C).double()
        torch.testing.assert_close(flat[t], want_t)
    out.sum().backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0


def test_topk_balance_loss_is_coef_when_uniform():
    moe = make_moe("topk", 4, balance_coef=0.5)
    with torch.no_grad():
        moe.router.gate.weight.zero_()  # uniform probabilities, all top-1 ties -> expert 0
    ctx = RoutingContext(dataset_ids=torch.tensor([0]))
    moe(torch.randn(1, 8, C, dtype=torch.float64), ctx)
    # f = (1, 0, 0, 0), P = 1/4 each: 0.5 * 4 * (1 * 1/4) = 0.5
    assert float(ctx.aux_losses["loss_balance_decoder.0"]) == pytest.approx(0.5)


def test_topk_capacity_drops_overflow_in_token_order():
    E, T = 4, 10
    moe = make_moe("topk", E, k=2, capacity_factor=1.0)
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[0] = 3.0  # x > 0: expert 0 first, expert 1 second for every token
        moe.router.gate.weight[1] = 1.0
    x = torch.rand(1, T, C, dtype=torch.float64) + 0.1
    pad = torch.zeros(1, T, dtype=torch.bool)
    pad[0, 0] = True  # a padded token takes no capacity
    ctx = RoutingContext(dataset_ids=torch.tensor([0]), key_padding_mask=pad)
    out = moe(x, ctx)[0]
    capacity = math.ceil(1.0 * 9 * 2 / E)  # 5 per expert over the 9 valid tokens
    _, probs = gate_probs(moe, x)
    for t in range(T):
        p0, p1 = probs[t, 0], probs[t, 1]
        want = torch.zeros(C, dtype=torch.float64)
        if 1 <= t <= capacity:  # the first 5 valid tokens keep both choices
            want = (p0 * expert_ref(moe, 0, x[0, t]) + p1 * expert_ref(moe, 1, x[0, t])) / (p0 + p1)
        torch.testing.assert_close(out[t], want)
    assert float(ctx.stats["decoder.0/dropped_fraction"]) == pytest.approx(8 / 18)
    assert ctx.stats["decoder.0/tokens_per_expert"].tolist() == [[5.0, 5.0, 0.0, 0.0]]


def test_topk_bad_arguments():
    with pytest.raises(ValueError, match=r"TOPK.K=5: expected <= MODEL.GEM.NUM_EXPERTS=4"):
        make_moe("topk", 4, k=5)
    with pytest.raises(ValueError, match="BALANCE_COEF"):
        make_moe("topk", 4, balance_coef=-1)


# --------------------------------------------------------------------------------------------- damex

def test_damex_cross_entropy_toward_mapped_expert_and_gate_routing():
    E = 4
    moe = make_moe("damex", E, dataset_to_expert=[2, 0, 3], loss_coef=0.1, capacity_factor=0.0, gate_noise=0.0)
    x = torch.randn(3, 4, C, dtype=torch.float64)
    ctx = RoutingContext(dataset_ids=torch.tensor([0, 1, 2]))
    out = moe.train()(x, ctx)
    logits, probs = gate_probs(moe, x)
    targets = [2] * 4 + [0] * 4 + [3] * 4
    ce = sum(-float(torch.log_softmax(logits[t], 0)[targets[t]]) for t in range(12)) / 12
    assert float(ctx.aux_losses["loss_damex_decoder.0"]) == pytest.approx(0.1 * ce, rel=1e-9)
    top1 = probs.argmax(-1)
    for t in range(12):
        torch.testing.assert_close(out.reshape(-1, C)[t], probs[t, top1[t]] * expert_ref(moe, int(top1[t]),
                                                                                           x.reshape(-1, C)[t]))
    ctx_eval = RoutingContext(dataset_ids=torch.tensor([0, 1, 2]))
    torch.testing.assert_close(moe.eval()(x, ctx_eval), out)  # test time: the learned gate decides
    assert ctx_eval.aux_losses == {}


def test_damex_training_moves_the_gate_toward_the_mapped_experts():
    moe = make_moe("damex", 2, dataset_to_expert=[0, 1, 0, 1], loss_coef=1.0, capacity_factor=0.0).train()
    ids = torch.tensor([0, 1, 2, 3])  # -> experts 0, 1, 0, 1
    assert moe.router.target_experts(ids).tolist() == [0, 1, 0, 1]
    x = 0.3 * torch.randn(4, 6, C, dtype=torch.float64)
    x[:, :, 0] += 2.0 * (ids[:, None] % 2)  # odd datasets are separable from even ones
    x[:, :, 1] += 2.0 * (1 - ids[:, None] % 2)
    opt = torch.optim.SGD(moe.router.parameters(), lr=1.0)
    for _ in range(15):
        ctx = RoutingContext(dataset_ids=ids)
        moe(x, ctx)
        opt.zero_grad()
        ctx.aux_losses["loss_damex_decoder.0"].backward()
        opt.step()
    ctx = RoutingContext(dataset_ids=ids)
    moe.eval()(x, ctx)
    assert ctx.stats["decoder.0/tokens_per_expert"].tolist() == [[6, 0], [0, 6], [6, 0], [0, 6]]
    with pytest.raises(ValueError, match=r"dataset_to_expert\[0\] = 9"):
        make_moe("damex", 2, dataset_to_expert=[9])
    with pytest.raises(ValueError, match="dataset_to_expert is required"):
        make_moe("damex", 2, dataset_to_expert=[])


# --------------------------------------------------------------------------------------------- remoe

def test_remoe_uses_every_positive_gate_and_l1_closed_form():
    E, k = 4, 1
    moe = make_moe("remoe", E, l1_init=0.01, l1_multiplier=2.0, target_k=k)
    x = torch.randn(2, 5, C, dtype=torch.float64)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 4] = True
    ctx = RoutingContext(dataset_ids=torch.tensor([0, 0]), key_padding_mask=pad)
    out = moe.eval()(x, ctx).reshape(-1, C)
    logits, _ = gate_probs(moe, x)
    g = torch.relu(logits)
    valid = ~pad.reshape(-1)
    T = int(valid.sum())
    for t in range(10):
        want = sum(g[t, e] * expert_ref(moe, e, x.reshape(-1, C)[t]) for e in range(E)) if valid[t] else 0 * out[t]
        torch.testing.assert_close(out[t], want)
    mean_g = [sum(float(g[t, e]) for t in range(10) if valid[t]) / T for e in range(E)]
    n = [sum(1 for t in range(10) if valid[t] and g[t, e] > 0) for e in range(E)]
    want = 0.01 * E * sum(mean_g[e] * n[e] / (T * k) for e in range(E))
    assert float(ctx.aux_losses["loss_remoe_l1_decoder.0"]) == pytest.approx(want, rel=1e-9)
    assert float(ctx.stats["decoder.0/remoe_sparsity"]) == pytest.approx(1 - sum(n) / (T * E))
    assert float(moe.router.l1_coef) == pytest.approx(0.01)  # eval: no update


@pytest.mark.parametrize("sign,factor", [(1.0, 2.0), (-1.0, 0.5)])
def test_remoe_lambda_moves_toward_target_sparsity(sign, factor):
    moe = make_moe("remoe", 4, l1_init=0.01, l1_multiplier=2.0, target_k=1).train()
    with torch.no_grad():
        moe.router.gate.weight.fill_(sign)  # x > 0: all gates on (too dense) or all off (sparse enough)
    x = torch.rand(1, 6, C, dtype=torch.float64) + 0.1
    for step in range(1, 3):
        moe(x, RoutingContext(dataset_ids=torch.tensor([0])))
        assert float(moe.router.l1_coef) == pytest.approx(0.01 * factor ** step)
    assert float(moe.state_dict()["router.l1_coef"]) == pytest.approx(0.01 * factor ** 2)  # checkpointed


# --------------------------------------------------------------------------------------------- moe++

def moepp_reference(moe, x, prev=None):
    """Float64 loop: softmax(W x + W_res prev) top-k renormalised over FFN/zero/copy/constant routes."""
    r = moe.router
    E, R = r.num_experts, r.num_routes
    xf = x.reshape(-1, C).double()
    logits = xf @ r.gate.weight.double().T
    if prev is not None:
        logits = logits + prev.reshape(-1, R).double() @ r.residual.weight.double().T
    probs = logits.softmax(-1)
    out = torch.zeros_like(xf)
    for t in range(xf.shape[0]):
        top = torch.topk(probs[t], r.k)
        for p, e in zip((top.values / top.values.sum()).tolist(), top.indices.tolist()):
            if e < E:
                y = expert_ref(moe, e, xf[t])
            elif e < E + r.num_zero:
                y = torch.zeros(C, dtype=torch.float64)
            elif e < E + r.num_zero + r.num_copy:
                y = xf[t]
            else:
                j = e - E - r.num_zero - r.num_copy
                a = (r.const_gate[j].double() @ xf[t]).softmax(0)
                y = a[0] * xf[t] + a[1] * r.const_vectors[j].double()
            out[t] += p * y
    return out, logits, probs


def test_moepp_matches_reference_with_gating_residual_and_balance_loss():
    E = 4
    moe = make_moe("moepp", E, k=2, num_zero=1, num_copy=1, num_constant=2, balance_coef=0.01)
    R = moe.router.num_routes
    assert R == 8
    with torch.no_grad():
        moe.router.gate.weight.mul_(8)  # spread the choices over all route kinds
        moe.router.residual.weight.normal_()
    x = torch.randn(3, 7, C, dtype=torch.float64)
    ctx = RoutingContext(dataset_ids=torch.tensor([0, 1, 0]))
    out1 = moe(x, ctx)
    want1, logits1, probs1 = moepp_reference(moe, x)
    torch.testing.assert_close(out1.reshape(-1, C), want1)
    assert ctx.prev_router_logits["decoder"].shape == (3, 7, R)
    top = probs1.topk(2, dim=-1).indices
    f = torch.stack([(top == e).sum(1).double() for e in range(R)], 1).mean(0) / 2
    want_balance = 0.01 * R * float((f * probs1.mean(0)).sum())
    assert float(ctx.aux_losses["loss_balance_decoder.0"]) == pytest.approx(want_balance)
    kinds = ctx.stats["decoder.0/tokens_per_expert"].sum(0)
    assert kinds.shape == (R,) and float(kinds.sum()) == 21 * 2

    prev = ctx.prev_router_logits["decoder"].detach().clone()
    out2 = moe(x, ctx)  # second MoE++ layer call of the same stack: uses the residual
    want2, _, _ = moepp_reference(moe, x, prev)
    torch.testing.assert_close(out2.reshape(-1, C), want2)
    assert not torch.allclose(want2, want1)
    out2.sum().backward()
    assert moe.router.residual.weight.grad.abs().sum() > 0


def test_moepp_first_layer_residual_gets_zero_gradient_for_ddp():
    moe = make_moe("moepp", 4)
    moe(torch.randn(1, 5, C, dtype=torch.float64), RoutingContext(dataset_ids=torch.tensor([0]))).sum().backward()
    assert moe.router.residual.weight.grad is not None
    assert torch.count_nonzero(moe.router.residual.weight.grad) == 0


# ------------------------------------------------------------------------------------------ registry

def test_user_router_registers_with_one_decorator():
    @register_router("test_last_expert")
    class LastExpert(Router):
        def route(self, tokens):
            T = tokens.x.shape[0]
            return RoutingPlan(torch.full((T, 1), self.num_experts - 1), torch.ones(T, 1, dtype=tokens.x.dtype))

    assert ROUTER_REGISTRY.get("test_last_expert") is LastExpert
    moe = make_moe("test_last_expert", 3)
    x = torch.randn(1, 4, C, dtype=torch.float64)
    torch.testing.assert_close(moe(x, RoutingContext(dataset_ids=torch.tensor([0])))[0], expert_ref(moe, 2, x[0]))
    with pytest.raises(KeyError, match="MODEL.GEM.ROUTER='nope' is not a registered router"):
        make_moe("nope")


def test_bad_plan_and_context_shapes_raise():
    @register_router("test_bad_plan")
    class BadPlan(Router):
        def route(self, tokens):
            T = tokens.x.shape[0]
            return RoutingPlan(torch.full((T, 2), 0), torch.ones(T, 1))

    moe = make_moe("test_bad_plan", 3)
    x = torch.randn(1, 4, C, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"combine_weight shape"):
        moe(x, RoutingContext(dataset_ids=torch.tensor([0])))
    with pytest.raises(ValueError, match=r"ctx.dataset_ids must have shape \(N=1,\)"):
        moe(x, RoutingContext(dataset_ids=torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        moe(x, RoutingContext(dataset_ids=torch.tensor([0]), key_padding_mask=torch.zeros(1, 3, dtype=torch.bool)))


def test_moepp_gating_residual_stays_within_its_stack():
    enc = make_moe("moepp", 4, layer="encoder.0", seed=1)
    dec = make_moe("moepp", 4, layer="decoder.0", seed=2)
    with torch.no_grad():
        dec.router.residual.weight.normal_()
    x = torch.randn(2, 5, C, dtype=torch.float64)
    ctx = RoutingContext(dataset_ids=torch.tensor([0, 1]))
    enc(x, ctx)  # same (N, L) as the decoder call below
    assert set(ctx.prev_router_logits) == {"encoder"}
    out = dec(x, ctx)
    want, _, _ = moepp_reference(dec, x)  # no residual from the encoder's logits
    torch.testing.assert_close(out.reshape(-1, C), want)
    assert set(ctx.prev_router_logits) == {"encoder", "decoder"}
