"""LISA Traffic Sign Dataset (``allAnnotations.csv`` + the annotated frames) -> UODB ``LISA``.

UODB keeps four classes (reference code ``LISA_voc.py``: warning, noturn, speedlimit, stop); how UODB mapped
LISA's 47 sign tags onto them is not public. Our mapping, by sign family of the US MUTCD:

- ``stop``: stop.
- ``speedlimit``: every ``speedLimit*`` tag (incl. speedLimitUrdbl), truckSpeedLimit55, schoolSpeedLimit25.
- ``noturn``: noLeftTurn, noRightTurn.
- ``warning`` (yellow W-series): addedLane, curveLeft, curveRight, dip, intersection, laneEnds, merge,
  pedestrianCrossing, roundabout, school, signalAhead, stopAhead, thruMergeLeft, thruMergeRight,
  thruTrafficMergeLeft, turnLeft, turnRight, yieldAhead and every ``rampSpeedAdvisory*`` tag.
- dropped (other regulatory signs): doNotEnter, doNotPass, keepRight, rightLaneMustTurn, slow, yield,
  zoneAhead25, zoneAhead45; any tag not listed here is dropped too and counted under its name.

Coordinates are LISA's pixel corners, kept as they are (the UODB loader reads LISA without offset). Split
(UODB's lists are not public): whole source folders (one per recorded clip) go to ``test`` in a deterministic
hash order until 20% of the frames, the rest to ``train``, so frames of one clip never straddle the split.
Frames are PNG, linked as is; image ids are the frame paths with ``/`` replaced by ``__``.
"""
import os
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

from gem_d2.data.voc_xml import VocBox
from gem_d2.prepare.base import Context, Converter, folder_stats
from gem_d2.prepare.csvio import csv_rows
from gem_d2.prepare.errors import SourceFormatError
from gem_d2.prepare.images import image_size
from gem_d2.prepare.splits import hash_split

CSV_NAME = "allAnnotations.csv"
TEST_FRACTION = 0.2
WARNING_TAGS = frozenset({
    "addedLane", "curveLeft", "curveRight", "dip", "intersection", "laneEnds", "merge", "pedestrianCrossing",
    "roundabout", "school", "signalAhead", "stopAhead", "thruMergeLeft", "thruMergeRight", "thruTrafficMergeLeft",
    "turnLeft", "turnRight", "yieldAhead"})
NOTURN_TAGS = frozenset({"noLeftTurn", "noRightTurn"})
SPEEDLIMIT_TAGS = frozenset({"truckSpeedLimit55", "schoolSpeedLimit25"})
DROPPED_TAGS = frozenset({"doNotEnter", "doNotPass", "keepRight", "rightLaneMustTurn", "slow", "yield", "zoneAhead25",
                          "zoneAhead45"})
COLUMNS = ("Filename", "Annotation tag", "Upper left corner X", "Upper left corner Y", "Lower right corner X",
           "Lower right corner Y")


def lisa_class(tag: str) -> Optional[str]:
    """The UODB class of a LISA sign tag, or None when the sign is not one of the four classes."""
    if tag == "stop":
        return "stop"
    if tag.startswith("speedLimit") or tag in SPEEDLIMIT_TAGS:
        return "speedlimit"
    if tag in NOTURN_TAGS:
        return "noturn"
    if tag in WARNING_TAGS or tag.startswith("rampSpeedAdvisory"):
        return "warning"
    return None


def parse_lisa_csv(path) -> "OrderedDict[str, List[Tuple[int, str, VocBox]]]":
    """Read ``allAnnotations.csv`` (``;``-separated, header first): frame path -> ``[(line, tag, box)]``.

    ``box.name`` is the UODB class, or ``""`` for a sign outside the four classes.
    """
    frames: OrderedDict[str, List[Tuple[int, str, VocBox]]] = OrderedDict()
    for line, (filename, tag, *corners) in csv_rows(path, COLUMNS, delimiter=";"):
        try:
            x1, y1, x2, y2 = (float(v) for v in corners)
        except ValueError:
            raise SourceFormatError(path, f"non-numeric corner coordinates {corners}", line) from None
        if not filename or not tag:
            raise SourceFormatError(path, "empty Filename or Annotation tag", line)
        if x2 < x1 or y2 < y1:
            raise SourceFormatError(path, f"lower-right corner above/left of upper-left: {corners}", line)
        frames.setdefault(filename, []).append((line, tag, VocBox(lisa_class(tag) or "", x1, y1, x2, y2)))
    if not frames:
        raise SourceFormatError(path, "no annotation rows")
    return frames


def frame_id(filename: str) -> str:
    """Image id of a LISA frame path: extension removed, ``/`` -> ``__``, other unsafe characters -> ``_``."""
    stem = os.path.splitext(filename.replace("\\", "/"))[0]
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem.replace("/", "__"))


class LisaConverter(Converter):
    key = "lisa"
    source_dir = "LISA"
    expected = ("LISA/allAnnotations.csv and the frame folders it lists (paths relative to the CSV), as unpacked "
                "from signDatabasePublicFramesOnly.zip")

    def options(self):
        return {"test_fraction": TEST_FRACTION}

    def _frames(self, src):
        csv_path = self.require(os.path.join(src, CSV_NAME), "annotation file")
        return csv_path, parse_lisa_csv(csv_path)

    def inputs(self, src):
        csv_path, frames = self._frames(src)
        return [csv_path] + [os.path.join(src, *f.replace("\\", "/").split("/")) for f in frames]

    def convert(self, src, ctx: Context):
        csv_path, frames = self._frames(src)
        ids: Dict[str, str] = {}
        for filename, rows in frames.items():
            image_id = frame_id(filename)
            if image_id in ids:
                raise SourceFormatError(csv_path, f"frames {ids[image_id]!r} and {filename!r} map to the same id "
                                        f"{image_id!r}", rows[0][0])
            ids[image_id] = filename
        group_of = {f: os.path.dirname(f.replace("\\", "/")) for f in frames}
        sizes: Dict[str, int] = {}
        for g in group_of.values():
            sizes[g] = sizes.get(g, 0) + 1
        test_groups = hash_split(sizes, TEST_FRACTION, salt="lisa")
        writer = ctx.writer(self.spec, "LISA")
        for filename in ctx.progress(sorted(frames), desc=self.key):
            boxes = []
            for _, tag, box in frames[filename]:
                if box.name:
                    boxes.append(box)
                else:
                    ctx.dropped[f"LISA tag {tag}"] += 1
            image = os.path.join(src, *filename.replace("\\", "/").split("/"))
            if not os.path.isfile(image):
                raise SourceFormatError(csv_path, f"frame not found: {image}", frames[filename][0][0])
            width, height = image_size(image)
            split = "test" if group_of[filename] in test_groups else "train"
            writer.add(split, frame_id(filename), width, height, boxes, source=image)
        return folder_stats("LISA", writer.finish(required_splits=("train", "test")))
