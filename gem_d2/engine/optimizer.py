"""The DINO optimizer (docs/design/detector.md): AdamW, backbone LR multiplier, no decay on
norms/biases/embeddings, grad clip.

Parameter groups are built like detectron2's ``get_default_optimizer_params`` (one group per
parameter, same norm-layer types), plus what v0.6 lacks: a learning-rate factor for the backbone
and zero decay for embeddings. Gradient clipping is detectron2's ``maybe_add_gradient_clipping``
for ``value``/``norm``; ``full_model`` (one norm over all parameters, as DETR/DINO clip) is added
here because v0.6 only clips per parameter.
"""
from __future__ import annotations

import itertools
from typing import Any, Dict, List, Optional, Type

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import maybe_add_gradient_clipping
from torch import nn

__all__ = ["NORM_MODULE_TYPES", "build_param_groups", "build_gem_optimizer", "add_full_model_gradient_clipping"]

NORM_MODULE_TYPES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm,
)
_WEIGHT_MODULE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)


def _is_backbone(module_name: str) -> bool:
    return module_name == "backbone" or module_name.startswith("backbone.")


def _is_embedding(module: nn.Module, param_name: str) -> bool:
    # nn.Embedding tables, and free parameters named like one (e.g. a transformer's `level_embed`);
    # a Linear head called `class_embed` is a projection, so weight-carrying layers are excluded.
    if isinstance(module, nn.Embedding):
        return True
    return not isinstance(module, _WEIGHT_MODULE_TYPES) and param_name.endswith(("embed", "embedding"))


def build_param_groups(model: nn.Module, base_lr: float, weight_decay: float, backbone_multiplier: float = 1.0,
                       weight_decay_norm: Optional[float] = 0.0, weight_decay_bias: Optional[float] = 0.0,
                       weight_decay_embed: Optional[float] = 0.0) -> List[Dict[str, Any]]:
    """One optimizer group per trainable parameter, with its ``lr`` and ``weight_decay``.

    lr = ``base_lr * backbone_multiplier`` for parameters under the module named ``backbone``, else
    ``base_lr``. weight decay = ``weight_decay`` except: parameters of normalization layers
    (``weight_decay_norm``), biases (``weight_decay_bias``), embeddings (``weight_decay_embed``);
    ``None`` for one of those means "same as ``weight_decay``". Shared parameters appear once.
    Each group also records ``name`` (the first qualified name of its parameter) for inspection.
    """
    groups: List[Dict[str, Any]] = []
    seen = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in seen:
                continue
            seen.add(param)
            decay = weight_decay
            if isinstance(module, NORM_MODULE_TYPES):
                override = weight_decay_norm
            elif _is_embedding(module, param_name):
                override = weight_decay_embed
            elif param_name == "bias":
                override = weight_decay_bias
            else:
                override = None
            if override is not None:
                decay = override
            lr = base_lr * backbone_multiplier if _is_backbone(module_name) else base_lr
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            groups.append({"params": [param], "lr": lr, "weight_decay": decay, "name": full_name})
    return groups


def add_full_model_gradient_clipping(optimizer_cls: Type[torch.optim.Optimizer], max_norm: float,
                                     norm_type: float = 2.0) -> Type[torch.optim.Optimizer]:
    """A subclass of ``optimizer_cls`` whose ``step`` first clips the gradient norm of all its parameters."""
    if max_norm <= 0:
        raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_VALUE={max_norm}: expected > 0 for full_model clipping")

    def step(self, closure=None):
        all_params = itertools.chain(*[g["params"] for g in self.param_groups])
        torch.nn.utils.clip_grad_norm_(all_params, max_norm, norm_type)
        return super(cls, self).step(closure)

    cls = type(optimizer_cls.__name__ + "WithFullModelGradientClip", (optimizer_cls,), {"step": step})
    return cls


def _optimizer_class(cfg: CfgNode) -> Type[torch.optim.Optimizer]:
    name = str(cfg.SOLVER.OPTIMIZER).upper()
    classes = {"ADAMW": torch.optim.AdamW, "SGD": torch.optim.SGD}
    if name not in classes:
        raise ValueError(f"SOLVER.OPTIMIZER={cfg.SOLVER.OPTIMIZER!r}: expected one of {sorted(classes)}")
    optimizer_cls = classes[name]
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and str(clip.CLIP_TYPE).lower() == "full_model":
        return add_full_model_gradient_clipping(optimizer_cls, float(clip.CLIP_VALUE), float(clip.NORM_TYPE))
    if clip.ENABLED and str(clip.CLIP_TYPE).lower() not in ("value", "norm"):
        raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE={clip.CLIP_TYPE!r}: expected full_model, norm or value")
    return maybe_add_gradient_clipping(cfg, optimizer_cls)


def build_gem_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``SOLVER.OPTIMIZER`` over :func:`build_param_groups`, with the configured clipping."""
    groups = build_param_groups(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        backbone_multiplier=cfg.SOLVER.BACKBONE_MULTIPLIER,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        weight_decay_embed=cfg.SOLVER.WEIGHT_DECAY_EMBED,
    )
    if not groups:
        raise ValueError("build_gem_optimizer: the model has no trainable parameters")
    optimizer_cls = _optimizer_class(cfg)
    if issubclass(optimizer_cls, torch.optim.SGD):
        return optimizer_cls(groups, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM,
                             nesterov=cfg.SOLVER.NESTEROV, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    return optimizer_cls(groups, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
