"""What every gem_d2 command-line tool does before its real work: build the config, make datasets available."""
from __future__ import annotations

from detectron2.config import CfgNode, get_cfg
from detectron2.utils import comm

from gem_d2.config import add_gem_config
from gem_d2.data import ensure_synthetic, register_few_shot_names, register_uodb


def build_cfg(config_file: str, opts) -> CfgNode:
    """get_cfg + add_gem_config + ``config_file`` (may be empty) + ``opts`` (KEY VALUE list); not frozen."""
    cfg = add_gem_config(get_cfg())
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    return cfg


def prepare_datasets(cfg: CfgNode) -> None:
    """Generate the ``synth_*`` data if the config uses it (once per machine); register UODB under UODB_ROOT
    and the K-shot subsets (``<source>_<K>shot_seed<S>``) the config names."""
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    if any(str(n).startswith("synth_") for n in names):
        if comm.get_local_rank() == 0:
            ensure_synthetic(cfg)
        comm.synchronize()
        if comm.get_local_rank() != 0:
            ensure_synthetic(cfg)  # finds the data written above; registers it in this process
    if cfg.DATASETS.UODB_ROOT:
        register_uodb(cfg.DATASETS.UODB_ROOT)
    register_few_shot_names(names)  # K-shot subsets named in an adapted model's config
