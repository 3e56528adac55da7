"""The DINO detector as plain ``nn.Module``s (tensors in, tensors out; no detectron2 config):
deformable transformer with two-stage query selection, contrastive denoising, Hungarian matcher and
set criterion. The GEM meta-architecture (``gem_d2.modeling.meta_arch``) wires them to detectron2."""
from gem_d2.modeling.dino.criterion import SetCriterion
from gem_d2.modeling.dino.detector import DINO, class_block_masks
from gem_d2.modeling.dino.matcher import HungarianMatcher
from gem_d2.modeling.dino.transformer import DINOTransformer, build_dino_transformer

__all__ = ["DINO", "DINOTransformer", "HungarianMatcher", "SetCriterion", "build_dino_transformer",
           "class_block_masks"]
