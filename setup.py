"""gem_d2: a detectron2 extension for multi-dataset DINO with GEM-routed Mixture-of-Experts.

Ranges here let gem_d2 install beside a user's own torch/detectron2; the exact tested versions
are pinned in requirements/lock.txt, which tools/bootstrap.py installs. detectron2 itself is not
listed: it is not on PyPI under that name (tools/bootstrap.py installs it; or install upstream).
"""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def config_files():
    """The YAML configs, shipped inside the package as gem_d2/model_zoo/configs (model zoo)."""
    return [str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml")]


setup(
    name="gem_d2",
    version="0.1.0",
    description="GEM (Global Expert Mapping) Mixture-of-Experts DINO for multi-dataset detection, on detectron2",
    packages=find_packages(include=["gem_d2", "gem_d2.*", "benchmarks", "benchmarks.*"]),
    package_dir={"": "."},
    package_data={"gem_d2.model_zoo": ["configs/*.yaml", "configs/**/*.yaml"]},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy>=1.24",
        "scipy>=1.10",
        "pulp>=2.7",
        "pycocotools>=2.0.6",
        "fvcore>=0.1.5,<0.1.6",
        "matplotlib>=3.5",
        "pillow>=9",
        "pyyaml>=5.1",
        "tabulate",
        "tqdm",
    ],
    extras_require={"test": ["pytest>=7", "pytest-timeout", "ruff"]},
)
