"""DeepLesion (``DL_info.csv`` + ``Images_png/<series>/<slice>.png``, 16-bit) -> UODB ``DeepLesion``, 8-bit PNG.

One image per annotated key slice, with all its lesions (``Bounding_boxes``, 0-based pixels, read by the UODB
loader without offset). Splits follow the CSV's ``Train_Val_Test`` column as UODB does (reference code
``deeplesion_trainval`` / ``deeplesion_test``): 1 (train) and 2 (val) -> ``trainval``, 3 -> ``test``.
Pixels: the 16-bit PNG value minus 32768 is the Hounsfield unit; the single window [-1024, 3071] HU of the
DeepLesion reference detector (NIH CADLab ``lesion_detector_3DCE``, ``WINDOWING``) is mapped linearly to
0-255 and written as 8-bit grayscale PNG. No resampling to a common pixel spacing. Lesions the CSV flags
``Possibly_noisy`` are kept as difficult. Image ids are the CSV ``File_name`` without ``.png``.
"""
import os
from collections import OrderedDict
from typing import List, Tuple

import numpy as np

from gem_d2.data.voc_xml import VocBox
from gem_d2.prepare.base import Context, Converter, folder_stats
from gem_d2.prepare.csvio import csv_rows
from gem_d2.prepare.errors import SourceFormatError
from gem_d2.prepare.images import load_image

CSV_NAME = "DL_info.csv"
HU_OFFSET = 32768
WINDOW = (-1024.0, 3071.0)
SPLIT_OF = {"1": "trainval", "2": "trainval", "3": "test"}
COLUMNS = ("File_name", "Bounding_boxes", "Train_Val_Test", "Possibly_noisy")


def window_to_uint8(raw: np.ndarray, window=WINDOW) -> np.ndarray:
    """16-bit DeepLesion pixels -> uint8: HU = raw - 32768, ``window`` mapped linearly onto 0..255 (clipped)."""
    hu = raw.astype(np.float64) - HU_OFFSET
    lo, hi = window
    return np.round(np.clip((hu - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


def parse_dl_info(path) -> "OrderedDict[str, Tuple[int, str, List[VocBox]]]":
    """Read ``DL_info.csv``: key-slice file name -> ``(first line, split, lesion boxes)``."""
    slices: OrderedDict[str, Tuple[int, str, List[VocBox]]] = OrderedDict()
    for line, (name, box_text, split_code, noisy) in csv_rows(path, COLUMNS):
        if not name.lower().endswith(".png") or "_" not in name:
            raise SourceFormatError(path, f"File_name {name!r} is not '<patient>_<study>_<series>_<slice>.png'",
                                    line)
        if split_code not in SPLIT_OF:
            raise SourceFormatError(path, f"Train_Val_Test must be 1, 2 or 3, got {split_code!r}", line)
        try:
            x1, y1, x2, y2 = (float(v) for v in box_text.split(","))
            is_noisy = int(float(noisy or 0))
        except ValueError:
            raise SourceFormatError(path, f"Bounding_boxes must be 'x1, y1, x2, y2', got {box_text!r}",
                                    line) from None
        if x2 < x1 or y2 < y1:
            raise SourceFormatError(path, f"box has x2 < x1 or y2 < y1: {box_text!r}", line)
        box = VocBox("lesion", x1, y1, x2, y2, difficult=1 if is_noisy else 0)
        if name in slices:
            first, split, boxes = slices[name]
            if split != SPLIT_OF[split_code]:
                raise SourceFormatError(path, f"{name} is in split {split} on line {first}, "
                                        f"{SPLIT_OF[split_code]} here", line)
            boxes.append(box)
        else:
            slices[name] = (line, SPLIT_OF[split_code], [box])
    if not slices:
        raise SourceFormatError(path, "no annotation rows")
    return slices


def slice_path(src: str, file_name: str) -> str:
    """``000001_01_01_109.png`` -> ``<src>/Images_png/000001_01_01/109.png``."""
    series, slice_file = file_name.rsplit("_", 1)
    return os.path.join(src, "Images_png", series, slice_file)


class DeepLesionConverter(Converter):
    key = "deeplesion"
    source_dir = "DeepLesion"
    expected = ("DeepLesion/DL_info.csv and DeepLesion/Images_png/<patient>_<study>_<series>/<slice>.png "
                "(Images_png_01.zip ... Images_png_56.zip unpacked into one Images_png/)")

    def options(self):
        return {"window_hu": list(WINDOW)}

    def _slices(self, src):
        csv_path = self.require(os.path.join(src, CSV_NAME), "annotation file")
        return csv_path, parse_dl_info(csv_path)

    def inputs(self, src):
        csv_path, slices = self._slices(src)
        return [csv_path] + [slice_path(src, name) for name in slices]

    def convert(self, src, ctx: Context):
        csv_path, slices = self._slices(src)
        writer = ctx.writer(self.spec, "DeepLesion")
        for name in ctx.progress(list(slices), desc=self.key):
            line, split, boxes = slices[name]
            path = slice_path(src, name)
            if not os.path.isfile(path):
                raise SourceFormatError(csv_path, f"key slice {name} not found: {path}", line)
            raw = np.asarray(load_image(path))
            if raw.ndim != 2:
                raise SourceFormatError(path, f"expected a single-channel 16-bit slice, got shape {raw.shape}")
            pixels = window_to_uint8(raw)
            writer.add(split, os.path.splitext(name)[0], raw.shape[1], raw.shape[0], boxes, image=pixels, depth=1)
        return folder_stats("DeepLesion", writer.finish(required_splits=("trainval", "test")))
