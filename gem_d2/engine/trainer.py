"""GemTrainer: detectron2's DefaultTrainer wired to gem_d2's data, evaluation, optimizer and checkpoints."""
from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict
from typing import Any, Dict, List, Optional

from detectron2.config import CfgNode
from detectron2.engine import DefaultTrainer, TrainerBase
from detectron2.engine import hooks as d2_hooks
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from gem_d2 import data as gem_data
from gem_d2 import evaluation as gem_evaluation
from gem_d2.engine.checkpoint import GemCheckpointer
from gem_d2.engine.dataset_classifier import DatasetClassifierHook, fit_dataset_classifier
from gem_d2.engine.divergence import TrainingDivergedError, non_finite_parameters
from gem_d2.engine.hooks import RoutingStatsHook, TrainingCurvesHook
from gem_d2.engine.launch import create_ddp_model, unwrap_model
from gem_d2.engine.optimizer import build_gem_optimizer
from gem_d2.engine.step import GemAMPTrainer, GemSimpleTrainer, amp_dtype

__all__ = ["GemTrainer", "GemAMPTrainer", "GemSimpleTrainer", "amp_dtype", "results_source"]
logger = logging.getLogger(__name__)
# Hooks whose after_train must not run when the loop did not finish: the final evaluation and saves.
_SKIPPED_AFTER_FAILURE = (d2_hooks.EvalHook, d2_hooks.PeriodicCheckpointer, d2_hooks.BestCheckpointer)


def results_source(checkpointer: GemCheckpointer, iteration: Optional[int] = None) -> Dict[str, Any]:
    """Where evaluated weights come from, as results files record it: ``{"iteration", "checkpoint"}``.

    Without ``iteration`` (``--eval-only``): the file the checkpointer loaded and the iteration stored in
    it (None for weights without one). With it (during training): that iteration, and the last
    checkpoint file only when it holds exactly these weights (else None: not saved at that iteration).
    """
    last = checkpointer.last_checkpoint
    if iteration is None:
        return {"iteration": last[1] if last else None, "checkpoint": last[0] if last else None}
    return {"iteration": int(iteration), "checkpoint": last[0] if last and last[1] == iteration else None}


class GemTrainer(DefaultTrainer):
    """DefaultTrainer for GEM-DINO.

    Differences from detectron2's: gem_d2's multi-dataset loaders and per-dataset UODB evaluators;
    ``test`` evaluates every ``DATASETS.TEST`` dataset and writes the summary table
    (``results_table.md``/``results.json``, with the iteration and checkpoint evaluated) into
    ``OUTPUT_DIR``; AdamW with a backbone LR multiplier (:func:`build_gem_optimizer`); DDP that also
    works on CPU (gloo); AMP with float16/bfloat16 on CUDA; :class:`GemCheckpointer` (GEM mapping,
    label space and layout in every checkpoint, atomic writes); optimizer (and grad scaler) state
    saved and restored on ``--resume``; routing statistics in the event storage and a
    ``training_curves.png`` at the end.

    Divergence (a NaN/inf loss, or NaN/inf weights when a checkpoint is due) raises
    :class:`TrainingDivergedError` naming the iteration and the values; from then on the checkpointer
    refuses to save, and a loop that did not finish (error or Ctrl-C) runs no final evaluation or save,
    so ``last_checkpoint`` keeps naming the last good checkpoint.

    The config must already hold the resolved GEM mapping (see ``resolve_gem_mapping``).
    """

    def __init__(self, cfg: CfgNode):
        TrainerBase.__init__(self)  # DefaultTrainer.__init__ hard-wires CUDA-only DDP and its checkpointer
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        dtype = amp_dtype(cfg)
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)
        if dtype is None:
            self._trainer = GemSimpleTrainer(model, data_loader, optimizer)
        else:
            self._trainer = GemAMPTrainer(model, data_loader, optimizer, dtype)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = GemCheckpointer.from_config(cfg, model, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.diverged: Optional[str] = None
        self.register_hooks(self.build_hooks())

    def build_hooks(self) -> List[d2_hooks.HookBase]:
        """detectron2's hooks plus routing statistics (before the writer) and the curve plot (after it); the
        evaluation hook records where its results come from (:meth:`results_source`)."""
        ret = [h for h in super().build_hooks() if h is not None]
        ret = [d2_hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, self._test_and_save_results)
               if isinstance(h, d2_hooks.EvalHook) else h for h in ret]
        routing = RoutingStatsHook(20, _train_dataset_names(self.cfg), self.cfg.OUTPUT_DIR)
        writer_at = next((i for i, h in enumerate(ret) if isinstance(h, d2_hooks.PeriodicWriter)), len(ret))
        ret.insert(writer_at, routing)
        ckpt_at = next((i for i, h in enumerate(ret) if isinstance(h, d2_hooks.PeriodicCheckpointer)), 0)
        if unwrap_model(self.model).dataset_classifier is not None:  # a model with a label space
            ret.insert(ckpt_at, DatasetClassifierHook(self.cfg, self.cfg.TEST.EVAL_PERIOD))
        if comm.is_main_process():
            ret.append(TrainingCurvesHook(self.cfg.OUTPUT_DIR))
        return ret

    def _test_and_save_results(self):
        self._last_eval_results = self.test(self.cfg, self.model, source=self.results_source())
        return self._last_eval_results

    def results_source(self) -> Dict[str, Any]:
        """``{"iteration", "checkpoint"}`` of the weights now in the model (the last finished iteration)."""
        return results_source(self.checkpointer, min(self.iter, self.max_iter - 1))

    # ------------------------------------------------------------------------------------- divergence
    def run_step(self):
        try:
            super().run_step()
        except FloatingPointError as e:  # detectron2's non-finite loss (GemSimpleTrainer names the values)
            self._stop_diverged(e)
        except Exception as e:
            bad = non_finite_parameters(unwrap_model(self.model))
            if bad:  # e.g. the matcher refusing NaN predictions: the weights diverged in the previous step
                self._stop_diverged(e, f"the model has non-finite parameters ({', '.join(bad[:3])} ...); {e}")
            raise

    def after_step(self):
        try:
            super().after_step()
        except FloatingPointError as e:  # a checkpoint of non-finite weights was refused
            self._stop_diverged(e)

    def _stop_diverged(self, error: BaseException, what: Optional[str] = None):
        self.diverged = f"training diverged at iteration {self.iter}: {what or error}"
        self.checkpointer.refuse_saves(self.diverged)
        path = self.checkpointer.get_checkpoint_file() if self.checkpointer.save_dir else ""
        kept = f"{self.cfg.OUTPUT_DIR}/last_checkpoint still names {path}" if path else "this run has no checkpoint"
        raise TrainingDivergedError(
            f"{self.diverged}\nNothing was saved or tagged after it: {kept}. Lower "
            "SOLVER.BASE_LR (or enable SOLVER.CLIP_GRADIENTS) before --resume.") from error

    def after_train(self):
        if self.iter >= self.max_iter:  # the loop finished (detectron2 increments iter past the last step)
            return super().after_train()
        self.storage.iter = self.iter
        for h in self._hooks:
            if not isinstance(h, _SKIPPED_AFTER_FAILURE):
                h.after_train()

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self):
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_gem_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        return gem_data.build_gem_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return gem_data.build_gem_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return gem_evaluation.build_uodb_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators: Optional[List[DatasetEvaluator]] = None,
             source: Optional[Dict[str, Any]] = None) -> Dict[str, dict]:
        """Evaluate ``model`` on every ``DATASETS.TEST`` dataset; the main process writes the summary table.

        ``source`` (``{"iteration", "checkpoint"}``, see :func:`results_source`) is recorded in
        ``results.json`` and every ``uodb_metrics_<dataset>.json``. Returns ``{dataset: evaluator result}``
        (never collapsed to one dataset's dict, unlike detectron2's, so the keys in metrics.json are
        always ``<dataset>/uodb/<metric>``).
        """
        if isinstance(evaluators, DatasetEvaluator):
            evaluators = [evaluators]
        if evaluators is not None and len(evaluators) != len(cfg.DATASETS.TEST):
            raise ValueError(f"{len(evaluators)} evaluators for {len(cfg.DATASETS.TEST)} DATASETS.TEST datasets")
        classifier = unwrap_model(model).dataset_classifier
        if cfg.MODEL.GEM.TEST_ROUTING == "auto" and classifier is not None and not bool(classifier.ready):
            fit_dataset_classifier(model, cfg)  # e.g. --eval-only on a checkpoint of a run that never evaluated
        results: Dict[str, dict] = OrderedDict()
        for idx, name in enumerate(cfg.DATASETS.TEST):
            loader = cls.build_test_loader(cfg, name)
            evaluator = evaluators[idx] if evaluators is not None else cls.build_evaluator(cfg, name)
            if isinstance(evaluator, gem_evaluation.UODBEvaluator):
                evaluator.source = source
            results[name] = inference_on_dataset(model, loader, evaluator)
            if comm.is_main_process():
                logger.info(f"Evaluation results for {name} in csv format:")
                print_csv_format(results[name])
        if comm.is_main_process() and results:
            gem_evaluation.summarize_results(results, cfg.OUTPUT_DIR, source=source)  # prints the table
            logger.info(f"Per-dataset results table written to {os.path.join(cfg.OUTPUT_DIR, 'results_table.md')}")
        return results


def _train_dataset_names(cfg: CfgNode) -> List[str]:
    # Rows of model.routing_stats follow the unified label space's dataset order.
    return list(gem_data.UnifiedLabelSpace.from_cfg(cfg).dataset_names)
