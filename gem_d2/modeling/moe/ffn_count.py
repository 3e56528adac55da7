"""FFN evaluations per token: a counter on every MoE layer's expert bank, reported in the routing statistics.

Compute-matched comparisons need what each router really computes, not what its settings promise (a ReMoE gate
opens a variable number of experts, MoE++ sends some tokens to zero/copy/constant experts, SoftMoE's experts
process slots, capacity drops tokens). :func:`count_ffn_evaluations` makes every :class:`MoEFFN` of a model
count the rows its FFN experts process: ``forward_expert(e, x)`` and ``forward_segments(x, ...)`` count
``len(x)`` token-expert evaluations, ``forward_all(x)`` (SoftMoE's slots) ``E * S``. After each forward the
layer's count divided by its valid (non-padded) tokens is stored as
``ctx.stats["<layer>/ffn_evals_per_token"]``, so it reaches ``model.routing_stats``, the training hooks
(``routing/<layer>/ffn_evals_per_token`` in ``metrics.json``, the mean over the steps of each logging window) and
the router study. MoE++'s zero, copy and constant routes
never reach the bank and are not FFN evaluations; a plain dense FFN is 1 by definition and is not counted.
"""
from __future__ import annotations

import torch

from gem_d2.modeling.moe.experts import ExpertBank
from gem_d2.modeling.moe.layer import MoEFFN

__all__ = ["CountingExpertBank", "count_ffn_evaluations", "FFN_EVALS_STAT"]

FFN_EVALS_STAT = "ffn_evals_per_token"


class CountingExpertBank(ExpertBank):
    """An :class:`ExpertBank` that adds the rows each FFN call processes to ``ffn_rows`` (reset per layer call)."""

    ffn_rows: int = 0

    def forward_expert(self, e: int, x: torch.Tensor, weights=None, scale: float = 1.0) -> torch.Tensor:
        # (T, C) from both dispatches; the per-image one's rows include padded tokens (it computes them, then
        # multiplies their outputs by 0)
        self.ffn_rows += int(x.shape[:-1].numel())
        return super().forward_expert(e, x, weights, scale)

    def forward_segments(self, x: torch.Tensor, segments, scales=None) -> torch.Tensor:
        self.ffn_rows += int(x.shape[0])  # every row through its segment's one expert
        return super().forward_segments(x, segments, scales)

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        self.ffn_rows += int(x.shape[0]) * int(x.shape[1])
        return super().forward_all(x)


def _reset(layer: MoEFFN, inputs) -> None:
    layer.experts.ffn_rows = 0


def _record(layer: MoEFFN, inputs, output) -> None:
    x, ctx = inputs[0], inputs[1]
    rows, tokens = layer.experts.ffn_rows, int(x.shape[0]) * int(x.shape[1])
    if ctx.key_padding_mask is None:
        per_token = torch.tensor(rows / max(tokens, 1), dtype=torch.float32)
    else:  # divided on the device: reading the mask's sum to the host would wait for the GPU mid-forward
        per_token = rows / (tokens - ctx.key_padding_mask.sum()).clamp(min=1).to(torch.float32)
    ctx.stats[f"{layer.layer_name}/{FFN_EVALS_STAT}"] = per_token


def count_ffn_evaluations(model: torch.nn.Module) -> int:
    """Make every :class:`MoEFFN` in ``model`` report its FFN evaluations per valid token (see the module
    docstring). Idempotent; returns the number of MoE layers counted. The bank's class becomes
    :class:`CountingExpertBank` (same parameters and computation), and the layer gets a forward pre-hook
    (reset) and a forward hook (record)."""
    layers = [m for m in model.modules() if isinstance(m, MoEFFN)]
    for layer in layers:
        if isinstance(layer.experts, CountingExpertBank):
            continue
        if type(layer.experts) is not ExpertBank:
            raise TypeError(f"{layer.layer_name}: cannot count FFN evaluations of a {type(layer.experts).__name__}")
        layer.experts.__class__ = CountingExpertBank
        layer.register_forward_pre_hook(_reset)
        layer.register_forward_hook(_record)
    return len(layers)
