"""Feed-forward blocks: the transformer FFN and the multi-layer perceptron of the box heads."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FFN", "MLP", "activation_layer"]

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


def activation_layer(name: str) -> nn.Module:
    """The activation module called ``name`` ("relu" or "gelu")."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"MODEL.DINO.ACTIVATION={name!r}: expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


class FFN(nn.Module):
    """Linear(d_model, d_ffn) -> activation -> dropout -> Linear(d_ffn, d_model). (N, L, C) -> (N, L, C).

    ``forward(x, ctx)`` accepts and ignores a routing context, so a dense FFN and an MoE layer are
    called the same way by the transformer layers.
    """

    def __init__(self, d_model: int, d_ffn: int, dropout: float = 0.0, activation: str = "relu"):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = activation_layer(activation)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)

    def forward(self, x: torch.Tensor, ctx: Optional[Any] = None) -> torch.Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them. ``(..., in_dim) -> (..., out_dim)``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x
