"""GemDatasetMapper: detectron2's DatasetMapper plus the dataset identity and unified labels gem_d2 needs.

Training augmentation is DETR's/DINO's (:func:`build_train_augmentation`), as detectron2 augmentations.
"""
import copy
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.utils.file_io import PathManager
from PIL import Image

from gem_d2.data.label_space import UnifiedLabelSpace
from gem_d2.utils.checks import check_index_range

# Integer grayscale modes PIL opens 16-bit images in (PNG, TIFF; "I" is 32-bit signed, e.g. older Pillow's PNGs).
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageReadError(OSError):
    """An image file exists but cannot be decoded (the message names the file)."""


def image_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale -> 8-bit ``"L"`` by ``v >> 8`` (``floor(v / 256)``); other modes are returned as is.

    PIL's own conversion of a 16-bit image to ``"L"``/``"RGB"`` clips every value above 255 to 255, which
    turns most of a 16-bit image white. The rule here maps the full 16-bit range linearly onto 0..255:
    it keeps the order of pixel values (monotone), a full-range image keeps its full spread (each output
    level gets 1/256 of a uniform gradient), and it is the same for every image (no per-image stretch,
    so brightness stays comparable across a dataset and flat images do not get their noise amplified).
    Modes: ``I;16`` (and ``I;16L/B/N``) and ``I`` (32-bit integer; values outside 0..65535 are clipped
    first). Data that uses only part of the range (e.g. 12-bit scans stored in 16 bits, or CT values
    that need a window) comes out dark: convert such images to 8 bits when preparing the dataset, as
    ``gem_d2.prepare`` does for DeepLesion.
    """
    if image.mode not in HIGH_BIT_DEPTH_MODES:
        return image
    values = np.asarray(image).astype(np.int64)
    return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8))


def read_image_checked(file_name: str, format: Optional[str] = None):
    """detectron2's ``read_image`` (EXIF orientation, then ``format``) with an error naming the file when it is
    missing or corrupt, and 16-bit images mapped to 8 bits by :func:`image_to_8bit` instead of clipped."""
    try:
        with PathManager.open(file_name, "rb") as f:
            image = Image.open(f)
            image = utils._apply_exif_orientation(image)
            return utils.convert_PIL_to_numpy(image_to_8bit(image), format)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"image file not found: {file_name}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"cannot read image {file_name}: {e}") from e


class RandomBranch(T.Augmentation):
    """Apply the augmentations of ``second`` with probability ``prob``, else those of ``first``.

    DETR's ``RandomSelect(first, second, p)`` with ``p = 1 - prob``; one uniform draw from numpy's global
    generator (as every detectron2 augmentation) picks the branch. Returns the chosen branch's transforms.
    """

    def __init__(self, first: Sequence[T.Augmentation], second: Sequence[T.Augmentation], prob: float):
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"RandomBranch prob must be in [0, 1], got {prob!r}")
        self.first = T.AugmentationList(list(first))
        self.second = T.AugmentationList(list(second))
        self.prob = float(prob)

    def __call__(self, aug_input) -> T.Transform:
        branch = self.second if self._rand_range() < self.prob else self.first
        return branch(aug_input)


def build_train_augmentation(cfg) -> List[T.Augmentation]:
    """DETR's/DINO's training augmentation from ``cfg.INPUT``.

    Random flip (``INPUT.RANDOM_FLIP``), then with probability ``1 - INPUT.CROP_BRANCH.PROB`` the
    multi-scale resize alone (short side from ``INPUT.MIN_SIZE_TRAIN`` by ``MIN_SIZE_TRAIN_SAMPLING``,
    long side at most ``INPUT.MAX_SIZE_TRAIN``), else: resize the short side to one of
    ``INPUT.CROP_BRANCH.RESIZE_SHORT`` (no long-side limit), crop a random region whose height and width
    are each drawn uniformly from ``[SIZE[0], min(SIZE[1], side)]`` (DETR's ``RandomSizeCrop``; detectron2's
    ``absolute_range`` crop) at a uniform position, then the same multi-scale resize. DINO/DETR: ``PROB``
    0.5, ``RESIZE_SHORT`` (400, 500, 600), ``SIZE`` (384, 600). Boxes follow through detectron2's transforms.
    """
    inp = cfg.INPUT
    if inp.CROP.ENABLED:
        raise ValueError("INPUT.CROP is not used by gem_d2's dataset mapper (it would crop every image before the "
                         "resize); DINO's crop branch is INPUT.CROP_BRANCH.PROB / RESIZE_SHORT / SIZE. Set "
                         "INPUT.CROP.ENABLED False")
    branch = inp.CROP_BRANCH
    prob = float(branch.PROB)
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"INPUT.CROP_BRANCH.PROB must be in [0, 1], got {branch.PROB!r}")
    augs: List[T.Augmentation] = []
    if inp.RANDOM_FLIP != "none":
        augs.append(T.RandomFlip(horizontal=inp.RANDOM_FLIP == "horizontal", vertical=inp.RANDOM_FLIP == "vertical"))
    resize = T.ResizeShortestEdge(inp.MIN_SIZE_TRAIN, inp.MAX_SIZE_TRAIN, inp.MIN_SIZE_TRAIN_SAMPLING)
    if prob == 0.0:
        return augs + [resize]
    shorts = tuple(int(v) for v in branch.RESIZE_SHORT)
    size = tuple(int(v) for v in branch.SIZE)
    if not shorts or min(shorts) <= 0:
        raise ValueError(f"INPUT.CROP_BRANCH.RESIZE_SHORT must be positive sizes, got {branch.RESIZE_SHORT!r}")
    if len(size) != 2 or not 0 < size[0] <= size[1]:
        raise ValueError(f"INPUT.CROP_BRANCH.SIZE must be (min, max) with 0 < min <= max, got {branch.SIZE!r}")
    crop = [T.ResizeShortestEdge(shorts, sys.maxsize, "choice"), T.RandomCrop("absolute_range", size), resize]
    if prob == 1.0:
        return augs + crop
    return augs + [RandomBranch([resize], crop, prob)]


class GemDatasetMapper(DatasetMapper):
    """Maps a dataset dict like ``DatasetMapper`` and adds, for every image:

    - ``dataset_id`` (int): index of the image's dataset in the label space (test datasets: their domain's);
    - ``dataset_name`` (str) and ``class_block`` ``(start, stop)``: the dataset's classes in the unified space;
    - in training, ``instances.gt_classes`` in unified ids and ``instances.gt_difficult`` (bool).

    Records must carry ``dataset_name`` (gem_d2's registrations and loaders add it). Images without objects
    give empty ``instances``. Detection only: no semantic segmentation or precomputed proposals. From a
    config, training uses :func:`build_train_augmentation` (``INPUT.CROP`` is refused) and testing
    detectron2's test-time resize.
    """

    @configurable
    def __init__(self, is_train: bool, *, label_space: UnifiedLabelSpace, **kwargs):
        """Args: ``is_train``, ``label_space`` and every keyword argument of ``DatasetMapper``."""
        super().__init__(is_train, **kwargs)
        if self.proposal_topk is not None:
            raise ValueError("GemDatasetMapper does not load precomputed proposals (MODEL.LOAD_PROPOSALS)")
        self.label_space = label_space
        self._dataset_ids: Dict[str, int] = {}

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, label_space: Optional[UnifiedLabelSpace] = None):
        if is_train:
            augmentations = build_train_augmentation(cfg)  # first: it refuses INPUT.CROP before d2 reads it
        ret = super().from_config(cfg, is_train)
        if is_train:
            ret["augmentations"] = augmentations
        ret["label_space"] = label_space if label_space is not None else UnifiedLabelSpace.from_cfg(cfg)
        return ret

    def dataset_id(self, name: str) -> int:
        """Label-space index of dataset ``name`` (cached)."""
        if name not in self._dataset_ids:
            self._dataset_ids[name] = self.label_space.dataset_index(name)
        return self._dataset_ids[name]

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        annos = []
        for obj in dataset_dict.pop("annotations"):
            if obj.get("iscrowd", 0) != 0:
                continue
            obj = dict(obj)
            if not self.use_instance_mask:
                obj.pop("segmentation", None)
            if not self.use_keypoint:
                obj.pop("keypoints", None)
            annos.append(utils.transform_instance_annotations(
                obj, transforms, image_shape, keypoint_hflip_indices=self.keypoint_hflip_indices))
        instances = utils.annotations_to_instances(annos, image_shape, mask_format=self.instance_mask_format)
        instances.gt_difficult = torch.tensor([bool(a.get("difficult", 0)) for a in annos], dtype=torch.bool)
        if self.recompute_boxes:
            instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
        dataset_dict["instances"] = utils.filter_empty_instances(instances)

    def __call__(self, dataset_dict):
        """Map one record (see the class doc); errors name the image file or the dataset."""
        name = dataset_dict.get("dataset_name")
        if name is None:
            raise ValueError(f"record of {dataset_dict.get('file_name', '?')} has no 'dataset_name': load datasets "
                           f"with gem_d2.data.get_gem_dataset_dicts (or add the key) before GemDatasetMapper")
        index = self.dataset_id(name)
        start, stop = self.label_space.block(index)
        out = self._map_image(copy.deepcopy(dataset_dict))
        out["dataset_id"] = index
        out["dataset_name"] = name
        out["class_block"] = (start, stop)
        if "instances" in out:
            gt = out["instances"].gt_classes
            check_index_range(gt, stop - start, f"{dataset_dict['file_name']}: category ids of dataset '{name}'")
            out["instances"].gt_classes = gt + start
        return out

    def _map_image(self, dataset_dict):
        """DatasetMapper's detection steps: read (errors name the file), augment, image tensor, annotations."""
        image = read_image_checked(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict
