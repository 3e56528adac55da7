"""WIDER FACE (``wider_face_split/wider_face_{train,val}_bbx_gt.txt`` + ``WIDER_{train,val}/images``) -> ``WiderFace``.

UODB splits: train -> ``train``, val -> ``val`` (reference code ``widerface_train`` / ``widerface_val``).
Boxes ``x y w h`` become ``[x, y, x + w, y + h]`` (the UODB loader reads WiderFace coordinates as they are);
boxes with zero width or height (present in the official files) are dropped, faces flagged ``invalid`` are
kept as difficult. Image ids are the file names without extension (unique in WIDER FACE).
"""
import os
from typing import List, Tuple

from gem_d2.data.voc_xml import VocBox
from gem_d2.prepare.base import Context, Converter, folder_stats
from gem_d2.prepare.errors import SourceFormatError
from gem_d2.prepare.images import image_size

SPLITS = ("train", "val")


def parse_wider_gt(path) -> List[Tuple[str, int, List[VocBox]]]:
    """Read a ``*_bbx_gt.txt`` file: ``[(relative image path, line of the path, boxes)]``.

    Each image is a path line, a count line, then ``max(count, 1)`` lines of ``x y w h blur expression
    illumination invalid occlusion pose`` (a count of 0 is followed by one line of zeros). Zero-size boxes are
    returned with ``name=""`` (to drop).
    """
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    out, i = [], 0
    while i < len(lines):
        if not lines[i]:
            i += 1
            continue
        rel, rel_line = lines[i], i + 1
        if not rel.lower().endswith((".jpg", ".jpeg", ".png")):
            raise SourceFormatError(path, f"expected an image path, got {rel!r}", rel_line)
        if i + 1 >= len(lines):
            raise SourceFormatError(path, f"file ends after image path {rel!r}: missing the box count", rel_line)
        try:
            count = int(lines[i + 1])
        except ValueError:
            raise SourceFormatError(path, f"expected the number of faces, got {lines[i + 1]!r}", i + 2) from None
        if count < 0:
            raise SourceFormatError(path, f"negative number of faces {count}", i + 2)
        rows = max(count, 1)
        boxes = []
        for k in range(i + 2, i + 2 + rows):
            if k >= len(lines) or not lines[k]:
                raise SourceFormatError(path, f"{rel}: expected {rows} box lines, file/section ends early", k + 1)
            fields = lines[k].split()
            if len(fields) < 4:
                raise SourceFormatError(path, f"expected 'x y w h ...' (10 numbers), got {lines[k]!r}", k + 1)
            try:
                x, y, w, h = (float(v) for v in fields[:4])
                invalid = int(fields[7]) if len(fields) > 7 else 0
            except ValueError:
                raise SourceFormatError(path, f"non-numeric box line {lines[k]!r}", k + 1) from None
            if count == 0:
                continue
            name = "face" if w > 0 and h > 0 else ""
            boxes.append(VocBox(name, x, y, x + w, y + h, difficult=int(invalid == 1)))
        out.append((rel, rel_line, boxes))
        i += 2 + rows
    return out


class WiderFaceConverter(Converter):
    key = "widerface"
    source_dir = "WiderFace"
    expected = ("WiderFace/wider_face_split/wider_face_train_bbx_gt.txt and wider_face_val_bbx_gt.txt, "
                "WiderFace/WIDER_train/images/<event>/<name>.jpg, WiderFace/WIDER_val/images/<event>/<name>.jpg")

    def _gt(self, src, split):
        return self.require(os.path.join(src, "wider_face_split", f"wider_face_{split}_bbx_gt.txt"),
                            f"{split} annotation file")

    def _image(self, src, split, rel):
        return os.path.join(src, f"WIDER_{split}", "images", *rel.split("/"))

    def inputs(self, src):
        files = []
        for split in SPLITS:
            gt = self._gt(src, split)
            files.append(gt)
            files += [self._image(src, split, rel) for rel, _, _ in parse_wider_gt(gt)]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            self.require(missing[0], f"image ({len(missing)} missing)")
        return files

    def convert(self, src, ctx: Context):
        work, seen = [], {}
        for split in SPLITS:
            gt = self._gt(src, split)
            for rel, line, boxes in parse_wider_gt(gt):
                image_id = os.path.splitext(rel.split("/")[-1])[0]
                if image_id in seen:
                    raise SourceFormatError(gt, f"image name {image_id!r} already listed at {seen[image_id]}", line)
                seen[image_id] = f"{gt}:{line}"
                work.append((split, image_id, self._image(src, split, rel), boxes))
        writer = ctx.writer(self.spec, "WiderFace")
        for split, image_id, image, boxes in ctx.progress(work, desc=self.key):
            kept = []
            for b in boxes:
                if b.name:
                    kept.append(b)
                else:
                    ctx.dropped["WiderFace box with zero width or height"] += 1
            width, height = image_size(image)
            writer.add(split, image_id, width, height, kept, source=image)
        return folder_stats("WiderFace", writer.finish(required_splits=SPLITS))
