"""Input checks shared by the data and model boundaries."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["check_index_range"]


def check_index_range(values: Any, stop: int, what: str, start: int = 0) -> None:
    """Raise ValueError naming ``what`` unless every integer in ``values`` lies in ``[start, stop)``.

    ``values``: an int, a sequence, a numpy array or a tensor. Call it where data enters (on CPU, before
    tensors move to an accelerator): reading a tensor's min/max synchronises with the device.
    """
    arr = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values)
    if arr.size == 0:
        return
    low, high = int(arr.min()), int(arr.max())
    if low < start or high >= stop:
        raise ValueError(f"{what} must lie in [{start}, {stop}), got values in [{low}, {high}]")
