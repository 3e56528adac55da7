"""gem_d2.engine: training and evaluation machinery (detectron2 conventions, CPU and CUDA).

- :class:`GemTrainer`: ``DefaultTrainer`` with gem_d2's loaders, evaluators, optimizer, checkpoints, hooks.
- :func:`launch`, :func:`create_ddp_model`: multi-process training on CPU (gloo) and CUDA (NCCL).
- :class:`GemCheckpointer`: checkpoints with the GEM mapping and unit prototypes, written atomically.
- :func:`resolve_gem_mapping`: the mapping from config, checkpoint or planner, before the model is built.
- :func:`build_gem_optimizer`: AdamW/SGD with backbone LR multiplier, no decay on norms/biases/embeddings.
"""
from gem_d2.engine.adaptation import AdaptTrainer, adapted_config, load_extended_weights, select_trainable
from gem_d2.engine.checkpoint import (
    MAPPING_KEY,
    PROTOTYPES_KEY,
    GemCheckpointer,
    MappingMismatchError,
    atomic_write,
    gem_mapping_from_cfg,
    read_checkpoint_gem,
)
from gem_d2.engine.hooks import RoutingStatsHook, TrainingCurvesHook
from gem_d2.engine.launch import create_ddp_model, launch, resolve_device, unwrap_model
from gem_d2.engine.optimizer import build_gem_optimizer, build_param_groups
from gem_d2.engine.planning import checkpoint_to_load, needs_planning, resolve_gem_mapping, write_config
from gem_d2.engine.plotting import plot_training_curves
from gem_d2.engine.routing_prototypes import RoutingPrototypesHook, compute_routing_prototypes
from gem_d2.engine.trainer import GemAMPTrainer, GemTrainer, amp_dtype

__all__ = [
    "AdaptTrainer", "adapted_config", "load_extended_weights", "select_trainable",
    "MAPPING_KEY",
    "PROTOTYPES_KEY",
    "GemAMPTrainer",
    "GemCheckpointer",
    "GemTrainer",
    "MappingMismatchError",
    "RoutingPrototypesHook",
    "RoutingStatsHook",
    "TrainingCurvesHook",
    "amp_dtype",
    "atomic_write",
    "build_gem_optimizer",
    "build_param_groups",
    "compute_routing_prototypes",
    "checkpoint_to_load",
    "create_ddp_model",
    "gem_mapping_from_cfg",
    "launch",
    "needs_planning",
    "plot_training_curves",
    "read_checkpoint_gem",
    "resolve_device",
    "resolve_gem_mapping",
    "unwrap_model",
    "write_config",
]
