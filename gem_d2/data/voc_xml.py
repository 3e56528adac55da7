"""VOC XML: the one reader and the one writer, and the one box record, for the loader, the generated data and
the UODB converters (``gem_d2.prepare``).

Reading keeps the line of every element (``xml.etree`` does not), so errors name ``file:line``. The reader
returns what a file says (:func:`voc_size`, :func:`voc_boxes`: coordinates as written); what to do with it
(coordinate offset, class list, clipping) is the caller's: ``gem_d2.data.voc.parse_voc_annotation`` for the
loader, ``gem_d2.prepare`` for the converters and their ``--check``. Writing produces the minimal VOC XML the
loader reads, deterministically.
"""
from __future__ import annotations

import math
import xml.parsers.expat
from typing import List, NamedTuple, Optional, Sequence, Tuple
from xml.sax.saxutils import escape

from gem_d2.data.errors import FileFormatError

BOX_TAGS = ("xmin", "ymin", "xmax", "ymax")


class VocBox(NamedTuple):
    """One object: a lower-cased class name, ``x1, y1, x2, y2`` and ``difficult`` (0/1).

    What the coordinates mean is the holder's: as written in a file (:func:`voc_boxes`), or 0-based pixel
    coordinates, what gem_d2's loader returns (the converters' boxes, the writer's input).
    """

    name: str
    x1: float
    y1: float
    x2: float
    y2: float
    difficult: int = 0

    def clipped(self, width: int, height: int) -> VocBox:
        """This box clipped to the loader's valid range ``[0, width-1] x [0, height-1]``."""
        return self._replace(x1=min(max(self.x1, 0.0), width - 1.0), y1=min(max(self.y1, 0.0), height - 1.0),
                             x2=min(max(self.x2, 0.0), width - 1.0), y2=min(max(self.y2, 0.0), height - 1.0))

    @property
    def is_empty(self) -> bool:
        return self.x2 <= self.x1 or self.y2 <= self.y1


# ---------------------------------------------------------------------------------------------------------
# Reading


class Node:
    """An XML element with the line it starts on; ``text`` is all character data directly inside it."""

    __slots__ = ("tag", "line", "text", "children")

    def __init__(self, tag: str, line: int):
        self.tag, self.line, self.text, self.children = tag, line, "", []

    def __repr__(self) -> str:
        return f"Node({self.tag!r}, line {self.line}, {len(self.children)} children)"

    def find(self, tag: str) -> Optional[Node]:
        for c in self.children:
            if c.tag == tag:
                return c
        return None

    def findall(self, tag: str) -> List[Node]:
        return [c for c in self.children if c.tag == tag]


def read_xml(path) -> Node:
    """Parse ``path`` into a :class:`Node` tree; malformed XML raises :class:`FileFormatError` with the line.

    The loader reads every annotation file with it: the handlers are kept minimal (a document node under the
    root makes every element's parent ``stack[-1]``; ``buffer_text`` gives one call per text run).
    """
    parser = xml.parsers.expat.ParserCreate()
    parser.buffer_text = True
    document = Node("", 0)
    stack = [document]

    def start(tag, _attrs):
        node = Node(tag, parser.CurrentLineNumber)
        stack[-1].children.append(node)
        stack.append(node)

    def end(_tag):
        stack.pop()

    def chars(data):
        stack[-1].text += data

    parser.StartElementHandler, parser.EndElementHandler, parser.CharacterDataHandler = start, end, chars
    try:
        with open(path, "rb") as f:
            parser.ParseFile(f)
    except xml.parsers.expat.ExpatError as e:
        raise FileFormatError(path, f"malformed XML: {xml.parsers.expat.ErrorString(e.code)}", e.lineno) from None
    if not document.children:
        raise FileFormatError(path, "malformed XML: no element found", 1)
    return document.children[0]


def child_text(node: Node, tag: str, path, what: str) -> str:
    """The stripped text of ``node``'s first ``<tag>``; missing or blank is an error naming ``node``'s line."""
    child = node.find(tag)
    if child is None or not child.text.strip():
        raise FileFormatError(path, f"{what} has no <{tag}>", node.line)
    return child.text.strip()


def child_number(node: Node, tag: str, path, what: str) -> float:
    """:func:`child_text` as a float (``nan``/``inf`` included); not a number is an error naming its line."""
    text = child_text(node, tag, path, what)
    try:
        return float(text)
    except ValueError:
        raise FileFormatError(path, f"{what} <{tag}> is not a number: {text!r}", node.find(tag).line) from None


def voc_size(root: Node, path) -> Tuple[int, int]:
    """``(width, height)`` of the ``<size>`` of an ``<annotation>``; ``(0, 0)`` when it is missing (no
    ``<width>`` or no ``<height>``) or not positive. A NaN/inf size or a non-number is an error."""
    size = root.find("size")
    if size is None or size.find("width") is None or size.find("height") is None:
        return 0, 0
    wf, hf = child_number(size, "width", path, "<size>"), child_number(size, "height", path, "<size>")
    if not (math.isfinite(wf) and math.isfinite(hf)):
        raise FileFormatError(path, f"<size> is not finite: width {wf}, height {hf}", size.line)
    w, h = int(wf), int(hf)
    return (w, h) if w > 0 and h > 0 else (0, 0)


def voc_boxes(root: Node, path) -> List[VocBox]:
    """The ``<object>`` s of an ``<annotation>``, in file order, coordinates as written.

    Names are stripped and lower-cased; ``<difficult>`` missing or blank -> 0, else ``1 if int(float(text))``.
    Errors (naming the line): no ``<name>``, no ``<bndbox>``, a coordinate missing or not a number (NaN and
    inf are numbers: the loader's box rule drops them), a ``<difficult>`` that is not a number.
    """
    boxes = []
    for k, obj in enumerate(root.findall("object")):
        what = f"object #{k}"
        name = child_text(obj, "name", path, what).lower()
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise FileFormatError(path, f"{what} ('{name}') has no <bndbox>", obj.line)
        x1, y1, x2, y2 = (child_number(bndbox, t, path, f"{what} ('{name}')") for t in BOX_TAGS)
        difficult = 0
        diff = obj.find("difficult")
        if diff is not None and diff.text.strip():
            try:
                difficult = 1 if int(float(diff.text.strip())) else 0
            except (ValueError, OverflowError):
                raise FileFormatError(path, f"{what} <difficult> is not 0/1: {diff.text.strip()!r}",
                                      diff.line) from None
        boxes.append(VocBox(name, x1, y1, x2, y2, difficult))
    return boxes


# ---------------------------------------------------------------------------------------------------------
# Writing


def format_number(value: float) -> str:
    """Shortest fixed-point text of ``value`` with at most 3 decimals (``12.0`` -> ``"12"``)."""
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def voc_xml_text(folder: str, filename: str, width: int, height: int, depth: int, boxes: Sequence[VocBox],
                 coordinate_offset: float) -> str:
    """VOC XML for one image; ``coordinate_offset`` is added to every coordinate (the loader subtracts it)."""
    lines = ["<annotation>", f"  <folder>{escape(folder)}</folder>", f"  <filename>{escape(filename)}</filename>",
             "  <size>", f"    <width>{width}</width>", f"    <height>{height}</height>", f"    <depth>{depth}</depth>",
             "  </size>"]
    for b in boxes:
        lines += ["  <object>", f"    <name>{escape(b.name)}</name>", f"    <difficult>{b.difficult}</difficult>",
                  "    <bndbox>"]
        for tag, v in zip(BOX_TAGS, (b.x1, b.y1, b.x2, b.y2)):
            lines.append(f"      <{tag}>{format_number(v + coordinate_offset)}</{tag}>")
        lines += ["    </bndbox>", "  </object>"]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"
