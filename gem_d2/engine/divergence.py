"""A diverged run stops before anything is saved: the error type and the checks behind it.

detectron2's ``SimpleTrainer`` raises ``FloatingPointError`` when the total loss is NaN/inf (before the
optimizer step), but a step with a finite loss and non-finite gradients turns the weights into NaN and
the next periodic checkpoint would save (and tag) them, so ``--resume`` would continue the diverged model.
``GemTrainer`` turns either into :class:`TrainingDivergedError` and stops every later save; the
checkpointer refuses a model with non-finite parameters (:func:`non_finite_parameters`).
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping

import torch
from torch import nn

__all__ = ["TrainingDivergedError", "non_finite_parameters", "format_losses", "non_finite_losses"]


class TrainingDivergedError(FloatingPointError):
    """The loss or the weights became NaN/inf; nothing was saved or tagged after that point."""


def non_finite_parameters(model: nn.Module) -> List[str]:
    """Names of the floating-point parameters of ``model`` holding a NaN or inf (one pass, no copy)."""
    return [name for name, p in model.named_parameters()
            if p.is_floating_point() and not bool(torch.isfinite(p.detach()).all())]


def _value(v) -> float:
    return float(v.detach().float().mean()) if torch.is_tensor(v) else float(v)


def format_losses(losses: Mapping[str, object]) -> str:
    """``"loss_a=nan, loss_b=1.234"``: non-finite terms first."""
    values: Dict[str, float] = {k: _value(v) for k, v in losses.items()}
    order = sorted(values, key=lambda k: math.isfinite(values[k]))
    return ", ".join(f"{k}={values[k]:.4g}" for k in order)


def non_finite_losses(losses: Mapping[str, object]) -> bool:
    """True when a loss term (or their sum) is NaN/inf."""
    values = [_value(v) for v in losses.values()]
    return not all(math.isfinite(v) for v in values) or not math.isfinite(sum(values))
