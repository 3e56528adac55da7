"""GEMDINO: the detectron2 meta-architecture, a thin adapter around :class:`~gem_d2.modeling.dino.DINO`.

It reads the config once (``from_config``), builds detectron2's backbone and the plain modules
(DINO, matcher, criterion), and converts between detectron2's inputs/outputs and tensors:

- inputs: dicts with ``"image"`` ``(3, H, W)`` uint8 in ``INPUT.FORMAT``, ``"instances"``
  (``gt_boxes`` absolute XYXY in that image, ``gt_classes`` unified ids), ``"dataset_id"`` (int),
  ``"class_block"`` ``(start, stop)`` and, for inference, ``"height"``/``"width"``;
- training returns the loss dict: the criterion's weighted losses plus every auxiliary loss the
  MoE routers put into ``RoutingContext.aux_losses``;
- inference returns ``[{"instances": Instances}]`` with ``pred_boxes`` in the input's
  ``height``/``width``, ``scores`` and ``pred_classes`` as the dataset's **local** 0-based ids.

With ``MODEL.GEM.TEST_ROUTING: auto`` inference ignores the inputs' dataset: a linear classifier on
the image's pooled backbone features picks it (:mod:`gem_d2.modeling.auto_routing`, fitted by
:meth:`GEMDINO.fit_dataset_classifier`), and each
output also carries ``"routed_dataset"`` (a ``DATASETS.TRAIN`` name).

After each forward, ``self.routing_stats`` holds the routers' ``RoutingContext.stats`` (detached), with
each MoE layer's FFN evaluations per token (:mod:`gem_d2.modeling.moe.ffn_count`).
"""
from __future__ import annotations

import logging
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone, detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor, nn

from gem_d2.data.label_space import UnifiedLabelSpace
from gem_d2.layers.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from gem_d2.layers.neck import ChannelMapper
from gem_d2.layers.position_encoding import PositionEmbeddingSine
from gem_d2.modeling.auto_routing import DatasetClassifier, pooled_image_features
from gem_d2.modeling.dino.criterion import SetCriterion
from gem_d2.modeling.dino.detector import DINO, class_block_masks
from gem_d2.modeling.dino.matcher import HungarianMatcher
from gem_d2.modeling.dino.transformer import build_dino_transformer
from gem_d2.modeling.moe.context import MoESpec
from gem_d2.modeling.moe.ffn_count import count_ffn_evaluations
from gem_d2.modeling.moe.spec import moe_spec_from_cfg
from gem_d2.utils.checks import check_index_range

__all__ = ["GEMDINO", "build_moe_spec"]

logger = logging.getLogger(__name__)


def build_moe_spec(cfg, dataset_names: Sequence[str]) -> Optional[MoESpec]:
    """The MoE spec of ``cfg.MODEL.GEM`` for the label space's datasets ``dataset_names`` (in block order);
    None (dense FFNs everywhere) when ``MOE_LAYERS`` is empty."""
    if not cfg.MODEL.GEM.MOE_LAYERS:
        return None
    return moe_spec_from_cfg(cfg, list(dataset_names))


@META_ARCH_REGISTRY.register()
class GEMDINO(nn.Module):
    """DINO on a detectron2 backbone, trained and evaluated per dataset class block.

    Args:
        backbone: detectron2 backbone.
        in_features: backbone outputs fed to DINO's neck, finest first.
        dino: the detector.
        criterion: :class:`SetCriterion`.
        pixel_mean, pixel_std: per-channel normalisation in ``INPUT.FORMAT`` order.
        num_select: detections kept per image at inference.
    """

    @configurable
    def __init__(self, *, backbone: Backbone, in_features: Sequence[str], dino: DINO, criterion: SetCriterion,
                 pixel_mean: Sequence[float], pixel_std: Sequence[float], num_select: int = 300,
                 dataset_names: Sequence[str] = (), dataset_blocks: Sequence[Sequence[int]] = (),
                 test_routing: str = "dataset"):
        super().__init__()
        if test_routing not in ("dataset", "auto"):
            raise ValueError(f"MODEL.GEM.TEST_ROUTING must be 'dataset' or 'auto', got {test_routing!r}")
        if test_routing == "auto" and not dataset_names:
            raise ValueError("MODEL.GEM.TEST_ROUTING 'auto' needs the label space's datasets (DATASETS.TRAIN)")
        missing = [f for f in in_features if f not in backbone.output_shape()]
        if missing:
            raise ValueError(f"MODEL.DINO.IN_FEATURES {missing} are not backbone outputs "
                             f"{sorted(backbone.output_shape())} (set MODEL.RESNETS.OUT_FEATURES)")
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError(f"MODEL.PIXEL_MEAN/PIXEL_STD need 3 values, got {list(pixel_mean)} / {list(pixel_std)}")
        if num_select <= 0:
            raise ValueError(f"MODEL.DINO.NUM_SELECT must be > 0, got {num_select}")
        self.backbone = backbone
        self.in_features = list(in_features)
        self.dino = dino
        count_ffn_evaluations(self.dino)  # routing_stats["<layer>/ffn_evals_per_token"] of every MoE layer
        self.criterion = criterion
        self.num_select = num_select
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)
        self.routing_stats: Dict[str, Tensor] = {}
        self.test_routing = test_routing
        self.dataset_names = list(dataset_names)
        self.dataset_classifier = None
        if self.dataset_names:
            self.register_buffer("dataset_blocks", torch.tensor([list(b) for b in dataset_blocks], dtype=torch.long),
                                 False)
            channels = 2 * sum(backbone.output_shape()[f].channels for f in self.in_features)  # mean + std
            self.dataset_classifier = DatasetClassifier(len(self.dataset_names), channels)

    @classmethod
    def from_config(cls, cfg):
        d = cfg.MODEL.DINO
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        missing = [f for f in d.IN_FEATURES if f not in shapes]
        if missing:
            raise ValueError(f"MODEL.DINO.IN_FEATURES {missing} are not backbone outputs {sorted(shapes)} "
                             "(set MODEL.RESNETS.OUT_FEATURES)")
        num_classes, dataset_names, dataset_blocks = _num_classes_and_datasets(cfg)
        moe = build_moe_spec(cfg, dataset_names)
        transformer = build_dino_transformer(
            d_model=d.HIDDEN_DIM, n_heads=d.NHEADS, d_ffn=d.DIM_FEEDFORWARD, enc_layers=d.ENC_LAYERS,
            dec_layers=d.DEC_LAYERS, num_levels=d.NUM_FEATURE_LEVELS, enc_points=d.ENC_N_POINTS,
            dec_points=d.DEC_N_POINTS, num_queries=d.NUM_QUERIES, num_classes=num_classes, dropout=d.DROPOUT,
            activation=d.ACTIVATION, query_pe_temperature=d.QUERY_PE_TEMPERATURE, moe=moe,
            class_blocks=dataset_blocks, share_class_head=d.SHARE_CLASS_HEAD, share_box_head=d.SHARE_BOX_HEAD,
            msda_impl=d.MSDA_IMPL)
        neck = ChannelMapper([shapes[f].channels for f in d.IN_FEATURES], d.HIDDEN_DIM, d.NUM_FEATURE_LEVELS)
        position_embedding = PositionEmbeddingSine(d.HIDDEN_DIM // 2, d.PE_TEMPERATURE, offset=d.PE_OFFSET,
                                                   scale=d.PE_SCALE, normalize=d.PE_NORMALIZE)
        dino = DINO(neck, position_embedding, transformer,
                    dn_number=d.DN_NUMBER, label_noise_ratio=d.DN_LABEL_NOISE_RATIO,
                    box_noise_scale=d.DN_BOX_NOISE_SCALE, aux_loss=d.AUX_LOSS)
        matcher = HungarianMatcher(d.CLASS_COST, d.BBOX_COST, d.GIOU_COST, d.FOCAL_ALPHA, d.FOCAL_GAMMA)
        weights = {"loss_class": d.CLASS_WEIGHT, "loss_bbox": d.BBOX_WEIGHT, "loss_giou": d.GIOU_WEIGHT}
        criterion = SetCriterion(num_classes, matcher, weights, d.FOCAL_ALPHA, d.FOCAL_GAMMA,
                                 emit_zero_dn=d.DN_NUMBER > 0)
        return {"backbone": backbone, "in_features": list(d.IN_FEATURES), "dino": dino, "criterion": criterion,
                "pixel_mean": list(cfg.MODEL.PIXEL_MEAN), "pixel_std": list(cfg.MODEL.PIXEL_STD),
                "num_select": d.NUM_SELECT, "dataset_names": dataset_names, "dataset_blocks": dataset_blocks,
                "test_routing": cfg.MODEL.GEM.TEST_ROUTING}

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def num_classes(self) -> int:
        return self.dino.num_classes

    def forward(self, batched_inputs: List[Dict]):
        """Training: dict of losses. Inference: ``[{"instances": Instances}]`` per input (see module doc)."""
        images, image_mask = self.preprocess_image(batched_inputs)
        auto = not self.training and self.test_routing == "auto"  # inputs need no dataset: it is identified
        class_blocks, dataset_ids = (None, None) if auto else self._dataset_info(batched_inputs)
        features = self.backbone(images.tensor)
        feats = [features[f] for f in self.in_features]
        if self.training:
            targets = self.prepare_targets(batched_inputs, images.image_sizes)
            outputs, dn_meta, ctx = self.dino(feats, image_mask, class_blocks, dataset_ids, targets)
            class_masks = class_block_masks(class_blocks, self.num_classes)
            losses = self.criterion(outputs, targets, class_masks, dn_meta)
            clash = sorted(set(losses) & set(ctx.aux_losses))
            if clash:
                raise KeyError(f"router auxiliary losses {clash} clash with the criterion's loss names")
            losses.update(ctx.aux_losses)
            self.routing_stats = {k: v.detach() for k, v in ctx.stats.items()}
            return losses
        routed = None
        if auto:
            routed = self.identify_datasets(features, images)
            dataset_ids, class_blocks = routed, self.dataset_blocks[routed]
        outputs, _, ctx = self.dino(feats, image_mask, class_blocks, dataset_ids)
        self.routing_stats = {k: v.detach() for k, v in ctx.stats.items()}
        results = self.postprocess(outputs, class_blocks, batched_inputs, images.image_sizes)
        if routed is not None:
            for r, i in zip(results, routed.tolist()):
                r["routed_dataset"] = self.dataset_names[i]
        return results

    def image_features(self, features: Dict[str, Tensor], images: ImageList) -> Tensor:
        """(N, D) image descriptor: per backbone level in IN_FEATURES, the normalised per-channel mean and
        standard deviation over the image's valid cells, concatenated and normalised again (the style statistics
        of several levels tell visual domains apart far better than the last stage's mean alone)."""
        hw = images.tensor.shape[-2:]
        pooled = [pooled_image_features(features[f], images.image_sizes, hw, with_std=True) for f in self.in_features]
        return F.normalize(torch.cat(pooled, dim=1), dim=1)

    def identify_datasets(self, features: Dict[str, Tensor], images: ImageList) -> Tensor:
        """(N,) index (label-space order) of each image's dataset, by the fitted dataset classifier (auto routing)."""
        return self.dataset_classifier(self.image_features(features, images))

    @torch.no_grad()
    def fit_dataset_classifier(self, batches: Iterable[Tuple[int, List[Dict]]]) -> float:
        """Fit the test-time dataset classifier on this model's backbone features.

        Args:
            batches: ``(dataset index in label-space order, batched_inputs)`` pairs; the inputs need only
                ``"image"`` (as for inference). Every dataset of the label space must occur.
        Returns:
            the classifier's training accuracy.
        """
        if self.dataset_classifier is None:
            raise ValueError("the model has no label space (DATASETS.TRAIN), so no dataset classifier to fit")
        was_training = self.training
        self.eval()
        feats, labels = [], []
        try:
            for index, inputs in batches:
                images, _ = self.preprocess_image(inputs)
                feats.append(self.image_features(self.backbone(images.tensor), images))
                labels.append(torch.full((len(inputs),), int(index), dtype=torch.long))
        finally:
            self.train(was_training)
        return self.dataset_classifier.fit(torch.cat(feats), torch.cat(labels))

    def preprocess_image(self, batched_inputs: List[Dict]) -> Tuple[ImageList, Tensor]:
        """Normalise, pad into one batch; returns the ImageList and its ``(N, H, W)`` padding mask (True = pad)."""
        images = []
        for i, x in enumerate(batched_inputs):
            img = x.get("image")
            if not isinstance(img, Tensor) or img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"batched_inputs[{i}]['image'] must be a (3, H, W) tensor, got "
                                 f"{type(img).__name__} {tuple(img.shape) if isinstance(img, Tensor) else ''}")
            images.append((img.to(self.device, torch.float32) - self.pixel_mean) / self.pixel_std)
        images = ImageList.from_tensors(images, self.backbone.size_divisibility)
        n, _, h, w = images.tensor.shape
        mask = torch.ones(n, h, w, dtype=torch.bool, device=self.device)
        for i, (ih, iw) in enumerate(images.image_sizes):
            mask[i, :ih, :iw] = False
        return images, mask

    def _dataset_info(self, batched_inputs: List[Dict]) -> Tuple[Tensor, Tensor]:
        blocks, ids = [], []
        for i, x in enumerate(batched_inputs):
            if "class_block" not in x or "dataset_id" not in x:
                raise KeyError(f"batched_inputs[{i}] lacks 'class_block'/'dataset_id' (has {sorted(x)}); GEMDINO "
                               "needs each image's dataset, as gem_d2's dataset mapper provides")
            start, stop = (int(v) for v in x["class_block"])
            if not 0 <= start < stop <= self.num_classes:
                raise ValueError(f"batched_inputs[{i}]['class_block']={(start, stop)} must satisfy "
                                 f"0 <= start < stop <= num_classes={self.num_classes}")
            blocks.append((start, stop))
            ids.append(int(x["dataset_id"]))
        if self.dataset_names:
            check_index_range(ids, len(self.dataset_names), "batched_inputs' 'dataset_id' (label-space datasets)")
        return (torch.tensor(blocks, dtype=torch.long, device=self.device),
                torch.tensor(ids, dtype=torch.long, device=self.device))

    def prepare_targets(self, batched_inputs: List[Dict], image_sizes) -> List[Dict[str, Tensor]]:
        """Per image ``{"labels" (M,) unified ids, "boxes" (M, 4) cxcywh normalised by the image size}``."""
        targets = []
        for i, (x, (h, w)) in enumerate(zip(batched_inputs, image_sizes)):
            if "instances" not in x:
                raise KeyError(f"batched_inputs[{i}] has no 'instances' in training")
            start, stop = (int(v) for v in x["class_block"])
            check_index_range(x["instances"].gt_classes, stop, f"batched_inputs[{i}] gt_classes (class block "
                              f"{(start, stop)})", start=start)
            inst = x["instances"].to(self.device)
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            boxes = box_xyxy_to_cxcywh(inst.gt_boxes.tensor.to(torch.float32) / scale)
            targets.append({"labels": inst.gt_classes.to(torch.long), "boxes": boxes})
        return targets

    def postprocess(self, outputs: Dict, class_blocks: Tensor, batched_inputs: List[Dict], image_sizes
                    ) -> List[Dict[str, Instances]]:
        """Top-``num_select`` detections within each image's block, rescaled to the input's height/width."""
        detections = DINO.predict(outputs["pred_logits"], outputs["pred_boxes"], class_blocks, self.num_select)
        results = []
        for (scores, labels, boxes), x, (h, w), (start, _) in zip(detections, batched_inputs, image_sizes,
                                                                   class_blocks.tolist()):
            r = Instances((h, w))
            scale = boxes.new_tensor([w, h, w, h])
            r.pred_boxes = Boxes(box_cxcywh_to_xyxy(boxes) * scale)
            r.scores = scores
            r.pred_classes = labels - start
            results.append({"instances": detector_postprocess(r, x.get("height", h), x.get("width", w))})
        return results


def _num_classes_and_datasets(cfg) -> Tuple[int, Tuple[str, ...], Tuple[Tuple[int, int], ...]]:
    """``MODEL.DINO.NUM_CLASSES`` (0 = the unified label space's size) and the label space's datasets.

    The label space is only built when it is needed (NUM_CLASSES 0, MoE layers that route by
    dataset, or auto test routing); the dataset tuple and the (start, stop) block of each dataset are
    empty when it was not built.
    """
    num_classes = cfg.MODEL.DINO.NUM_CLASSES
    if num_classes < 0:
        raise ValueError(f"MODEL.DINO.NUM_CLASSES must be >= 0 (0 = from the label space), got {num_classes}")
    if num_classes > 0 and not cfg.MODEL.GEM.MOE_LAYERS and cfg.MODEL.GEM.TEST_ROUTING != "auto":
        return num_classes, (), ()
    space = UnifiedLabelSpace.from_cfg(cfg)
    if num_classes == 0:
        num_classes = space.num_classes
    elif num_classes < space.num_classes:
        raise ValueError(f"MODEL.DINO.NUM_CLASSES={num_classes} is smaller than the unified label space of "
                         f"DATASETS.TRAIN ({space.num_classes} classes)")
    blocks = tuple(tuple(space.block(i)) for i in range(len(space.dataset_names)))
    return num_classes, space.dataset_names, blocks
