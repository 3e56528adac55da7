"""SoftMoE (Puigcerver et al. 2023), per image and per query segment so DN groups never mix."""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from gem_d2.modeling.moe.base import MoEResult, Router, TokenBatch, check_positive_int, register_router
from gem_d2.modeling.moe.experts import ExpertBank


@register_router("softmoe")
class SoftMoERouter(Router):
    """S = E * p slots; logits = scale * l2n(x) @ l2n(Phi) with Phi (C, S) learned, normalised per slot.

    Within one group (one image's tokens of one ``ctx.segments`` value; the whole image when segments
    is None) dispatch weights are a softmax over the group's valid tokens (each slot is a convex mix of
    tokens) and combine weights a softmax over slots (each token a convex mix of slot outputs). Padded
    tokens (``ctx.key_padding_mask``) get no dispatch weight and output 0. Every slot of every group of
    every image goes through the experts in one batched call. No aux loss. Statistics count each
    token's combine mass per expert (rows sum to 1 per token).
    """

    def __init__(self, d_model: int, num_experts: int, slots_per_expert: int = 1):
        super().__init__(d_model, num_experts)
        self.slots_per_expert = check_positive_int(slots_per_expert, "MODEL.GEM.SOFTMOE.SLOTS_PER_EXPERT")
        self.phi = nn.Parameter(torch.randn(d_model, num_experts * self.slots_per_expert) / math.sqrt(d_model))
        self.scale = nn.Parameter(torch.ones(()))

    @classmethod
    def kwargs_from_cfg(cls, cfg, dataset_names: List[str]) -> dict:
        return dict(slots_per_expert=cfg.MODEL.GEM.SOFTMOE.SLOTS_PER_EXPERT)

    def route(self, tokens: TokenBatch):
        raise TypeError("softmoe mixes tokens into slots and has no per-token plan; use forward_moe")

    def forward_moe(self, tokens: TokenBatch, experts: ExpertBank) -> MoEResult:
        N, L = tokens.shape
        C = tokens.x.shape[1]
        E, p = self.num_experts, self.slots_per_expert
        S = E * p
        x = tokens.x.reshape(N, L, C)
        valid = tokens.valid.reshape(N, L)
        segments = tokens.ctx.segments
        if segments is None:
            groups = [torch.arange(L, device=x.device)]
        else:
            seg = segments.to(x.device)
            groups = [torch.nonzero(seg == s).squeeze(1) for s in torch.unique(seg).tolist()]

        rdt = torch.promote_types(x.dtype, torch.float32)  # routing precision: >= float32
        with torch.autocast(device_type=x.device.type, enabled=False):
            phi = self.scale.to(rdt) * F.normalize(self.phi.to(rdt), dim=0)
        combines, slot_inputs = [], []
        for idx in groups:
            xg, vg = x[:, idx], valid[:, idx, None]  # (N, n, C), (N, n, 1)
            with torch.autocast(device_type=x.device.type, enabled=False):
                logits = F.normalize(xg.to(rdt), dim=-1) @ phi  # (N, n, S)
                # finite fill: an all-padded group gives uniform (then zeroed) weights instead of NaN
                dispatch = logits.masked_fill(~vg, torch.finfo(logits.dtype).min).softmax(dim=1) * vg
                combines.append(logits.softmax(dim=2))
            slot_inputs.append(dispatch.transpose(1, 2).to(xg.dtype) @ xg)  # (N, S, C)

        G = len(groups)
        slots = torch.stack(slot_inputs)  # (G, N, S, C); slot s belongs to expert s // p
        slots = slots.reshape(G * N, E, p, C).transpose(0, 1).reshape(E, G * N * p, C)
        y = experts.forward_all(slots).reshape(E, G * N, p, C).transpose(0, 1).reshape(G, N, S, C)

        out = x.new_zeros(N, L, C, dtype=y.dtype)
        load = x.new_zeros(N, L, E, dtype=rdt)
        for g, idx in enumerate(groups):
            vg = valid[:, idx, None]
            out[:, idx] = (combines[g].to(y.dtype) @ y[g]) * vg
            load[:, idx] = combines[g].reshape(N, -1, E, p).sum(-1) * vg
        return MoEResult(out.reshape(N * L, C), load.reshape(N * L, E), experts_ran=True)
