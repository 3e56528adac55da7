"""gem_d2.data: UODB and generated datasets, unified label space, mapper and multi-dataset sampler.

Importing it registers (lazily: nothing is read until ``DatasetCatalog.get``) the generated ``synth_*``
datasets under the default root.
"""
from .synthetic import (  # noqa: F401
    DOMAIN_CLASSES,
    DOMAINS,
    RARE_DOMAIN,
    ensure_synthetic,
    generate_synthetic,
    register_synthetic,
    synthetic_root,
)
from .voc import DatasetFormatError, VocLoadStats, load_voc_instances, register_voc_dataset  # noqa: F401

register_synthetic(synthetic_root())
