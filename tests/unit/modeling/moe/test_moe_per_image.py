"""Per-image GEM dispatch (each expert on an image's contiguous tokens) against the general per-token dispatch."""
import pytest
import torch

import gem_d2  # noqa: F401  (shims before detectron2)
from gem_d2.modeling.moe import MoEFFN
from gem_d2.modeling.moe.context import MoESpec, RoutingContext
from gem_d2.modeling.moe.dispatch import per_image_dispatch
from gem_d2.modeling.moe.router_gem import GEMRouter
from gem_d2.planner.mapping import GemMapping, RouterTables

C, FH, E = 6, 12, 4
# rows: u0 -> experts 1, 3 (k = 2, weights 0.3/0.7), u1 -> 0, u2 -> 2, 1 (0.5/0.5); datasets u2, u0, u1
TABLES = GemMapping.create(["u0", "u1", "u2"], [[1, 3], [0], [2, 1]], [[0.3, 0.7], [1.0], [0.5, 0.5]],
                           num_experts=E).router_tables(["u2", "u0", "u1"])

# every unit one expert (k = 1): the mixed batch below then runs experts 2, 0, 1, 2 on four runs of images
TABLES_K1 = GemMapping.create(["u0", "u1", "u2"], [[1], [0], [2]], [[1.0], [1.0], [1.0]],
                              num_experts=E).router_tables(["u2", "u0", "u1"])


def make_moe(tables=TABLES, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    spec = MoESpec(["encoder.0"], E, "gem", {"tables": tables}, num_datasets=4)
    return MoEFFN("encoder.0", C, FH, 0.0, "relu", spec).to(dtype)


def run(moe, x, ctx_kwargs, per_image):
    """Output, stats and the gradients of x and every parameter for one path."""
    moe.per_image = per_image
    moe.zero_grad()
    x = x.clone().requires_grad_(True)
    ctx = RoutingContext(**ctx_kwargs)
    out = moe(x, ctx)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = {"x": x.grad}
    grads.update({n: p.grad.clone() for n, p in moe.named_parameters()})
    return out.detach(), ctx.stats, grads


def mixed_batch(dtype, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    N, L = 5, 9
    x = torch.randn(N, L, C, generator=g, dtype=dtype)
    mask = torch.zeros(N, L, dtype=torch.bool)
    if pad:
        mask[1, 6:] = True
        mask[3, 2:] = True
        mask[4, :] = True  # a fully padded image
    # datasets 0, 0 (one slice), 2, 1, 0: three different rows, k = 2 and k = 1, a row seen again later
    return x, {"dataset_ids": torch.tensor([0, 0, 2, 1, 0]), "key_padding_mask": mask if pad else None}


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("pad", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("tables", [TABLES, TABLES_K1], ids=["k1-and-k2", "k1-segments"])
def test_per_image_equals_per_token_dispatch(dtype, tol, pad, tables):
    moe = make_moe(tables, dtype=dtype)
    segmented = []
    original = moe.experts.forward_segments
    moe.experts.forward_segments = lambda *a: segmented.append(a[1]) or original(*a)
    x, ctx = mixed_batch(dtype, pad=pad)
    out_a, stats_a, grads_a = run(moe, x, ctx, per_image=False)
    out_b, stats_b, grads_b = run(moe, x, ctx, per_image=True)
    torch.testing.assert_close(out_b, out_a, rtol=tol, atol=tol)
    if pad:
        assert torch.equal(out_b[ctx["key_padding_mask"]], torch.zeros_like(out_b[ctx["key_padding_mask"]]))
        assert torch.equal(grads_b["x"][ctx["key_padding_mask"]], torch.zeros_like(x[ctx["key_padding_mask"]]))
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=tol, atol=tol, msg=name)
    assert stats_a.keys() == stats_b.keys()
    for name in stats_a:
        assert torch.equal(stats_b[name], stats_a[name]), name
    # k = 1 everywhere: one segmented call over the four runs of images (9 tokens each), expert 2 twice
    assert segmented == ([] if tables is TABLES else [[(2, 0, 18), (0, 18, 27), (1, 27, 36), (2, 36, 45)]])


def test_per_image_dispatch_slices_consecutive_images_without_copies():
    moe = make_moe()
    x = torch.randn(4, 3, C, dtype=torch.float64)
    seen = []
    original = moe.experts.forward_expert

    def spy(e, xs, weights=None, scale=1.0):
        seen.append((e, xs.shape[0], xs.data_ptr() - x.data_ptr()))
        return original(e, xs, weights, scale)

    moe.experts.forward_expert = spy
    routes = [((1, 0.3), (3, 0.7))] * 2 + [((0, 1.0),)] * 2
    out, ran = per_image_dispatch(x, routes, moe.experts)
    assert ran
    row = 3 * C * x.element_size()  # bytes per image
    # images 0-1 share a route: one call per expert on the view x[0:2] (its 6 tokens); images 2-3 on x[2:4]
    assert seen == [(1, 6, 0), (3, 6, 0), (0, 6, 2 * row)]
    want = torch.cat([0.3 * original(1, x[:2]) + 0.7 * original(3, x[:2]), original(0, x[2:])])
    torch.testing.assert_close(out, want)


def graph_nodes(grad_fn):
    """Names of the autograd nodes reachable from ``grad_fn``."""
    names, stack, seen = [], [grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


@pytest.mark.parametrize("routes", [[((2, 1.0),)] * 2, [((2, 1.0),), ((0, 0.4), (1, 0.6))]])
def test_per_image_padding_is_zeroed_in_place_without_copying_slices(routes):
    # zeroing in place on a view of the expert's output would make the backward copy whole slices (CopySlices)
    moe = make_moe()
    x = torch.randn(2, 5, C, dtype=torch.float64, requires_grad=True)
    padding = torch.tensor([[False] * 3 + [True] * 2, [False] * 4 + [True]])
    out, _ = per_image_dispatch(x, routes, moe.experts, padding)
    nodes = graph_nodes(out.grad_fn)
    assert "CopySlices" not in nodes and "MulBackward0" in nodes
    assert torch.equal(out[padding], torch.zeros_like(out[padding]))
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad[padding], torch.zeros_like(x.grad[padding]))


def test_class_level_plan_keeps_per_token_dispatch_for_labelled_tokens():
    # classes 0..2 belong to dataset 0, 3..4 to dataset 1; class 1 has no unit (-1): its dataset's row
    tables = RouterTables([[0], [1], [2], [3]], [[1.0]] * 4, [[False]] * 4, [0, 3], [1, -1, 2, 3, 0])
    router = GEMRouter(C, E, tables)
    ids = torch.tensor([0, 1])
    labels = torch.tensor([[0, 1, 2], [3, 4, -1]])
    assert router.image_routes(RoutingContext(dataset_ids=ids, query_labels=labels), 2) is None
    assert router.image_routes(RoutingContext(dataset_ids=ids), 2) == [((0, 1.0),), ((3, 1.0),)]  # encoder
    moe = make_moe(tables)
    x = torch.randn(2, 3, C, dtype=torch.float64)
    calls = []
    original = moe.experts.forward_expert
    moe.experts.forward_expert = lambda e, xs, w=None, scale=1.0: calls.append(xs.shape) or original(e, xs, w, scale)
    moe(x, RoutingContext(dataset_ids=ids, query_labels=labels))
    assert all(len(s) == 2 for s in calls)  # (tokens, C): the per-token path, not image slices


def test_unknown_dataset_id_is_a_clear_error():
    moe = make_moe()
    want = r"gem router: dataset ids \(the mapping's datasets\) must lie in \[0, 3\), got values in \[3, 3\]"
    with pytest.raises(ValueError, match=want):
        moe(torch.randn(1, 2, C, dtype=torch.float64), RoutingContext(dataset_ids=torch.tensor([3])))
