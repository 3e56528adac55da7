"""COCO-JSON datasets for gem_d2: detectron2's ``register_coco_instances`` plus the metadata gem_d2 needs."""
import os
from typing import Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_coco_instances

from gem_d2.data.catalog import GEM_EVALUATOR_TYPE, strip_split_suffix, unregister


def _load_with_name(json_file: str, image_root: str, name: str):
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"dataset '{name}': COCO annotation file not found: {json_file}")
    try:
        records = load_coco_json(json_file, image_root, name)
    except AssertionError as e:  # Metadata refuses a thing_classes different from the one given at registration
        given = MetadataCatalog.get(name).get("thing_classes")
        raise ValueError(f"dataset '{name}': the categories of {json_file} (sorted by id) differ from the "
                         f"class_names given at registration {given}: {e}") from e
    for r in records:
        r["dataset_name"] = name
    return records


def register_coco_dataset(
    name: str,
    json_file: str,
    image_root: str,
    class_names: Optional[Sequence[str]] = None,
    domain: Optional[str] = None,
) -> None:
    """Register a COCO-JSON detection dataset so it can go in ``DATASETS.TRAIN``/``TEST`` like a UODB one.

    Uses detectron2's ``register_coco_instances`` (so ``load_coco_json`` reads the file lazily and maps the
    JSON's category ids to contiguous ids in category-id order), then adds gem_d2's metadata:
    ``evaluator_type="gem_uodb"``, ``domain`` and, when ``class_names`` is given, ``thing_classes`` now (it
    must equal the JSON's category names sorted by id; otherwise they are set when the JSON is first read).
    Records carry ``dataset_name``. Re-registering a name replaces it.

    Args:
        name: dataset name, e.g. ``"mydomain_train"``.
        json_file: COCO instances JSON.
        image_root: folder the JSON's ``file_name`` entries are relative to.
        class_names: optional class list (category-id order), to avoid reading the JSON for the label space.
        domain: label-space domain (train/test of one domain share a class block); default: ``name`` minus a
            trailing ``_train``/``_val``/``_test``/``_minival``/... .
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty str, got {name!r}")
    json_file, image_root = os.fspath(json_file), os.fspath(image_root)
    unregister(name)
    register_coco_instances(name, {}, json_file, image_root)
    # register_coco_instances fixes evaluator_type="coco" and records lack dataset_name: rebuild both entries.
    meta = {k: v for k, v in MetadataCatalog.get(name).as_dict().items() if k not in ("name", "evaluator_type")}
    unregister(name)
    DatasetCatalog.register(name, lambda: _load_with_name(json_file, image_root, name))
    extra = {"thing_classes": [str(c) for c in class_names]} if class_names is not None else {}
    MetadataCatalog.get(name).set(**meta, evaluator_type=GEM_EVALUATOR_TYPE,
                                  domain=domain or strip_split_suffix(name), **extra)
