"""gem_d2.engine: training and evaluation machinery (detectron2 conventions, CPU and CUDA).

- :class:`GemTrainer`: ``DefaultTrainer`` with gem_d2's loaders, evaluators, optimizer, checkpoints, hooks.
- :func:`launch`, :func:`create_ddp_model`: multi-process training on CPU (gloo) and CUDA (NCCL).
- :class:`GemCheckpointer`: checkpoints with the GEM mapping, label space and MoE layout, written atomically;
  loading another label space or layout is a :class:`CheckpointLayoutError`.
- :func:`resolve_gem_mapping`: the mapping from config, checkpoint or planner, before the model is built.
- :func:`resume_checkpoint`: the checkpoint ``--resume`` uses (skips an unreadable newest one).
- :class:`TrainingDivergedError`: a NaN/inf loss or weights; nothing is saved after it.
- :func:`build_gem_optimizer`: AdamW/SGD with backbone LR multiplier, no decay on norms/biases/embeddings.
- :func:`fit_dataset_classifier`: the test-time dataset classifier of auto routing.
"""
from gem_d2.engine.checkpoint import MAPPING_KEY, GemCheckpointer, MappingMismatchError, read_checkpoint_mapping
from gem_d2.engine.checkpoint_records import CheckpointLayoutError
from gem_d2.engine.dataset_classifier import DatasetClassifierHook, fit_dataset_classifier
from gem_d2.engine.divergence import TrainingDivergedError
from gem_d2.engine.hooks import RoutingStatsHook, TrainingCurvesHook
from gem_d2.engine.launch import create_ddp_model, launch, resolve_device, unwrap_model
from gem_d2.engine.optimizer import build_gem_optimizer, build_param_groups
from gem_d2.engine.planning import checkpoint_to_load, needs_planning, resolve_gem_mapping, write_config
from gem_d2.engine.resume import resume_checkpoint
from gem_d2.engine.trainer import GemAMPTrainer, GemTrainer, amp_dtype

__all__ = [
    "MAPPING_KEY", "CheckpointLayoutError", "DatasetClassifierHook", "GemAMPTrainer", "GemCheckpointer", "GemTrainer",
    "MappingMismatchError", "RoutingStatsHook", "TrainingCurvesHook", "TrainingDivergedError", "amp_dtype",
    "build_gem_optimizer", "build_param_groups", "checkpoint_to_load", "create_ddp_model", "fit_dataset_classifier",
    "launch", "needs_planning", "read_checkpoint_mapping", "resolve_device", "resolve_gem_mapping",
    "resume_checkpoint", "unwrap_model", "write_config",
]
