"""DOTA v1.0 (``{train,val}/images/*.png`` + ``{train,val}/labelTxt/*.txt``) -> UODB ``DOTA`` patches.

UODB trains on DOTA at scale 600 and its reference code reads ready-made ``.jpg`` images with horizontal
boxes; how UODB cropped the 800-20000 px scenes is not public. Our cropping follows DOTA_devkit's
``ImgSplit`` with a smaller patch: 800 x 800 px patches with 200 px overlap (stride 600, the last patch
aligned to the scene border; a scene smaller than a patch is one patch). Each oriented polygon is clipped to
the patch; the box is the axis-aligned bounds of the clipped polygon. An object with at least 70% of its
polygon area inside the patch keeps its difficulty, one with less is kept as difficult (ImgSplit's rule),
a leftover under 2 px wide or high is dropped, and patches without any object are not written. Classes
outside the 15 of DOTA v1.0 (e.g. v1.5's container-crane) are dropped. Splits: train -> ``train``, val ->
``val`` (reference code ``dota_train`` / ``dota_val``). Patches are JPEG, id ``<scene>__<left>_<top>``.
"""
import glob
import os
from typing import List, Sequence, Tuple

import numpy as np

from gem_d2.data.voc_xml import VocBox
from gem_d2.prepare.base import Context, Converter, folder_stats
from gem_d2.prepare.errors import SourceFormatError
from gem_d2.prepare.images import load_image

PATCH, OVERLAP, MIN_VISIBLE, MIN_SIDE = 800, 200, 0.7, 2.0
SPLITS = ("train", "val")
Point = Tuple[float, float]


def parse_dota_label(path) -> List[Tuple[str, List[Point], int]]:
    """Read a DOTA ``labelTxt`` file: ``[(class, 4 polygon points, difficult)]``; header lines are skipped."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.lower().startswith(("imagesource:", "gsd:")):
                continue
            fields = text.split()
            if len(fields) not in (9, 10):
                raise SourceFormatError(path, f"expected 'x1 y1 x2 y2 x3 y3 x4 y4 class [difficult]', got {text!r}",
                                        lineno)
            try:
                xy = [float(v) for v in fields[:8]]
                difficult = int(fields[9]) if len(fields) == 10 else 0
            except ValueError:
                raise SourceFormatError(path, f"non-numeric coordinate or difficulty in {text!r}", lineno) from None
            out.append((fields[8].lower(), list(zip(xy[0::2], xy[1::2])), 1 if difficult else 0))
    return out


def polygon_area(points: Sequence[Point]) -> float:
    """Absolute area (shoelace formula)."""
    n = len(points)
    return abs(sum(points[i][0] * points[(i + 1) % n][1] - points[(i + 1) % n][0] * points[i][1]
                   for i in range(n))) / 2.0


def clip_polygon(points: Sequence[Point], x0: float, y0: float, x1: float, y1: float) -> List[Point]:
    """The part of a convex or concave polygon inside the rectangle (Sutherland-Hodgman)."""
    def clip(pts, inside, cross):
        out = []
        for i, cur in enumerate(pts):
            prev = pts[i - 1]
            if inside(cur):
                if not inside(prev):
                    out.append(cross(prev, cur))
                out.append(cur)
            elif inside(prev):
                out.append(cross(prev, cur))
        return out

    def at_x(x):
        return lambda p, q: (x, p[1] + (q[1] - p[1]) * (x - p[0]) / (q[0] - p[0]))

    def at_y(y):
        return lambda p, q: (p[0] + (q[0] - p[0]) * (y - p[1]) / (q[1] - p[1]), y)

    pts = list(points)
    for inside, cross in ((lambda p: p[0] >= x0, at_x(x0)), (lambda p: p[0] <= x1, at_x(x1)),
                          (lambda p: p[1] >= y0, at_y(y0)), (lambda p: p[1] <= y1, at_y(y1))):
        if not pts:
            break
        pts = clip(pts, inside, cross)
    return pts


def patch_starts(length: int, patch: int = PATCH, overlap: int = OVERLAP) -> List[int]:
    """Left (or top) edges of the patches along one axis; the last patch ends at the border."""
    if length <= patch:
        return [0]
    starts = list(range(0, length - patch, patch - overlap))
    if starts[-1] + patch < length:
        starts.append(length - patch)
    return starts


def patch_boxes(objects, left: int, top: int, width: int, height: int) -> Tuple[List[VocBox], int]:
    """Boxes of ``objects`` inside the patch, in patch coordinates, and the number of tiny leftovers dropped."""
    boxes, tiny = [], 0
    for name, poly, difficult in objects:
        area = polygon_area(poly)
        if area <= 0:
            continue
        inside = clip_polygon(poly, left, top, left + width, top + height)
        if len(inside) < 3:
            continue
        visible = polygon_area(inside) / area
        if visible <= 0:
            continue
        xs, ys = [p[0] - left for p in inside], [p[1] - top for p in inside]
        box = VocBox(name, min(xs), min(ys), max(xs), max(ys), difficult if visible >= MIN_VISIBLE else 1)
        if box.x2 - box.x1 < MIN_SIDE or box.y2 - box.y1 < MIN_SIDE:
            tiny += 1
            continue
        boxes.append(box)
    return boxes, tiny


class DotaConverter(Converter):
    key = "dota"
    source_dir = "DOTA"
    expected = ("DOTA/train/images/P*.png, DOTA/train/labelTxt/P*.txt, DOTA/val/images/P*.png, "
                "DOTA/val/labelTxt/P*.txt (DOTA v1.0 horizontal-and-oriented release, oriented labelTxt)")

    def options(self):
        return {"patch": PATCH, "overlap": OVERLAP, "min_visible": MIN_VISIBLE, "min_side": MIN_SIDE}

    def _scenes(self, src) -> List[Tuple[str, str, str, str]]:
        out = []
        for split in SPLITS:
            label_dir = self.require(os.path.join(src, split, "labelTxt"), f"{split} label folder")
            image_dir = self.require(os.path.join(src, split, "images"), f"{split} image folder")
            labels = sorted(glob.glob(os.path.join(label_dir, "*.txt")))
            if not labels:
                raise SourceFormatError(label_dir, "no label files (*.txt)")
            for label in labels:
                stem = os.path.splitext(os.path.basename(label))[0]
                image = next((os.path.join(image_dir, stem + e) for e in (".png", ".jpg", ".tif")
                              if os.path.isfile(os.path.join(image_dir, stem + e))), None)
                if image is None:
                    raise SourceFormatError(label, f"no image {stem}.png in {image_dir}")
                out.append((split, stem, label, image))
        return out

    def inputs(self, src):
        return [f for _, _, label, image in self._scenes(src) for f in (label, image)]

    def convert(self, src, ctx: Context):
        writer = ctx.writer(self.spec, "DOTA")
        classes = set(self.spec.classes)
        for split, stem, label, image in ctx.progress(self._scenes(src), desc=self.key):
            objects = []
            for name, poly, difficult in parse_dota_label(label):
                if name in classes:
                    objects.append((name, poly, difficult))
                else:
                    ctx.dropped[f"DOTA class {name}"] += 1
            if not objects:
                ctx.dropped["DOTA scene without objects"] += 1
                continue
            pixels = np.asarray(load_image(image, "RGB"))
            height, width = pixels.shape[:2]
            for top in patch_starts(height):
                for left in patch_starts(width):
                    ph, pw = min(PATCH, height - top), min(PATCH, width - left)
                    boxes, tiny = patch_boxes(objects, left, top, pw, ph)
                    if tiny:
                        ctx.dropped["DOTA leftover under 2 px after cropping"] += tiny
                    if boxes:
                        writer.add(split, f"{stem}__{left}_{top}", pw, ph, boxes,
                                   image=np.ascontiguousarray(pixels[top:top + ph, left:left + pw]))
        return folder_stats("DOTA", writer.finish(required_splits=SPLITS))
