"""Fitting the model's test-time dataset classifier (auto routing) during and after training.

``fit_dataset_classifier(model, cfg)`` samples ``MODEL.GEM.PLANNER.SAMPLES_PER_UNIT`` training images per
dataset (seeded with ``MODEL.GEM.PLANNER.SEED``), maps them at test-time resolution and hands them to
``GEMDINO.fit_dataset_classifier``. ``DatasetClassifierHook`` refits it before every evaluation and before
the final checkpoint, so ``model_final.pth`` carries it.
"""
from __future__ import annotations

import logging
from typing import Iterator, List, Optional, Tuple

import numpy as np
from detectron2.data import DatasetCatalog
from detectron2.engine import HookBase

from gem_d2.data import GemDatasetMapper
from gem_d2.engine.launch import unwrap_model

__all__ = ["DatasetClassifierHook", "fit_dataset_classifier"]
logger = logging.getLogger(__name__)


def classifier_batches(cfg, dataset_names: List[str], samples_per_dataset: int, batch_size: int = 4
                       ) -> Iterator[Tuple[int, List[dict]]]:
    """``(dataset index, mapped inputs)`` batches of up to ``samples_per_dataset`` seeded images per dataset."""
    mapper = GemDatasetMapper(cfg, is_train=False)
    for d, name in enumerate(dataset_names):
        records = DatasetCatalog.get(name)
        if not records:
            raise ValueError(f"dataset {name!r} has no images: cannot fit the dataset classifier on it")
        rng = np.random.RandomState(cfg.MODEL.GEM.PLANNER.SEED + d)
        picks = sorted(rng.choice(len(records), size=min(samples_per_dataset, len(records)), replace=False).tolist())
        for start in range(0, len(picks), batch_size):
            yield d, [mapper(records[i]) for i in picks[start:start + batch_size]]


def fit_dataset_classifier(model, cfg, samples_per_dataset: Optional[int] = None) -> float:
    """Fit ``model``'s dataset classifier on its training datasets; returns the training accuracy."""
    model = unwrap_model(model)
    n = samples_per_dataset or cfg.MODEL.GEM.PLANNER.SAMPLES_PER_UNIT
    accuracy = model.fit_dataset_classifier(classifier_batches(cfg, model.dataset_names, n))
    logger.info(f"dataset classifier fitted on {len(model.dataset_names)} datasets ({n} images each at most; "
                f"training accuracy {accuracy:.3f})")
    return accuracy


class DatasetClassifierHook(HookBase):
    """Refit the dataset classifier after the steps that precede an evaluation or the last checkpoint.

    Register it before detectron2's PeriodicCheckpointer and EvalHook so both see the fresh classifier.
    """

    def __init__(self, cfg, eval_period: int):
        self.cfg = cfg
        self.eval_period = eval_period

    def after_step(self):
        next_iter = self.trainer.iter + 1
        last = next_iter == self.trainer.max_iter
        if last or (self.eval_period > 0 and next_iter % self.eval_period == 0):
            fit_dataset_classifier(self.trainer.model, self.cfg)
