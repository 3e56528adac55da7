"""Multi-scale deformable attention against an independent naive bilinear-sampling reference."""
import math

import pytest
import torch

from gem_d2.layers.ms_deform_attn import MSDeformAttn, ms_deform_attn_core

SHAPES = [(3, 4), (2, 3), (1, 2)]  # non-square levels


def naive_core(value, shapes, locations, weights):
    """Explicit loops in Python floats: pixel (i, j) centred at ((j+0.5)/W, (i+0.5)/H), zeros outside."""
    v = value.tolist()
    loc = locations.tolist()
    w = weights.tolist()
    n, _, m, d = value.shape
    lq, num_levels, p = locations.shape[1], locations.shape[3], locations.shape[4]
    starts = [0]
    for h, wd in shapes[:-1]:
        starts.append(starts[-1] + h * wd)
    out = [[[0.0] * (m * d) for _ in range(lq)] for _ in range(n)]
    for b in range(n):
        for q in range(lq):
            for head in range(m):
                for lvl in range(num_levels):
                    h, wd = shapes[lvl]
                    for pt in range(p):
                        x, y = loc[b][q][head][lvl][pt]
                        px, py = x * wd - 0.5, y * h - 0.5
                        x0, y0 = math.floor(px), math.floor(py)
                        fx, fy = px - x0, py - y0
                        taps = [(x0, y0, (1 - fx) * (1 - fy)), (x0 + 1, y0, fx * (1 - fy)),
                                (x0, y0 + 1, (1 - fx) * fy), (x0 + 1, y0 + 1, fx * fy)]
                        for xi, yi, bw in taps:
                            if 0 <= xi < wd and 0 <= yi < h:
                                row = v[b][starts[lvl] + yi * wd + xi][head]
                                for c in range(d):
                                    out[b][q][head * d + c] += w[b][q][head][lvl][pt] * bw * row[c]
    return torch.tensor(out, dtype=torch.float64)


def make_inputs(n=2, lq=5, m=2, d=3, p=3, shapes=SHAPES, seed=0, lo=-0.15, hi=1.15):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, generator=g, dtype=torch.float64)
    loc = lo + (hi - lo) * torch.rand(n, lq, m, len(shapes), p, 2, generator=g, dtype=torch.float64)
    weights = torch.rand(n, lq, m, len(shapes), p, generator=g, dtype=torch.float64)
    return value, torch.tensor(shapes, dtype=torch.long), loc, weights


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_core_matches_naive_reference_float64():
    value, ss, loc, w = make_inputs()
    out = ms_deform_attn_core(value, ss, loc, w)
    assert out.shape == (2, 5, 6) and out.dtype == torch.float64
    assert rel_err(out, naive_core(value, SHAPES, loc, w)) < 1e-10


def test_core_exact_points_and_borders():
    # pixel centres read the pixel exactly; the map border (0 or 1) reads half a pixel of zeros
    shapes = [(2, 3)]
    value = torch.arange(6, dtype=torch.float64).view(1, 6, 1, 1) + 1.0
    pts = [((0.5 / 3), 0.25), ((2.5 / 3), 0.75), (0.0, 0.25), (1.0, 0.75), (1.5, 0.5), (-0.4, 0.5)]
    loc = torch.tensor(pts, dtype=torch.float64).view(1, len(pts), 1, 1, 1, 2)
    w = torch.ones(1, len(pts), 1, 1, 1, dtype=torch.float64)
    out = ms_deform_attn_core(value, torch.tensor(shapes), loc, w).flatten()
    # value map rows [[1,2,3],[4,5,6]]
    expected = torch.tensor([1.0, 6.0, 0.5, 3.0, 0.0, 0.0], dtype=torch.float64)
    assert torch.allclose(out, expected, atol=1e-12)
    assert rel_err(out, naive_core(value, shapes, loc, w).flatten()) < 1e-12


def test_core_single_level_and_many_points():
    value, ss, loc, w = make_inputs(n=1, lq=4, m=3, d=2, p=6, shapes=[(5, 2)], seed=3)
    assert rel_err(ms_deform_attn_core(value, ss, loc, w), naive_core(value, [(5, 2)], loc, w)) < 1e-10


def test_core_float32_close_to_float64():
    value, ss, loc, w = make_inputs(seed=1)
    out64 = ms_deform_attn_core(value, ss, loc, w)
    out32 = ms_deform_attn_core(value.float(), ss, loc.float(), w.float())
    assert out32.dtype == torch.float32
    assert rel_err(out32.double(), out64) < 1e-5


def test_core_gradcheck():
    value, ss, loc, w = make_inputs(n=1, lq=2, m=2, d=2, p=2, shapes=[(2, 3), (1, 2)], seed=2, lo=0.05, hi=0.95)
    value.requires_grad_(True)
    loc.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, l, a: ms_deform_attn_core(v, ss, l, a), (value, loc, w),
                                    eps=1e-6, atol=1e-7)


def test_core_rejects_bad_inputs():
    value, ss, loc, w = make_inputs()
    with pytest.raises(ValueError, match="sum to"):
        ms_deform_attn_core(value[:, :-1], ss, loc, w)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn_core(value, ss, loc, w[..., :-1])
    with pytest.raises(TypeError, match="dtype"):
        ms_deform_attn_core(value.float(), ss, loc, w)
    with pytest.raises(TypeError, match="integer"):
        ms_deform_attn_core(value, ss.double(), loc, w)


def naive_module(mod, query, ref, value, shapes, mask):
    """MSDeformAttn written out with explicit float64 maths and the naive core."""
    def lin(layer, x):
        return x @ layer.weight.T + layer.bias

    n, lq, c = query.shape
    m, num_levels, p = mod.n_heads, mod.n_levels, mod.n_points
    v = lin(mod.value_proj, value)
    if mask is not None:
        v = torch.where(mask[..., None], torch.zeros_like(v), v)
    v = v.view(n, -1, m, c // m)
    off = lin(mod.sampling_offsets, query).view(n, lq, m, num_levels, p, 2)
    logits = lin(mod.attention_weights, query).view(n, lq, m, num_levels * p)
    aw = (logits.exp() / logits.exp().sum(-1, keepdim=True)).view(n, lq, m, num_levels, p)
    loc = torch.empty_like(off)
    for lvl, (h, w) in enumerate(shapes):
        for axis, size in ((0, w), (1, h)):
            if ref.shape[-1] == 2:
                loc[:, :, :, lvl, :, axis] = ref[:, :, None, lvl, None, axis] + off[:, :, :, lvl, :, axis] / size
            else:
                half_size = ref[:, :, None, lvl, None, 2 + axis] / 2
                centre = ref[:, :, None, lvl, None, axis]
                loc[:, :, :, lvl, :, axis] = centre + off[:, :, :, lvl, :, axis] / p * half_size
    return lin(mod.output_proj, naive_core(v, shapes, loc, aw))


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_with_padding_matches_naive(ref_dim):
    torch.manual_seed(0)
    shapes = [(3, 4), (2, 2)]
    s = 16
    mod = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=3).double()
    # random (non-init) projections so offsets and weights depend on the query
    for prm in mod.parameters():
        torch.nn.init.normal_(prm, std=0.3)
    query = torch.randn(2, 4, 8, dtype=torch.float64)
    value = torch.randn(2, s, 8, dtype=torch.float64)
    ref = torch.rand(2, 4, 2, ref_dim, dtype=torch.float64) * 0.6 + 0.2
    mask = torch.zeros(2, s, dtype=torch.bool)
    mask[1, 3] = mask[1, 7] = mask[1, 11] = mask[1, 14:] = True  # right column of level 0, last level row
    ss = torch.tensor(shapes)
    lsi = torch.tensor([0, 12])
    out = mod(query, ref, value, ss, lsi, mask)
    assert out.shape == (2, 4, 8)
    assert rel_err(out, naive_module(mod, query, ref, value, shapes, mask)) < 1e-10
    # values at padded tokens have no influence
    value2 = value.clone()
    value2[mask] = 1e3
    assert torch.equal(mod(query, ref, value2, ss, lsi, mask), out)
    assert not torch.allclose(mod(query, ref, value2, ss, lsi, None), out)


def test_module_initialisation():
    mod = MSDeformAttn(d_model=16, n_levels=2, n_heads=8, n_points=3)
    bias = mod.sampling_offsets.bias.detach().view(8, 2, 3, 2)
    # head 0 looks right (1, 0), head 1 diagonally (1, 1), head 2 down (0, 1), head 4 left (-1, 0)
    for head, direction in ((0, (1.0, 0.0)), (1, (1.0, 1.0)), (2, (0.0, 1.0)), (4, (-1.0, 0.0))):
        for point in range(3):
            expected = torch.tensor(direction) * (point + 1)
            assert torch.allclose(bias[head, :, point], expected.expand(2, 2), atol=1e-6)
    assert torch.equal(mod.sampling_offsets.weight, torch.zeros_like(mod.sampling_offsets.weight))
    assert torch.equal(mod.attention_weights.weight, torch.zeros_like(mod.attention_weights.weight))
    assert torch.equal(mod.attention_weights.bias, torch.zeros_like(mod.attention_weights.bias))
    assert torch.equal(mod.value_proj.bias, torch.zeros(16)) and mod.value_proj.weight.abs().sum() > 0
    bound = math.sqrt(6.0 / 32)  # xavier uniform bound for 16 -> 16
    assert mod.output_proj.weight.abs().max() <= bound


def test_module_rejects_bad_inputs():
    mod = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=1)
    q, v = torch.randn(1, 3, 8), torch.randn(1, 16, 8)
    ss = torch.tensor([[3, 4], [2, 2]])
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="reference_points"):
        mod(q, torch.rand(1, 3, 2, 3), v, ss)
    with pytest.raises(ValueError, match="level_start_index"):
        mod(q, torch.rand(1, 3, 2, 2), v, ss, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="padding_mask"):
        mod(q, torch.rand(1, 3, 2, 2), v, ss, None, torch.zeros(1, 15, dtype=torch.bool))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_core_cuda_matches_cpu():
    value, ss, loc, w = make_inputs(seed=5)
    out = ms_deform_attn_core(*(t.to("cuda") for t in (value, ss, loc, w)))
    assert out.device.type == "cuda"
    assert rel_err(out.cpu(), ms_deform_attn_core(value, ss, loc, w)) < 1e-10
