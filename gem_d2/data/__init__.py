"""gem_d2.data: UODB and generated datasets, unified label space, mapper and multi-dataset sampler/loaders.

Importing it registers, lazily (nothing is read until ``DatasetCatalog.get``):

- the 11 UODB datasets ``uodb_<name>_<split>`` under ``$DETECTRON2_DATASETS`` (default ``datasets``), see
  :mod:`gem_d2.data.uodb` for the names and folder layout; ``register_uodb(root)`` moves them;
- the generated datasets ``synth_<domain>_train|test`` under ``<that root>/gem_synth``, see
  :mod:`gem_d2.data.synthetic`; ``ensure_synthetic(cfg)`` generates and re-registers them per config.

The tools make a config's datasets available with ``gem_d2.engine.setup.prepare_datasets(cfg)`` (the one
registration path: generates the ``synth_*`` data if used, registers UODB under ``DATASETS.UODB_ROOT``).

Your own datasets: :func:`register_voc_dataset` (UODB/VOC layout) or :func:`register_coco_dataset` (COCO JSON).
"""
from gem_d2.data.build import build_gem_test_loader, build_gem_train_loader, dataset_sampling_weights, load_gem_datasets
from gem_d2.data.catalog import UnknownDatasetError, dataset_domain, datasets_root
from gem_d2.data.coco import register_coco_dataset
from gem_d2.data.errors import DatasetFormatError
from gem_d2.data.fewshot import few_shot_name, few_shot_records, register_few_shot, register_few_shot_names
from gem_d2.data.label_space import UnifiedLabelSpace, dataset_classes
from gem_d2.data.mapper import GemDatasetMapper, ImageReadError, read_image_checked
from gem_d2.data.sampler import MultiDatasetTrainingSampler, sampling_probabilities
from gem_d2.data.summary import summarize_datasets
from gem_d2.data.synthetic import (
    DOMAIN_CLASSES,
    DOMAIN_IMAGE_EXT,
    DOMAINS,
    RARE_DOMAIN,
    ensure_synthetic,
    generate_synthetic,
    register_synthetic,
    synthetic_root,
)
from gem_d2.data.uodb import UODB_DATASETS, register_uodb, uodb_dataset_names
from gem_d2.data.voc import (
    VocLoadStats,
    load_voc_instances,
    register_voc_dataset,
    register_voc_sources,
)

__all__ = [
    "few_shot_name", "few_shot_records", "register_few_shot", "register_few_shot_names",
    "DOMAINS", "DOMAIN_CLASSES", "DOMAIN_IMAGE_EXT", "RARE_DOMAIN", "UODB_DATASETS", "DatasetFormatError",
    "GemDatasetMapper", "ImageReadError", "MultiDatasetTrainingSampler", "UnifiedLabelSpace", "UnknownDatasetError",
    "VocLoadStats", "build_gem_test_loader", "build_gem_train_loader", "dataset_classes", "dataset_domain",
    "dataset_sampling_weights", "datasets_root", "ensure_synthetic", "generate_synthetic", "load_gem_datasets",
    "load_voc_instances", "read_image_checked", "register_coco_dataset",
    "register_synthetic", "register_uodb", "register_voc_dataset",
    "register_voc_sources", "sampling_probabilities", "summarize_datasets", "synthetic_root", "uodb_dataset_names",
]

register_uodb(datasets_root())
register_synthetic(synthetic_root())
