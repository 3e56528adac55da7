"""Small helpers around detectron2's DatasetCatalog/MetadataCatalog shared by gem_d2's registrations.

- ``datasets_root(cfg)``: where datasets live (``cfg.DATASETS.UODB_ROOT``, else ``$DETECTRON2_DATASETS``,
  else ``./datasets``, detectron2's convention).
- ``unregister(name)``: drop a dataset and its metadata so it can be registered again (e.g. under another root).
- ``require_registered(name)``: a clear error for an unknown dataset name.
- ``dataset_domain(name)``: the label-space domain of a dataset. Datasets of one domain (typically the
  train and test splits of one dataset) share one block of the unified label space.
"""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

GEM_EVALUATOR_TYPE = "gem_uodb"  # evaluator_type of every dataset registered by gem_d2

# Trailing "_<split>" words stripped from a dataset name to get its domain when none was recorded.
_SPLIT_WORDS = ("train", "val", "test", "trainval", "minival", "valminusminival", "valid", "validation")


class UnknownDatasetError(KeyError):
    """A dataset name that is not registered (or not covered by the label space); a KeyError with a plain message."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def datasets_root(cfg=None) -> str:
    """Return the datasets root: ``cfg.DATASETS.UODB_ROOT`` if set, else ``$DETECTRON2_DATASETS``, else ``datasets``."""
    if cfg is not None:
        root = cfg.DATASETS.get("UODB_ROOT", "")
        if root:
            return os.path.expanduser(root)
    return os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def unregister(name: str) -> None:
    """Remove ``name`` from DatasetCatalog and MetadataCatalog if present (no error otherwise)."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)


def require_registered(name: str) -> None:
    """Raise a KeyError naming ``name`` (and the known gem_d2 datasets) if it is not a registered dataset."""
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__}: {name!r}")
    registered = DatasetCatalog.list()
    if name not in registered:
        ours = sorted(n for n in registered if n.startswith(("uodb_", "synth_")))
        raise UnknownDatasetError(
            f"dataset '{name}' is not registered. Register it with gem_d2.data.register_voc_dataset / "
            f"register_coco_dataset (or detectron2's DatasetCatalog). gem_d2 datasets: {', '.join(ours)}"
        )


def strip_split_suffix(name: str) -> str:
    """``"foo_train"`` -> ``"foo"``; a name without a known split word at the end is returned unchanged."""
    head, sep, tail = name.rpartition("_")
    if sep and head and tail in _SPLIT_WORDS:
        return head
    return name


def dataset_domain(name: str) -> str:
    """The domain of dataset ``name``: its metadata ``domain`` if recorded, else the name minus a split suffix."""
    require_registered(name)
    domain = MetadataCatalog.get(name).get("domain")
    return domain if domain else strip_split_suffix(name)
