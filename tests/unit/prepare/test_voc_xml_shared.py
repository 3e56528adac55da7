"""One VOC XML reader for the loader and the converters: ``gem_d2.data.voc.load_voc_instances`` and
``--check`` (``gem_d2.prepare.check``) read the same file to the same size, boxes and counts, and reject a
broken file with the same ``file:line`` message."""
import pytest
from PIL import Image

from gem_d2.data import DatasetFormatError, load_voc_instances
from gem_d2.data.uodb import UODB_DATASETS
from gem_d2.prepare import SourceFormatError
from gem_d2.prepare.check import check_dataset
from gem_d2.prepare.xmlio import parse_voc_xml

SPEC = UODB_DATASETS["clipart"]  # VOC classes, 1-based coordinates, .jpg

# Hand-written, as other tools write VOC XML: a declaration, comments, attributes, blank lines, padded and
# upper-case names, float coordinates, <difficult> missing, blank, "1.0" and "0", an entity in <folder>.
XML = """<?xml version="1.0" encoding="utf-8"?>
<!-- written by some labelling tool -->
<annotation verified="yes">
  <folder>art &amp; co</folder>
  <filename>a.jpg</filename>
  <size><width> 64 </width><height>48</height><depth>3</depth></size>
  <object>
    <name>  Person </name>
    <bndbox><xmin>11</xmin><ymin>21.5</ymin><xmax>31</xmax><ymax>41</ymax></bndbox>
  </object>
  <object>
    <name>DOG</name><difficult> </difficult>
    <bndbox>
      <!-- corners -->
      <xmin>1</xmin>
      <ymin>1</ymin>
      <xmax>64</xmax>
      <ymax>48</ymax>
    </bndbox>
  </object>
  <object><name>car</name><difficult>1.0</difficult>
    <bndbox><xmin>5</xmin><ymin>6</ymin><xmax>7.25</xmax><ymax>9</ymax></bndbox></object>
  <object><name>person</name><difficult>0</difficult>
    <bndbox><xmin>2</xmin><ymin>2</ymin><xmax>3</xmax><ymax>3</ymax></bndbox></object>
</annotation>
"""


def _tree(tmp_path, xml_text, size=(64, 48)):
    """A ``clipart`` UODB folder whose train split holds image ``a`` with ``xml_text``, test split image ``b``."""
    root = tmp_path / "clipart"
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id in ("a", "b"):
        Image.new("RGB", size, (90, 60, 30)).save(root / "JPEGImages" / f"{image_id}.jpg")
    (root / "Annotations" / "a.xml").write_text(xml_text)
    (root / "Annotations" / "b.xml").write_text(XML)
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\n")
    (root / "ImageSets" / "Main" / "test.txt").write_text("b\n")
    return root


def test_loader_and_check_read_the_same_boxes(tmp_path):
    root = _tree(tmp_path, XML)
    xml = root / "Annotations" / "a.xml"
    records, stats = load_voc_instances(str(root), "train", SPEC.classes, coordinate_offset=SPEC.coordinate_offset)
    ann = parse_voc_xml(xml)  # what --check and the VOC-XML converters read

    assert (records[0]["width"], records[0]["height"]) == (ann.width, ann.height) == (64, 48)
    off = SPEC.coordinate_offset
    from_check = [(SPEC.classes.index(b.name), [b.x1 - off, b.y1 - off, b.x2 - off, b.y2 - off], b.difficult)
                  for b in ann.boxes]
    from_loader = [(a["category_id"], a["bbox"], a["difficult"]) for a in records[0]["annotations"]]
    person, dog, car = (SPEC.classes.index(c) for c in ("person", "dog", "car"))
    assert from_loader == from_check == [(person, [10.0, 20.5, 30.0, 40.0], 0), (dog, [0.0, 0.0, 63.0, 47.0], 0),
                                         (car, [4.0, 5.0, 6.25, 8.0], 1), (person, [1.0, 1.0, 2.0, 2.0], 0)]
    assert (stats.clipped, stats.dropped_degenerate, stats.dropped_unknown) == (0, 0, {})

    result = check_dataset("clipart", str(tmp_path))
    assert result.ok, result.problems
    train = result.report.splits["train"]
    assert (train.images, train.boxes, train.difficult) == (stats.images, stats.boxes, stats.difficult) == (1, 4, 1)
    assert dict(train.classes) == {"person": 2, "dog": 1, "car": 1}


@pytest.mark.parametrize("xml_text, line, message", [
    ("<annotation>\n  <object>\n    <name>cat</name>\n</annotation>\n", 4, "malformed XML: mismatched tag"),
    ("<annotation>\n<object><name>cat</name>\n<bndbox><xmin>1</xmin></bndbox></object>\n</annotation>\n", 3,
     "object #0 ('cat') has no <ymin>"),
    ("<annotation>\n<object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>x9</xmax>\n"
     "<ymax>5</ymax></bndbox></object>\n</annotation>\n", 2, "object #0 ('cat') <xmax> is not a number: 'x9'"),
    ("<annotation>\n<object>\n<bndbox/></object></annotation>\n", 2, "object #0 has no <name>"),
    ("<annotation>\n<object><name>cat</name>\n<difficult>inf</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
     "<xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>\n", 3, "object #0 <difficult> is not 0/1: 'inf'"),
    ("<annotation>\n\n<size><width>nan</width><height>48</height></size></annotation>\n", 3,
     "<size> is not finite: width nan, height 48.0"),
])
def test_loader_and_check_reject_a_broken_file_alike(tmp_path, xml_text, line, message):
    root = _tree(tmp_path, xml_text)
    xml = root / "Annotations" / "a.xml"
    expected = f"{xml}:{line}: {message}"
    with pytest.raises(DatasetFormatError) as loader_error:
        load_voc_instances(str(root), "train", SPEC.classes)
    with pytest.raises(SourceFormatError) as converter_error:
        parse_voc_xml(xml)
    assert str(loader_error.value) == str(converter_error.value) == expected
    assert expected in check_dataset("clipart", str(tmp_path)).problems
