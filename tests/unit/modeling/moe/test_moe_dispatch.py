"""Expert bank, grouped dispatch, the dense router and the DDP zero-gradient anchor of MoEFFN."""
import pytest
import torch

import gem_d2  # noqa: F401  (shims before detectron2)
from gem_d2.layers.mlp import FFN
from gem_d2.modeling.moe import ExpertBank, MoEFFN, grouped_dispatch
from gem_d2.modeling.moe.context import MoESpec, RoutingContext
from gem_d2.modeling.moe.layer import build_ffn
from gem_d2.planner.mapping import RouterTables

C, FH, E = 6, 10, 4


def naive_expert(bank: ExpertBank, e: int, x_row: torch.Tensor) -> torch.Tensor:
    """One token through expert e with explicit float64 loops over the hidden units (no matmul)."""
    w1, b1, w2, b2 = (p.detach().double() for p in (bank.w1[e], bank.b1[e], bank.w2[e], bank.b2[e]))
    x_row = x_row.double()
    hidden = [max(0.0, float(b1[f] + sum(w1[f, c] * x_row[c] for c in range(x_row.numel())))) for f in range(FH)]
    return torch.tensor([float(b2[c] + sum(w2[c, f] * hidden[f] for f in range(FH))) for c in range(C)],
                        dtype=torch.float64)


def make_bank(seed=0):
    torch.manual_seed(seed)
    return ExpertBank(E, C, FH, dropout=0.0, activation="relu").double()


def test_expert_bank_matches_naive_and_batched_path():
    bank = make_bank()
    x = torch.randn(5, C, dtype=torch.float64)
    for e in range(E):
        got = bank.forward_expert(e, x)
        for t in range(5):
            torch.testing.assert_close(got[t], naive_expert(bank, e, x[t]))
    xs = torch.randn(E, 3, C, dtype=torch.float64)
    got = bank.forward_all(xs)
    for e in range(E):
        torch.testing.assert_close(got[e], bank.forward_expert(e, xs[e]))
    with pytest.raises(ValueError, match="forward_all expects"):
        bank.forward_all(torch.randn(E + 1, 3, C, dtype=torch.float64))


@pytest.mark.parametrize("shared_views", [False, True])
def test_expert_scale_equals_multiplying_the_output(shared_views):
    # the scale is folded into the second linear; the reference multiplies the output (float64)
    bank = make_bank(3)
    x = torch.randn(7, C, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(7, C, dtype=torch.float64)
    results = []
    for fold in (False, True):
        bank.zero_grad(set_to_none=True)
        x.grad = None
        weights = bank.weights_of([0, 2]) if shared_views else None
        out = bank.forward_expert(2, x, weights, scale=0.3) if fold else bank.forward_expert(2, x, weights) * 0.3
        out.backward(grad_out)
        results.append([out.detach(), x.grad.clone()] + [p.grad.clone() for p in bank.parameters()])
    for got, want in zip(*results[::-1]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_shared_expert_views_give_the_indexed_outputs_and_gradients():
    # several experts in one call share weights_of's views; the reference indexes the stacked parameters per call
    bank = make_bank(5)
    x = torch.randn(6, C, dtype=torch.float64)
    grad_out = torch.randn(6, C, dtype=torch.float64)
    grads = []
    for weights in (None, bank.weights_of([3, 0, 1])):  # expert 0 asked for but unused
        bank.zero_grad(set_to_none=True)
        out = bank.forward_expert(1, x[:4], weights) * 0.25 + bank.forward_expert(3, x[2:], weights) * 0.5
        out.backward(grad_out[:4])
        grads.append((out.detach(), [p.grad.clone() for p in bank.parameters()]))
    (out_a, grads_a), (out_b, grads_b) = grads
    assert torch.equal(out_a, out_b)
    for got, want in zip(grads_b, grads_a):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    assert torch.equal(grads_b[0][[0, 2]], torch.zeros_like(grads_b[0][[0, 2]]))  # experts 0 and 2 did not run
    assert bank.weights_of([2]) is None  # one expert: indexing per call
    with torch.no_grad():
        assert bank.weights_of([0, 1]) is None
    with pytest.raises(ValueError, match=r"repeated experts in \[1, 1\]"):
        bank.weights_of([1, 1])


def test_grouped_dispatch_equals_naive_per_token_loop_k2():
    bank = make_bank(1)
    g = torch.Generator().manual_seed(3)
    T, k = 37, 2
    x = torch.randn(T, C, generator=g, dtype=torch.float64)
    idx = torch.randint(0, E, (T, k), generator=g)
    w = torch.rand(T, k, generator=g, dtype=torch.float64)
    active = torch.rand(T, k, generator=g) > 0.25
    out, ran = grouped_dispatch(x, idx, w, active, bank)
    assert ran
    for t in range(T):
        want = torch.zeros(C, dtype=torch.float64)
        for j in range(k):
            if active[t, j]:
                want += w[t, j] * naive_expert(bank, int(idx[t, j]), x[t])
        torch.testing.assert_close(out[t], want)


def test_dispatch_skips_non_ffn_routes_and_reports_when_nothing_ran():
    bank = make_bank(2)
    x = torch.randn(4, C, dtype=torch.float64)
    idx = torch.tensor([[E], [E + 1], [0], [E]])  # routes >= E belong to the router (e.g. MoE++ copy)
    out, ran = grouped_dispatch(x, idx, torch.ones(4, 1, dtype=torch.float64), torch.ones(4, 1, dtype=torch.bool),
                                bank)
    assert ran
    assert torch.equal(out[[0, 1, 3]], torch.zeros(3, C, dtype=torch.float64))
    torch.testing.assert_close(out[2], naive_expert(bank, 0, x[2]))
    out, ran = grouped_dispatch(x, idx, torch.ones(4, 1, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.bool),
                                bank)
    assert not ran and torch.equal(out, torch.zeros_like(x))


def test_fast_path_runs_the_expert_on_x_directly():
    bank = make_bank(4)
    x = torch.randn(9, C, dtype=torch.float64)
    calls = []
    original = bank.forward_expert
    bank.forward_expert = lambda e, inp, w=None, scale=1.0: calls.append((e, inp)) or original(e, inp, w, scale)
    w = torch.full((9, 1), 0.5, dtype=torch.float64)
    out, _ = grouped_dispatch(x, torch.full((9, 1), 2), w, torch.ones(9, 1, dtype=torch.bool), bank)
    assert len(calls) == 1 and calls[0][0] == 2 and calls[0][1] is x  # no gather
    for t in range(9):
        torch.testing.assert_close(out[t], 0.5 * naive_expert(bank, 2, x[t]))
    calls.clear()
    grouped_dispatch(x, torch.tensor([[1]] * 4 + [[3]] * 5), w, torch.ones(9, 1, dtype=torch.bool), bank)
    assert [e for e, _ in calls] == [1, 3] and [len(i) for _, i in calls] == [4, 5]  # one call per used expert


def test_dense_moe_equals_plain_ffn():
    torch.manual_seed(0)
    ffn = FFN(C, FH, 0.0, "relu")
    moe = build_ffn("decoder.0", C, FH, 0.0, "relu", MoESpec(["decoder.0"], num_experts=8, router="dense"))
    assert isinstance(moe, MoEFFN) and moe.experts.num_experts == 1
    moe.load_from_ffn(ffn)
    x = torch.randn(2, 7, C)
    ctx = RoutingContext(dataset_ids=torch.tensor([0, 1]))
    torch.testing.assert_close(moe(x, ctx), ffn(x), rtol=0, atol=1e-6)
    assert ctx.aux_losses == {}
    assert torch.equal(ctx.stats["decoder.0/tokens_per_expert"], torch.tensor([[7.0], [7.0]]))
    assert build_ffn("decoder.1", C, FH, 0.0, "relu", MoESpec(["decoder.0"], 8, "dense")).__class__ is FFN


def test_unused_experts_and_router_params_get_zero_not_none_gradients():
    spec = MoESpec(["encoder.0"], num_experts=E, router="gem", router_kwargs=dict(
        tables=RouterTables([[0], [2]], [[1.0], [1.0]], [[False], [False]], [0, 1])))
    torch.manual_seed(0)
    moe = MoEFFN("encoder.0", C, FH, 0.0, "relu", spec)
    x = torch.randn(3, 5, C)
    moe(x, RoutingContext(dataset_ids=torch.tensor([0, 0, 0]))).sum().backward()
    for p in moe.experts.parameters():
        assert p.grad is not None
        assert torch.count_nonzero(p.grad[1:]) == 0 and torch.count_nonzero(p.grad[0]) > 0

    topk = MoEFFN("decoder.0", C, FH, 0.0, "relu", MoESpec(["decoder.0"], E, "topk"))
    out = topk(x, RoutingContext(dataset_ids=torch.tensor([0, 1, 0]),
                                 key_padding_mask=torch.ones(3, 5, dtype=torch.bool)))  # nothing valid: nothing ran
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    for name, p in topk.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name
