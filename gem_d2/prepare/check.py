"""``--check``: validate an existing UODB tree without writing anything.

For every split the loader reads: the split file, each image (present, fully decodable, same size as its
annotation says), each annotation (parsable, class in the dataset's list, box inside the image and not empty,
in the loader's coordinates) and, when the folder holds a manifest, the image and box counts it recorded.
"""
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from PIL import Image

from gem_d2.data.uodb import COCO_IMAGE_DIR, UODB_DATASETS, UodbSpec
from gem_d2.prepare.coco import load_json, validate_coco
from gem_d2.prepare.errors import SourceFormatError
from gem_d2.prepare.images import large_images
from gem_d2.prepare.manifest import read_manifest
from gem_d2.prepare.records import DatasetReport, SplitStats
from gem_d2.prepare.runner import aggregate
from gem_d2.prepare.xmlio import parse_voc_xml

EPS = 1e-6


@dataclass
class CheckResult:
    """Problems found in one dataset (each names a file) and the counts recomputed from the tree."""

    key: str
    problems: List[str] = field(default_factory=list)
    report: Optional[DatasetReport] = None
    has_manifest: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


def _decoded_size(path: str) -> Tuple[Optional[Tuple[int, int]], Optional[str]]:
    """``((width, height), None)`` when the image decodes fully, else ``(None, reason)``."""
    if not os.path.isfile(path):
        return None, "missing image"
    try:
        with large_images(), Image.open(path) as im:
            im.load()
            return im.size, None
    except (OSError, SyntaxError, ValueError) as e:
        return None, f"unreadable image ({e})"


def _box_problem(x1, y1, x2, y2, width, height) -> Optional[str]:
    if x2 <= x1 or y2 <= y1:
        return "empty box"
    if x1 < -EPS or y1 < -EPS or x2 > width - 1 + EPS or y2 > height - 1 + EPS:
        return f"box out of bounds for a {width}x{height} image"
    return None


def _check_voc(spec: UodbSpec, output: str, result: CheckResult) -> Dict[Tuple[str, str], SplitStats]:
    classes = set(spec.classes)
    per_image: Dict[Tuple[str, str], Optional[SplitStats]] = {}
    stats: Dict[Tuple[str, str], SplitStats] = {}
    for sources in spec.splits.values():
        for folder, split in sources:
            root = os.path.join(output, folder)
            split_file = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
            if not os.path.isfile(split_file):
                result.problems.append(f"{split_file}: split file missing")
                continue
            with open(split_file, encoding="utf-8") as f:
                ids = [line.split()[0] for line in f if line.strip()]
            if not ids:
                result.problems.append(f"{split_file}: split file lists no image")
            total = SplitStats()
            for image_id in ids:
                if (folder, image_id) not in per_image:
                    per_image[(folder, image_id)] = _check_voc_image(spec, root, image_id, classes, result)
                st = per_image[(folder, image_id)]
                if st is not None:
                    total.add(st)
            stats[(folder, split)] = total
    return stats


def _check_voc_image(spec, root, image_id, classes, result) -> Optional[SplitStats]:
    image = os.path.join(root, "JPEGImages", image_id + spec.image_ext)
    xml = os.path.join(root, "Annotations", image_id + ".xml")
    size, reason = _decoded_size(image)
    if reason:
        result.problems.append(f"{image}: {reason}")
    if not os.path.isfile(xml):
        result.problems.append(f"{xml}: missing annotation")
        return None
    try:
        ann = parse_voc_xml(xml)
    except SourceFormatError as e:
        result.problems.append(str(e))
        return None
    width, height = (ann.width, ann.height) if ann.width > 0 and ann.height > 0 else (size or (0, 0))
    if size is not None and (ann.width, ann.height) != (0, 0) and size != (ann.width, ann.height):
        result.problems.append(f"{xml}: <size> {ann.width}x{ann.height} differs from the image's {size[0]}x{size[1]}")
    st = SplitStats(images=1)
    off = spec.coordinate_offset
    for k, b in enumerate(ann.boxes):
        if b.name not in classes:
            result.problems.append(f"{xml}: object #{k} class {b.name!r} not in the dataset's classes")
            continue
        problem = _box_problem(b.x1 - off, b.y1 - off, b.x2 - off, b.y2 - off, width, height) if width else None
        if problem:
            result.problems.append(f"{xml}: object #{k} ({b.name}): {problem}")
        st.boxes += 1
        st.difficult += b.difficult
        st.classes[b.name] += 1
    return st


def _check_coco(spec: UodbSpec, output: str, result: CheckResult) -> Dict[Tuple[str, str], SplitStats]:
    from gem_d2.prepare.coco import coco_stats

    folder = spec.splits[next(iter(spec.splits))][0][0]
    image_dir = os.path.join(output, folder, COCO_IMAGE_DIR)
    stats, checked = {}, {}
    for split, rel in spec.coco_json.items():
        path = os.path.join(output, folder, rel)
        if not os.path.isfile(path):
            result.problems.append(f"{path}: annotation file missing")
            continue
        try:
            data = load_json(path)
            images = validate_coco(path, data, spec.classes)
        except SourceFormatError as e:
            result.problems.append(str(e))
            continue
        for im in images.values():
            file = os.path.join(image_dir, im["file_name"])
            if file not in checked:
                checked[file] = _decoded_size(file)
            size, reason = checked[file]
            if reason:
                result.problems.append(f"{file}: {reason}")
            elif size != (im["width"], im["height"]):
                result.problems.append(f"{path}: image {im['id']} is {im['width']}x{im['height']} in the JSON, "
                                       f"{size[0]}x{size[1]} on disk")
        for i, a in enumerate(data["annotations"]):
            im = images[a["image_id"]]
            x, y, w, h = a["bbox"]
            if w <= 0 or h <= 0 or x < -EPS or y < -EPS or x + w > im["width"] + EPS or y + h > im["height"] + EPS:
                result.problems.append(f"{path}: annotations[{i}] (id {a.get('id')}): bbox {a['bbox']} empty or "
                                       f"outside the {im['width']}x{im['height']} image")
        stats[(folder, split)] = coco_stats(data, spec.classes)
    return stats


def check_dataset(key: str, output: str) -> CheckResult:
    """Validate dataset ``key`` under ``output`` (read-only); see the module doc for what is checked."""
    spec = UODB_DATASETS[key]
    result = CheckResult(key)
    folders = list(dict.fromkeys(folder for sources in spec.splits.values() for folder, _ in sources))
    missing = [os.path.join(output, f) for f in folders if not os.path.isdir(os.path.join(output, f))]
    if missing:
        result.problems += [f"{m}: folder missing" for m in missing]
        return result
    stats = _check_coco(spec, output, result) if spec.coco_json else _check_voc(spec, output, result)
    result.report = aggregate(key, spec, stats, Counter())
    manifests = [read_manifest(os.path.join(output, f)) for f in folders]
    result.has_manifest = all(m is not None for m in manifests)
    if result.has_manifest:
        recorded = DatasetReport.from_json(key, manifests[0])
        for split, st in result.report.splits.items():
            want = recorded.splits.get(split)
            if want is None:
                result.problems.append(f"{os.path.join(output, folders[0])}: manifest has no split '{split}'")
            elif (st.images, st.boxes) != (want.images, want.boxes):
                result.problems.append(f"{os.path.join(output, folders[0])}: split '{split}' has {st.images} images / "
                                       f"{st.boxes} boxes, the manifest recorded {want.images} / {want.boxes}")
    return result
