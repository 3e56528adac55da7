"""Reading and writing Pascal-VOC annotation XML.

Reading keeps the line number of every element (``xml.etree`` does not), so a malformed source file is
reported as ``file:line``. Writing produces the minimal VOC XML the loader reads, deterministically.
"""
import os
import xml.parsers.expat
from dataclasses import dataclass, field
from typing import List, Optional

from gem_d2.prepare.errors import SourceFormatError
from gem_d2.prepare.records import Box


@dataclass
class Node:
    """An XML element with the line it starts on."""

    tag: str
    line: int
    text: str = ""
    children: List["Node"] = field(default_factory=list)

    def find(self, tag: str) -> Optional["Node"]:
        return next((c for c in self.children if c.tag == tag), None)

    def findall(self, tag: str) -> List["Node"]:
        return [c for c in self.children if c.tag == tag]


def read_xml(path) -> Node:
    """Parse ``path`` into a :class:`Node` tree; malformed XML raises :class:`SourceFormatError` with the line."""
    parser = xml.parsers.expat.ParserCreate()
    stack: List[Node] = []
    root: List[Node] = []

    def start(tag, _attrs):
        node = Node(tag, parser.CurrentLineNumber)
        (stack[-1].children if stack else root).append(node)
        stack.append(node)

    def end(_tag):
        stack.pop()

    def chars(data):
        if stack:
            stack[-1].text += data

    parser.StartElementHandler, parser.EndElementHandler, parser.CharacterDataHandler = start, end, chars
    try:
        with open(path, "rb") as f:
            parser.ParseFile(f)
    except xml.parsers.expat.ExpatError as e:
        raise SourceFormatError(path, f"malformed XML: {xml.parsers.expat.ErrorString(e.code)}", e.lineno) from None
    if not root:
        raise SourceFormatError(path, "no XML element found", 1)
    return root[0]


def _child_text(node: Node, tag: str, path, what: str) -> str:
    child = node.find(tag)
    if child is None or not child.text.strip():
        raise SourceFormatError(path, f"{what} has no <{tag}>", node.line)
    return child.text.strip()


def _child_number(node: Node, tag: str, path, what: str) -> float:
    text = _child_text(node, tag, path, what)
    try:
        return float(text)
    except ValueError:
        raise SourceFormatError(path, f"{what}: <{tag}> is not a number: {text!r}", node.find(tag).line) from None


@dataclass
class VocAnnotation:
    """The parts of a VOC XML file the converters use. Box coordinates are as written in the file."""

    folder: str
    filename: str
    width: int  # 0 when <size> is missing or not positive
    height: int
    boxes: List[Box]


def parse_voc_xml(path) -> VocAnnotation:
    """Read a VOC annotation file; names are lower-cased and stripped, ``difficult`` defaults to 0."""
    root = read_xml(path)
    if root.tag != "annotation":
        raise SourceFormatError(path, f"root element is <{root.tag}>, expected <annotation>", root.line)
    width = height = 0
    size = root.find("size")
    if size is not None and size.find("width") is not None and size.find("height") is not None:
        width = int(_child_number(size, "width", path, "<size>"))
        height = int(_child_number(size, "height", path, "<size>"))
    boxes = []
    for k, obj in enumerate(root.findall("object")):
        what = f"object #{k}"
        name = _child_text(obj, "name", path, what).lower()
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise SourceFormatError(path, f"{what} ('{name}') has no <bndbox>", obj.line)
        coords = [_child_number(bndbox, t, path, f"{what} ('{name}')") for t in ("xmin", "ymin", "xmax", "ymax")]
        difficult = 0
        diff = obj.find("difficult")
        if diff is not None and diff.text.strip():
            try:
                difficult = 1 if int(float(diff.text.strip())) else 0
            except ValueError:
                raise SourceFormatError(path, f"{what}: <difficult> is not 0/1: {diff.text.strip()!r}",
                                        diff.line) from None
        boxes.append(Box(name, *coords, difficult=difficult))
    folder_node, file_node = root.find("folder"), root.find("filename")
    return VocAnnotation(folder_node.text.strip() if folder_node is not None else "",
                         file_node.text.strip() if file_node is not None else "", width, height, boxes)


def write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` (UTF-8, ``\\n`` line ends); parent folders are created."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
