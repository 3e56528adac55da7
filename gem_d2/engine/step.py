"""One training step: detectron2's ``SimpleTrainer`` and a mixed-precision variant, both stopping on divergence.

- :class:`GemSimpleTrainer`: ``SimpleTrainer`` whose non-finite-loss error (detectron2 raises
  ``FloatingPointError`` in ``_write_metrics``, before the optimizer step) becomes
  :class:`~gem_d2.engine.divergence.TrainingDivergedError` naming the iteration and every loss value.
- :class:`GemAMPTrainer`: the same with autocast in float16 (gradient scaler) or bfloat16, CUDA only.
- :func:`amp_dtype`: the autocast dtype ``SOLVER.AMP`` asks for, or a clear error where AMP cannot run.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
from detectron2.config import CfgNode
from detectron2.engine import SimpleTrainer

from gem_d2.engine.divergence import TrainingDivergedError, format_losses

__all__ = ["GemSimpleTrainer", "GemAMPTrainer", "amp_dtype"]

_AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def amp_dtype(cfg: CfgNode) -> Optional[torch.dtype]:
    """The autocast dtype when ``SOLVER.AMP.ENABLED``, else None; a clear error where AMP cannot run.

    Mixed precision is CUDA-only here: on CPU, enabling it is an error rather than a silent no-op.
    """
    if not cfg.SOLVER.AMP.ENABLED:
        return None
    device = torch.device(cfg.MODEL.DEVICE)
    if device.type != "cuda":
        raise ValueError(f"SOLVER.AMP.ENABLED=True needs MODEL.DEVICE cuda, got {cfg.MODEL.DEVICE!r}: "
                         "mixed precision training is CUDA-only; set SOLVER.AMP.ENABLED False on CPU")
    name = str(cfg.SOLVER.AMP.DTYPE).lower()
    if name not in _AMP_DTYPES:
        raise ValueError(f"SOLVER.AMP.DTYPE={cfg.SOLVER.AMP.DTYPE!r}: expected one of {sorted(_AMP_DTYPES)}")
    if name == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ValueError("SOLVER.AMP.DTYPE='bfloat16' is not supported by this GPU; use float16")
    return _AMP_DTYPES[name]


class GemSimpleTrainer(SimpleTrainer):
    """``SimpleTrainer`` whose non-finite loss error names the iteration and the loss values."""

    def _write_metrics(self, loss_dict, data_time: float, prefix: str = "") -> None:
        try:
            super()._write_metrics(loss_dict, data_time, prefix)
        except FloatingPointError as e:
            raise TrainingDivergedError(f"non-finite loss at iteration {self.iter}: {format_losses(loss_dict)}") from e


class GemAMPTrainer(GemSimpleTrainer):
    """Mixed-precision step on CUDA with a chosen dtype (detectron2 v0.6's AMPTrainer is float16 only).

    float16 uses a gradient scaler; bfloat16 needs none. Gradients are unscaled before
    ``optimizer.step`` so that gradient clipping inside the step sees their true norm.
    """

    def __init__(self, model, data_loader, optimizer, dtype: torch.dtype = torch.float16):
        super().__init__(model, data_loader, optimizer)
        self.dtype = dtype
        self.grad_scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    def run_step(self):
        assert self.model.training, "[GemAMPTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast(device_type="cuda", dtype=self.dtype):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses, loss_dict = loss_dict, {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        self._write_metrics(loss_dict, data_time)
        self.grad_scaler.unscale_(self.optimizer)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()

    def state_dict(self):
        ret = super().state_dict()
        ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
