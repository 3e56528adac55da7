"""Shared pytest fixtures and the ``slow`` marker's meaning (training subprocesses, DDP, benchmarks).

- ``write_voc``: a function writing a small dataset in the UODB/VOC layout (images, XML, split file).
- ``tiny_config``: the one tiny GEM-DINO config file of the training tests.
- ``small_synth``: the generated multi-domain dataset at a tiny size (written once per session), with the
  ``synth_*`` datasets registered under it for the session.
- ``data_cfg``: a fresh detectron2 config with gem_d2's keys and small CPU-friendly input sizes.
"""
import os
import re
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import pytest
from PIL import Image

import gem_d2  # noqa: F401  (shims + registrations before detectron2)

# isort: split
from detectron2.config import get_cfg

from gem_d2.config import add_gem_config
from gem_d2.data import catalog, synthetic
from gem_d2.data.voc_xml import VocBox, voc_xml_text

TESTS = Path(__file__).resolve().parent
TINY_CONFIG = str(TESTS / "tiny_gem_dino.yaml")  # the one tiny GEM-DINO of the training tests
SMALL_SYNTH = {"images_per_domain": 6, "test_images_per_domain": 2, "image_size": 96, "seed": 0}  # = TINY_CONFIG's

# An object of a fixture dataset: (name, xmin, ymin, xmax, ymax, difficult or None = no <difficult> tag).
VocObject = Tuple[str, float, float, float, float, Optional[int]]


def write_voc_dataset(root, split: str, images: Dict[str, dict]) -> str:
    """Write ``images`` (id -> {"objects": [VocObject], "size": (w, h), "ext": ".jpg", "xml_size": True,
    "color": (r, g, b)}) under ``root`` in the VOC layout with gem_d2's own XML writer (coordinates as given)
    and append their ids to ``<split>.txt``; returns root. ``difficult`` None and ``xml_size`` False remove
    the ``<difficult>``/``<size>`` elements, as in files from other tools."""
    root = os.fspath(root)
    for sub in ("Annotations", os.path.join("ImageSets", "Main"), "JPEGImages"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for image_id, spec in images.items():
        w, h = spec.get("size", (64, 48))
        ext = spec.get("ext", ".jpg")
        image = Image.new("RGB", (w, h), spec.get("color", (120, 60, 30)))
        image.save(os.path.join(root, "JPEGImages", image_id + ext))
        objects = spec.get("objects", [])
        boxes = [VocBox(n, x0, y0, x1, y1, 0 if d is None else d) for n, x0, y0, x1, y1, d in objects]
        text = voc_xml_text("", image_id + ext, w, h, 3, boxes, coordinate_offset=0)
        for (*_box, difficult), box_xml in zip(objects, re.findall(r"  <object>.*?</object>\n", text, re.S)):
            if difficult is None:
                text = text.replace(box_xml, re.sub(r"    <difficult>.*</difficult>\n", "", box_xml), 1)
        if not spec.get("xml_size", True):
            text = re.sub(r"  <size>.*?</size>\n", "", text, flags=re.S)
        with open(os.path.join(root, "Annotations", image_id + ".xml"), "w") as f:
            f.write(text)
    with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "a") as f:
        f.write("".join(i + "\n" for i in images))
    return root


@pytest.fixture(scope="session")
def write_voc():
    """The :func:`write_voc_dataset` helper (session scope, so module-scoped fixtures can use it too)."""
    return write_voc_dataset


@pytest.fixture(scope="session")
def tiny_config():
    """Path of the tiny GEM-DINO config (tests/tiny_gem_dino.yaml) every training test starts from."""
    return TINY_CONFIG


@pytest.fixture
def registered_names():
    """A list to append test dataset names to; they are unregistered after the test."""
    names = []
    yield names
    for n in names:
        catalog.unregister(n)


@pytest.fixture(scope="session")
def small_synth(tmp_path_factory):
    """Generate the multi-domain dataset at ``SMALL_SYNTH`` size once and register ``synth_*`` under it."""
    root = tmp_path_factory.mktemp("synth") / "gem_synth"
    summary = synthetic.generate_synthetic(root, **SMALL_SYNTH)
    synthetic.register_synthetic(root)
    yield summary
    synthetic.register_synthetic(synthetic.synthetic_root())


def make_cfg(train: Sequence[str] = (), test: Sequence[str] = (), **overrides):
    """A gem_d2 config with small inputs (short side 64, no flip) and the given datasets."""
    cfg = add_gem_config(get_cfg())
    cfg.DATASETS.TRAIN = tuple(train)
    cfg.DATASETS.TEST = tuple(test)
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 128
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 128
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SEED = 0
    for key, value in overrides.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return cfg


@pytest.fixture
def data_cfg():
    """The :func:`make_cfg` helper."""
    return make_cfg

