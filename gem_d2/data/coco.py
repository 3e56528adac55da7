"""COCO-JSON datasets for gem_d2, read with the same rules as the VOC-layout reader.

:func:`load_coco_instances` returns what detectron2's ``load_coco_json`` returns for detection (records
sorted by image id, ``bbox`` in ``XYWH_ABS``, ``category_id`` contiguous in category-id order,
``iscrowd`` kept) and checks the file first. Errors name the JSON file and the entry:

- malformed JSON; a top level that is not an object; ``images``/``categories`` missing or not lists;
- an image without an integer/string ``id``, a ``file_name`` that is not a relative path inside
  ``image_root`` (``../`` or an absolute path elsewhere), a non-finite or non-positive ``height``/``width``;
- a duplicate image id or category id; a duplicate annotation id (except in files whose name contains
  ``minival``: COCO 2014's minival / valminusminival files have them, and detectron2 accepts them too);
- an annotation without ``id``, without ``bbox``, with a ``bbox`` that is not 4 numbers, with a
  ``category_id`` not in ``categories``, with ``iscrowd`` other than 0/1 or a non-zero ``ignore``.

Boxes then follow :func:`gem_d2.data.voc.validate_box` in COCO's continuous coordinates (the image spans
``[0, width] x [0, height]``): NaN/inf boxes and boxes of zero/negative width or height are dropped,
boxes are clipped to the image, all counted in :class:`~gem_d2.data.voc.VocLoadStats` (metadata
``load_stats``) and logged. Annotations of an image id the file does not list are skipped and counted
(``dropped_no_image``), as detectron2 skips them. Detection only: ``segmentation`` and ``keypoints`` are
not read.
"""
import json
import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from gem_d2.data.catalog import GEM_EVALUATOR_TYPE, strip_split_suffix, unregister
from gem_d2.data.errors import DatasetFormatError
from gem_d2.data.voc import VocLoadStats, _log_stats, validate_box

logger = logging.getLogger(__name__)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def resolve_inside(root: str, relative: str) -> Optional[str]:
    """``os.path.join(root, relative)`` when it stays inside ``root`` (lexically, after ``..``), else None.

    Symbolic links inside ``root`` are not followed: datasets are often assembled from links to elsewhere.
    """
    joined = os.path.join(root, relative)
    base = os.path.normpath(os.path.abspath(root))
    target = os.path.normpath(os.path.abspath(joined))
    if target == base or os.path.commonpath([base, target]) != base:
        return None
    return joined


def _read_json(json_file: str) -> Dict[str, Any]:
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO annotation file not found: {json_file}")
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetFormatError(f"malformed JSON in {json_file}: {e}") from None
    if not isinstance(data, dict):
        raise DatasetFormatError(f"{json_file}: the top level is a {type(data).__name__}, expected a COCO object "
                                 f"with 'images', 'annotations' and 'categories'")
    return data


def _list(data: dict, key: str, json_file: str, required: bool) -> list:
    if key not in data:
        if required:
            raise DatasetFormatError(f"{json_file}: no '{key}' list")
        return []
    value = data[key]
    if not isinstance(value, list):
        raise DatasetFormatError(f"{json_file}: '{key}' is a {type(value).__name__}, expected a list")
    return value


def _categories(categories: list, json_file: str) -> Dict[int, str]:
    names: Dict[int, str] = {}
    for k, c in enumerate(categories):
        if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str):
            raise DatasetFormatError(f"{json_file}: categories[{k}] must be an object with an integer 'id' and a "
                                     f"string 'name', got {c!r}")
        if c["id"] in names:
            raise DatasetFormatError(f"{json_file}: duplicate category id {c['id']} (categories[{k}])")
        names[c["id"]] = c["name"]
    if not names:
        raise DatasetFormatError(f"{json_file}: 'categories' is empty")
    return names


def _size(img: dict, key: str, where: str) -> int:
    v = img.get(key)
    if not _is_number(v) or not math.isfinite(v) or v <= 0 or v != int(v):
        raise DatasetFormatError(f"{where}: '{key}' must be a positive integer, got {v!r}")
    return int(v)


def _images(images: list, json_file: str, image_root: str) -> Dict[Any, dict]:
    records: Dict[Any, dict] = {}
    position: Dict[Any, int] = {}
    for k, img in enumerate(images):
        if not isinstance(img, dict):
            raise DatasetFormatError(f"{json_file}: images[{k}] is a {type(img).__name__}, expected an object")
        image_id = img.get("id")
        if not (_is_int(image_id) or isinstance(image_id, str)):
            raise DatasetFormatError(f"{json_file}: images[{k}] has no integer or string 'id' (got {image_id!r})")
        where = f"{json_file}: image id {image_id!r} (images[{k}])"
        if image_id in records:
            raise DatasetFormatError(f"{json_file}: duplicate image id {image_id!r} (images[{position[image_id]}] and "
                                     f"images[{k}]); each image must appear once")
        file_name = img.get("file_name")
        if not isinstance(file_name, str) or not file_name.strip():
            raise DatasetFormatError(f"{where}: 'file_name' must be a non-empty string, got {file_name!r}")
        path = resolve_inside(image_root, file_name)
        if path is None:
            raise DatasetFormatError(f"{where}: file_name {file_name!r} resolves outside the image root {image_root}; "
                                     f"file names must be relative paths inside it")
        records[image_id] = {"file_name": path, "height": _size(img, "height", where),
                             "width": _size(img, "width", where), "image_id": image_id, "annotations": []}
        position[image_id] = k
    return records


def _annotation_box(ann: dict, where: str) -> List[float]:
    if "bbox" not in ann:
        raise DatasetFormatError(f"{where}: no 'bbox'")
    bbox = ann["bbox"]
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise DatasetFormatError(f"{where}: 'bbox' must be 4 numbers [x, y, width, height], got {bbox!r}")
    return [float(v) for v in bbox]


def load_coco_instances(json_file: str, image_root: str, dataset_name: Optional[str] = None
                        ) -> Tuple[List[dict], VocLoadStats, List[str], Dict[int, int]]:
    """Read and check a COCO instances JSON (rules in this module's doc).

    Args:
        json_file: the COCO JSON.
        image_root: folder the images' ``file_name`` are relative to (and must stay inside).
        dataset_name: stored as ``"dataset_name"`` in every record and used in log messages.

    Returns:
        ``(records, stats, thing_classes, id_map)``: detectron2 dataset dicts sorted by image id; the
        load's :class:`VocLoadStats`; category names in category-id order; category id -> contiguous id.
    """
    json_file, image_root = os.fspath(json_file), os.fspath(image_root)
    data = _read_json(json_file)
    names = _categories(_list(data, "categories", json_file, required=True), json_file)
    id_map = {cid: i for i, cid in enumerate(sorted(names))}
    thing_classes = [names[cid] for cid in sorted(names)]
    records = _images(_list(data, "images", json_file, required=True), json_file, image_root)
    exempt = "minival" in os.path.basename(json_file)  # COCO 2014 minival files repeat annotation ids
    stats, seen, duplicates = VocLoadStats(), {}, 0
    for k, ann in enumerate(_list(data, "annotations", json_file, required=False)):
        if not isinstance(ann, dict):
            raise DatasetFormatError(f"{json_file}: annotations[{k}] is a {type(ann).__name__}, expected an object")
        ann_id = ann.get("id")
        if not (_is_int(ann_id) or isinstance(ann_id, str)):
            raise DatasetFormatError(f"{json_file}: annotations[{k}] has no integer or string 'id' (got {ann_id!r})")
        where = f"{json_file}: annotation id {ann_id!r} (annotations[{k}])"
        if ann_id in seen:
            if not exempt:
                raise DatasetFormatError(f"{json_file}: duplicate annotation id {ann_id!r} (annotations["
                                         f"{seen[ann_id]}] and annotations[{k}]); annotation ids must be unique")
            duplicates += 1
        else:
            seen[ann_id] = k
        bbox = _annotation_box(ann, where)
        category = ann.get("category_id")
        if not _is_int(category) or category not in id_map:
            raise DatasetFormatError(f"{where}: category_id {category!r} is not an id of the file's categories "
                                     f"{sorted(id_map)}")
        iscrowd = ann.get("iscrowd", 0)
        if not _is_number(iscrowd) or iscrowd not in (0, 1):
            raise DatasetFormatError(f"{where}: 'iscrowd' must be 0 or 1, got {iscrowd!r}")
        if ann.get("ignore", 0):
            raise DatasetFormatError(f"{where}: 'ignore' is not supported (use iscrowd 1 for boxes to ignore)")
        record = records.get(ann.get("image_id"))
        if record is None:
            stats.dropped_no_image += 1
            continue
        x, y, w, h = bbox
        kept = validate_box([x, y, x + w, y + h], record["width"], record["height"], stats, pixel_inclusive=False)
        if kept is None:
            continue
        if kept != [x, y, x + w, y + h]:  # clipped: back to XYWH; unchanged boxes keep their exact values
            bbox = [kept[0], kept[1], kept[2] - kept[0], kept[3] - kept[1]]
        obj = {"bbox": bbox, "bbox_mode": BoxMode.XYWH_ABS, "category_id": id_map[category]}
        if "iscrowd" in ann:
            obj["iscrowd"] = int(iscrowd)
        stats.boxes += 1
        stats.difficult += int(iscrowd)
        record["annotations"].append(obj)
    out = [records[i] for i in sorted(records, key=lambda i: (isinstance(i, str), i))]
    if dataset_name is not None:
        for r in out:
            r["dataset_name"] = dataset_name
    stats.images = len(out)
    stats.loaded = True
    label = dataset_name or json_file
    if duplicates:
        logger.warning(f"{label}: {duplicates} repeated annotation ids in {json_file}, accepted for COCO 2014 "
                       f"minival files (every annotation is kept)")
    _log_stats(label, stats)
    return out, stats, thing_classes, id_map


def _load_with_name(json_file: str, image_root: str, name: str, stats_holder: VocLoadStats):
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"dataset '{name}': COCO annotation file not found: {json_file}")
    records, stats, thing_classes, id_map = load_coco_instances(json_file, image_root, name)
    meta = MetadataCatalog.get(name)
    given = meta.get("thing_classes")
    if given is not None and list(given) != thing_classes:
        raise ValueError(f"dataset '{name}': the categories of {json_file} (sorted by id) {thing_classes} differ "
                         f"from the class_names given at registration {list(given)}")
    if given is None:
        meta.thing_classes = thing_classes
    known = meta.get("thing_dataset_id_to_contiguous_id")
    if known is not None and dict(known) != id_map:
        raise ValueError(f"dataset '{name}': the category ids of {json_file} changed since it was first read "
                         f"({dict(known)} -> {id_map}); register the dataset again")
    if known is None:
        meta.thing_dataset_id_to_contiguous_id = id_map
    stats_holder.update(stats)
    return records


def register_coco_dataset(
    name: str,
    json_file: str,
    image_root: str,
    class_names: Optional[Sequence[str]] = None,
    domain: Optional[str] = None,
) -> None:
    """Register a COCO-JSON detection dataset so it can go in ``DATASETS.TRAIN``/``TEST`` like a UODB one.

    Nothing is read now; :func:`load_coco_instances` reads and checks the file on ``DatasetCatalog.get``
    (rules in this module's doc). Metadata: ``json_file``, ``image_root``, ``evaluator_type="gem_uodb"``,
    ``domain``, ``load_stats`` (:class:`~gem_d2.data.voc.VocLoadStats`, filled by each load) and, when
    ``class_names`` is given, ``thing_classes`` now (it must equal the JSON's category names sorted by id;
    otherwise they are set, with ``thing_dataset_id_to_contiguous_id``, when the JSON is first read).
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
    stats = VocLoadStats()
    unregister(name)
    DatasetCatalog.register(name, lambda: _load_with_name(json_file, image_root, name, stats))
    extra = {"thing_classes": [str(c) for c in class_names]} if class_names is not None else {}
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type=GEM_EVALUATOR_TYPE,
                                  domain=domain or strip_split_suffix(name), load_stats=stats, **extra)
