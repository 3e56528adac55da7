"""Training hooks: routing statistics into the event storage, and the training-curve plot."""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.engine.train_loop import HookBase
from detectron2.utils import comm

from gem_d2.engine.launch import unwrap_model
from gem_d2.engine.plotting import plot_training_curves
from gem_d2.utils.files import atomic_write

__all__ = ["RoutingStatsHook", "TrainingCurvesHook"]
logger = logging.getLogger(__name__)
_COUNTS_SUFFIX = "/tokens_per_expert"


class RoutingStatsHook(HookBase):
    """Accumulates ``model.routing_stats`` over steps and writes it to the event storage.

    ``routing_stats`` maps names to tensors: 2-D ones are counts (num_datasets, E) of tokens per expert
    per dataset (e.g. ``decoder.0/tokens_per_expert``), anything else is a router scalar (e.g. a
    sparsity); layer-level names are used as given, the ``/tokens_per_expert`` suffix is dropped.
    Every ``period`` iterations (and at the end) the counts of all ranks are summed and, on the main
    process, written as shares of that layer's routed tokens: ``routing/<layer>/expert<j>`` (all
    datasets) and ``routing/<layer>/<dataset>/expert<j>`` (share of the dataset's tokens; zero entries are
    omitted to keep metrics.json small); scalars are averaged over steps and ranks as
    ``routing/<name>``. At the end the cumulative counts go to ``<output_dir>/routing_stats.json``.
    A model whose ``routing_stats`` is empty (no MoE layer) makes this hook a no-op.
    """

    def __init__(self, period: int, dataset_names: Sequence[str] = (), output_dir: Optional[str] = None):
        self._period = int(period)
        self._names = list(dataset_names)
        self._output_dir = output_dir
        self._counts: Dict[str, np.ndarray] = {}
        self._scalars: Dict[str, List[float]] = {}
        self._total: Dict[str, np.ndarray] = {}

    def after_step(self):
        stats = unwrap_model(self.trainer.model).routing_stats
        for name, value in stats.items():
            value = value.detach().to("cpu", torch.float64).numpy() if torch.is_tensor(value) else np.asarray(
                value, dtype=np.float64)
            if value.ndim == 2:
                layer = name[: -len(_COUNTS_SUFFIX)] if name.endswith(_COUNTS_SUFFIX) else name
                if layer in self._counts and self._counts[layer].shape != value.shape:
                    raise ValueError(f"routing_stats[{name!r}] changed shape from {self._counts[layer].shape} "
                                     f"to {value.shape}; expected (num_datasets, num_experts) every step")
                self._counts[layer] = self._counts.get(layer, 0) + value
            else:
                self._scalars.setdefault(name, []).extend(np.ravel(value).tolist())
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
        # whose model reported no stats contributes empty dicts.
        window = (self._counts, self._scalars)
        self._counts, self._scalars = {}, {}
        gathered = comm.all_gather(window) if comm.get_world_size() > 1 else [window]
        counts: Dict[str, np.ndarray] = {}
        scalars: Dict[str, List[float]] = {}
        for part_counts, part_scalars in gathered:
            for layer, c in part_counts.items():
                counts[layer] = counts.get(layer, 0) + c
            for name, values in part_scalars.items():
                scalars.setdefault(name, []).extend(values)
        for layer, c in counts.items():
            self._total[layer] = self._total.get(layer, 0) + c
        if not comm.is_main_process() or not (counts or scalars):
            return
        out = {f"routing/{name}": float(np.mean(values)) for name, values in scalars.items() if values}
        for layer, c in counts.items():
            names = self._row_names(c.shape[0])
            per_expert = c.sum(axis=0)
            total = per_expert.sum()
            if total <= 0:
                continue
            out.update({f"routing/{layer}/expert{j}": float(v / total) for j, v in enumerate(per_expert)})
            for d, row in enumerate(c):
                row_total = row.sum()
                out.update({f"routing/{layer}/{names[d]}/expert{j}": float(v / row_total)
                            for j, v in enumerate(row) if v > 0})
        if out:
            self.trainer.storage.put_scalars(smoothing_hint=False, **out)


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
