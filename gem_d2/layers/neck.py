"""Channel mapper: project backbone levels to the transformer width and add extra stride-2 levels."""
from __future__ import annotations

from typing import List, Sequence

from torch import Tensor, nn

__all__ = ["ChannelMapper"]


def _conv_gn(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)
    nn.init.xavier_uniform_(conv.weight)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.GroupNorm(32, out_channels))


class ChannelMapper(nn.Module):
    """Per input level 1x1 conv + GroupNorm(32) to ``out_channels``; extra levels by 3x3 stride-2 conv + GN.

    The first extra level convolves the last *input* feature (e.g. C5 with 2048 channels, as DINO
    does); further extra levels convolve the previous extra level.

    Args:
        in_channels: channels of each input level, finest first.
        out_channels: ``MODEL.DINO.HIDDEN_DIM`` (a multiple of 32 for GroupNorm(32)).
        num_outs: ``MODEL.DINO.NUM_FEATURE_LEVELS`` (>= ``len(in_channels)``).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, num_outs: int):
        super().__init__()
        in_channels = list(in_channels)
        if not in_channels:
            raise ValueError("ChannelMapper needs at least one input level (MODEL.DINO.IN_FEATURES is empty)")
        if out_channels % 32:
            raise ValueError(f"MODEL.DINO.HIDDEN_DIM={out_channels} must be a multiple of 32 "
                             "(GroupNorm(32) in the neck)")
        if num_outs < len(in_channels):
            raise ValueError(f"MODEL.DINO.NUM_FEATURE_LEVELS={num_outs} must be >= the number of "
                             f"MODEL.DINO.IN_FEATURES ({len(in_channels)})")
        self.in_channels = in_channels
        self.convs = nn.ModuleList(_conv_gn(c, out_channels, 1, 1) for c in in_channels)
        num_extra = num_outs - len(in_channels)
        extra_in = ([in_channels[-1]] + [out_channels] * (num_extra - 1))[:num_extra]
        self.extra_convs = nn.ModuleList(_conv_gn(c, out_channels, 3, 2) for c in extra_in)

    def forward(self, features: Sequence[Tensor]) -> List[Tensor]:
        """``features``: ``(N, C_l, H_l, W_l)`` per input level -> ``num_outs`` maps ``(N, out_channels, H, W)``."""
        if len(features) != len(self.convs):
            raise ValueError(f"ChannelMapper got {len(features)} feature levels, expected {len(self.convs)}")
        outs = [conv(f) for conv, f in zip(self.convs, features)]
        src = features[-1]
        for conv in self.extra_convs:
            src = conv(src)
            outs.append(src)
        return outs
