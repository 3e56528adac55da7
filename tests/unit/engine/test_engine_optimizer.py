"""Optimizer parameter groups, gradient clipping and the AMP guard of gem_d2.engine."""
import gem_d2  # noqa: F401,I001  (compat shims before detectron2)

import warnings

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.utils.events import EventStorage
from torch import nn

from gem_d2.config import add_gem_config
from gem_d2.engine import GemAMPTrainer, amp_dtype, build_gem_optimizer, build_param_groups


class _Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = _Backbone()
        self.input_proj = nn.Conv2d(4, 8, 1)
        self.gn = nn.GroupNorm(2, 8)
        self.norm = nn.LayerNorm(8)
        self.level_embed = nn.Parameter(torch.zeros(4, 8))
        self.label_enc = nn.Embedding(5, 8)
        self.class_embed = nn.Linear(8, 5)  # a head named "*_embed": a projection, decayed
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.shared = self.class_embed  # the same parameters reached twice


def _cfg(**solver):
    cfg = get_cfg()
    add_gem_config(cfg)
    cfg.SOLVER.BASE_LR = 1e-4
    cfg.SOLVER.WEIGHT_DECAY = 1e-4
    for k, v in solver.items():
        setattr(cfg.SOLVER, k, v)
    return cfg


def _by_name(groups):
    return {g["name"]: g for g in groups}


def test_param_groups_backbone_multiplier_and_no_decay_on_norm_bias_embedding():
    model = _Toy()
    groups = _by_name(build_param_groups(model, base_lr=1e-4, weight_decay=1e-4, backbone_multiplier=0.1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(groups) == trainable  # each trainable parameter once, frozen ones absent
    assert all(len(g["params"]) == 1 for g in groups.values())
    for name, g in groups.items():
        expected_lr = 1e-5 if name.startswith("backbone.") else 1e-4
        assert g["lr"] == pytest.approx(expected_lr), name
    decayed = {n for n, g in groups.items() if g["weight_decay"] > 0}
    assert decayed == {"backbone.conv.weight", "input_proj.weight", "class_embed.weight"}
    assert all(groups[n]["weight_decay"] == pytest.approx(1e-4) for n in decayed)


def test_param_groups_none_overrides_follow_weight_decay():
    groups = _by_name(build_param_groups(_Toy(), 1e-4, 5e-2, weight_decay_norm=None, weight_decay_bias=None,
                                         weight_decay_embed=None))
    assert all(g["weight_decay"] == pytest.approx(5e-2) for g in groups.values())


def test_build_gem_optimizer_adamw_from_config():
    cfg = _cfg(OPTIMIZER="ADAMW", BACKBONE_MULTIPLIER=0.1)
    opt = build_gem_optimizer(cfg, _Toy())
    assert isinstance(opt, torch.optim.AdamW)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["backbone.conv.weight"] == pytest.approx(1e-5) and lrs["input_proj.weight"] == pytest.approx(1e-4)
    assert {g["name"]: g["weight_decay"] for g in opt.param_groups}["gn.weight"] == 0.0


def test_full_model_clipping_clips_the_global_norm():
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    cfg = _cfg(OPTIMIZER="SGD", MOMENTUM=0.0, WEIGHT_DECAY=0.0, BACKBONE_MULTIPLIER=1.0)
    cfg.SOLVER.BASE_LR = 1.0
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.1
    opt = build_gem_optimizer(cfg, model)
    before = [p.detach().clone() for p in model.parameters()]
    (model(torch.randn(8, 4)) * 100).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    assert torch.norm(torch.stack([g.norm() for g in grads])) > 1.0
    opt.step()
    steps = [b - p.detach() for b, p in zip(before, model.parameters())]  # = lr * clipped grad
    total = torch.norm(torch.stack([s.norm() for s in steps]))
    assert total == pytest.approx(0.1, rel=1e-4)
    # clipping scales all gradients by one factor (not per parameter)
    ratios = [s.flatten() / g.flatten() for s, g in zip(steps, grads)]
    assert torch.allclose(torch.cat(ratios), ratios[0][0].expand(sum(r.numel() for r in ratios)), rtol=1e-4)


def test_bad_optimizer_and_clip_type_name_the_key():
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER='ADAM9'"):
        build_gem_optimizer(_cfg(OPTIMIZER="ADAM9"), _Toy())
    cfg = _cfg()
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "global"
    with pytest.raises(ValueError, match="CLIP_TYPE='global'"):
        build_gem_optimizer(cfg, _Toy())


def test_amp_on_cpu_is_a_clear_error_and_off_is_none():
    cfg = _cfg()
    cfg.MODEL.DEVICE = "cpu"
    assert amp_dtype(cfg) is None
    cfg.SOLVER.AMP.ENABLED = True
    with pytest.raises(ValueError, match="SOLVER.AMP.ENABLED=True needs MODEL.DEVICE cuda"):
        amp_dtype(cfg)


def test_amp_trainer_step_unscales_before_the_clipped_step():
    """GemAMPTrainer's control flow (on CPU autocast('cuda') and the scaler are disabled, so it runs in fp32)."""
    class _Loss(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, batch):
            return {"loss_a": (self.w * batch).sum() * 100, "loss_b": self.w.sum()}

    model = _Loss()
    cfg = _cfg(OPTIMIZER="SGD", MOMENTUM=0.0, WEIGHT_DECAY=0.0)
    cfg.SOLVER.BASE_LR = 1.0
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available, disabling" from autocast/GradScaler
        trainer = GemAMPTrainer(model, [torch.ones(3)] * 2, build_gem_optimizer(cfg, model), torch.bfloat16)
        with EventStorage(0):
            trainer.run_step()
    assert torch.linalg.vector_norm(torch.ones(3) - model.w.detach()) == pytest.approx(0.5, rel=1e-5)
    assert "grad_scaler" in trainer.state_dict() and "optimizer" in trainer.state_dict()
