"""The visual styles of the generated multi-domain dataset: one renderer per domain.

Each renderer takes a seeded ``numpy.random.Generator``, the image side and the class of every object to
draw, and returns ``(PIL image, [(class_name, x0, y0, x1, y1), ...])`` where the box is the exact extent
of the object's drawn pixels (0-based, inclusive). Objects never overlap, so every box is fully visible.

Domains (class names partly shared, looks different):

============  ===========================  ==========================================================
domain        classes                      look
============  ===========================  ==========================================================
photo         circle, square, triangle     smooth colour-noise textures, shaded objects with shadows
cartoon       circle, star, heart          flat pastel scenes, saturated flat fills, black outlines
medical       lesion, cyst                 grey-scale CT-like slice, faint bright blobs / dark rings
aerial        vehicle, plane, tank         terrain with a road, many small rotated objects
sketch        square, triangle, star       pencil line-art on ruled paper
============  ===========================  ==========================================================
"""
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

Box = Tuple[str, int, int, int, int]


@dataclass(frozen=True)
class DomainStyle:
    """How one domain looks: its classes, file extension, objects per image, object size range and renderer."""

    name: str
    classes: Tuple[str, ...]
    image_ext: str
    objects_per_image: Tuple[int, int]  # inclusive range
    size_range: Tuple[float, float]  # object extent as a fraction of the image side
    render: Callable  # (rng, size, classes_to_draw, style) -> (PIL.Image, [Box])


# ----------------------------------------------------------------------------------------------- geometry
def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> List[List[Tuple[float, float]]]:
    """Polygons (a list, drawn together) of a shape of circumradius ``r`` centred at (cx, cy), rotated."""

    def rot(points):
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    if kind == "square":
        h = r / math.sqrt(2)
        return [rot([(-h, -h), (h, -h), (h, h), (-h, h)])]
    if kind == "triangle":
        return [rot([(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])]
    if kind == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else 0.45 * r
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        return [rot(pts)]
    if kind == "heart":
        pts = []
        for i in range(48):
            t = 2 * math.pi * i / 48
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((x * r / 17.0, (y + 2.5) * r / 17.0))
        return [rot(pts)]
    if kind == "vehicle":  # 2:1 rectangle
        return [rot([(-r * 0.9, -r * 0.42), (r * 0.9, -r * 0.42), (r * 0.9, r * 0.42), (-r * 0.9, r * 0.42)])]
    if kind == "plane":  # fuselage + wings + tail
        fus = [(-r, -0.14 * r), (r, -0.14 * r), (r, 0.14 * r), (-r, 0.14 * r)]
        wings = [(0.05 * r, -0.95 * r), (0.3 * r, -0.95 * r), (0.3 * r, 0.95 * r), (0.05 * r, 0.95 * r)]
        tail = [(-0.95 * r, -0.4 * r), (-0.8 * r, -0.4 * r), (-0.8 * r, 0.4 * r), (-0.95 * r, 0.4 * r)]
        return [rot(fus), rot(wings), rot(tail)]
    raise ValueError(f"unknown shape kind {kind!r}")


def _shape_mask(kind: str, size: int, cx: float, cy: float, r: float, angle: float, outline: int = 0) -> np.ndarray:
    """Boolean mask of a filled shape (``outline`` = 0) or of its outline of that width."""
    im = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(im)
    if kind in ("circle", "tank", "lesion", "cyst"):
        bbox = [cx - r, cy - r, cx + r, cy + r]
        if outline:
            draw.ellipse(bbox, outline=255, width=outline)
        else:
            draw.ellipse(bbox, fill=255)
    else:
        for poly in _polygon(kind, cx, cy, r, angle):
            if outline:
                draw.line(poly + [poly[0]], fill=255, width=outline, joint="curve")
            else:
                draw.polygon(poly, fill=255)
    return np.asarray(im) > 0


def _mask_box(mask: np.ndarray) -> Tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def _place(rng, size: int, n: int, size_range, margin: int = 5) -> List[Tuple[float, float, float]]:
    """Up to ``n`` non-overlapping (cx, cy, r) placements; the first always succeeds."""
    placed: List[Tuple[float, float, float]] = []
    for _ in range(n):
        for _try in range(60):
            r = rng.uniform(*size_range) * size / 2
            cx = rng.uniform(r + margin, size - r - margin)
            cy = rng.uniform(r + margin, size - r - margin)
            if all(abs(cx - px) > r + pr + 3 or abs(cy - py) > r + pr + 3 for px, py, pr in placed):
                placed.append((cx, cy, r))
                break
    return placed


def _smooth_noise(rng, size: int, cells: int, channels: int, low: float, high: float) -> np.ndarray:
    """Low-frequency noise: a ``cells x cells`` random grid upsampled bicubically to ``size``; float32 HxWxC."""
    grid = rng.uniform(low, high, size=(cells, cells, channels)).astype(np.float32)
    out = np.empty((size, size, channels), np.float32)
    for c in range(channels):
        out[..., c] = np.asarray(Image.fromarray(grid[..., c], mode="F").resize((size, size), Image.BICUBIC))
    return out


def _to_image(canvas: np.ndarray) -> Image.Image:
    arr = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr, mode="L" if arr.shape[2] == 1 else "RGB")


def _coords(size: int):
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return xs, ys


# ---------------------------------------------------------------------------------------------- renderers
def _render_photo(rng, size, classes, style):
    base = rng.uniform(60, 190, 3).astype(np.float32)  # scene colour; texture = luminance + mild chroma noise
    canvas = base * _smooth_noise(rng, size, 6, 1, 0.55, 1.35) * _smooth_noise(rng, size, 28, 1, 0.85, 1.15)
    canvas += _smooth_noise(rng, size, 4, 3, -25, 25) + rng.normal(0, 5, (size, size, 3)).astype(np.float32)
    xs, ys = _coords(size)
    light = rng.uniform(0, 2 * math.pi)
    lx, ly = math.cos(light), math.sin(light)
    boxes = []
    for cls, (cx, cy, r) in zip(classes, _place(rng, size, len(classes), style.size_range)):
        angle = rng.uniform(-0.3, 0.3) if cls == "square" else rng.uniform(0, 2 * math.pi)
        mask = _shape_mask(cls, size, cx, cy, r, angle)
        shadow = np.roll(mask, (4, 4), axis=(0, 1)) & ~mask
        canvas[shadow] *= 0.55
        colour = rng.uniform(30, 230, 3).astype(np.float32)
        shade = 1.0 + 0.45 * (((xs - cx) * lx + (ys - cy) * ly) / r)  # lit side brighter
        obj = colour[None, None, :] * np.clip(shade, 0.45, 1.5)[..., None]
        canvas[mask] = obj[mask] + rng.normal(0, 4, (int(mask.sum()), 3))
        boxes.append((cls, *_mask_box(mask)))
    return _to_image(canvas), boxes


_PASTELS = np.array([[250, 230, 200], [200, 235, 250], [220, 250, 210], [250, 215, 235], [240, 240, 200]], np.float32)
_SATURATED = np.array([[230, 40, 40], [40, 90, 230], [30, 170, 60], [250, 200, 20], [160, 50, 200], [250, 120, 20]],
                      np.float32)


def _render_cartoon(rng, size, classes, style):
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:] = _PASTELS[rng.integers(len(_PASTELS))]
    hill = Image.new("L", (size, size), 0)
    hy = rng.uniform(0.6, 0.85) * size
    ImageDraw.Draw(hill).ellipse([-0.3 * size, hy, 1.3 * size, hy + size], fill=255)
    canvas[np.asarray(hill) > 0] = _PASTELS[rng.integers(len(_PASTELS))] * 0.9
    boxes = []
    for cls, (cx, cy, r) in zip(classes, _place(rng, size, len(classes), style.size_range)):
        angle = rng.uniform(-0.35, 0.35)
        fill = _shape_mask(cls, size, cx, cy, r, angle)
        line = _shape_mask(cls, size, cx, cy, r, angle, outline=3)
        canvas[fill] = _SATURATED[rng.integers(len(_SATURATED))]
        canvas[line] = 10.0
        boxes.append((cls, *_mask_box(fill | line)))
    return _to_image(canvas), boxes


def _render_medical(rng, size, classes, style):
    xs, ys = _coords(size)
    body = ((xs - size / 2) / (0.46 * size)) ** 2 + ((ys - size / 2) / (0.40 * size)) ** 2 <= 1.0
    canvas = np.full((size, size, 1), 18.0, np.float32)
    tissue = 95 + _smooth_noise(rng, size, 10, 1, -20, 20)
    canvas[body] = tissue[body]
    for _ in range(2):  # faint organ-like structures as distractors
        ox, oy = rng.uniform(0.3, 0.7, 2) * size
        ax, ay = rng.uniform(0.08, 0.18, 2) * size
        organ = ((xs - ox) / ax) ** 2 + ((ys - oy) / ay) ** 2
        canvas[(organ <= 1.0) & body] += rng.uniform(-14, 14)
    boxes = []
    # margin keeps every lesion inside the body ellipse
    for cls, (cx, cy, r) in zip(classes, _place(rng, size, len(classes), style.size_range, margin=int(0.22 * size))):
        d = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2) / r
        mask = _shape_mask("circle", size, cx, cy, r, 0.0)
        if cls == "lesion":
            profile = np.clip(1 - d ** 2, 0, 1) ** 0.7
            canvas[..., 0] += 48 * profile * mask
        else:  # cyst: dark core with a bright rim
            rim = _shape_mask("circle", size, cx, cy, r, 0.0, outline=max(2, int(r * 0.2)))
            canvas[mask & ~rim, 0] -= 38
            canvas[rim, 0] += 40
        boxes.append((cls, *_mask_box(mask)))
    canvas += rng.normal(0, 6, canvas.shape).astype(np.float32)
    return _to_image(canvas), boxes


_TERRAIN = np.array([[70, 110, 50], [110, 130, 70], [130, 110, 80], [90, 120, 60]], np.float32)
_VEHICLE = np.array([[235, 235, 235], [200, 30, 30], [30, 60, 190], [230, 200, 40], [20, 20, 20]], np.float32)


def _render_aerial(rng, size, classes, style):
    base = _TERRAIN[rng.integers(len(_TERRAIN))]
    canvas = base[None, None, :] + _smooth_noise(rng, size, 8, 3, -25, 25) + _smooth_noise(rng, size, 40, 3, -10, 10)
    road = Image.new("L", (size, size), 0)
    a = rng.uniform(0, math.pi)
    c, s = math.cos(a) * size, math.sin(a) * size
    mx, my = rng.uniform(0.3, 0.7, 2) * size
    ImageDraw.Draw(road).line([(mx - c, my - s), (mx + c, my + s)], fill=255, width=int(0.07 * size))
    canvas[np.asarray(road) > 0] = 120 + rng.normal(0, 4, (int((np.asarray(road) > 0).sum()), 1))
    boxes = []
    for cls, (cx, cy, r) in zip(classes, _place(rng, size, len(classes), style.size_range)):
        angle = rng.uniform(0, 2 * math.pi)
        if cls == "tank":
            mask = _shape_mask("tank", size, cx, cy, r, 0.0)
            canvas[mask] = 205
            canvas[_shape_mask("tank", size, cx, cy, r * 0.6, 0.0, outline=2)] = 140
        else:
            mask = _shape_mask(cls, size, cx, cy, r, angle)
            colour = _VEHICLE[rng.integers(len(_VEHICLE))] if cls == "vehicle" else np.array([225, 225, 230])
            canvas[mask] = colour
            if cls == "vehicle":  # windshield on the front quarter
                wx, wy = cx + 0.45 * r * math.cos(angle), cy + 0.45 * r * math.sin(angle)
                shield = _shape_mask("vehicle", size, wx, wy, r * 0.3, angle) & mask
                canvas[shield] = 40
        shadow = np.roll(mask, (2, 2), axis=(0, 1)) & ~mask
        canvas[shadow] *= 0.5
        boxes.append((cls, *_mask_box(mask)))
    return _to_image(canvas), boxes


def _render_sketch(rng, size, classes, style):
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:] = (246, 241, 226)
    canvas += rng.normal(0, 3, canvas.shape).astype(np.float32)
    spacing = max(8, size // 16)
    offset = int(rng.integers(spacing))
    canvas[offset::spacing, :, :] = (205, 215, 240)
    boxes = []
    for cls, (cx, cy, r) in zip(classes, _place(rng, size, len(classes), style.size_range)):
        angle = rng.uniform(-0.4, 0.4)
        strokes = np.zeros((size, size), bool)
        for _ in range(2):  # two slightly offset pencil passes
            jx, jy, jr = rng.uniform(-1.5, 1.5, 3)
            strokes |= _shape_mask(cls, size, cx + jx, cy + jy, r + jr, angle + rng.uniform(-0.03, 0.03), outline=2)
        canvas[strokes] = rng.uniform(40, 80)
        boxes.append((cls, *_mask_box(strokes)))
    return _to_image(canvas), boxes


STYLES: Dict[str, DomainStyle] = {
    s.name: s
    for s in (
        DomainStyle("photo", ("circle", "square", "triangle"), ".jpg", (1, 4), (0.18, 0.40), _render_photo),
        DomainStyle("cartoon", ("circle", "star", "heart"), ".png", (1, 4), (0.18, 0.40), _render_cartoon),
        DomainStyle("medical", ("lesion", "cyst"), ".png", (1, 3), (0.12, 0.25), _render_medical),
        DomainStyle("aerial", ("vehicle", "plane", "tank"), ".jpg", (3, 5), (0.10, 0.18), _render_aerial),
        DomainStyle("sketch", ("square", "triangle", "star"), ".png", (1, 4), (0.18, 0.40), _render_sketch),
    )
}


def render_image(style: DomainStyle, rng: np.random.Generator, size: int,
                 first_class: str) -> Tuple[Image.Image, List[Box]]:
    """Render one image of ``style``; the first object is ``first_class``, the others random classes."""
    n = int(rng.integers(style.objects_per_image[0], style.objects_per_image[1] + 1))
    others = rng.integers(len(style.classes), size=n - 1)
    classes: Sequence[str] = [first_class] + [style.classes[int(i)] for i in others]
    return style.render(rng, size, classes, style)
