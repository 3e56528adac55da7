"""KITTI 2D object detection (``training/label_2/*.txt`` + ``training/image_2/*.png``) -> UODB ``KITTI``.

Classes (UODB: pedestrian, cyclist, car) with the merges of DAMEX's converter (``jinga-lala/DAMEX:
datasets/voc_to_coco.py``): Car, Van, Truck -> car; Person_sitting -> pedestrian; Cyclist -> cyclist;
Tram, Misc and DontCare are dropped. Objects outside KITTI's own "hard" evaluation setting (box height
< 25 px, occlusion level 3 = unknown, or truncation > 0.5; KITTI object devkit readme) are flagged
difficult, so the VOC metric ignores them as KITTI's benchmark does. Frames are re-encoded as JPEG (the UODB
loader reads ``KITTI/JPEGImages/<id>.jpg``). Splits: ``ImageSets/train.txt`` / ``val.txt`` from the source
when present (e.g. the common 3,712 / 3,769 split of Chen et al.), else a deterministic 50/50 split by hash
of the frame id (UODB's own KITTI lists are not public).
"""
import glob
import os
from typing import Dict, List, Tuple

from gem_d2.data.voc_xml import VocBox
from gem_d2.prepare.base import Context, Converter, folder_stats
from gem_d2.prepare.errors import SourceFormatError
from gem_d2.prepare.images import image_size
from gem_d2.prepare.splits import hash_split

KITTI_CLASS_MAP = {"car": "car", "van": "car", "truck": "car", "pedestrian": "pedestrian",
                   "person_sitting": "pedestrian", "cyclist": "cyclist", "tram": None, "misc": None, "dontcare": None}
HARD_MIN_HEIGHT, HARD_MAX_OCCLUSION, HARD_MAX_TRUNCATION = 25.0, 2, 0.5


def parse_kitti_label(path) -> List[Tuple[str, VocBox]]:
    """Read one KITTI label file: ``[(kitti_type, box)]`` with ``box.name`` the UODB class or ``""`` if dropped."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) not in (15, 16):
                raise SourceFormatError(path, f"expected 15 fields (type, truncated, occluded, alpha, 4 box, 3 dims, "
                                        f"3 location, rotation_y), got {len(fields)}", lineno)
            kitti_type = fields[0]
            if kitti_type.lower() not in KITTI_CLASS_MAP:
                raise SourceFormatError(path, f"unknown KITTI object type {kitti_type!r}", lineno)
            try:
                truncated, occluded = float(fields[1]), int(float(fields[2]))
                x1, y1, x2, y2 = (float(v) for v in fields[4:8])
            except ValueError:
                raise SourceFormatError(path, f"non-numeric truncation/occlusion/box in {line.strip()!r}",
                                        lineno) from None
            if x2 < x1 or y2 < y1:
                raise SourceFormatError(path, f"box has x2 < x1 or y2 < y1: {fields[4:8]}", lineno)
            hard = (y2 - y1) < HARD_MIN_HEIGHT or occluded > HARD_MAX_OCCLUSION or truncated > HARD_MAX_TRUNCATION
            name = KITTI_CLASS_MAP[kitti_type.lower()] or ""
            out.append((kitti_type, VocBox(name, x1, y1, x2, y2, difficult=int(hard))))
    return out


def read_id_list(path) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return [line.split()[0] for line in f if line.strip()]


class KittiConverter(Converter):
    key = "kitti"
    source_dir = "KITTI"
    expected = ("KITTI/training/label_2/<id>.txt and KITTI/training/image_2/<id>.png (data_object_label_2.zip, "
                "data_object_image_2.zip); optional KITTI/ImageSets/train.txt and val.txt")

    def _split_files(self, src):
        files = [os.path.join(src, "ImageSets", f"{s}.txt") for s in ("train", "val")]
        present = [os.path.isfile(f) for f in files]
        if any(present) and not all(present):
            raise SourceFormatError(files[present.index(False)], "missing: give both ImageSets/train.txt and val.txt")
        return files if all(present) else None

    def _ids(self, src) -> List[str]:
        label_dir = self.require(os.path.join(src, "training", "label_2"), "label folder")
        self.require(os.path.join(src, "training", "image_2"), "image folder")
        ids = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(label_dir, "*.txt")))
        if not ids:
            raise SourceFormatError(label_dir, "no label files (*.txt)")
        return ids

    def _paths(self, src, frame_id):
        return (os.path.join(src, "training", "label_2", frame_id + ".txt"),
                os.path.join(src, "training", "image_2", frame_id + ".png"))

    def inputs(self, src):
        files = [p for i in self._ids(src) for p in self._paths(src, i)]
        return files + (self._split_files(src) or [])

    def _assign(self, src, ids) -> Dict[str, str]:
        split_files = self._split_files(src)
        if split_files is None:
            test = hash_split({i: 1 for i in ids}, 0.5, salt="kitti")
            return {i: ("val" if i in test else "train") for i in ids}
        known, assign = set(ids), {}
        for split, path in zip(("train", "val"), split_files):
            for lineno, frame_id in enumerate(read_id_list(path), 1):
                if frame_id not in known:
                    raise SourceFormatError(path, f"frame {frame_id!r} has no label file", lineno)
                if frame_id in assign:
                    raise SourceFormatError(path, f"frame {frame_id!r} is also in {assign[frame_id]}.txt", lineno)
                assign[frame_id] = split
        return assign

    def convert(self, src, ctx: Context):
        ids = self._ids(src)
        assign = self._assign(src, ids)
        if len(assign) < len(ids):
            ctx.dropped["frame in neither split file"] += len(ids) - len(assign)
        writer = ctx.writer(self.spec, "KITTI")
        for frame_id in ctx.progress(sorted(assign), desc=self.key):
            label, image = self._paths(src, frame_id)
            boxes = []
            for kitti_type, box in parse_kitti_label(label):
                if box.name:
                    boxes.append(box)
                else:
                    ctx.dropped[f"KITTI type {kitti_type}"] += 1
            width, height = image_size(image)
            writer.add(assign[frame_id], frame_id, width, height, boxes, source=image)
        return folder_stats("KITTI", writer.finish(required_splits=("train", "val")))
