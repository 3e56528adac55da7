"""Few-shot adaptation to a new domain: extend the label space and the experts, freeze what old datasets use.

``tools/adapt.py`` drives it. The pieces:

- :func:`adapted_config`: the trained run's config with the new dataset appended to ``DATASETS.TRAIN`` (its
  class block goes last, so every old class id is unchanged), ``NUM_EXPERTS`` grown by ``ADAPT.NEW_EXPERTS``
  (gem) and the new unit's mapping row appended.
- :func:`load_extended_weights`: loads the trained checkpoint into the larger model: old class rows and
  old experts are copied, new class rows keep their fresh initialisation, appended experts start as copies
  of a given old expert.
- :func:`select_trainable`: what fine-tuning may change. ``gem``: only the new class block's rows (decoder and
  encoder class heads, DN label embedding) and experts no old unit is mapped to; every tensor old datasets
  read stays bit-identical (partially trainable tensors get a gradient mask and no weight decay, so AdamW
  leaves their frozen rows exactly as they were). Learned routers (``topk``, ``damex``, ...): the usual
  fine-tuning of every MoE layer (experts and gates) and the detection heads.
- :class:`AdaptTrainer`: a :class:`GemTrainer` that trains on the new dataset only, with the optimizer over
  the selected parameters and every BatchNorm kept in eval mode (the backbone is frozen in both cases).
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog
from detectron2.engine.train_loop import HookBase
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger
from torch import nn

from gem_d2 import data as gem_data
from gem_d2.data import UnifiedLabelSpace, register_few_shot
from gem_d2.data.catalog import require_registered, strip_split_suffix
from gem_d2.engine.launch import unwrap_model
from gem_d2.engine.optimizer import build_gem_optimizer
from gem_d2.engine.planning import resolve_gem_mapping, write_config
from gem_d2.engine.run_lock import OutputDirLock
from gem_d2.engine.setup import build_cfg, prepare_datasets
from gem_d2.engine.trainer import GemTrainer
from gem_d2.planner.mapping import GemMapping
from gem_d2.planner.pipeline import plan_new_unit_from_cfg
from gem_d2.utils.files import atomic_write_text
from gem_d2.utils.safe_load import load_torch_file

__all__ = ["adapted_config", "load_extended_weights", "select_trainable", "AdaptTrainer", "CLASS_ROW_PARAMS",
           "run_adaptation", "adaptation_output_dir"]
logger = logging.getLogger(__name__)

# Parameters whose first dimension is the unified label space (one row per class).
CLASS_ROW_PARAMS = re.compile(r"(class_heads\.\d+\.(weight|bias)|enc_class_head\.(weight|bias)|label_enc\.weight)$")
_EXPERT_PARAMS = re.compile(r"\.experts\.(w1|b1|w2|b2)$")
_HEAD_PARAMS = re.compile(r"(class_heads|box_heads|enc_class_head|enc_box_head|bbox_embed|class_embed|label_enc)")


def adapted_config(cfg: CfgNode, new_train: str, new_test: Sequence[str] = (),
                   new_experts: Optional[Sequence[int]] = None, new_weights: Optional[Sequence[float]] = None,
                   num_new_experts: int = 0) -> CfgNode:
    """The config of the adapted model (a clone; ``cfg`` is not changed).

    Args:
        cfg: the trained run's resolved config (for gem: UNITS/MAPPING hold every old unit).
        new_train: the new (few-shot) training dataset, appended to ``DATASETS.TRAIN``.
        new_test: its test datasets, appended to ``DATASETS.TEST``.
        new_experts, new_weights: the new unit's mapping row (gem only).
        num_new_experts: experts appended to every MoE layer (gem only).
    """
    if int(cfg.MODEL.DINO.NUM_CLASSES) != 0:
        raise ValueError(f"MODEL.DINO.NUM_CLASSES={cfg.MODEL.DINO.NUM_CLASSES}: adaptation derives the label space "
                         f"from DATASETS.TRAIN and needs 0 (the trained model's space must be DATASETS.TRAIN's blocks)")
    if new_train in cfg.DATASETS.TRAIN:
        raise ValueError(f"--new-dataset {new_train!r} is already in DATASETS.TRAIN {list(cfg.DATASETS.TRAIN)}")
    out = cfg.clone()
    out.defrost()
    out.DATASETS.TRAIN = tuple(cfg.DATASETS.TRAIN) + (new_train,)
    out.DATASETS.TEST = tuple(cfg.DATASETS.TEST) + tuple(t for t in new_test if t not in cfg.DATASETS.TEST)
    g = out.MODEL.GEM
    if g.ROUTER == "gem" and len(g.MOE_LAYERS):
        if new_experts is None:
            raise ValueError("adapted_config: the gem router needs the new unit's experts (new_experts)")
        mapping = GemMapping.from_cfg(cfg).with_unit(new_train, [int(j) for j in new_experts], new_weights,
                                                     num_experts=int(g.NUM_EXPERTS) + int(num_new_experts))
        mapping.to_cfg(out)
    elif num_new_experts:
        raise ValueError(f"MODEL.GEM.ADAPT.NEW_EXPERTS={num_new_experts} needs ROUTER gem (got {g.ROUTER!r})")
    return out


@torch.no_grad()
def load_extended_weights(model: nn.Module, state: Dict[str, torch.Tensor], old_num_classes: int,
                          old_num_experts: int, init_new_experts_from: Optional[int] = None) -> None:
    """Load a trained model's ``state`` (its ``model`` state dict) into the extended ``model``.

    Same-shape tensors are copied. Class-row tensors (:data:`CLASS_ROW_PARAMS`) get the old rows
    ``[:old_num_classes]``; expert banks get the old experts ``[:old_num_experts]`` and the appended ones a
    copy of expert ``init_new_experts_from``; the auto-routing classifier is not loaded (refitted after training).
    Any other difference (or a missing key) is an error naming it.
    """
    target = unwrap_model(model).state_dict()
    target = {k: v for k, v in target.items() if "dataset_classifier." not in k}
    missing = [k for k in target if k not in state]
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} tensors of the adapted model, e.g. {missing[:3]}: it is not "
                       f"a checkpoint of the config given to adaptation")
    for key, dst in target.items():
        src = state[key].to(dst.device)
        if src.shape == dst.shape:
            dst.copy_(src)
        elif CLASS_ROW_PARAMS.search(key) and src.shape[0] == old_num_classes and src.shape[1:] == dst.shape[1:]:
            dst[:old_num_classes].copy_(src)
        elif _EXPERT_PARAMS.search(key) and src.shape[0] == old_num_experts and src.shape[1:] == dst.shape[1:]:
            dst[:old_num_experts].copy_(src)
            if init_new_experts_from is not None:
                dst[old_num_experts:].copy_(src[int(init_new_experts_from)].expand_as(dst[old_num_experts:]))
        else:
            raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(src.shape)} but the adapted model's is "
                             f"{tuple(dst.shape)} (old classes {old_num_classes}, old experts {old_num_experts})")


def select_trainable(model: nn.Module, router: str, old_num_classes: int,
                     old_experts_used: Optional[Sequence[int]] = None) -> Dict[str, Optional[torch.Tensor]]:
    """Set ``requires_grad`` for adaptation; returns ``{name: row mask or None}`` of the trainable parameters.

    gem: class-row tensors with a mask of the new rows; expert banks with a mask of the experts not in
    ``old_experts_used`` (none when every expert serves an old unit). Other routers: every MoE and head tensor
    (mask None = the whole tensor).
    """
    model = unwrap_model(model)
    chosen: Dict[str, Optional[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        mask = None
        if router == "gem":
            if CLASS_ROW_PARAMS.search(name):
                mask = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
                mask[old_num_classes:] = True
            elif _EXPERT_PARAMS.search(name):
                mask = torch.ones(p.shape[0], dtype=torch.bool, device=p.device)
                mask[list(old_experts_used or [])] = False
            train = mask is not None and bool(mask.any())
        else:
            train = ".ffn.experts." in name or ".ffn.router." in name or bool(_HEAD_PARAMS.search(name))
        p.requires_grad_(train)
        if train:
            chosen[name] = mask
    if not chosen:
        raise ValueError(f"adaptation with router {router!r} found nothing to train")
    return chosen


def _mask_gradient(mask: torch.Tensor):
    shape = (-1,) + (1,) * 8

    def hook(grad):
        return grad * mask.view(shape[: grad.dim()]).to(grad.dtype)
    return hook


class _BatchNormEval(HookBase):
    """Keeps every BatchNorm in eval mode (frozen statistics), also after an evaluation set the model to train."""

    def before_step(self):
        for m in unwrap_model(self.trainer.model).modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


class AdaptTrainer(GemTrainer):
    """GemTrainer for few-shot adaptation.

    Args:
        cfg: the adapted config (:func:`adapted_config`); ``SOLVER`` is the fine-tuning schedule.
        new_train: the dataset to train on (the other DATASETS.TRAIN entries only define the label space).
        prepare_model: called with the freshly built model before the optimizer is built; it loads the
            weights and returns :func:`select_trainable`'s result.
    """

    def __init__(self, cfg: CfgNode, new_train: str, prepare_model):
        self._new_train = new_train
        self._prepare_model = prepare_model
        self.trainable: Dict[str, Optional[torch.Tensor]] = {}
        super().__init__(cfg)

    def build_model(self, cfg):  # instance method on purpose: it needs prepare_model
        model = GemTrainer.build_model(cfg)
        self.trainable = self._prepare_model(model)
        params = dict(model.named_parameters())
        for name, mask in self.trainable.items():
            if mask is not None:
                params[name].register_hook(_mask_gradient(mask))
        n_train = sum(int(params[n].numel() if m is None else params[n][m].numel()) for n, m in self.trainable.items())
        logger.info(f"adaptation trains {n_train:,} of {sum(p.numel() for p in model.parameters()):,} parameters "
                    f"({len(self.trainable)} tensors)")
        return model

    def build_optimizer(self, cfg, model):
        optimizer = build_gem_optimizer(cfg, model)
        masked = {id(p) for n, p in unwrap_model(model).named_parameters() if self.trainable.get(n) is not None}
        for group in optimizer.param_groups:
            if any(id(p) in masked for p in group["params"]):
                group["weight_decay"] = 0.0  # decay would shrink the frozen rows of a partially trained tensor
        return optimizer

    def build_train_loader(self, cfg):
        only_new = cfg.clone()
        only_new.defrost()
        only_new.DATASETS.TRAIN = (self._new_train,)
        return gem_data.build_gem_train_loader(only_new, mapper=gem_data.GemDatasetMapper(cfg, True))

    def build_hooks(self):
        return [_BatchNormEval()] + super().build_hooks()


def experts_of_units(mapping: List[List[int]]) -> List[int]:
    """Sorted expert ids used by any row of ``mapping``."""
    return sorted({int(j) for row in mapping for j in row})


def default_test_name(train_name: str):
    base = strip_split_suffix(train_name)
    for split in ("test", "val"):
        if f"{base}_{split}" in DatasetCatalog.list():
            return f"{base}_{split}"
    return None


def ap_table(results) -> dict:
    return {name: {"AP50": float(r["uodb"]["AP50_voc07"]), "AP": float(r["uodb"].get("AP", float("nan")))}
            for name, r in results.items()}


def adaptation_output_dir(args, cfg: Optional[CfgNode] = None) -> str:
    """``--output-dir``, or ``<OUTPUT_DIR>_adapt_<new dataset>_<K>shot`` of the trained run's config."""
    cfg = build_cfg(args.config_file, args.opts) if cfg is None else cfg
    shots = int(args.shots if args.shots is not None else cfg.MODEL.GEM.ADAPT.SHOTS)
    return args.output_dir or f"{cfg.OUTPUT_DIR.rstrip('/')}_adapt_{args.new_dataset}_{shots}shot"


def run_adaptation(args) -> dict:
    """The whole few-shot adaptation of ``tools/adapt.py`` (``args``: its parsed command line: config_file, weights,
    new_dataset, new_test, shots, output_dir, opts); returns the result dict also written to ``adapt_result.json``.

    Holds the output folder's :class:`OutputDirLock` throughout (a second adaptation into it fails at once)."""
    t0 = time.time()
    cfg = build_cfg(args.config_file, args.opts)
    out_dir = adaptation_output_dir(args, cfg)
    with OutputDirLock(out_dir):
        return _run_adaptation(args, cfg, out_dir, t0)


def _run_adaptation(args, cfg: CfgNode, out_dir: str, t0: float) -> dict:
    prepare_datasets(cfg)
    a = cfg.MODEL.GEM.ADAPT
    shots = int(args.shots if args.shots is not None else a.SHOTS)
    require_registered(args.new_dataset)
    new_test = args.new_test or default_test_name(args.new_dataset)
    if new_test is None:
        raise ValueError(f"no test dataset found for {args.new_dataset!r}; pass --new-test")
    require_registered(new_test)
    os.makedirs(out_dir, exist_ok=True)
    setup_logger(out_dir, name="gem_d2", abbrev_name="gem")
    setup_logger(out_dir, name="detectron2", abbrev_name="d2")
    cfg.MODEL.WEIGHTS = args.weights
    cfg.OUTPUT_DIR = out_dir
    seed_all_rng(int(cfg.SEED) if int(cfg.SEED) >= 0 else int(a.SEED))  # new class rows' init, data order
    resolve_gem_mapping(cfg, resume=False, eval_only=True)  # the trained mapping, from the config or checkpoint
    few = register_few_shot(args.new_dataset, shots, int(a.SEED))
    logger.info(f"{few}: {len(DatasetCatalog.get(few))} images ({shots}-shot per class, seed {a.SEED})")

    router = cfg.MODEL.GEM.ROUTER
    gem = router == "gem" and len(cfg.MODEL.GEM.MOE_LAYERS) > 0
    old_classes = UnifiedLabelSpace(list(cfg.DATASETS.TRAIN)).num_classes
    old_experts = int(cfg.MODEL.GEM.NUM_EXPERTS)
    num_new = int(a.NEW_EXPERTS) if gem else 0
    if int(a.NEW_EXPERTS) and not gem:
        logger.info(f"MODEL.GEM.ADAPT.NEW_EXPERTS={a.NEW_EXPERTS} ignored: router {router!r} fine-tunes its "
                    f"own experts")
    plan = None
    experts = weights = None
    best_old = None
    if gem:
        experts, weights, best_old, plan = plan_new_unit_from_cfg(cfg, few, num_new)
        logger.info(f"new unit {few} -> experts {experts} (old rows fixed; appended experts: {num_new})")
    new_cfg = adapted_config(cfg, few, [new_test], experts, weights, num_new)
    new_cfg.SOLVER.MAX_ITER = int(a.MAX_ITER)
    new_cfg.SOLVER.BASE_LR = float(a.BASE_LR)
    new_cfg.SOLVER.STEPS = ()
    new_cfg.SOLVER.WARMUP_ITERS = 0
    new_cfg.SOLVER.CHECKPOINT_PERIOD = int(a.MAX_ITER)
    new_cfg.TEST.EVAL_PERIOD = 0
    new_cfg.freeze()
    write_config(new_cfg, os.path.join(out_dir, "config.yaml"))

    state = load_torch_file(args.weights)
    trained_at = state.get("iteration") if isinstance(state, dict) else None
    state = state.get("model", state)
    old_used = experts_of_units(list(cfg.MODEL.GEM.MAPPING)) if gem else None

    def prepare(model):
        load_extended_weights(model, state, old_classes, old_experts, best_old)
        return select_trainable(model, router, old_classes, old_used)

    trainer = AdaptTrainer(new_cfg, few, prepare)
    before_cfg = new_cfg.clone()
    before_cfg.defrost()
    before_cfg.OUTPUT_DIR = os.path.join(out_dir, "before")
    os.makedirs(before_cfg.OUTPUT_DIR, exist_ok=True)
    source = {"iteration": trained_at if isinstance(trained_at, int) else None,
              "checkpoint": os.path.abspath(args.weights)}
    before = ap_table(GemTrainer.test(before_cfg, trainer.model, source=source))
    after = ap_table(trainer.train() or GemTrainer.test(new_cfg, trainer.model))
    result = {
        "router": router, "new_dataset": args.new_dataset, "few_shot_dataset": few, "new_test": new_test,
        "shots": shots, "seed": int(a.SEED), "images": len(DatasetCatalog.get(few)), "iterations": int(a.MAX_ITER),
        "new_experts": num_new, "plan": plan, "mapping": [list(r) for r in new_cfg.MODEL.GEM.MAPPING],
        "units": list(new_cfg.MODEL.GEM.UNITS),
        "trainable_tensors": sorted(trainer.trainable), "before": before, "after": after,
        "old_test": [t for t in new_cfg.DATASETS.TEST if t != new_test],
        "checkpoint": os.path.join(out_dir, "model_final.pth"), "minutes": (time.time() - t0) / 60,
    }
    atomic_write_text(os.path.join(out_dir, "adapt_result.json"), json.dumps(result, indent=1))
    logger.info("adaptation AP50 before -> after: " + ", ".join(
        f"{d}: {before[d]['AP50']:.1f} -> {after[d]['AP50']:.1f}" for d in after))
    return result
