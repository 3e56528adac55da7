"""gem_d2's model zoo: the configs shipped inside the package, as ``detectron2.model_zoo`` does.

    from gem_d2 import model_zoo
    cfg = model_zoo.get_config("gem_dino_uodb.yaml")      # a CfgNode with add_gem_config applied
    path = model_zoo.get_config_file("dino_synth_small.yaml")

In a checkout ``gem_d2/model_zoo/configs`` is a symlink to the top-level ``configs/``; an installed
wheel carries a copy (setup.py's package_data).

Pretrained weights have ``gem_d2://`` URLs, resolved by detectron2's ``PathManager`` (:mod:`.pretrained`,
docs/backbones.md), e.g. ``MODEL.WEIGHTS gem_d2://ImageNetPretrained/mobilenet_v2``.
"""
from pathlib import Path
from typing import List

from gem_d2.model_zoo import pretrained  # noqa: F401  (registers the gem_d2:// handler)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def list_configs() -> List[str]:
    """Names (relative paths) of every shipped config."""
    return sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.yaml"))


def get_config_file(name: str) -> str:
    """Absolute path of the shipped config ``name`` (e.g. "gem_dino_uodb.yaml")."""
    path = CONFIG_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"{name!r} is not a gem_d2 model-zoo config; available: {list_configs()}")
    return str(path)


def get_config(name: str):
    """A detectron2 CfgNode with gem_d2's keys, merged from the shipped config ``name``."""
    from detectron2.config import get_cfg

    from gem_d2.config import add_gem_config, merge_config_file

    cfg = add_gem_config(get_cfg())
    merge_config_file(cfg, get_config_file(name))
    return cfg
