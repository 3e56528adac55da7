"""Writing VOC-layout annotation XML: one writer for the generated data and the UODB converters."""
from __future__ import annotations

from typing import NamedTuple, Sequence
from xml.sax.saxutils import escape


class VocBox(NamedTuple):
    """One object, 0-based pixel coordinates (what gem_d2's loader returns)."""

    name: str
    x1: float
    y1: float
    x2: float
    y2: float
    difficult: int = 0


def format_number(value: float) -> str:
    """Shortest fixed-point text of ``value`` with at most 3 decimals (``12.0`` -> ``"12"``)."""
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def voc_xml_text(folder: str, filename: str, width: int, height: int, depth: int, boxes: Sequence[VocBox],
                 coordinate_offset: float) -> str:
    """VOC XML for one image; ``coordinate_offset`` is added to every coordinate (the loader subtracts it).

    ``boxes``: objects with ``name, x1, y1, x2, y2, difficult`` (a :class:`VocBox`, or the converters' ``Box``).
    """
    lines = ["<annotation>", f"  <folder>{escape(folder)}</folder>", f"  <filename>{escape(filename)}</filename>",
             "  <size>", f"    <width>{width}</width>", f"    <height>{height}</height>", f"    <depth>{depth}</depth>",
             "  </size>"]
    for b in boxes:
        lines += ["  <object>", f"    <name>{escape(b.name)}</name>", f"    <difficult>{b.difficult}</difficult>",
                  "    <bndbox>"]
        for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), (b.x1, b.y1, b.x2, b.y2)):
            lines.append(f"      <{tag}>{format_number(v + coordinate_offset)}</{tag}>")
        lines += ["    </bndbox>", "  </object>"]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"
