"""MODEL.DINO.MSDA_IMPL: the compiled kernel (torch-ms-deform-attn) against the PyTorch reference, and the choice.

Comparisons need the package (built by tools/bootstrap.py from requirements/build.txt) and skip without it; the
selection and fallback tests fake its absence and run everywhere.
"""
import logging
import sys

import pytest
import torch

from gem_d2.layers import ms_deform_attn as msda
from gem_d2.layers.ms_deform_attn import MSDeformAttn, ext_status, ms_deform_attn, resolve_impl, set_msda_impl

needs_ext = pytest.mark.skipif(ext_status()[0] is None, reason=f"torch-ms-deform-attn is not built here: "
                               f"{ext_status()[1]}")

# DINO-4scale's level structure at a small size: 4 levels, non-square, the last ones a few pixels wide.
LEVELS = [(10, 13), (5, 7), (3, 4), (2, 2)]


@pytest.fixture
def no_ext(monkeypatch):
    """The package made unimportable (as on a machine without a compiler) for one test."""
    monkeypatch.setitem(sys.modules, "torch_ms_deform_attn", None)  # import raises ImportError
    ext_status.cache_clear()
    monkeypatch.setattr(msda, "_logged", set())
    yield
    ext_status.cache_clear()


def _module_inputs(dtype, n=2, lq=7, ref_dim=2, seed=0, levels=LEVELS, d_model=32):
    """query/value/reference points/padding mask; levels padded on the right and bottom for image 1, and
    reference points reaching past the map so that some samples fall outside it."""
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in levels)
    query = torch.randn(n, lq, d_model, generator=g, dtype=dtype)
    value = torch.randn(n, s, d_model, generator=g, dtype=dtype)
    ref = -0.2 + 1.4 * torch.rand(n, lq, len(levels), ref_dim, generator=g, dtype=dtype)
    if ref_dim == 4:
        ref[..., 2:] = 0.05 + 0.5 * ref[..., 2:].abs()  # box sizes
    mask = torch.zeros(n, s, dtype=torch.bool)
    start = 0
    for h, w in levels:
        level = mask[1, start:start + h * w].view(h, w)
        level[:, max(1, w - w // 3):] = True  # image 1: padded columns
        level[max(1, h - h // 3):, :] = True  # and rows
        start += h * w
    return query, value, ref, torch.tensor(levels), mask


def _run(module, inputs, impl):
    query, value, ref, shapes, mask = (t.clone() for t in inputs)
    query.requires_grad_(query.is_floating_point())
    value.requires_grad_(True)
    module.impl = impl
    module.zero_grad()
    out = module(query, ref, value, shapes, None, mask)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    (out * weight).sum().backward()
    grads = {"query": query.grad, "value": value.grad}
    grads.update({name: p.grad.clone() for name, p in module.named_parameters()})
    return out.detach(), grads


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _ext_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ok, why = msda.ext_supports(torch.device(device), torch.float32)
    if not ok:
        pytest.skip(why)
    return torch.device(device)


@needs_ext
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("ref_dim", [2, 4], ids=["encoder", "decoder"])
def test_module_ext_matches_pytorch(device, dtype, tol, ref_dim):
    """Outputs and every gradient (inputs and parameters) agree on the model's shapes: 4 levels, padded levels,
    samples outside the map, encoder (point references) and decoder (box references)."""
    device = _ext_device(device)
    torch.manual_seed(0)
    module = MSDeformAttn(d_model=32, n_levels=len(LEVELS), n_heads=4, n_points=4).to(device, dtype)
    with torch.no_grad():  # offsets large enough to leave the map, attention not uniform
        module.sampling_offsets.weight.normal_(0, 2.0)
        module.attention_weights.weight.normal_(0, 0.5)
    inputs = [t.to(device) for t in _module_inputs(dtype, ref_dim=ref_dim)]
    out_ref, grads_ref = _run(module, inputs, "pytorch")
    out_ext, grads_ext = _run(module, inputs, "ext")
    assert _rel(out_ext, out_ref) < tol
    for name, g in grads_ref.items():
        assert _rel(grads_ext[name], g) < tol, name


@needs_ext
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
def test_core_ext_matches_pytorch_outside_and_on_borders(dtype, tol):
    """Raw kernel: locations well outside [0, 1], exactly on pixel centres and on the map's edges."""
    g = torch.Generator().manual_seed(1)
    shapes = torch.tensor(LEVELS)
    s = sum(h * w for h, w in LEVELS)
    n, lq, m, d, p = 2, 6, 2, 4, 5
    value = torch.randn(n, s, m, d, generator=g, dtype=dtype, requires_grad=True)
    loc = -0.5 + 2 * torch.rand(n, lq, m, len(LEVELS), p, 2, generator=g, dtype=dtype)
    loc[:, :, :, :, 0] = 0.0  # the border itself
    loc[:, :, :, :, 1] = 1.0
    loc[:, 0, :, :, 2] = -3.0  # far outside: reads zeros
    loc = loc.requires_grad_(True)
    weights = torch.rand(n, lq, m, len(LEVELS), p, generator=g, dtype=dtype, requires_grad=True)
    results = []
    for impl in ("pytorch", "ext"):
        out = ms_deform_attn(value, shapes, None, loc, weights, impl)
        results.append((out, torch.autograd.grad(out.square().sum(), (value, loc, weights))))
    (out_ref, g_ref), (out_ext, g_ext) = results
    assert _rel(out_ext, out_ref) < tol
    for a, b in zip(g_ext, g_ref):
        assert _rel(a, b) < tol
    assert out_ref[:, 0].abs().sum() > 0  # other points of the query still contribute


@needs_ext
def test_auto_selects_the_package_on_cpu(caplog):
    msda._logged.clear()
    with caplog.at_level(logging.INFO, logger=msda.__name__):
        assert resolve_impl("auto", torch.device("cpu"), torch.float32) == "ext"
        assert resolve_impl("auto", torch.device("cpu"), torch.float32) == "ext"
    assert sum("torch_ms_deform_attn" in r.getMessage() for r in caplog.records) == 1  # logged once
    assert resolve_impl("pytorch", torch.device("cpu"), torch.float32) == "pytorch"
    assert resolve_impl("ext", torch.device("cpu"), torch.float64) == "ext"


@needs_ext
def test_auto_falls_back_where_the_build_has_no_kernels(monkeypatch):
    """A CPU-only build on a CUDA tensor (faked: the build's flag), and an unsupported dtype."""
    monkeypatch.setattr(ext_status()[0]._C, "with_cuda", False, raising=False)
    monkeypatch.setattr(msda, "_logged", set())
    assert resolve_impl("auto", torch.device("cuda"), torch.float32) == "pytorch"
    with pytest.raises(RuntimeError, match="no CUDA kernels"):
        resolve_impl("ext", torch.device("cuda"), torch.float32)
    assert resolve_impl("auto", torch.device("cpu"), torch.complex64) == "pytorch"


def test_auto_falls_back_when_the_package_does_not_import(no_ext, caplog):
    assert ext_status()[0] is None and "not importable" in ext_status()[1]
    with caplog.at_level(logging.INFO, logger=msda.__name__):
        assert resolve_impl("auto", torch.device("cpu"), torch.float32) == "pytorch"
        assert resolve_impl("auto", torch.device("cpu"), torch.float32) == "pytorch"
    fallbacks = [r.getMessage() for r in caplog.records if "PyTorch implementation" in r.getMessage()]
    assert len(fallbacks) == 1 and "not importable" in fallbacks[0]
    module = MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=2)  # auto is the default
    query, value, ref = torch.randn(1, 3, 8), torch.randn(1, 6, 8), torch.rand(1, 3, 1, 2)
    expected = module(query, ref, value, torch.tensor([[2, 3]]))
    module.impl = "pytorch"
    assert torch.equal(module(query, ref, value, torch.tensor([[2, 3]])), expected)


def test_ext_without_the_package_fails_at_build_time(no_ext):
    with pytest.raises(RuntimeError, match="MSDA_IMPL=ext.*not importable"):
        MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=2, impl="ext")
    with pytest.raises(RuntimeError, match="MSDA_IMPL=ext"):
        resolve_impl("ext", torch.device("cpu"), torch.float32)


def test_set_msda_impl_reaches_every_module_and_checks_the_name():
    net = torch.nn.Sequential(MSDeformAttn(8, 1, 2, 2), torch.nn.Sequential(MSDeformAttn(8, 1, 2, 2)))
    assert set_msda_impl(net, "pytorch") is net
    assert [m.impl for m in net.modules() if isinstance(m, MSDeformAttn)] == ["pytorch", "pytorch"]
    with pytest.raises(ValueError, match="expected one of"):
        set_msda_impl(net, "cuda")
    with pytest.raises(ValueError, match="expected one of"):
        MSDeformAttn(8, 1, 2, 2, impl="fast")


@pytest.mark.parametrize("impl", ["pytorch", pytest.param("ext", marks=needs_ext)])
def test_autocast_mixed_dtypes_run(impl):
    """Under autocast the value is bfloat16 and the softmaxed weights float32: sampling runs in the wider dtype."""
    module = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2, impl=impl)
    query, value, ref, shapes, mask = _module_inputs(torch.float32, levels=LEVELS[:2], d_model=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(query, ref, value, shapes, None, mask)
    assert out.shape == (2, 7, 16) and torch.isfinite(out).all()
