"""MoEFFN: an expert bank plus a router, a drop-in replacement of the dense FFN of one transformer layer."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from gem_d2.layers.mlp import FFN
from gem_d2.modeling.moe.base import ROUTER_REGISTRY, ImageRoute, TokenBatch
from gem_d2.modeling.moe.context import MoESpec, RoutingContext
from gem_d2.modeling.moe.dispatch import per_image_dispatch
from gem_d2.modeling.moe.experts import ExpertBank


class MoEFFN(nn.Module):
    """``forward(x (N, L, C), ctx) -> (N, L, C)``: routes the tokens of ``x`` to FFN experts.

    Records into ``ctx``: auxiliary losses as ``aux_losses[f"loss_{name}_{layer_name}"]``; statistics
    ``stats[f"{layer_name}/tokens_per_expert"]`` (num_datasets, R) float (valid tokens per route per
    dataset; fractional for SoftMoE) and router-specific scalars ``stats[f"{layer_name}/<name>"]``;
    ``prev_router_logits[stack]`` (N, L, R) when the router exports logits (MoE++ gating residuals;
    stack = "encoder"/"decoder", the part of ``layer_name`` before the dot). The per-image path may record a
    cached tensor shared between calls: read the statistics, do not modify them in place.
    Padded tokens (``ctx.key_padding_mask`` True) output 0, get no gradient and are not counted.

    When the router routes per image (``router.image_routes``: ``gem`` with a dataset-level plan or on tokens
    without labels, ``dense``), each expert runs on slices of consecutive images that share a route, with no
    gather or scatter (:func:`~gem_d2.modeling.moe.dispatch.per_image_dispatch`); padded tokens are then computed
    and their outputs multiplied by 0. ``per_image = False`` forces the per-token path (tests, benchmarks).

    DDP: without ``find_unused_parameters`` DDP waits forever for gradients of parameters that took
    no part in the forward. Expert weights are stacked Parameters, so one expert call gives every
    expert a (zero) gradient; the router's parameters, and the experts' when no expert ran at all
    (all tokens dropped/padded or sent to non-FFN routes), are added to the output as
    ``0.0 * sum(p.sum())``, which gives them exact zero gradients.
    """

    def __init__(self, layer_name: str, d_model: int, d_ffn: int, dropout: float, activation: str,
                 spec: MoESpec):
        super().__init__()
        self.layer_name = layer_name
        self.stack = layer_name.split(".")[0]
        if spec.router not in ROUTER_REGISTRY:
            raise KeyError(f"MODEL.GEM.ROUTER={spec.router!r} is not a registered router; registered: "
                           f"{sorted(name for name, _ in ROUTER_REGISTRY)}")
        self.router = ROUTER_REGISTRY.get(spec.router)(d_model=d_model, num_experts=spec.num_experts,
                                                       **dict(spec.router_kwargs))
        self.experts = ExpertBank(self.router.num_experts, d_model, d_ffn, dropout, activation)
        self.num_datasets: Optional[int] = spec.num_datasets
        self.per_image = True
        self._uses_cache: dict = {}  # per-image statistics: device tables per routes/datasets (_per_dataset_of_images)

    def load_from_ffn(self, ffn: FFN) -> None:
        """Copy a dense FFN's weights into every expert (a ``dense`` MoEFFN then equals ``ffn``)."""
        self.experts.load_from_ffn(ffn)

    def forward(self, x: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        """x (N, L, C) -> (N, L, C); fills ``ctx.aux_losses`` / ``ctx.stats`` (see the class docstring)."""
        padding = self._padding(x, ctx)  # checks x and ctx first
        if self.per_image:
            routes = self.router.image_routes(ctx, x.shape[0])
            if routes is not None:
                return self._forward_per_image(x, ctx, routes, padding)
        tokens = self._flatten(x, ctx, padding)
        result = self.router.forward_moe(tokens, self.experts)
        out = result.output.reshape(x.shape[0], x.shape[1], -1)
        anchor = self._ddp_anchor(result.experts_ran) if torch.is_grad_enabled() else None
        if anchor is not None:
            out = out + anchor

        for name, value in result.aux_losses.items():
            ctx.aux_losses[f"loss_{name}_{self.layer_name}"] = value
        for name, value in result.stats.items():
            ctx.stats[f"{self.layer_name}/{name}"] = value.detach()
        ctx.stats[f"{self.layer_name}/tokens_per_expert"] = self._per_dataset(result.token_load, tokens)
        if result.router_logits is not None:
            ctx.prev_router_logits[self.stack] = result.router_logits.reshape(x.shape[0], x.shape[1], -1)
        return out

    def _forward_per_image(self, x: torch.Tensor, ctx: RoutingContext, routes: List[ImageRoute],
                           padding: Optional[torch.Tensor]) -> torch.Tensor:
        out, ran = per_image_dispatch(x, routes, self.experts, padding)
        anchor = self._ddp_anchor(ran) if torch.is_grad_enabled() else None
        if anchor is not None:
            out = out + anchor
        ctx.stats[f"{self.layer_name}/tokens_per_expert"] = self._per_dataset_of_images(routes, ctx, padding, x)
        return out

    def _per_dataset_of_images(self, routes: List[ImageRoute], ctx: RoutingContext, padding: Optional[torch.Tensor],
                               x: torch.Tensor) -> torch.Tensor:
        """(num_datasets, R): valid tokens per route per dataset, as ``_per_dataset`` counts them per token.

        No host-to-device copy (it would wait for the GPU in the middle of the forward): per distinct list of
        routes and dataset ids the layer keeps on the device the (num_datasets, N) dataset-of-image one-hot and
        the (N, R) routes-used table, and without padding their product times L, the result itself."""
        ids = tuple(ctx.dataset_id_list())
        num_datasets = self.num_datasets if self.num_datasets is not None else max(ids, default=-1) + 1
        key = (tuple(routes), ids, num_datasets, str(x.device), None if padding is not None else x.shape[1])
        cached = self._uses_cache.get(key)
        if cached is None:
            if len(self._uses_cache) >= 256:
                self._uses_cache.clear()
            uses = torch.zeros(len(routes), self.router.num_routes)
            for n, route in enumerate(routes):
                for e, _ in route:
                    uses[n, e] = 1.0
            images_of = torch.zeros(num_datasets, len(routes))
            images_of[list(ids), list(range(len(ids)))] = 1.0
            without_padding = None if padding is not None else images_of @ uses * x.shape[1]
            cached = tuple(None if t is None else t.to(x.device) for t in (images_of, uses, without_padding))
            self._uses_cache[key] = cached
        images_of, uses, without_padding = cached
        if padding is None:
            return without_padding
        valid = x.shape[1] - padding.sum(1, dtype=torch.float32)  # (N,)
        return images_of @ (uses * valid[:, None])

    def _padding(self, x: torch.Tensor, ctx: RoutingContext) -> Optional[torch.Tensor]:
        """Check ``x`` (N, L, C) and ``ctx``'s per-image fields; (N, L) bool, True = padded, or None: no padding."""
        if x.dim() != 3:
            raise ValueError(f"{self.layer_name}: MoEFFN expects x of shape (N, L, C), got {tuple(x.shape)}")
        N, L, _ = x.shape
        ds = ctx.dataset_ids
        if ds is None or ds.shape != (N,):
            raise ValueError(f"{self.layer_name}: ctx.dataset_ids must have shape (N={N},), "
                             f"got {None if ds is None else tuple(ds.shape)}")
        if ctx.key_padding_mask is None:
            return None
        if ctx.key_padding_mask.shape != (N, L):
            raise ValueError(f"{self.layer_name}: ctx.key_padding_mask must be (N, L)={(N, L)}, "
                             f"got {tuple(ctx.key_padding_mask.shape)}")
        return ctx.key_padding_mask.bool()

    def _flatten(self, x: torch.Tensor, ctx: RoutingContext, padding: Optional[torch.Tensor]) -> TokenBatch:
        N, L, C = x.shape
        ds = ctx.dataset_ids
        valid = torch.ones(N, L, dtype=torch.bool, device=x.device) if padding is None else ~padding
        labels = None
        if ctx.query_labels is not None:
            if ctx.query_labels.shape != (N, L):
                raise ValueError(f"{self.layer_name}: ctx.query_labels must be (N, L)={(N, L)}, "
                                 f"got {tuple(ctx.query_labels.shape)}")
            labels = ctx.query_labels.reshape(-1).long()
        if ctx.segments is not None and ctx.segments.shape != (L,):
            raise ValueError(f"{self.layer_name}: ctx.segments must be (L={L},), got {tuple(ctx.segments.shape)}")
        dataset = ds.long().to(x.device).repeat_interleave(L)
        prev = ctx.prev_router_logits.get(self.stack)
        prev = prev.reshape(N * L, -1) if prev is not None and prev.shape[:2] == (N, L) else None
        return TokenBatch(x.reshape(N * L, C), dataset, labels, valid.reshape(-1), (N, L), ctx, prev)

    def _per_dataset(self, token_load: torch.Tensor, tokens: TokenBatch) -> torch.Tensor:
        """(num_datasets, R): sum of ``token_load`` over the valid tokens of each dataset."""
        load = token_load.detach().float()[tokens.valid]
        ds = tokens.dataset[tokens.valid]
        num_datasets = self.num_datasets
        if num_datasets is None:
            num_datasets = int(tokens.dataset.max()) + 1 if tokens.dataset.numel() else 0
        return load.new_zeros(num_datasets, load.shape[1]).index_add_(0, ds, load)

    def _ddp_anchor(self, experts_ran: bool) -> Optional[torch.Tensor]:
        """0.0 * (sum of the parameters the forward may not have touched), or None if there are none."""
        params = list(self.router.parameters())
        if not experts_ran:
            params += list(self.experts.parameters())
        params = [p for p in params if p.requires_grad]
        if not params:
            return None
        return 0.0 * sum(p.sum() for p in params)

    def extra_repr(self) -> str:
        return f"layer_name={self.layer_name!r}"


def build_ffn(layer_name: str, d_model: int, d_ffn: int, dropout: float, activation: str,
              moe: Optional[MoESpec] = None) -> nn.Module:
    """The FFN of layer ``layer_name`` ("encoder.i" / "decoder.i"): an :class:`MoEFFN` if ``moe`` lists it,
    else a dense :class:`~gem_d2.layers.mlp.FFN`."""
    if moe is None or layer_name not in moe.layers:
        return FFN(d_model, d_ffn, dropout, activation)
    return MoEFFN(layer_name, d_model, d_ffn, dropout, activation, moe)
