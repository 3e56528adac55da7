"""Training hooks: routing statistics into the event storage, and the training-curve plot."""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from detectron2.engine.train_loop import HookBase
from detectron2.utils import comm

from .checkpoint import atomic_write
from .launch import unwrap_model
from .plotting import plot_training_curves

__all__ = ["RoutingStatsHook", "TrainingCurvesHook"]
logger = logging.getLogger(__name__)


class RoutingStatsHook(HookBase):
    """Accumulates ``model.routing_stats`` (layer -> (num_datasets, E) tokens per expert) over steps.

    Every ``period`` iterations (and at the end) the counts of all ranks are summed and, on the main
    process, written to the event storage as shares of that layer's routed tokens:
    ``routing/<layer>/expert<j>`` (all datasets) and ``routing/<layer>/<dataset>/expert<j>`` (share of
    the dataset's tokens; entries that are 0 are omitted to keep metrics.json small). At the end of
    training the cumulative counts go to ``<output_dir>/routing_stats.json``. A model without
    ``routing_stats`` (or with an empty one) makes this hook a no-op.
    """

    def __init__(self, period: int, dataset_names: Sequence[str] = (), output_dir: Optional[str] = None):
        self._period = int(period)
        self._names = list(dataset_names)
        self._output_dir = output_dir
        self._window: Dict[str, np.ndarray] = {}
        self._total: Dict[str, np.ndarray] = {}

    def after_step(self):
        stats = getattr(unwrap_model(self.trainer.model), "routing_stats", None) or {}
        for layer, counts in stats.items():
            counts = counts.detach().to("cpu", torch.float64).numpy() if torch.is_tensor(counts) else np.asarray(
                counts, dtype=np.float64)
            if layer in self._window and self._window[layer].shape != counts.shape:
                raise ValueError(f"routing_stats[{layer!r}] changed shape from {self._window[layer].shape} "
                                 f"to {counts.shape}; expected (num_datasets, num_experts) every step")
            self._window[layer] = self._window.get(layer, 0) + counts
        next_iter = self.trainer.iter + 1
        if self._period > 0 and next_iter % self._period == 0:
            self._flush()

    def after_train(self):
        self._flush()
        if comm.is_main_process() and self._output_dir and self._total:
            payload = {
                "datasets": self._row_names(next(iter(self._total.values())).shape[0]),
                "tokens_per_dataset_expert": {k: v.tolist() for k, v in self._total.items()},
            }
            atomic_write(os.path.join(self._output_dir, "routing_stats.json"),
                         lambda f: f.write(json.dumps(payload, indent=1) + "\n"), binary=False)

    def _row_names(self, rows: int):
        return self._names[:rows] + [f"dataset{i}" for i in range(len(self._names), rows)]

    def _flush(self):
        # Every rank calls this at the same iterations, so the gather below cannot deadlock; a rank
        # whose model reported no stats contributes an empty dict.
        window, self._window = self._window, {}
        gathered = comm.all_gather(window) if comm.get_world_size() > 1 else [window]
        summed: Dict[str, np.ndarray] = {}
        for part in gathered:
            for layer, counts in part.items():
                summed[layer] = summed.get(layer, 0) + counts
        if not summed:
            return
        for layer, counts in summed.items():
            self._total[layer] = self._total.get(layer, 0) + counts
        if not comm.is_main_process():
            return
        storage = self.trainer.storage
        for layer, counts in summed.items():
            names = self._row_names(counts.shape[0])
            per_expert = counts.sum(axis=0)
            total = per_expert.sum()
            if total <= 0:
                continue
            scalars = {f"routing/{layer}/expert{j}": float(c / total) for j, c in enumerate(per_expert)}
            for d, row in enumerate(counts):
                row_total = row.sum()
                for j, c in enumerate(row):
                    if c > 0:
                        scalars[f"routing/{layer}/{names[d]}/expert{j}"] = float(c / row_total)
            storage.put_scalars(smoothing_hint=False, **scalars)


class TrainingCurvesHook(HookBase):
    """After training, plots ``<output_dir>/metrics.json`` into ``<output_dir>/training_curves.png``.

    Register it after detectron2's ``PeriodicWriter`` so the final metrics are flushed first. A
    failure to plot is logged, never raised: the trained model matters more than its picture.
    """

    def __init__(self, output_dir: str, filename: str = "training_curves.png"):
        self._output_dir = output_dir
        self._filename = filename

    def after_train(self):
        if not comm.is_main_process():
            return
        metrics = os.path.join(self._output_dir, "metrics.json")
        if not os.path.isfile(metrics):
            logger.warning(f"No {metrics}; training curves not plotted")
            return
        try:
            path = plot_training_curves(metrics, os.path.join(self._output_dir, self._filename))
        except Exception as e:  # noqa: BLE001 - see class docstring
            logger.warning(f"Could not plot training curves from {metrics}: {e!r}")
            return
        logger.info(f"Training curves written to {path}")
