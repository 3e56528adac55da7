"""Releases already in the VOC layout, kept as is: PASCAL VOC 2007/2012 and Clipart1k / Watercolor2k / Comic2k.

Annotations and images are linked (or copied) unchanged; every XML listed in a split is parsed, so a malformed
file fails the conversion with its file and line, and the boxes are counted. Only the standard split files
(train, val, trainval, test) are carried over; the loader reads those named in ``gem_d2.data.uodb``:
VOC2007 trainval + VOC2012 trainval -> ``uodb_voc_trainval``, VOC2007 test -> ``uodb_voc_test`` (reference
code ``voc_2007_trainval+voc_2012_trainval`` / ``voc_2007_test``); the art sets' train / test files as
released by Inoue et al. (naoto0804/cross-domain-detection), which the reference code reads unchanged.
"""
import os
from typing import Dict, List, Tuple

from gem_d2.prepare.base import Context, Converter
from gem_d2.prepare.errors import SourceFormatError

STANDARD_SPLITS = ("train", "val", "trainval", "test")


def read_split_file(path) -> List[Tuple[int, str]]:
    """``[(line number, image id)]`` of a VOC split file (first token of each non-blank line)."""
    with open(path, encoding="utf-8") as f:
        return [(n, line.split()[0]) for n, line in enumerate(f, 1) if line.strip()]


class AsIsVocConverter(Converter):
    """Links VOC-layout source folders into the output. ``folder_map``: output folder -> source sub-folder."""

    def __init__(self, key: str, source_dir: str, folder_map: Dict[str, str], expected: str):
        self.key, self.source_dir, self.folder_map, self.expected = key, source_dir, folder_map, expected

    def _required(self) -> Dict[str, List[str]]:
        req: Dict[str, List[str]] = {}
        for sources in self.spec.splits.values():
            for folder, split in sources:
                req.setdefault(folder, []).append(split)
        return req

    def _listing(self, src) -> List[Tuple[str, str, str, int, str]]:
        """``[(folder, split, split_file, line, image id)]`` over the split files to carry."""
        out = []
        required = self._required()
        for folder in self.folders:
            root = self.require(os.path.join(src, self.folder_map[folder]), f"folder for {folder}")
            for split in STANDARD_SPLITS:
                path = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
                if not os.path.isfile(path):
                    if split in required[folder]:
                        self.require(path, f"split file '{split}'")
                    continue
                rows = read_split_file(path)
                if not rows and split in required[folder]:
                    raise SourceFormatError(path, "split file lists no image")
                out += [(folder, split, path, n, image_id) for n, image_id in rows]
        return out

    def _files(self, src, folder, image_id):
        root = os.path.join(src, self.folder_map[folder])
        return (os.path.join(root, "Annotations", image_id + ".xml"),
                os.path.join(root, "JPEGImages", image_id + self.spec.image_ext))

    def inputs(self, src):
        files = set()
        for folder, _, path, _, image_id in self._listing(src):
            files.add(path)
            files.update(self._files(src, folder, image_id))
        return sorted(files)

    def convert(self, src, ctx: Context):
        listing = self._listing(src)
        writers = {folder: ctx.writer(self.spec, folder) for folder in self.folders}
        for folder, split, path, line, image_id in ctx.progress(listing, desc=self.key):
            xml, image = self._files(src, folder, image_id)
            for f, what in ((xml, "annotation"), (image, "image")):
                if not os.path.isfile(f):
                    raise SourceFormatError(path, f"{what} of listed image {image_id!r} not found: {f}", line)
            writers[folder].add_existing(split, image_id, xml, image)
        stats = {}
        required = self._required()
        for folder, writer in writers.items():
            for split, st in writer.finish(required_splits=required[folder]).items():
                stats[(folder, split)] = st
        return stats


def voc_converter() -> AsIsVocConverter:
    return AsIsVocConverter("voc", "VOCdevkit", {"VOC2007": "VOC2007", "VOC2012": "VOC2012"},
                            "VOCdevkit/VOC2007 and VOCdevkit/VOC2012 as unpacked from VOCtrainval_06-Nov-2007.tar, "
                            "VOCtest_06-Nov-2007.tar and VOCtrainval_11-May-2012.tar (Annotations/, JPEGImages/, "
                            "ImageSets/Main/{trainval,test}.txt)")


def art_converter(key: str) -> AsIsVocConverter:
    return AsIsVocConverter(key, key, {key: "."},
                            f"{key}/Annotations/*.xml, {key}/JPEGImages/*.jpg, {key}/ImageSets/Main/train.txt and "
                            "test.txt, as unpacked from the cross-domain-detection release (naoto0804)")
