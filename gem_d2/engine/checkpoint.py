"""Checkpoints that carry the GEM mapping and unit prototypes, written atomically.

Format (model-zoo style, readable by a plain detectron2 ``DetectionCheckpointer``, which returns the
extra keys)::

    {"model": state_dict, "iteration": int, "trainer": {...} (training states, when saved by GemTrainer),
     "gem_mapping": {"units", "mapping", "mapping_weights", "num_experts", "router", "moe_layers"},
     "gem_prototypes": {"units": [str], "features": Tensor (U, D)} or None}

Only tensors and plain Python containers are stored, so ``torch.load(weights_only=True)`` reads them.
fvcore's ``Checkpointer.save`` and ``tag_last_checkpoint`` write in place, so a crash mid-write
leaves a truncated file that ``--resume`` would then pick; here both go to a temporary file in the
same folder first and are moved over the target with ``os.replace``.
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.utils import comm

from gem_d2.engine.launch import unwrap_model

__all__ = ["MAPPING_KEY", "PROTOTYPES_KEY", "GemCheckpointer", "gem_mapping_from_cfg", "mapping_differences",
           "normalize_prototypes", "read_checkpoint_gem", "atomic_write", "MappingMismatchError"]

MAPPING_KEY = "gem_mapping"
PROTOTYPES_KEY = "gem_prototypes"
_COMPARED_FIELDS = ("units", "mapping", "mapping_weights", "num_experts", "moe_layers")
logger = logging.getLogger(__name__)


class MappingMismatchError(ValueError):
    """A checkpoint's GEM mapping or expert layout disagrees with the config the model was built from."""


def atomic_write(path: str, write: Callable[[Any], None], binary: bool = True) -> None:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync it, then ``os.replace`` it onto ``path``.

    On any failure the temporary file is removed and ``path`` keeps its previous content.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable; not possible on every platform/filesystem
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def gem_mapping_from_cfg(cfg: CfgNode) -> Dict[str, Any]:
    """The ``gem_mapping`` record of a config: MODEL.GEM's mapping and expert layout as plain lists."""
    g = cfg.MODEL.GEM
    return _normalize_mapping({
        "units": g.UNITS, "mapping": g.MAPPING, "mapping_weights": g.MAPPING_WEIGHTS,
        "num_experts": g.NUM_EXPERTS, "router": g.ROUTER, "moe_layers": g.MOE_LAYERS,
    }, source="MODEL.GEM")


def _normalize_mapping(record: Dict[str, Any], source: str) -> Dict[str, Any]:
    try:
        return {
            "units": [str(u) for u in record.get("units", [])],
            "mapping": [[int(e) for e in experts] for experts in record.get("mapping", [])],
            "mapping_weights": [[float(w) for w in ws] for ws in record.get("mapping_weights", [])],
            "num_experts": int(record.get("num_experts", 0)),
            "router": str(record.get("router", "")),
            "moe_layers": [str(n) for n in record.get("moe_layers", [])],
        }
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: malformed GEM mapping {record!r}: expected units [str], mapping [[int]], "
                         f"mapping_weights [[float]], num_experts int, router str, moe_layers [str] ({e})") from e


def mapping_differences(expected: Dict[str, Any], found: Dict[str, Any]) -> List[str]:
    """Human-readable list of the compared fields (units, mapping, weights, experts, layers) that differ."""
    diffs = []
    for key in _COMPARED_FIELDS:
        a, b = expected.get(key), found.get(key)
        if key == "mapping_weights":
            same = len(a) == len(b) and all(len(x) == len(y) and np.allclose(x, y, rtol=0, atol=1e-6)
                                            for x, y in zip(a, b))
        else:
            same = a == b
        if not same:
            diffs.append(f"{key}: config={a!r} vs checkpoint={b!r}")
    return diffs


def normalize_prototypes(prototypes: Any, units: Optional[List[str]] = None) -> Optional[Dict[str, Any]]:
    """``{"units": [str], "features": float32 Tensor (U, D)}`` from a dict, array or tensor (``None`` stays None)."""
    if prototypes is None:
        return None
    if isinstance(prototypes, dict):
        units = list(prototypes.get("units", units or []))
        features = prototypes.get("features", prototypes.get("prototypes"))
    else:
        features = prototypes
    if features is None:
        raise ValueError(f"unit prototypes {type(prototypes).__name__} without 'features': expected an array (U, D)")
    features = torch.as_tensor(np.asarray(features), dtype=torch.float32).detach().cpu()
    if features.ndim != 2:
        raise ValueError(f"unit prototypes have shape {tuple(features.shape)}: expected (units, feature_dim)")
    units = [str(u) for u in (units or [])]
    if units and len(units) != features.shape[0]:
        raise ValueError(f"unit prototypes: {features.shape[0]} rows for {len(units)} units {units}")
    return {"units": units, "features": features}


def read_checkpoint_gem(path: str) -> Dict[str, Any]:
    """The ``gem_mapping``/``gem_prototypes`` of a checkpoint file, without building a model.

    Returns ``{}`` for files that are not gem_d2 checkpoints (e.g. ImageNet backbones, ``.pkl``).
    """
    from detectron2.utils.file_io import PathManager

    local = PathManager.get_local_path(path)
    if not os.path.isfile(local):
        raise FileNotFoundError(f"checkpoint {path!r} not found (MODEL.WEIGHTS or OUTPUT_DIR/last_checkpoint)")
    if not local.endswith((".pth", ".pt")):
        return {}
    try:
        data = torch.load(local, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
        data = torch.load(local, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or MAPPING_KEY not in data:
        return {}
    out = {MAPPING_KEY: _normalize_mapping(data[MAPPING_KEY], source=f"{path}[{MAPPING_KEY!r}]")}
    out[PROTOTYPES_KEY] = normalize_prototypes(data.get(PROTOTYPES_KEY))
    return out


class GemCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that stores the GEM mapping and prototypes and saves atomically.

    Args:
        model, save_dir, save_to_disk, checkpointables: as ``DetectionCheckpointer``.
        gem_mapping: the record the model was built with (:func:`gem_mapping_from_cfg`); ``None``
            disables the check on load (e.g. a model without GEM).
        gem_prototypes: unit prototypes to store (:func:`normalize_prototypes` input) or ``None``.

    Loading a checkpoint whose ``gem_mapping`` differs from ``gem_mapping`` in units, mapping,
    weights, expert count or MoE layers raises :class:`MappingMismatchError` naming both. (To take the
    checkpoint's mapping instead, set ``MODEL.GEM.LOAD_CHECKPOINT_MAPPING``: tools/train_net.py then
    puts it into the config before the model is built, see ``gem_d2.engine.resolve_gem_mapping``.)
    Prototypes found in a loaded checkpoint replace missing ones and are handed to the model's
    ``set_unit_prototypes(units, features)`` when it has one.
    """

    def __init__(self, model, save_dir: str = "", *, gem_mapping: Optional[Dict[str, Any]] = None,
                 gem_prototypes: Any = None, save_to_disk: Optional[bool] = None, **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.gem_mapping = None if gem_mapping is None else _normalize_mapping(gem_mapping, "gem_mapping")
        units = self.gem_mapping["units"] if self.gem_mapping else None
        self.gem_prototypes = normalize_prototypes(gem_prototypes, units)

    @classmethod
    def from_config(cls, cfg: CfgNode, model, save_dir: Optional[str] = None, prototypes: Any = None,
                    **checkpointables) -> GemCheckpointer:
        """A checkpointer for a model built from ``cfg``; prototypes default to ``MODEL.GEM.PROTOTYPES`` (.npz).

        Only the process that writes checkpoints (the main one) reads the prototypes file, so other
        machines of a multi-machine job need no copy of it.
        """
        save_to_disk = checkpointables.pop("save_to_disk", None)
        writes = comm.is_main_process() if save_to_disk is None else save_to_disk
        if prototypes is None and cfg.MODEL.GEM.PROTOTYPES and writes:
            prototypes = load_prototypes_file(cfg.MODEL.GEM.PROTOTYPES)
        return cls(model, cfg.OUTPUT_DIR if save_dir is None else save_dir, gem_mapping=gem_mapping_from_cfg(cfg),
                   gem_prototypes=prototypes, save_to_disk=save_to_disk, **checkpointables)

    def save(self, name: str, **kwargs: Any) -> None:
        """Write ``<save_dir>/<name>.pth`` atomically, with the GEM keys, then tag it as the last checkpoint."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data[MAPPING_KEY] = self.gem_mapping
        data[PROTOTYPES_KEY] = self.gem_prototypes
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
        found = checkpoint.pop(MAPPING_KEY, None)
        prototypes = checkpoint.pop(PROTOTYPES_KEY, None)
        if found is not None and self.gem_mapping is not None:
            found = _normalize_mapping(found, source=f"checkpoint[{MAPPING_KEY!r}]")
            diffs = mapping_differences(self.gem_mapping, found)
            if diffs:
                raise MappingMismatchError(
                    "The checkpoint's GEM mapping disagrees with the config the model was built from:\n  "
                    + "\n  ".join(diffs)
                    + "\nSet MODEL.GEM.LOAD_CHECKPOINT_MAPPING True to take the checkpoint's mapping "
                    "(tools/train_net.py reads it before building the model), or load a matching checkpoint.")
            if found["router"] != self.gem_mapping["router"]:
                self.logger.warning(f"Checkpoint was trained with router {found['router']!r}, "
                                    f"config uses {self.gem_mapping['router']!r}")
        if prototypes is not None:
            prototypes = normalize_prototypes(prototypes)
            if self.gem_prototypes is None:
                self.gem_prototypes = prototypes
            setter = getattr(unwrap_model(self.model), "set_unit_prototypes", None)
            if callable(setter):
                setter(prototypes["units"], prototypes["features"])
        return super()._load_model(checkpoint)


def load_prototypes_file(path: str) -> Dict[str, Any]:
    """Read unit prototypes from an ``.npz`` with arrays ``units`` (U,) and ``features`` (U, D)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "features" not in npz:
                raise ValueError(f"{path}: no array 'features' (found {sorted(npz.files)}): "
                                 "expected 'units' (U,) and 'features' (U, D)")
            units = [str(u) for u in npz["units"]] if "units" in npz else []
            return normalize_prototypes({"units": units, "features": npz["features"]})
    except (OSError, ValueError) as e:
        raise ValueError(f"MODEL.GEM.PROTOTYPES={path!r}: cannot read unit prototypes ({e})") from e
