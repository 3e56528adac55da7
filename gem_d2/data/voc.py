"""Reader and registration for datasets in the UODB / Pascal-VOC folder layout.

Layout of one dataset root::

    <root>/ImageSets/Main/<split>.txt    one image id per line
    <root>/Annotations/<id>.xml          VOC XML
    <root>/JPEGImages/<id>.jpg|.png      the image (extension fixed, or detected per image)

Parsing rules (those of the UODB reference code):

- ``object/name`` is lower-cased and stripped before it is matched against the class list. Objects whose
  name is **not in the class list are dropped** (the reference code keeps them as background, which a
  set-prediction detector has no target for) and counted per name in :class:`VocLoadStats`, logged.
- Coordinates are 1-based: ``coordinate_offset`` (1 by default) is subtracted from all four; boxes are
  ``XYXY_ABS`` in 0-based pixel indices (inclusive), the reference convention.
- ``difficult`` (missing -> 0) is kept and stored as ``"difficult": 0|1`` in each annotation dict.
- Boxes follow :func:`validate_box` (shared with the COCO-JSON reader): a box with a NaN/inf coordinate
  is dropped; a box with ``x2 <= x1`` or ``y2 <= y1`` is dropped; a box outside the image is clipped to
  ``[0, width-1] x [0, height-1]``; a box empty after clipping is dropped. Each is counted in
  :class:`VocLoadStats` and logged.
- Height/width come from ``<size>`` when present and positive, else from the image header; a NaN/inf
  ``<size>`` is an error naming the file and line.
- The split file must list each id once, and ids must be plain file names (no ``/``, not ``.``/``..``),
  so every file read stays inside the dataset root; otherwise an error names the split file and the id.
- Missing files, malformed XML, an empty split file or unparsable fields raise an error naming the file
  (XML content: ``file:line``, from the one VOC XML reader, :mod:`gem_d2.data.voc_xml`, which the UODB
  converters share).
"""
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image

from gem_d2.data.catalog import GEM_EVALUATOR_TYPE, strip_split_suffix, unregister
from gem_d2.data.errors import DatasetFormatError
from gem_d2.data.voc_xml import read_xml, voc_boxes, voc_size

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".bmp")  # tried in this order when image_ext is None


@dataclass
class VocLoadStats:
    """What one load of a dataset kept, changed and skipped (VOC layout and COCO JSON alike).

    Filled in place on every ``DatasetCatalog.get`` (registered datasets keep one in metadata ``load_stats``).
    """

    images: int = 0
    boxes: int = 0  # boxes kept
    difficult: int = 0  # kept boxes flagged difficult (COCO: iscrowd)
    dropped_unknown: Dict[str, int] = field(default_factory=dict)  # class name -> boxes dropped
    clipped: int = 0  # kept boxes that were clipped to the image
    dropped_degenerate: int = 0  # boxes dropped: zero/negative width or height, before or after clipping
    dropped_nonfinite: int = 0  # boxes dropped: a NaN or infinite coordinate
    dropped_no_image: int = 0  # COCO annotations whose image_id is not among the file's images
    loaded: bool = False

    @property
    def num_dropped_unknown(self) -> int:
        return sum(self.dropped_unknown.values())

    def update(self, other: "VocLoadStats") -> None:
        """Replace this object's counters by ``other``'s (keeps the object identity stored in metadata)."""
        self.__dict__.update({k: (dict(v) if isinstance(v, dict) else v) for k, v in other.__dict__.items()})


def validate_box(box: Sequence[float], width: float, height: float, stats: VocLoadStats,
                 pixel_inclusive: bool = True) -> Optional[List[float]]:
    """The one box rule of every gem_d2 loader: the box to keep (XYXY_ABS, clipped), or None to drop it.

    Args:
        box: ``[x1, y1, x2, y2]`` in absolute pixels.
        width, height: the image size (finite, positive; the loaders check it).
        stats: ``dropped_nonfinite``, ``dropped_degenerate`` or ``clipped`` is incremented (``boxes`` is the
            caller's, as it may drop boxes for other reasons).
        pixel_inclusive: True for VOC pixel indices (the image spans ``[0, width-1]``), False for COCO's
            continuous coordinates (the image spans ``[0, width]``).

    Rules, in order: any NaN/inf coordinate -> dropped (``dropped_nonfinite``); ``x2 <= x1`` or
    ``y2 <= y1`` -> dropped (``dropped_degenerate``); clipped to the image, and dropped when empty
    after clipping (``dropped_degenerate``), else counted in ``clipped`` when clipping changed it.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        stats.dropped_nonfinite += 1
        return None
    if x2 <= x1 or y2 <= y1:
        stats.dropped_degenerate += 1
        return None
    max_x = width - 1.0 if pixel_inclusive else float(width)
    max_y = height - 1.0 if pixel_inclusive else float(height)
    clipped = [min(max(x1, 0.0), max_x), min(max(y1, 0.0), max_y), min(max(x2, 0.0), max_x), min(max(y2, 0.0), max_y)]
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        stats.dropped_degenerate += 1
        return None
    if clipped != [x1, y1, x2, y2]:
        stats.clipped += 1
    return clipped


def _normalise_ext(image_ext: Optional[str]) -> Optional[str]:
    if image_ext is None:
        return None
    if not isinstance(image_ext, str) or not image_ext.strip(". "):
        raise ValueError(f"image_ext must be None or an extension like '.jpg' or 'png', got {image_ext!r}")
    ext = image_ext.strip().lower()
    return ext if ext.startswith(".") else "." + ext


def read_split_ids(root: str, split: str) -> Tuple[str, List[str]]:
    """Return ``(split_file, ids)`` of ``<root>/ImageSets/Main/<split>.txt``; errors name the file."""
    split_file = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
    if not os.path.isfile(split_file):
        raise FileNotFoundError(f"split file not found: {split_file} (expected one image id per line)")
    with open(split_file, encoding="utf-8") as f:
        numbered = [(n, line.split()[0]) for n, line in enumerate(f, 1) if line.strip()]
    if not numbered:
        raise DatasetFormatError(f"split file {split_file} is empty: it lists no image ids")
    first_line: Dict[str, int] = {}
    for n, image_id in numbered:
        if "/" in image_id or "\\" in image_id or image_id in (".", ".."):
            raise DatasetFormatError(f"{split_file}, line {n}: image id {image_id!r} is not a plain file name; ids "
                                     f"name files in Annotations/ and JPEGImages/ and must not reach outside {root}")
        if image_id in first_line:
            raise DatasetFormatError(f"{split_file}: image id {image_id!r} is listed twice (lines "
                                     f"{first_line[image_id]} and {n}); each image must appear once in a split")
        first_line[image_id] = n
    return split_file, [image_id for _, image_id in numbered]


def _index_images(image_dir: str) -> Dict[str, List[str]]:
    """Map image stem -> file names in ``image_dir`` with a known image extension (one listdir)."""
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    index: Dict[str, List[str]] = {}
    for fname in os.listdir(image_dir):
        stem, ext = os.path.splitext(fname)
        if ext.lower() in IMAGE_EXTENSIONS:
            index.setdefault(stem, []).append(fname)
    return index


def _find_image(image_dir, index, image_id, image_ext, split_file) -> str:
    found = index.get(image_id, [])
    if image_ext is not None:
        matches = [f for f in found if os.path.splitext(f)[1].lower() == image_ext]
        expected = f"{image_id}{image_ext}"
    else:
        order = {e: i for i, e in enumerate(IMAGE_EXTENSIONS)}
        matches = sorted(found, key=lambda f: order[os.path.splitext(f)[1].lower()])
        expected = f"{image_id}.jpg or {image_id}.png"
    if not matches:
        raise FileNotFoundError(
            f"image not found: {os.path.join(image_dir, expected)} (id '{image_id}' listed in {split_file})"
        )
    return os.path.join(image_dir, matches[0])


def _image_size(image_file: str, xml_file: str) -> Tuple[int, int]:
    """(height, width) from the image header (the XML has no positive ``<size>``)."""
    try:
        with Image.open(image_file) as im:
            w, h = im.size
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetFormatError(f"cannot read the size of image {image_file} (no <size> in {xml_file}): {e}") from e
    return h, w


def parse_voc_annotation(xml_file, image_file, class_to_id, stats, coordinate_offset=1.0) -> Tuple[int, int, list]:
    """Parse one VOC XML; returns ``(height, width, annotations)`` and updates ``stats`` (see module doc)."""
    if not os.path.isfile(xml_file):
        raise FileNotFoundError(f"annotation file not found: {xml_file}")
    root = read_xml(xml_file)
    width, height = voc_size(root, xml_file)
    if not (width and height):
        height, width = _image_size(image_file, xml_file)
    annotations = []
    for b in voc_boxes(root, xml_file):
        if b.name not in class_to_id:
            stats.dropped_unknown[b.name] = stats.dropped_unknown.get(b.name, 0) + 1
            continue
        box = [v - coordinate_offset for v in (b.x1, b.y1, b.x2, b.y2)]
        clipped = validate_box(box, width, height, stats, pixel_inclusive=True)
        if clipped is None:
            continue
        stats.boxes += 1
        stats.difficult += b.difficult
        annotations.append({"bbox": clipped, "bbox_mode": BoxMode.XYXY_ABS,
                            "category_id": class_to_id[b.name], "difficult": b.difficult})
    return height, width, annotations


def load_voc_instances(
    root: str,
    split: str,
    class_names: Sequence[str],
    dataset_name: Optional[str] = None,
    image_ext: Optional[str] = None,
    coordinate_offset: float = 1.0,
) -> Tuple[List[dict], VocLoadStats]:
    """Read one VOC-layout split.

    Args:
        root: dataset folder holding Annotations/, ImageSets/Main/, JPEGImages/.
        split: split file name without ``.txt``.
        class_names: the dataset's classes; ``category_id`` is the index in this list.
        dataset_name: stored as ``"dataset_name"`` in every record (and used in log messages).
        image_ext: ``".jpg"``/``".png"``/... for all images, or None to detect each image's extension.
        coordinate_offset: subtracted from every coordinate (1 for 1-based VOC files, 0 for 0-based ones).

    Returns:
        (records in detectron2's dataset-dict format, the load's :class:`VocLoadStats`).
    """
    class_to_id = {c.lower().strip(): i for i, c in enumerate(class_names)}
    ext = _normalise_ext(image_ext)
    split_file, ids = read_split_ids(root, split)
    image_dir = os.path.join(root, "JPEGImages")
    index = _index_images(image_dir)
    stats = VocLoadStats()
    records = []
    for image_id in ids:
        image_file = _find_image(image_dir, index, image_id, ext, split_file)
        xml_file = os.path.join(root, "Annotations", f"{image_id}.xml")
        height, width, annos = parse_voc_annotation(xml_file, image_file, class_to_id, stats, coordinate_offset)
        record = {"file_name": image_file, "image_id": image_id, "height": height, "width": width,
                  "annotations": annos}
        if dataset_name is not None:
            record["dataset_name"] = dataset_name
        records.append(record)
    stats.images = len(records)
    stats.loaded = True
    _log_stats(dataset_name or f"{root}:{split}", stats)
    return records, stats


def _log_stats(label: str, stats: VocLoadStats) -> None:
    if stats.dropped_nonfinite:
        logger.warning(f"{label}: dropped {stats.dropped_nonfinite} boxes with a NaN or infinite coordinate")
    if stats.dropped_no_image:
        logger.warning(f"{label}: dropped {stats.dropped_no_image} annotations whose image_id is not in the file")
    if stats.dropped_unknown:
        logger.warning(f"{label}: dropped {stats.num_dropped_unknown} boxes of classes not in the dataset's class "
                       f"list: {dict(sorted(stats.dropped_unknown.items()))}")
    if stats.clipped:
        logger.warning(f"{label}: clipped {stats.clipped} boxes that extended outside their image")
    if stats.dropped_degenerate:
        logger.warning(f"{label}: dropped {stats.dropped_degenerate} boxes that were empty (zero or negative width "
                       f"or height, as given or after clipping to the image)")
    logger.info(f"{label}: loaded {stats.images} images, {stats.boxes} boxes ({stats.difficult} difficult)")


def _load_and_record(name, sources, class_names, image_ext, coordinate_offset, stats_holder):
    """Load every (root, split) of ``sources`` for dataset ``name`` and store the merged stats."""
    records, total = [], VocLoadStats()
    for root, split in sources:
        recs, st = load_voc_instances(root, split, class_names, name, image_ext, coordinate_offset)
        if len(sources) > 1:  # image ids must stay unique across the concatenated sources
            for r in recs:
                r["image_id"] = f"{os.path.basename(os.path.normpath(root))}/{r['image_id']}"
        records.extend(recs)
        for key in ("images", "boxes", "difficult", "clipped", "dropped_degenerate", "dropped_nonfinite",
                    "dropped_no_image"):
            setattr(total, key, getattr(total, key) + getattr(st, key))
        total.dropped_unknown = dict(Counter(total.dropped_unknown) + Counter(st.dropped_unknown))
    total.loaded = True
    stats_holder.update(total)
    return records


def register_voc_sources(
    name: str,
    sources: Sequence[Tuple[str, str]],
    class_names: Sequence[str],
    image_ext: Optional[str] = None,
    domain: Optional[str] = None,
    coordinate_offset: float = 1.0,
    **extra_metadata,
) -> None:
    """Register ``name`` as the concatenation of several VOC-layout ``(root, split)`` sources.

    Like :func:`register_voc_dataset` (see there), for datasets such as VOC 07+12 trainval. Metadata
    ``dirname``/``split`` are those of the first source. Re-registering a name replaces it.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty str, got {name!r}")
    if not sources:
        raise ValueError(f"dataset '{name}': no (root, split) sources given")
    class_names = [str(c).lower().strip() for c in class_names]
    if not class_names or len(set(class_names)) != len(class_names) or not all(class_names):
        raise ValueError(f"dataset '{name}': class_names must be non-empty, unique and non-blank, got {class_names}")
    ext = _normalise_ext(image_ext)
    sources = [(os.fspath(r), str(s)) for r, s in sources]
    stats = VocLoadStats()
    unregister(name)
    DatasetCatalog.register(
        name, lambda: _load_and_record(name, sources, class_names, ext, coordinate_offset, stats))
    MetadataCatalog.get(name).set(
        thing_classes=list(class_names),
        dirname=sources[0][0],
        split=sources[0][1],
        year=2007,
        image_ext=ext or "auto",
        evaluator_type=GEM_EVALUATOR_TYPE,
        domain=domain or strip_split_suffix(name),
        load_stats=stats,
        **extra_metadata,
    )


def register_voc_dataset(
    name: str,
    root: str,
    split: str,
    class_names: Sequence[str],
    image_ext: Optional[str] = None,
    domain: Optional[str] = None,
    coordinate_offset: float = 1.0,
) -> None:
    """Register a dataset in the UODB/VOC layout with detectron2 so it can go in ``DATASETS.TRAIN``/``TEST``.

    Nothing is read now; files are parsed on ``DatasetCatalog.get(name)`` (rules in this module's doc).

    Args:
        name: the dataset name, e.g. ``"mydomain_train"``.
        root: folder with ``Annotations/``, ``ImageSets/Main/<split>.txt`` and ``JPEGImages/``.
        split: the split file's name without ``.txt``.
        class_names: the dataset's classes (lower-cased); category ids follow this order.
        image_ext: extension of all images (``".jpg"``, ``"png"``...) or None to detect it per image.
        domain: label-space domain; the train and test datasets of one domain share one class block.
            Default: ``name`` without a trailing ``_train``/``_val``/``_test``/``_trainval``/... .
        coordinate_offset: subtracted from all four coordinates (1: 1-based VOC files; 0: 0-based).

    Metadata set: ``thing_classes``, ``dirname``, ``split``, ``year=2007``, ``image_ext``,
    ``evaluator_type="gem_uodb"``, ``domain``, ``load_stats`` (:class:`VocLoadStats`, filled by each load).
    Records carry ``dataset_name``. Re-registering a name replaces it.
    """
    register_voc_sources(name, [(root, split)], class_names, image_ext=image_ext, domain=domain,
                         coordinate_offset=coordinate_offset)
