"""What the converters add to the shared VOC XML reader (``gem_d2.data.voc_xml``): the check of the root
element and the size/boxes of one file as a record; and writing a text file.

Box coordinates are as written in the file; names are lower-cased, ``difficult`` defaults to 0, and every
error names ``file:line``, exactly as the loader reads the file (``gem_d2.data.voc.parse_voc_annotation``).
"""
import os
from dataclasses import dataclass
from typing import List

from gem_d2.data.voc_xml import VocBox, read_xml, voc_boxes, voc_size
from gem_d2.prepare.errors import SourceFormatError


@dataclass
class VocAnnotation:
    """The parts of a VOC XML file the converters use. Box coordinates are as written in the file."""

    width: int  # 0 (both) when <size> is missing or not positive
    height: int
    boxes: List[VocBox]


def parse_voc_xml(path) -> VocAnnotation:
    """Read a VOC annotation file with the loader's reader; the root element must be ``<annotation>``."""
    root = read_xml(path)
    if root.tag != "annotation":
        raise SourceFormatError(path, f"root element is <{root.tag}>, expected <annotation>", root.line)
    return VocAnnotation(*voc_size(root, path), voc_boxes(root, path))


def write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` (UTF-8, ``\\n`` line ends); parent folders are created."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
