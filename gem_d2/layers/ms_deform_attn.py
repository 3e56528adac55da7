"""Multi-scale deformable attention (Deformable-DETR): the pure-PyTorch reference and a compiled kernel.

``ms_deform_attn_core`` is the reference path: one ``F.grid_sample`` per feature level, so it
imports and runs everywhere (CPU, CUDA, any floating dtype including float64). The compiled kernel
is the optional package ``torch-ms-deform-attn`` (import name ``torch_ms_deform_attn``, CPU/CUDA
kernels with autograd, built from source against the installed torch by ``tools/bootstrap.py``,
pinned in ``requirements/build.txt``); it must match the reference numerically (tested).
:class:`MSDeformAttn` picks one per call with ``impl`` (``MODEL.DINO.MSDA_IMPL``):

- ``pytorch``: the reference, always;
- ``ext``: the package; a clear error if it is not importable or does not support the tensors'
  device and dtype;
- ``auto``: the package when it is importable and supports the device and dtype, else the
  reference; the choice (and why) is logged once per device/dtype.

Sampling convention (grid_sample with ``align_corners=False``, ``padding_mode="zeros"``): a
location ``(x, y)`` in [0, 1] maps to pixel coordinates ``(x * W - 0.5, y * H - 0.5)``, so pixel
``(i, j)`` has its centre at ``((j + 0.5) / W, (i + 0.5) / H)``; bilinear taps outside the map
contribute zero.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MSDA_IMPLS", "ms_deform_attn_core", "ms_deform_attn", "ext_status", "ext_supports", "resolve_impl",
           "check_impl", "set_msda_impl", "MSDeformAttn"]

MSDA_IMPLS = ("auto", "pytorch", "ext")
EXT_MODULE = "torch_ms_deform_attn"  # PyPI name torch-ms-deform-attn
_EXT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # half types run in float32 inside
_logger = logging.getLogger(__name__)
_logged: set = set()


def _level_sizes(spatial_shapes: Tensor) -> list:
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must have shape (L, 2) as (H, W), got {tuple(spatial_shapes.shape)}")
    if spatial_shapes.dtype.is_floating_point or spatial_shapes.dtype == torch.bool:
        raise TypeError(f"spatial_shapes must be an integer tensor, got {spatial_shapes.dtype}")
    sizes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    if any(h <= 0 or w <= 0 for h, w in sizes):
        raise ValueError(f"spatial_shapes must be positive, got {sizes}")
    return sizes


def ms_deform_attn_core(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
                        attention_weights: Tensor) -> Tensor:
    """Weighted sum of bilinear samples from a multi-level value map.

    Args:
        value: ``(N, S, M, D)`` values of all levels flattened row-major and concatenated,
            ``S = sum_l H_l * W_l``; ``M`` heads of ``D`` channels.
        spatial_shapes: ``(L, 2)`` integer ``(H_l, W_l)`` per level.
        sampling_locations: ``(N, Lq, M, L, P, 2)`` normalised ``(x, y)``; [0, 1] covers the map,
            outside it samples read zeros.
        attention_weights: ``(N, Lq, M, L, P)`` weight of each sample (normally softmax over L*P).

    Returns:
        ``(N, Lq, M * D)``: for each query and head, ``sum_{l,p} w * bilinear(value_l, loc)``;
        heads concatenated along the last axis.
    """
    if value.dim() != 4:
        raise ValueError(f"value must have shape (N, S, M, D), got {tuple(value.shape)}")
    n, s, m, d = value.shape
    sizes = _level_sizes(spatial_shapes)
    num_levels = len(sizes)
    if sum(h * w for h, w in sizes) != s:
        raise ValueError(f"value has S={s} tokens but spatial_shapes {sizes} sum to {sum(h * w for h, w in sizes)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"sampling_locations must have shape (N, Lq, M, L, P, 2), got "
                         f"{tuple(sampling_locations.shape)}")
    _, lq, _, _, p, _ = sampling_locations.shape
    expected = (n, lq, m, num_levels, p)
    if tuple(sampling_locations.shape[:5]) != expected:
        raise ValueError(f"sampling_locations shape {tuple(sampling_locations.shape)} does not match "
                         f"(N, Lq, M, L, P, 2) = {expected + (2,)} implied by value and spatial_shapes")
    if tuple(attention_weights.shape) != expected:
        raise ValueError(f"attention_weights must have shape (N, Lq, M, L, P) = {expected}, got "
                         f"{tuple(attention_weights.shape)}")
    if not (value.dtype == sampling_locations.dtype == attention_weights.dtype):
        raise TypeError(f"value, sampling_locations and attention_weights must share a dtype, got "
                        f"{value.dtype}, {sampling_locations.dtype}, {attention_weights.dtype}")

    # grid_sample wants (batch, C, H, W) maps and (batch, H_out, W_out, 2) grids in [-1, 1]: heads
    # are folded into the batch axis and the grid is laid out (points, queries) so that the weighted
    # sum over points runs over a non-innermost axis with queries contiguous (faster on CPU than
    # reducing a size-P innermost axis).
    value_levels = value.split([h * w for h, w in sizes], dim=1)
    grids = 2 * sampling_locations - 1
    out = None
    for lvl, (h, w) in enumerate(sizes):
        value_l = value_levels[lvl].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        grid_l = grids[:, :, :, lvl].permute(0, 2, 3, 1, 4).reshape(n * m, p, lq, 2)
        sampled = F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        weights_l = attention_weights[:, :, :, lvl].permute(0, 2, 3, 1).reshape(n * m, 1, p, lq)
        # (N*M, D, P, Lq) weighted over P; accumulating per level never holds all levels' samples.
        contrib = (sampled * weights_l).sum(2)
        out = contrib if out is None else out + contrib
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()


@functools.cache
def ext_status() -> Tuple[Optional[object], str]:
    """``(package module, "")`` when ``torch_ms_deform_attn`` imports with its compiled ops, else ``(None, why)``.

    Cached: call ``ext_status.cache_clear()`` after installing the package (or in tests that fake its absence).
    """
    try:
        import torch_ms_deform_attn
        from torch_ms_deform_attn import _C  # noqa: F401  (the compiled ops; a build for another torch fails here)
    except Exception as e:  # ImportError, or OSError/undefined symbols from a build against another torch
        return None, (f"{EXT_MODULE} is not importable ({type(e).__name__}: {e}); tools/bootstrap.py builds it "
                      "(requirements/build.txt) where a C++ compiler is available")
    return torch_ms_deform_attn, ""


def ext_supports(device: torch.device, dtype: torch.dtype) -> Tuple[bool, str]:
    """Whether the package can run on ``device`` with ``dtype``, and if not why."""
    module, why = ext_status()
    if module is None:
        return False, why
    if dtype not in _EXT_DTYPES:
        return False, f"{EXT_MODULE} does not support dtype {dtype}"
    compiled = module._C
    kind = torch.device(device).type
    if kind == "cpu":
        return True, ""
    if kind == "cuda" and not compiled.with_cuda:
        return False, (f"this {EXT_MODULE} build has no CUDA kernels (it was built without a visible GPU or "
                       "the CUDA toolkit; rebuild it with FORCE_CUDA=1)")
    if kind == "mps" and (not compiled.with_mps or dtype == torch.float64):
        return False, f"this {EXT_MODULE} build does not support mps with {dtype}"
    if kind not in ("cuda", "mps"):
        return False, f"{EXT_MODULE} has no kernels for device type {kind!r}"
    return True, ""


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """``"ext"`` or ``"pytorch"``: what ``impl`` (one of :data:`MSDA_IMPLS`) runs for tensors on ``device`` / ``dtype``.

    ``ext`` raises a RuntimeError naming the reason when the package cannot run them; ``auto`` logs its choice
    once per (device type, dtype)."""
    if impl == "pytorch":
        return "pytorch"
    if impl not in MSDA_IMPLS:
        raise ValueError(f"MODEL.DINO.MSDA_IMPL={impl!r}: expected one of {MSDA_IMPLS}")
    ok, why = ext_supports(device, dtype)
    if impl == "ext":
        if not ok:
            raise RuntimeError(f"MODEL.DINO.MSDA_IMPL=ext: {why}. Use 'auto' to fall back to the PyTorch "
                               "implementation, or 'pytorch'")
        return "ext"
    key = (torch.device(device).type, dtype, ok)
    if key not in _logged:
        _logged.add(key)
        choice = f"{EXT_MODULE} {ext_status()[0].__version__}" if ok else f"the PyTorch implementation ({why})"
        _logger.info("MSDA_IMPL=auto on %s/%s: using %s", key[0], str(dtype).replace("torch.", ""), choice)
    return "ext" if ok else "pytorch"


def ms_deform_attn(value: Tensor, spatial_shapes: Tensor, level_start_index: Optional[Tensor],
                   sampling_locations: Tensor, attention_weights: Tensor, impl: str = "auto") -> Tensor:
    """:func:`ms_deform_attn_core`'s contract, run by the implementation ``impl`` selects (:func:`resolve_impl`).

    ``level_start_index`` (L,) may be None (derived from ``spatial_shapes``); the package needs it and needs
    ``spatial_shapes`` as int64 on the values' device."""
    if resolve_impl(impl, value.device, value.dtype) == "pytorch":
        return ms_deform_attn_core(value, spatial_shapes, sampling_locations, attention_weights)
    shapes = spatial_shapes.to(device=value.device, dtype=torch.long)
    if level_start_index is None:
        areas = shapes[:, 0] * shapes[:, 1]
        level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    starts = level_start_index.to(device=value.device, dtype=torch.long)
    return ext_status()[0].ms_deform_attn(value, shapes, starts, sampling_locations, attention_weights)


def check_impl(impl: str) -> str:
    """``impl`` if it is one of :data:`MSDA_IMPLS` (for ``ext``: if the package is importable), else a clear error."""
    if impl not in MSDA_IMPLS:
        raise ValueError(f"MODEL.DINO.MSDA_IMPL={impl!r}: expected one of {MSDA_IMPLS}")
    if impl == "ext" and ext_status()[0] is None:  # fail when the model is built, not at its first forward
        raise RuntimeError(f"MODEL.DINO.MSDA_IMPL=ext: {ext_status()[1]}")
    return impl


def set_msda_impl(module: nn.Module, impl: str) -> nn.Module:
    """Set ``impl`` on every :class:`MSDeformAttn` in ``module`` (checked by :func:`check_impl`); returns ``module``."""
    check_impl(impl)
    for m in module.modules():
        if isinstance(m, MSDeformAttn):
            m.impl = impl
    return module


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable-DETR), built on ``ms_deform_attn_core``.

    Args:
        d_model: channels ``C`` of queries and values.
        n_levels: feature levels ``L``.
        n_heads: attention heads ``M`` (``d_model`` must be divisible by it).
        n_points: sampling points ``P`` per head and level.
        impl: ``auto`` | ``pytorch`` | ``ext`` (see the module docstring); an attribute, so it can be changed
            after construction.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 impl: str = "auto"):
        super().__init__()
        self.impl = check_impl(impl)
        for name, v in (("d_model", d_model), ("n_levels", n_levels), ("n_heads", n_heads), ("n_points", n_points)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"MSDeformAttn {name} must be a positive int, got {v!r}")
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable-DETR initialisation.

        Offsets start as a fixed pattern: head ``h`` looks in direction ``2*pi*h/M`` (scaled onto the
        unit square's border), point ``k`` at ``k + 1`` times that, on every level; attention starts
        uniform (zero logits); value/output projections are Xavier-uniform with zero bias.
        """
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float64) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float64).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1).to(self.sampling_offsets.bias.dtype))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes: Tensor,
                level_start_index: Optional[Tensor] = None, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Attend from each query to ``P`` learned points per head and level around its reference.

        Args:
            query: ``(N, Lq, C)`` (position embedding already added by the caller).
            reference_points: ``(N, Lq, L, 2)`` normalised ``(x, y)`` per level — offsets are in
                pixels of each level — or ``(N, Lq, L, 4)`` normalised ``(cx, cy, w, h)`` — offsets
                are in units of ``w / (2P)``, ``h / (2P)`` of the reference box.
            value: ``(N, S, C)`` flattened multi-level features.
            spatial_shapes: ``(L, 2)`` integer ``(H_l, W_l)``.
            level_start_index: ``(L,)`` offset of each level in ``S``; optional, checked if given.
            padding_mask: ``(N, S)`` bool, True at padded tokens (their values are zeroed), or None.

        Returns:
            ``(N, Lq, C)``.
        """
        if query.dim() != 3 or query.shape[-1] != self.d_model:
            raise ValueError(f"query must have shape (N, Lq, {self.d_model}), got {tuple(query.shape)}")
        if value.dim() != 3 or value.shape[-1] != self.d_model or value.shape[0] != query.shape[0]:
            raise ValueError(f"value must have shape (N={query.shape[0]}, S, {self.d_model}), got {tuple(value.shape)}")
        n, lq, _ = query.shape
        s = value.shape[1]
        if spatial_shapes.shape != (self.n_levels, 2):
            raise ValueError(f"spatial_shapes must have shape ({self.n_levels}, 2), got {tuple(spatial_shapes.shape)}")
        if level_start_index is not None:
            areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
            expected_start = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
            if level_start_index.shape != (self.n_levels,) or not torch.equal(
                    level_start_index.to(expected_start.device, expected_start.dtype), expected_start):
                raise ValueError(f"level_start_index {level_start_index.tolist()} does not match spatial_shapes "
                                 f"{spatial_shapes.tolist()} (expected {expected_start.tolist()})")
        if reference_points.dim() != 4 or tuple(reference_points.shape[:3]) != (n, lq, self.n_levels) \
                or reference_points.shape[-1] not in (2, 4):
            raise ValueError(f"reference_points must have shape ({n}, {lq}, {self.n_levels}, 2 or 4), got "
                             f"{tuple(reference_points.shape)}")

        v = self.value_proj(value)
        if padding_mask is not None:
            if padding_mask.shape != (n, s) or padding_mask.dtype != torch.bool:
                raise ValueError(f"padding_mask must be a bool tensor of shape ({n}, {s}), got "
                                 f"{padding_mask.dtype} {tuple(padding_mask.shape)}")
            v = v.masked_fill(padding_mask[..., None], 0.0)
        m, lvl, p = self.n_heads, self.n_levels, self.n_points
        v = v.view(n, s, m, self.d_model // m)
        offsets = self.sampling_offsets(query).view(n, lq, m, lvl, p, 2)
        weights = self.attention_weights(query).view(n, lq, m, lvl * p).softmax(-1).view(n, lq, m, lvl, p)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: divide by (W_l, H_l)
            normaliser = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], -1).to(offsets.device, offsets.dtype)
            locations = reference_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        else:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / p * reference_points[:, :, None, :, None, 2:] * 0.5)
        # Under autocast the value is half precision while locations/weights are float32 (softmax): sample in
        # the widest of the three, as the original kernel does under mixed precision.
        dtype = torch.promote_types(torch.promote_types(v.dtype, locations.dtype), weights.dtype)
        out = ms_deform_attn(v.to(dtype), spatial_shapes, level_start_index, locations.to(dtype),
                             weights.to(dtype), self.impl)
        return self.output_proj(out)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, "
                f"n_points={self.n_points}, impl={self.impl!r}")
