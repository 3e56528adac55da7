"""Checkpoints that carry the GEM mapping, the label space and the MoE layout, written atomically.

Format (model-zoo style, readable by a plain detectron2 ``DetectionCheckpointer``, which returns the
extra keys)::

    {"model": state_dict, "iteration": int, "trainer": {...} (training states, when saved by GemTrainer),
     "gem_mapping": GemMapping.to_record() (units, mapping, mapping_weights, num_experts, moe_layers),
     "gem_router": str (MODEL.GEM.ROUTER),
     "gem_label_space": {"datasets": [...], "classes": [[...], ...]} (when the config has DATASETS.TRAIN)}

Only tensors and plain Python containers are stored, so ``torch.load(weights_only=True)`` reads them
(``gem_d2.engine.checkpoint_records`` describes the records and compares them with a config).
fvcore's ``Checkpointer.save`` and ``tag_last_checkpoint`` write in place, so a crash mid-write
leaves a truncated file that ``--resume`` would then pick; here both go to a temporary file in the
same folder first and are moved over the target with ``os.replace``. ``--resume`` skips an unreadable
newest checkpoint (:func:`gem_d2.engine.resume.resume_checkpoint`). A model with a non-finite parameter
is never saved (:class:`~gem_d2.engine.divergence.TrainingDivergedError`).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple

import torch
from detectron2.config import CfgNode

from gem_d2.engine.checkpoint_records import (
    LABEL_SPACE_KEY,
    MAPPING_KEY,
    ROUTER_KEY,
    CheckpointLayoutError,
    checkpoint_layout,
    label_space_diffs,
    label_space_record,
    layout_diffs,
    read_checkpoint_records,
)
from gem_d2.engine.divergence import TrainingDivergedError, non_finite_parameters
from gem_d2.engine.resume import resume_checkpoint
from gem_d2.planner.mapping import GemMapping
from gem_d2.utils.files import atomic_write
from gem_d2.utils.safe_load import SafeDetectionCheckpointer

__all__ = ["MAPPING_KEY", "ROUTER_KEY", "LABEL_SPACE_KEY", "GemCheckpointer", "read_checkpoint_mapping",
           "MappingMismatchError", "CheckpointLayoutError"]

logger = logging.getLogger(__name__)
ADOPT_KEY = "MODEL.GEM.ADOPT_CHECKPOINT_LAYOUT"


class MappingMismatchError(ValueError):
    """A checkpoint's GEM mapping or expert layout disagrees with the config the model was built from."""


def read_checkpoint_mapping(path: str) -> Optional[GemMapping]:
    """The GEM mapping stored in checkpoint ``path``, without building a model; None for files without one
    (ImageNet backbones, detectron2 ``.pkl`` files, checkpoints of models without MoE)."""
    return read_checkpoint_records(path).mapping


def _location(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


class GemCheckpointer(SafeDetectionCheckpointer):
    """``DetectionCheckpointer`` that stores what the model was built as, saves atomically and reads files as
    data only (weights-only torch loading; ``.pkl`` through a restricted unpickler, see ``gem_d2.utils.safe_load``).

    Args:
        model, save_dir, save_to_disk, checkpointables: as ``DetectionCheckpointer``.
        gem_mapping: the mapping the model was built with (``GemMapping.from_cfg``); ``None``
            disables the mapping and expert-layout checks on load (e.g. a model without GEM).
        router: ``MODEL.GEM.ROUTER``.
        label_space: ``checkpoint_records.label_space_record(cfg)``; ``None`` disables that check.

    Loading a checkpoint that records another label space (DATASETS.TRAIN order, class lists) or another
    router/MoE layout raises :class:`CheckpointLayoutError`; another GEM mapping raises
    :class:`MappingMismatchError`; both name config and checkpoint values. The model is already built
    here, so nothing can be adopted: ``MODEL.GEM.ADOPT_CHECKPOINT_LAYOUT`` / ``LOAD_CHECKPOINT_MAPPING``
    act in ``gem_d2.engine.resolve_gem_mapping`` before the model is built (tools/train_net.py does).
    Files without gem_d2's records (ImageNet or detectron2 weights) load as in detectron2.

    ``--resume`` (``resume_or_load(..., resume=True)``) loads :func:`resume_checkpoint`'s choice.
    ``last_checkpoint`` is ``(path, iteration)`` of the file last saved or loaded here (None before).
    """

    def __init__(self, model, save_dir: str = "", *, gem_mapping: Optional[GemMapping] = None, router: str = "",
                 label_space: Optional[Dict[str, list]] = None, save_to_disk: Optional[bool] = None,
                 **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.gem_mapping = gem_mapping
        self.router = router
        self.label_space = label_space
        self.last_checkpoint: Optional[Tuple[str, Optional[int]]] = None
        self._refuse_reason: Optional[str] = None

    @classmethod
    def from_config(cls, cfg: CfgNode, model, save_dir: Optional[str] = None, **checkpointables) -> GemCheckpointer:
        """A checkpointer for a model built from ``cfg`` (its mapping, router and label space)."""
        return cls(model, cfg.OUTPUT_DIR if save_dir is None else save_dir, gem_mapping=GemMapping.from_cfg(cfg),
                   router=str(cfg.MODEL.GEM.ROUTER), label_space=label_space_record(cfg), **checkpointables)

    # ------------------------------------------------------------------------------------------ saving
    def refuse_saves(self, reason: str) -> None:
        """Make every later :meth:`save` raise ``TrainingDivergedError(reason)`` (set when training diverged)."""
        self._refuse_reason = reason

    def save(self, name: str, **kwargs: Any) -> None:
        """Write ``<save_dir>/<name>.pth`` atomically, with the GEM keys, then tag it as the last checkpoint.

        Raises :class:`TrainingDivergedError` (nothing written, ``last_checkpoint`` not moved) after
        :meth:`refuse_saves` or when a model parameter holds NaN/inf.
        """
        if not self.save_dir or not self.save_to_disk:
            return
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        if os.path.basename(save_file) != basename:
            raise ValueError(f"checkpoint name {name!r} must not contain a path separator")
        at = f" (iteration {kwargs['iteration']})" if "iteration" in kwargs else ""
        if self._refuse_reason is not None:
            raise TrainingDivergedError(f"refusing to save {save_file}{at}: {self._refuse_reason}")
        bad = non_finite_parameters(self.model)
        if bad:
            raise TrainingDivergedError(
                f"refusing to save {save_file}{at}: the model has non-finite (NaN/inf) parameters: "
                f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} ({len(bad)} tensors)")
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data[MAPPING_KEY] = None if self.gem_mapping is None else self.gem_mapping.to_record()
        data[ROUTER_KEY] = self.router
        if self.label_space is not None:
            data[LABEL_SPACE_KEY] = self.label_space
        data.update(kwargs)
        self.logger.info(f"Saving checkpoint to {save_file}")
        self._remove_stale_temp_files()
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)
        self.last_checkpoint = (_location(save_file), kwargs.get("iteration"))

    def _remove_stale_temp_files(self) -> None:
        # Only this process writes into save_dir, so a temp file already there was left by a run that
        # was killed mid-save (SIGKILL skips atomic_write's cleanup); the checkpoint it held never existed.
        for entry in os.listdir(self.save_dir) if os.path.isdir(self.save_dir) else []:
            if entry.startswith(".") and entry.endswith(".tmp") and (".pth." in entry or "last_checkpoint" in entry):
                self.logger.info(f"Removing {entry}, a partial write of a killed run")
                os.unlink(os.path.join(self.save_dir, entry))

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Point ``<save_dir>/last_checkpoint`` at ``last_filename_basename``, atomically."""
        atomic_write(os.path.join(self.save_dir, "last_checkpoint"),
                     lambda f: f.write(last_filename_basename), binary=False)

    # ----------------------------------------------------------------------------------------- loading
    def get_checkpoint_file(self) -> str:
        """The checkpoint ``--resume`` loads: :func:`resume_checkpoint` (skips an unreadable newest one)."""
        return resume_checkpoint(self.save_dir)

    def has_checkpoint(self) -> bool:
        """Whether ``--resume`` has a readable checkpoint to continue from."""
        return bool(self.get_checkpoint_file())

    def load(self, path: str, checkpointables=None) -> Dict[str, Any]:
        extra = super().load(path, checkpointables)
        if path:
            iteration = extra.get("iteration") if isinstance(extra, dict) else None
            self.last_checkpoint = (_location(path), iteration if isinstance(iteration, int) else None)
        return extra

    def _load_model(self, checkpoint: Dict[str, Any]):
        record = checkpoint.pop(MAPPING_KEY, None)
        router = checkpoint.pop(ROUTER_KEY, None)
        space = checkpoint.pop(LABEL_SPACE_KEY, None)
        if space is not None and self.label_space is not None:
            diffs = label_space_diffs(self.label_space, space)
            if diffs:
                raise CheckpointLayoutError(
                    "The checkpoint's label space disagrees with the config the model was built from (config vs "
                    "checkpoint):\n  " + "\n  ".join(diffs) + f"\nClass rows would mean other classes. {ADOPT_KEY} "
                    "True takes the checkpoint's DATASETS.TRAIN order before the model is built (tools/train_net.py, "
                    "resolve_gem_mapping); different class lists cannot be adopted.")
        found = None if record is None else GemMapping.from_record(record, source=f"checkpoint[{MAPPING_KEY!r}]")
        ckpt_layout = checkpoint_layout(router, found)
        if ckpt_layout is not None and self.gem_mapping is not None:
            mine = {"router": self.router, "num_experts": self.gem_mapping.num_experts,
                    "moe_layers": list(self.gem_mapping.moe_layers)}
            diffs = layout_diffs(mine, ckpt_layout)
            if diffs:
                raise CheckpointLayoutError(
                    "The checkpoint's router/MoE layout disagrees with the config the model was built from (config "
                    "vs checkpoint):\n  " + "\n  ".join(diffs) + "\nIts MoE weights would not fit the model (they "
                    f"would stay randomly initialised). {ADOPT_KEY} True builds the model with the checkpoint's "
                    "layout (resolve_gem_mapping, before the model is built), or use the checkpoint's config.")
        if found is not None and self.gem_mapping is not None:
            diffs = self.gem_mapping.diff(found)
            if diffs:
                raise MappingMismatchError(
                    "The checkpoint's GEM mapping disagrees with the config the model was built from (config vs "
                    "checkpoint):\n  " + "\n  ".join(diffs)
                    + "\nSet MODEL.GEM.LOAD_CHECKPOINT_MAPPING True to take the checkpoint's mapping "
                    "(tools/train_net.py reads it before building the model), or load a matching checkpoint.")
        return super()._load_model(checkpoint)
