"""Checkpoints that carry the GEM mapping, written atomically.

Format (model-zoo style, readable by a plain detectron2 ``DetectionCheckpointer``, which returns the
extra keys)::

    {"model": state_dict, "iteration": int, "trainer": {...} (training states, when saved by GemTrainer),
     "gem_mapping": GemMapping.to_record() (units, mapping, mapping_weights, num_experts, moe_layers),
     "gem_router": str (MODEL.GEM.ROUTER)}

Only tensors and plain Python containers are stored, so ``torch.load(weights_only=True)`` reads them.
fvcore's ``Checkpointer.save`` and ``tag_last_checkpoint`` write in place, so a crash mid-write
leaves a truncated file that ``--resume`` would then pick; here both go to a temporary file in the
same folder first and are moved over the target with ``os.replace``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional

import torch
from detectron2.config import CfgNode
from detectron2.utils.file_io import PathManager

from gem_d2.planner.mapping import GemMapping
from gem_d2.utils.files import atomic_write
from gem_d2.utils.safe_load import SafeDetectionCheckpointer, load_torch_file

__all__ = ["MAPPING_KEY", "ROUTER_KEY", "GemCheckpointer", "read_checkpoint_mapping", "MappingMismatchError"]

MAPPING_KEY = "gem_mapping"
ROUTER_KEY = "gem_router"
logger = logging.getLogger(__name__)


class MappingMismatchError(ValueError):
    """A checkpoint's GEM mapping or expert layout disagrees with the config the model was built from."""


def read_checkpoint_mapping(path: str) -> Optional[GemMapping]:
    """The GEM mapping stored in checkpoint ``path``, without building a model; None for files without one
    (ImageNet backbones, detectron2 ``.pkl`` files, checkpoints of models without MoE)."""
    local = PathManager.get_local_path(path)
    if not os.path.isfile(local):
        raise FileNotFoundError(f"checkpoint {path!r} not found (MODEL.WEIGHTS or OUTPUT_DIR/last_checkpoint)")
    if not local.endswith((".pth", ".pt")):
        return None
    data = load_torch_file(local, mmap=True)
    if not isinstance(data, dict) or data.get(MAPPING_KEY) is None:
        return None
    return GemMapping.from_record(data[MAPPING_KEY], source=f"{path}[{MAPPING_KEY!r}]")


class GemCheckpointer(SafeDetectionCheckpointer):
    """``DetectionCheckpointer`` that stores the GEM mapping, saves atomically and reads files as data only
    (weights-only torch loading; ``.pkl`` through a restricted unpickler, see ``gem_d2.utils.safe_load``).

    Args:
        model, save_dir, save_to_disk, checkpointables: as ``DetectionCheckpointer``.
        gem_mapping: the mapping the model was built with (``GemMapping.from_cfg``); ``None``
            disables the check on load (e.g. a model without GEM).
        router: ``MODEL.GEM.ROUTER``, stored so a load with another router warns.

    Loading a checkpoint whose ``gem_mapping`` differs from ``gem_mapping`` in units, mapping,
    weights, expert count or MoE layers raises :class:`MappingMismatchError` naming both. (To take the
    checkpoint's mapping instead, set ``MODEL.GEM.LOAD_CHECKPOINT_MAPPING``: tools/train_net.py then
    puts it into the config before the model is built, see ``gem_d2.engine.resolve_gem_mapping``.)
    """

    def __init__(self, model, save_dir: str = "", *, gem_mapping: Optional[GemMapping] = None, router: str = "",
                 save_to_disk: Optional[bool] = None, **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.gem_mapping = gem_mapping
        self.router = router

    @classmethod
    def from_config(cls, cfg: CfgNode, model, save_dir: Optional[str] = None, **checkpointables) -> GemCheckpointer:
        """A checkpointer for a model built from ``cfg`` (its mapping and router)."""
        return cls(model, cfg.OUTPUT_DIR if save_dir is None else save_dir, gem_mapping=GemMapping.from_cfg(cfg),
                   router=str(cfg.MODEL.GEM.ROUTER), **checkpointables)

    def save(self, name: str, **kwargs: Any) -> None:
        """Write ``<save_dir>/<name>.pth`` atomically, with the GEM keys, then tag it as the last checkpoint."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data[MAPPING_KEY] = None if self.gem_mapping is None else self.gem_mapping.to_record()
        data[ROUTER_KEY] = self.router
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        if os.path.basename(save_file) != basename:
            raise ValueError(f"checkpoint name {name!r} must not contain a path separator")
        self.logger.info(f"Saving checkpoint to {save_file}")
        self._remove_stale_temp_files()
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

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

    def _load_model(self, checkpoint: Dict[str, Any]):
        record = checkpoint.pop(MAPPING_KEY, None)
        router = checkpoint.pop(ROUTER_KEY, None)
        if record is not None and self.gem_mapping is not None:
            found = GemMapping.from_record(record, source=f"checkpoint[{MAPPING_KEY!r}]")
            diffs = self.gem_mapping.diff(found)
            if diffs:
                raise MappingMismatchError(
                    "The checkpoint's GEM mapping disagrees with the config the model was built from (config vs "
                    "checkpoint):\n  " + "\n  ".join(diffs)
                    + "\nSet MODEL.GEM.LOAD_CHECKPOINT_MAPPING True to take the checkpoint's mapping "
                    "(tools/train_net.py reads it before building the model), or load a matching checkpoint.")
        if router and self.router and router != self.router:
            self.logger.warning(f"Checkpoint was trained with router {router!r}, config uses {self.router!r}")
        return super()._load_model(checkpoint)
