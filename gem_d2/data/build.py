"""Train/test data loaders over several datasets, built from detectron2's loaders with gem_d2's sampler and mapper."""
import logging
from typing import Dict, List, Sequence

from detectron2.data import DatasetCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.data.build import build_batch_data_loader, filter_images_with_only_crowd_annotations
from detectron2.data.common import DatasetFromList, MapDataset, ToIterableDataset
from detectron2.utils import comm

from gem_d2.data.catalog import require_registered
from gem_d2.data.mapper import GemDatasetMapper
from gem_d2.data.sampler import MultiDatasetTrainingSampler, WorkerChunkSampler, sampling_probabilities

logger = logging.getLogger(__name__)


def load_gem_datasets(names: Sequence[str], filter_empty: bool = False) -> List[List[dict]]:
    """Load each named dataset (one list of records per name), with ``dataset_name`` set on every record.

    ``filter_empty`` drops images without non-crowd annotations (``DATALOADER.FILTER_EMPTY_ANNOTATIONS``).
    An unknown name or a dataset left without images raises an error naming it.
    """
    if isinstance(names, str):
        names = [names]
    out = []
    for name in names:
        require_registered(name)
        records = DatasetCatalog.get(name)
        for r in records:
            r.setdefault("dataset_name", name)
        if filter_empty:
            records = filter_images_with_only_crowd_annotations(records)
        if not records:
            what = "images with annotations" if filter_empty else "images"
            raise ValueError(f"dataset '{name}' has no {what}")
        out.append(records)
    return out


def _train_sizes(cfg) -> List[int]:
    per_dataset = load_gem_datasets(cfg.DATASETS.TRAIN, cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    return [len(d) for d in per_dataset]


def dataset_sampling_weights(cfg) -> Dict[str, float]:
    """Share of training draws per ``DATASETS.TRAIN`` dataset under the sampler: ``size^T / sum size^T``."""
    probs = sampling_probabilities(_train_sizes(cfg), cfg.DATALOADER.DATASET_TEMPERATURE)
    return {name: float(p) for name, p in zip(cfg.DATASETS.TRAIN, probs)}


def build_gem_train_loader(cfg, mapper=None):
    """Infinite training loader over ``DATASETS.TRAIN`` (``MultiDatasetTrainingSampler`` + ``GemDatasetMapper``).

    Honours ``SOLVER.IMS_PER_BATCH`` (total over ranks), ``DATALOADER.NUM_WORKERS``, ``DATASET_TEMPERATURE``,
    ``ONE_DATASET_PER_BATCH`` (then no aspect-ratio grouping), ``ASPECT_RATIO_GROUPING`` (mixed batches only),
    ``FILTER_EMPTY_ANNOTATIONS`` and ``SEED`` (< 0: a random seed shared by the ranks). Yields lists of
    mapped dicts, ``IMS_PER_BATCH / world_size`` per rank.
    """
    names = list(cfg.DATASETS.TRAIN)
    per_dataset = load_gem_datasets(names, cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    sizes = [len(d) for d in per_dataset]
    records = [r for d in per_dataset for r in d]
    if mapper is None:
        mapper = GemDatasetMapper(cfg, True)
    total = cfg.SOLVER.IMS_PER_BATCH
    world = comm.get_world_size()
    if total < 1 or total % world:
        raise ValueError(f"SOLVER.IMS_PER_BATCH={total} must be a positive multiple of the world size {world}")
    per_rank = total // world
    one_per_batch = bool(cfg.DATALOADER.ONE_DATASET_PER_BATCH)
    sampler = MultiDatasetTrainingSampler(
        sizes, temperature=cfg.DATALOADER.DATASET_TEMPERATURE, batch_size=per_rank,
        one_dataset_per_batch=one_per_batch, seed=cfg.SEED if cfg.SEED >= 0 else None)
    shares = ", ".join(f"{n}: {s} imgs, p={p:.3f}" for n, s, p in zip(names, sizes, sampler.probabilities))
    logger.info(f"multi-dataset sampler (T={cfg.DATALOADER.DATASET_TEMPERATURE}, "
                f"one_dataset_per_batch={one_per_batch}): {shares}")
    if not one_per_batch:
        return build_detection_train_loader(records, mapper=mapper, sampler=sampler, total_batch_size=total,
                                            aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
                                            num_workers=cfg.DATALOADER.NUM_WORKERS)
    dataset = MapDataset(DatasetFromList(records, copy=False), mapper)
    dataset = ToIterableDataset(dataset, WorkerChunkSampler(sampler, per_rank), shard_sampler=False)
    return build_batch_data_loader(dataset, None, total, aspect_ratio_grouping=False,
                                   num_workers=cfg.DATALOADER.NUM_WORKERS)


def build_gem_test_loader(cfg, dataset_name: str, mapper=None):
    """detectron2's test loader (batch 1, every image once across ranks) for one dataset, with ``GemDatasetMapper``."""
    records = load_gem_datasets([dataset_name], filter_empty=False)[0]
    if mapper is None:
        mapper = GemDatasetMapper(cfg, False)
    return build_detection_test_loader(records, mapper=mapper, num_workers=cfg.DATALOADER.NUM_WORKERS)
