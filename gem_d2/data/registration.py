"""Point gem_d2's built-in datasets at the roots a config names (before building loaders or a label space)."""
import os

from gem_d2.data.catalog import datasets_root
from gem_d2.data.synthetic import register_synthetic, registered_synthetic_root, synthetic_root
from gem_d2.data.uodb import register_uodb, registered_uodb_root


def register_datasets_from_cfg(cfg) -> None:
    """Re-register ``uodb_*`` under ``cfg.DATASETS.UODB_ROOT`` and ``synth_*`` under ``DATASETS.SYNTH.ROOT``.

    Each family is re-registered only if its root changed (re-registration drops metadata such as recorded
    label blocks, so call this before ``UnifiedLabelSpace.from_cfg``). Nothing is read or generated; use
    ``ensure_synthetic(cfg)`` to generate the synthetic data.
    """
    uodb_root = datasets_root(cfg)
    if registered_uodb_root() is None or os.path.abspath(registered_uodb_root()) != os.path.abspath(uodb_root):
        register_uodb(uodb_root)
    synth_root = synthetic_root(cfg)
    if registered_synthetic_root() != synth_root:
        register_synthetic(synth_root)
