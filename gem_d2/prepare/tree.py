"""Writing one dataset folder in the VOC layout the gem_d2 loader reads.

``<folder>/Annotations/<id>.xml``, ``<folder>/ImageSets/Main/<split>.txt`` (ids in the order added) and
``<folder>/JPEGImages/<id><ext>``. Boxes are given in the loader's 0-based coordinates and written with the
dataset's coordinate offset added, so the loader reads back exactly what the converter produced.
"""
import os
from collections import Counter
from typing import Dict, List, Optional, Sequence

from gem_d2.data.voc_xml import VocBox, voc_xml_text
from gem_d2.prepare.errors import SourceFormatError
from gem_d2.prepare.images import place_image, save_image
from gem_d2.prepare.records import SplitStats
from gem_d2.prepare.xmlio import parse_voc_xml, write_text

DROP_UNKNOWN = "class not in the UODB list: {}"
DROP_EMPTY_BOX = "box empty after clipping to the image"
DROP_EMPTY_IMAGE = "image left without boxes"


class VocTreeWriter:
    """Accumulates the images of one VOC-layout folder; :meth:`finish` writes the split files.

    Args:
        folder_dir: the folder to write (inside the staging area).
        classes: the dataset's class list; boxes of other names are dropped and counted in ``dropped``.
        image_ext: extension of every image in ``JPEGImages`` (``.jpg``/``.png``).
        coordinate_offset: added to every coordinate written (the loader subtracts it).
        link_mode: how source images whose format already matches are placed (see ``images.place_image``).
        dropped: counter of dropped items by reason, shared with the dataset's report.
        keep_empty: write images left without any box (default: they are dropped and counted).
    """

    def __init__(self, folder_dir: str, classes: Sequence[str], image_ext: str, coordinate_offset: float,
                 link_mode: str, dropped: Counter, keep_empty: bool = False):
        self.folder_dir = folder_dir
        self.folder_name = os.path.basename(os.path.normpath(folder_dir))
        self.classes = set(classes)
        self.image_ext = image_ext
        self.offset = coordinate_offset
        self.link_mode = link_mode
        self.dropped = dropped
        self.keep_empty = keep_empty
        self._splits: Dict[str, List[str]] = {}
        self._members: Dict[str, set] = {}
        self._images: Dict[str, SplitStats] = {}  # image id -> its boxes as a one-image SplitStats

    def _image_path(self, image_id: str) -> str:
        return os.path.join(self.folder_dir, "JPEGImages", image_id + self.image_ext)

    def _check_id(self, image_id: str) -> None:
        if not image_id or any(c in image_id for c in "/\\ \t\n") or image_id.startswith("."):
            raise ValueError(f"invalid image id {image_id!r}: ids must be non-empty, without slashes or spaces")
        if image_id in self._images:
            raise ValueError(f"image id {image_id!r} written twice in {self.folder_dir}")

    def _record(self, split: str, image_id: str, boxes: Sequence[VocBox]) -> None:
        st = SplitStats(images=1, boxes=len(boxes), difficult=sum(b.difficult for b in boxes),
                        classes=Counter(b.name for b in boxes))
        self._images[image_id] = st
        self._include(split, image_id)

    def _include(self, split: str, image_id: str) -> None:
        members = self._members.setdefault(split, set())
        if image_id in members:
            raise ValueError(f"image id {image_id!r} listed twice in split '{split}' of {self.folder_dir}")
        members.add(image_id)
        self._splits.setdefault(split, []).append(image_id)

    def add(self, split: str, image_id: str, width: int, height: int, boxes: Sequence[VocBox], *,
            source: Optional[str] = None, image=None, depth: int = 3) -> bool:
        """Add one image with its boxes to ``split``; returns False when it was dropped for having no box.

        Exactly one of ``source`` (a file, linked/copied or re-encoded) or ``image`` (a PIL image or uint8 array,
        encoded) gives the pixels. Boxes are filtered (class list), clipped to the image, empty ones dropped.
        """
        self._check_id(image_id)
        if (source is None) == (image is None):
            raise ValueError("give exactly one of source= or image=")
        kept = []
        for b in boxes:
            if b.name not in self.classes:
                self.dropped[DROP_UNKNOWN.format(b.name)] += 1
                continue
            c = b.clipped(width, height)
            if c.is_empty:
                self.dropped[DROP_EMPTY_BOX] += 1
                continue
            kept.append(c)
        if not kept and not self.keep_empty:
            self.dropped[DROP_EMPTY_IMAGE] += 1
            return False
        dst = self._image_path(image_id)
        if source is not None:
            place_image(source, dst, self.link_mode)
        else:
            save_image(image, dst)
        xml = voc_xml_text(self.folder_name, image_id + self.image_ext, width, height, depth, kept, self.offset)
        write_text(os.path.join(self.folder_dir, "Annotations", image_id + ".xml"), xml)
        self._record(split, image_id, kept)
        return True

    def add_existing(self, split: str, image_id: str, xml_source: str, image_source: str) -> None:
        """Add an image whose VOC XML is kept as is (linked/copied); the XML is parsed to validate and count it.

        An id already added (VOC lists an image in several split files) is only added to ``split``.
        """
        if image_id in self._images:
            self._include(split, image_id)
            return
        self._check_id(image_id)
        ann = parse_voc_xml(xml_source)
        kept = []
        for b in ann.boxes:
            if b.name in self.classes:
                kept.append(b)
            else:
                self.dropped[DROP_UNKNOWN.format(b.name)] += 1
        place_image(image_source, self._image_path(image_id), self.link_mode)
        place_image_file(xml_source, os.path.join(self.folder_dir, "Annotations", image_id + ".xml"), self.link_mode)
        self._record(split, image_id, kept)

    def finish(self, required_splits: Sequence[str] = ()) -> Dict[str, SplitStats]:
        """Write ``ImageSets/Main/<split>.txt`` for every split and return the stats per split.

        A split in ``required_splits`` with no image raises (the loader refuses empty split files).
        """
        for split in required_splits:
            if not self._splits.get(split):
                raise SourceFormatError(self.folder_dir, f"split '{split}' has no image after conversion "
                                        "(check the source files and the dropped-item counts)")
        stats = {}
        for split, ids in self._splits.items():
            split_file = os.path.join(self.folder_dir, "ImageSets", "Main", f"{split}.txt")
            write_text(split_file, "".join(i + "\n" for i in ids))
            st = SplitStats()
            for i in ids:
                st.add(self._images[i])
            stats[split] = st
        return stats


def place_image_file(src: str, dst: str, link_mode: str) -> None:
    """Link or copy a non-image file (an annotation kept as is) the way images are placed."""
    place_image(src, dst, link_mode)
