"""The 11 UODB datasets (Universal Object Detection Benchmark), registered as ``uodb_<name>_<split>``.

Splits, class lists and image extensions are those of the UODB reference code
(frank-xwang/towards-universal-object-detection, ``lib/datasets/factory.py`` and ``<name>_voc.py``):
one training and one test split per dataset. Registration is lazy (nothing is read before
``DatasetCatalog.get``). Folders, relative to the root (``cfg.DATASETS.UODB_ROOT``, else
``$DETECTRON2_DATASETS``, else ``./datasets``; ``register_uodb(root)`` re-registers under another one):

============================  ==========================  =========================================  =====  ======
datasets                      folder                      content                                    ext    offset
============================  ==========================  =========================================  =====  ======
uodb_kitti_train / _val       ``KITTI``                   VOC layout, splits train.txt / val.txt     .jpg   1
uodb_widerface_train / _val   ``WiderFace``               VOC layout, train / val                    .jpg   0
uodb_voc_trainval             ``VOC2007`` + ``VOC2012``   VOC layout, trainval of both years         .jpg   1
uodb_voc_test                 ``VOC2007``                 VOC layout, test                           .jpg   1
uodb_lisa_train / _test       ``LISA``                    VOC layout, train / test                   .png   0
uodb_dota_train / _val        ``DOTA``                    VOC layout, train / val                    .jpg   0
uodb_coco_valminusminival     ``coco``                    images/val2014/,                           .jpg   -
                                                          annotations/instances_valminusminival2014.json
uodb_coco_minival             ``coco``                    images/val2014/,                           .jpg   -
                                                          annotations/instances_minival2014.json
uodb_watercolor_train / _test ``watercolor``              VOC layout, train / test                   .jpg   1
uodb_clipart_train / _test    ``clipart``                 VOC layout, train / test                   .jpg   1
uodb_comic_train / _test      ``comic``                   VOC layout, train / test                   .jpg   1
uodb_kitchen_train / _test    ``Kitchen``                 VOC layout, train / test                   .png   1
uodb_deeplesion_trainval      ``DeepLesion``              VOC layout, trainval / test                .png   0
/ _test
============================  ==========================  =========================================  =====  ======

"VOC layout" = ``Annotations/<id>.xml``, ``ImageSets/Main/<split>.txt``, ``JPEGImages/<id>.<ext>``.
"offset" = value subtracted from the XML coordinates: the reference loaders subtract 1 (1-based files) for
KITTI, VOC, the art sets and Kitchen, but read WiderFace, LISA, DOTA and DeepLesion as they are.
Watercolor and Comic use the 20 VOC classes, as the official code does (DAMEX's 6-class lists differ).
The domain (label-space block) of each dataset is ``uodb_<name>``, shared by its two splits.
"""
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from detectron2.data.datasets.builtin_meta import _get_coco_instances_meta

from gem_d2.data.catalog import datasets_root
from gem_d2.data.coco import register_coco_dataset
from gem_d2.data.voc import register_voc_sources

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
DOTA_CLASSES = ("plane", "baseball-diamond", "bridge", "ground-track-field", "small-vehicle", "large-vehicle", "ship",
                "tennis-court", "basketball-court", "storage-tank", "soccer-ball-field", "roundabout", "harbor",
                "swimming-pool", "helicopter")
KITCHEN_CLASSES = ("coca_cola_glass_bottle", "coffee_mate_french_vanilla", "honey_bunches_of_oats_honey_roasted",
                   "hunts_sauce", "mahatma_rice", "nature_valley_soft_baked_oatmeal_squares_cinnamon_brown_sugar",
                   "nature_valley_sweet_and_salty_nut_almond", "palmolive_orange", "pop_secret_light_butter",
                   "pringles_bbq", "red_bull")
COCO_CLASSES = tuple(_get_coco_instances_meta()["thing_classes"])  # 80, in COCO category-id order


@dataclass(frozen=True)
class UodbSpec:
    """One UODB dataset: its VOC-layout sources per split (folder, split file) or COCO JSON files."""

    key: str
    classes: Tuple[str, ...]
    splits: Dict[str, Tuple[Tuple[str, str], ...]]  # our split name -> ((folder, split file), ...)
    image_ext: Optional[str] = None
    coordinate_offset: float = 1.0
    coco_json: Optional[Dict[str, str]] = None  # split -> json path relative to the folder (COCO only)


def _voc(key, folder, classes, train, test, ext, offset=1.0) -> UodbSpec:
    return UodbSpec(key, tuple(classes), {train: ((folder, train),), test: ((folder, test),)}, ext, offset)


UODB_DATASETS: Dict[str, UodbSpec] = {s.key: s for s in (
    _voc("kitti", "KITTI", ("pedestrian", "cyclist", "car"), "train", "val", ".jpg"),
    _voc("widerface", "WiderFace", ("face",), "train", "val", ".jpg", offset=0.0),
    UodbSpec("voc", VOC_CLASSES, {"trainval": (("VOC2007", "trainval"), ("VOC2012", "trainval")),
                                  "test": (("VOC2007", "test"),)}, ".jpg"),
    _voc("lisa", "LISA", ("warning", "noturn", "speedlimit", "stop"), "train", "test", ".png", offset=0.0),
    _voc("dota", "DOTA", DOTA_CLASSES, "train", "val", ".jpg", offset=0.0),
    UodbSpec("coco", COCO_CLASSES, {"valminusminival": (("coco", "valminusminival"),),
                                    "minival": (("coco", "minival"),)}, ".jpg",
             coco_json={"valminusminival": "annotations/instances_valminusminival2014.json",
                        "minival": "annotations/instances_minival2014.json"}),
    _voc("watercolor", "watercolor", VOC_CLASSES, "train", "test", ".jpg"),
    _voc("clipart", "clipart", VOC_CLASSES, "train", "test", ".jpg"),
    _voc("comic", "comic", VOC_CLASSES, "train", "test", ".jpg"),
    _voc("kitchen", "Kitchen", KITCHEN_CLASSES, "train", "test", ".png"),
    _voc("deeplesion", "DeepLesion", ("lesion",), "trainval", "test", ".png", offset=0.0),
)}
COCO_IMAGE_DIR = "images/val2014"  # relative to the coco folder, for both COCO splits


def uodb_dataset_names(split: Optional[str] = None) -> list:
    """All ``uodb_<name>_<split>`` names; ``split="train"`` / ``"test"`` keeps the training / test split only."""
    names = []
    for spec in UODB_DATASETS.values():
        splits = list(spec.splits)
        chosen = splits if split is None else [splits[0]] if split == "train" else [splits[1]]
        names += [f"uodb_{spec.key}_{s}" for s in chosen]
    return names


_registered_root: Optional[str] = None


def registered_uodb_root() -> Optional[str]:
    """The root the ``uodb_*`` datasets are currently registered under."""
    return _registered_root


def register_uodb(root: Optional[str] = None) -> None:
    """(Re-)register every UODB dataset under ``root`` (default: ``$DETECTRON2_DATASETS`` or ``datasets``)."""
    global _registered_root
    root = os.path.expanduser(os.fspath(root)) if root else datasets_root()
    _registered_root = root
    for spec in UODB_DATASETS.values():
        domain = f"uodb_{spec.key}"
        for split, sources in spec.splits.items():
            name = f"{domain}_{split}"
            if spec.coco_json is not None:
                folder = os.path.join(root, sources[0][0])
                register_coco_dataset(name, os.path.join(folder, spec.coco_json[split]),
                                      os.path.join(folder, COCO_IMAGE_DIR), class_names=spec.classes, domain=domain)
            else:
                register_voc_sources(name, [(os.path.join(root, folder), s) for folder, s in sources], spec.classes,
                                     image_ext=spec.image_ext, domain=domain,
                                     coordinate_offset=spec.coordinate_offset)
