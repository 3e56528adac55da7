"""COCO 2014 (``val2014/`` + ``instances_{valminusminival,minival}2014.json``) -> UODB ``coco``, kept as COCO JSON.

UODB trains on ``coco_2014_valminusminival`` and tests on ``coco_2014_minival`` (reference code
``datasets_info.py``); both files come from the Detectron (2017) release, both index images of ``val2014``.
The JSON files are validated (structure, the 80 categories, every image present) and linked unchanged to
``coco/annotations/``; the images they reference are linked to ``coco/images/val2014/``. Crowd annotations
are counted as difficult in the summary (detectron2 ignores them in training and evaluation).
"""
import json
import os
from typing import Dict, List

from gem_d2.data.uodb import COCO_IMAGE_DIR
from gem_d2.prepare.base import Context, Converter
from gem_d2.prepare.errors import SourceFormatError
from gem_d2.prepare.images import place_image
from gem_d2.prepare.records import SplitStats


def load_json(path):
    """Parse a JSON file; a syntax error names the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise SourceFormatError(path, f"malformed JSON: {e.msg} (column {e.colno})", e.lineno) from None


def validate_coco(path, data, class_names) -> Dict[int, dict]:
    """Check a COCO instances dict (keys, types, categories == ``class_names`` by id); return images by id.

    JSON keeps no line numbers, so errors name the file and the entry (``annotations[17] (id 123)``).
    """
    if not isinstance(data, dict):
        raise SourceFormatError(path, "top level is not a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise SourceFormatError(path, f"missing list '{key}'")
    try:
        names = [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
    except (KeyError, TypeError):
        raise SourceFormatError(path, "every category needs 'id' and 'name'") from None
    if names != list(class_names):
        raise SourceFormatError(path, f"categories (by id) are not the 80 COCO classes: {names[:5]}...")
    images = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not all(k in im for k in ("id", "file_name", "width", "height")):
            raise SourceFormatError(path, f"images[{i}] lacks one of id, file_name, width, height")
        if im["id"] in images:
            raise SourceFormatError(path, f"images[{i}]: duplicate image id {im['id']}")
        images[im["id"]] = im
    cat_ids = {c["id"] for c in data["categories"]}
    for i, a in enumerate(data["annotations"]):
        where = f"annotations[{i}] (id {a.get('id') if isinstance(a, dict) else '?'})"
        if not isinstance(a, dict) or not all(k in a for k in ("image_id", "category_id", "bbox")):
            raise SourceFormatError(path, f"{where} lacks one of image_id, category_id, bbox")
        if a["image_id"] not in images:
            raise SourceFormatError(path, f"{where}: unknown image_id {a['image_id']}")
        if a["category_id"] not in cat_ids:
            raise SourceFormatError(path, f"{where}: unknown category_id {a['category_id']}")
        bbox = a["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise SourceFormatError(path, f"{where}: bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
    return images


def coco_stats(data, class_names) -> SplitStats:
    names = {c["id"]: c["name"] for c in data["categories"]}
    st = SplitStats(images=len(data["images"]))
    for a in data["annotations"]:
        st.boxes += 1
        st.difficult += 1 if a.get("iscrowd", 0) else 0
        st.classes[names[a["category_id"]]] += 1
    return st


class CocoConverter(Converter):
    key = "coco"
    source_dir = "coco"
    expected = ("coco/annotations/instances_valminusminival2014.json and instances_minival2014.json (Detectron's "
                "coco_annotations_minival.tgz), coco/val2014/*.jpg (val2014.zip; coco/images/val2014/ also accepted)")

    def _json_files(self, src) -> Dict[str, str]:
        return {split: self.require(os.path.join(src, "annotations", os.path.basename(rel)), f"{split} annotations")
                for split, rel in self.spec.coco_json.items()}

    def _image_dir(self, src) -> str:
        for rel in ("val2014", os.path.join("images", "val2014")):
            if os.path.isdir(os.path.join(src, rel)):
                return os.path.join(src, rel)
        return self.require(os.path.join(src, "val2014"), "image folder")

    def _load(self, src):
        files = self._json_files(src)
        key = tuple((p, os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in files.values())
        if getattr(self, "_cached", (None,))[0] != key:  # inputs() and convert() both need the parsed files
            out = {}
            for split, path in files.items():
                data = load_json(path)
                out[split] = (path, data, validate_coco(path, data, self.spec.classes))
            self._cached = (key, out)
        return self._cached[1]

    def _file_names(self, loaded) -> List[str]:
        return sorted({im["file_name"] for _, _, images in loaded.values() for im in images.values()})

    def inputs(self, src):
        loaded = self._load(src)
        image_dir = self._image_dir(src)
        return [p for p, _, _ in loaded.values()] + [os.path.join(image_dir, f) for f in self._file_names(loaded)]

    def convert(self, src, ctx: Context):
        loaded = self._load(src)
        image_dir = self._image_dir(src)
        out_dir = os.path.join(ctx.stage, "coco")
        for split, (path, _, _) in loaded.items():
            place_image(path, os.path.join(out_dir, self.spec.coco_json[split]), ctx.link_mode)
        referenced: Dict[str, str] = {}
        for path, _, images in loaded.values():
            for im in images.values():
                referenced.setdefault(im["file_name"], path)
        for file_name in ctx.progress(sorted(referenced), desc=self.key):
            image = os.path.join(image_dir, file_name)
            if not os.path.isfile(image):
                raise SourceFormatError(referenced[file_name], f"image {file_name!r} not found in {image_dir}")
            place_image(image, os.path.join(out_dir, COCO_IMAGE_DIR, file_name), ctx.link_mode)
        stats = {("coco", split): coco_stats(data, self.spec.classes) for split, (_, data, _) in loaded.items()}
        return stats
