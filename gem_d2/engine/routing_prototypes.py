"""Dataset prototypes for auto test-time routing, computed with the model's own (trained) backbone.

See :mod:`gem_d2.modeling.auto_routing` for why the trained backbone's prototypes are used rather
than the planner's. ``RoutingPrototypesHook`` refreshes them before every evaluation and before the
final checkpoint, so ``model_final.pth`` carries them in the model's state dict.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.engine import HookBase

from gem_d2.data import GemDatasetMapper
from gem_d2.engine.launch import unwrap_model

logger = logging.getLogger(__name__)


@torch.no_grad()
def compute_routing_prototypes(model, cfg, samples_per_dataset: Optional[int] = None, batch_size: int = 4):
    """Fit ``model.auto_router``'s dataset classifier on the pooled backbone features of the training datasets.

    Samples ``samples_per_dataset`` (default ``MODEL.GEM.PLANNER.SAMPLES_PER_UNIT``) images per
    dataset with ``MODEL.GEM.PLANNER.SEED``, at test-time resolution. Returns the (D, C) mean feature of
    each dataset (its prototype), or None when the model has no dataset router (no label space).
    """
    model = unwrap_model(model)
    if getattr(model, "auto_router", None) is None:
        return None
    n = samples_per_dataset or cfg.MODEL.GEM.PLANNER.SAMPLES_PER_UNIT
    mapper = GemDatasetMapper(cfg, is_train=False)
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for d, name in enumerate(model.dataset_names):
            records = DatasetCatalog.get(name)
            if not records:
                raise ValueError(f"dataset {name!r} has no images: cannot compute its routing prototype")
            rng = np.random.RandomState(cfg.MODEL.GEM.PLANNER.SEED + d)
            picks = sorted(rng.choice(len(records), size=min(n, len(records)), replace=False).tolist())
            for start in range(0, len(picks), batch_size):
                batch = [mapper(records[i]) for i in picks[start:start + batch_size]]
                images, _ = model.preprocess_image(batch)
                feats.append(model.image_features(model.backbone(images.tensor), images))
                labels.append(torch.full((len(batch),), d, dtype=torch.long))
        feats, labels = torch.cat(feats), torch.cat(labels)
        prototypes = torch.stack([feats[labels == d].mean(0) for d in range(len(model.dataset_names))])
        accuracy = model.auto_router.fit(feats, labels)
    finally:
        model.train(was_training)
    logger.info(f"auto-routing classifier fitted on {len(labels)} images of {len(model.dataset_names)} datasets "
                f"({n} each at most; training accuracy {accuracy:.3f})")
    return prototypes


class RoutingPrototypesHook(HookBase):
    """Recompute the routing prototypes after the steps that precede an evaluation or the last checkpoint.

    Register it before detectron2's PeriodicCheckpointer and EvalHook so both see fresh prototypes.
    """

    def __init__(self, cfg, eval_period: int):
        self.cfg = cfg
        self.eval_period = eval_period

    def after_step(self):
        next_iter = self.trainer.iter + 1
        last = next_iter == self.trainer.max_iter
        if last or (self.eval_period > 0 and next_iter % self.eval_period == 0):
            compute_routing_prototypes(self.trainer.model, self.cfg)
