"""segmented_linear against one F.linear per segment (float64): outputs, gradients, scales, bad segments."""
import pytest
import torch
import torch.nn.functional as F

from gem_d2.layers.segmented_linear import segmented_linear

S, CIN, COUT, T = 3, 5, 4, 10
SEGMENTS = [(2, 0, 3), (0, 3, 4), (2, 4, 9), (1, 9, 10)]  # weight 2 on two segments: its gradient accumulates


def reference(x, weight, bias, segments, scales=None):
    scales = [1.0] * len(segments) if scales is None else scales
    return torch.cat([s * F.linear(x[a:b], weight[i], bias[i]) for (i, a, b), s in zip(segments, scales)])


@pytest.mark.parametrize("scales", [None, [0.5, 1.0, -2.0, 3.0]])
def test_equals_one_linear_per_segment(scales):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, CIN, generator=g, dtype=torch.float64)
    weight = torch.randn(S, COUT, CIN, generator=g, dtype=torch.float64)
    bias = torch.randn(S, COUT, generator=g, dtype=torch.float64)
    grad_out = torch.randn(T, COUT, generator=g, dtype=torch.float64)
    results = []
    for fn in (reference, segmented_linear):
        leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
        out = fn(*leaves, SEGMENTS, scales)
        out.backward(grad_out.t().contiguous().t())  # a non-contiguous gradient
        results.append([out.detach()] + [t.grad for t in leaves])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gradcheck_and_partial_gradients():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, CIN, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(S, COUT, CIN, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(S, COUT, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: segmented_linear(*t, SEGMENTS, [1.0, 0.5, 2.0, -1.0]),
                                    (x, weight, bias))
    # only the weights need a gradient (an input that is data, a frozen bias)
    out = segmented_linear(x.detach(), weight, bias.detach(), SEGMENTS)
    out.sum().backward()
    assert weight.grad is not None and weight.grad[0].abs().sum() > 0


@pytest.mark.parametrize("segments,match", [
    ([(0, 0, 5), (1, 6, 10)], r"must start at row 5"),  # a gap
    ([(0, 0, 5), (1, 4, 10)], r"must start at row 5"),  # an overlap
    ([(0, 0, 0), (1, 0, 10)], r"non-empty"),
    ([(0, 0, 5), (3, 5, 10)], r"name a weight in \[0, 3\)"),
    ([(0, 0, 5)], r"cover rows \[0, 5\), not \[0, 10\)"),
    ([(0, 0, 5), (1, 5, 11)], r"end by row 10"),
])
def test_bad_segments_are_named(segments, match):
    x, weight, bias = torch.zeros(T, CIN), torch.zeros(S, COUT, CIN), torch.zeros(S, COUT)
    with pytest.raises(ValueError, match=match):
        segmented_linear(x, weight, bias, segments)


def test_bad_shapes_and_scales():
    x, weight, bias = torch.zeros(T, CIN), torch.zeros(S, COUT, CIN), torch.zeros(S, COUT)
    with pytest.raises(ValueError, match=r"x \(T, C_in\), weight \(S, C_out, C_in\)"):
        segmented_linear(x[:, :3], weight, bias, SEGMENTS)
    with pytest.raises(ValueError, match="3 scales for 4 segments"):
        segmented_linear(x, weight, bias, SEGMENTS, [1.0, 1.0, 1.0])
