"""The generated multi-domain dataset (gem_d2's embedded default), written in the UODB VOC layout.

``generate_synthetic(root, ...)`` writes one VOC-layout folder per domain::

    <root>/manifest.json                      parameters + per-domain summary (idempotence key)
    <root>/<domain>/Annotations/<id>.xml      1-based VOC boxes
    <root>/<domain>/ImageSets/Main/train.txt, test.txt
    <root>/<domain>/JPEGImages/<id>.jpg|.png  (photo and aerial: .jpg; the others: .png)

Five visually distinct domains (see :mod:`gem_d2.data.synthetic_styles`), each with its own class set;
class names partly overlap across domains. ``medical`` is the rare domain: it gets a quarter of the
training images of the others (at most 10% of all training images for ``images_per_domain >= 3``; about 6%
by default) and the same number of test images.

Output is byte-identical for the same parameters. Re-running with the same parameters skips; different
parameters rewrite the whole root atomically (written to a temporary sibling folder, then renamed).

Registered datasets: ``synth_<domain>_train`` and ``synth_<domain>_test`` (domain ``synth_<domain>``), at
import under ``<$DETECTRON2_DATASETS or datasets>/gem_synth``; ``register_synthetic(root)`` or
``ensure_synthetic(cfg)`` (``cfg.DATASETS.SYNTH.*``) re-register them under another root.
"""
import json
import logging
import os
import shutil
from typing import Dict, Optional

import numpy as np

from gem_d2.data.catalog import datasets_root
from gem_d2.data.synthetic_styles import STYLES, render_image
from gem_d2.data.voc import register_voc_dataset
from gem_d2.data.voc_xml import VocBox, voc_xml_text

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when the rendering changes, so old folders are regenerated
DOMAINS = tuple(STYLES)  # ("photo", "cartoon", "medical", "aerial", "sketch")
RARE_DOMAIN = "medical"
DOMAIN_CLASSES: Dict[str, tuple] = {d: STYLES[d].classes for d in DOMAINS}
DOMAIN_IMAGE_EXT: Dict[str, str] = {d: STYLES[d].image_ext for d in DOMAINS}
SPLITS = ("train", "test")
MANIFEST = "manifest.json"
RARE_FRACTION = 0.25  # rare domain's training images relative to a regular domain's

_registered_root: Optional[str] = None


def dataset_name(domain: str, split: str) -> str:
    """``synth_<domain>_<split>``."""
    return f"synth_{domain}_{split}"


def train_dataset_names() -> list:
    """The training datasets of every domain, in :data:`DOMAINS` order."""
    return [dataset_name(d, "train") for d in DOMAINS]


def test_dataset_names() -> list:
    """The test datasets of every domain, in :data:`DOMAINS` order."""
    return [dataset_name(d, "test") for d in DOMAINS]


def images_per_split(domain: str, split: str, images_per_domain: int, test_images_per_domain: int) -> int:
    """Number of images of ``domain``'s ``split`` (the rare domain gets ``RARE_FRACTION`` of the training images)."""
    if split == "test":
        return test_images_per_domain
    if domain == RARE_DOMAIN:
        return max(1, int(round(images_per_domain * RARE_FRACTION)))
    return images_per_domain


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"generate_synthetic: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _write_domain(out_dir: str, domain_index: int, domain: str, counts: Dict[str, int], size: int, seed: int) -> dict:
    style = STYLES[domain]
    for sub in ("Annotations", os.path.join("ImageSets", "Main"), "JPEGImages"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    summary = {"classes": list(style.classes), "image_ext": style.image_ext}
    for split_index, split in enumerate(SPLITS):
        ids, class_counts, n_boxes = [], {c: 0 for c in style.classes}, 0
        for i in range(counts[split]):
            rng = np.random.default_rng([seed, domain_index, split_index, i])
            image, boxes = render_image(style, rng, size, first_class=style.classes[i % len(style.classes)])
            image_id = f"{domain}_{split}_{i:05d}"
            file_name = image_id + style.image_ext
            if style.image_ext == ".jpg":
                image.save(os.path.join(out_dir, "JPEGImages", file_name), quality=92)
            else:
                image.save(os.path.join(out_dir, "JPEGImages", file_name), optimize=False)
            depth = 1 if image.mode == "L" else 3
            with open(os.path.join(out_dir, "Annotations", image_id + ".xml"), "w", encoding="utf-8") as f:
                f.write(voc_xml_text(domain, file_name, size, size, depth, [VocBox(*b) for b in boxes], 1.0))
            ids.append(image_id)
            n_boxes += len(boxes)
            for b in boxes:
                class_counts[b[0]] += 1
        with open(os.path.join(out_dir, "ImageSets", "Main", f"{split}.txt"), "w", encoding="utf-8") as f:
            f.write("".join(x + "\n" for x in ids))
        summary[f"{split}_images"] = len(ids)
        summary[f"{split}_boxes"] = n_boxes
        summary[f"{split}_class_counts"] = class_counts
    return summary


def read_manifest(root: str) -> Optional[dict]:
    """The manifest of a generated root, or None if there is none (or it is unreadable)."""
    path = os.path.join(root, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _matches(manifest: Optional[dict], params: dict) -> bool:
    return bool(manifest) and manifest.get("version") == GENERATOR_VERSION and manifest.get("params") == params


def generate_synthetic(root: str, images_per_domain: int = 120, test_images_per_domain: int = 30,
                       image_size: int = 256, seed: int = 0) -> dict:
    """Write the generated multi-domain dataset under ``root`` unless it is already there with these parameters.

    Returns the summary ``{"root", "params", "generated": bool, "domains": {domain: {"classes", "image_ext",
    "train_images", "test_images", "train_boxes", "test_boxes", "train_class_counts", "test_class_counts"}}}``.
    ``generated`` is False when an existing folder with the same parameters was reused.
    """
    params = {"images_per_domain": _check_int("images_per_domain", images_per_domain, 1),
              "test_images_per_domain": _check_int("test_images_per_domain", test_images_per_domain, 1),
              "image_size": _check_int("image_size", image_size, 64),
              "seed": _check_int("seed", seed, 0)}
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    existing = read_manifest(root)
    if _matches(existing, params):
        return {"root": root, "params": params, "generated": False, "domains": existing["domains"]}
    if os.path.isdir(root) and os.listdir(root) and existing is None:
        raise FileExistsError(f"refusing to overwrite {root}: it is not empty and has no {MANIFEST} written by "
                              f"gem_d2's generator (choose another DATASETS.SYNTH.ROOT)")
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{root}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        domains = {}
        for k, domain in enumerate(DOMAINS):
            counts = {s: images_per_split(domain, s, params["images_per_domain"], params["test_images_per_domain"])
                      for s in SPLITS}
            domains[domain] = _write_domain(os.path.join(tmp, domain), k, domain, counts,
                                            params["image_size"], params["seed"])
        manifest = {"generator": "gem_d2.data.synthetic", "version": GENERATOR_VERSION, "params": params,
                    "domains": domains}
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        _swap_in(tmp, root, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(f"generated the synthetic multi-domain dataset under {root} ({params})")
    return {"root": root, "params": params, "generated": True, "domains": domains}


def _swap_in(tmp: str, root: str, params: dict) -> None:
    """Replace ``root`` by ``tmp`` with renames (a concurrent writer of the same parameters is tolerated)."""
    old = None
    if os.path.exists(root):
        old = f"{root}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(root, old)
    try:
        os.rename(tmp, root)
    except OSError:
        if not _matches(read_manifest(root), params):  # not another process writing the same thing
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def synthetic_root(cfg=None) -> str:
    """``cfg.DATASETS.SYNTH.ROOT`` if set, else ``<datasets root>/gem_synth`` (see ``catalog.datasets_root``)."""
    if cfg is not None and cfg.DATASETS.get("SYNTH") is not None and cfg.DATASETS.SYNTH.ROOT:
        return os.path.abspath(os.path.expanduser(cfg.DATASETS.SYNTH.ROOT))
    return os.path.abspath(os.path.join(datasets_root(cfg), "gem_synth"))


def register_synthetic(root: str) -> None:
    """(Re-)register ``synth_<domain>_train`` / ``synth_<domain>_test`` for every domain under ``root`` (lazy)."""
    global _registered_root
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    for domain in DOMAINS:
        for split in SPLITS:
            register_voc_dataset(dataset_name(domain, split), os.path.join(root, domain), split,
                                 DOMAIN_CLASSES[domain], image_ext=DOMAIN_IMAGE_EXT[domain], domain=f"synth_{domain}")
    _registered_root = root


def registered_synthetic_root() -> Optional[str]:
    """The root the ``synth_*`` datasets are currently registered under."""
    return _registered_root


def ensure_synthetic(cfg) -> dict:
    """Generate the dataset of ``cfg.DATASETS.SYNTH.*`` if missing, register it there; returns the summary."""
    s = cfg.DATASETS.SYNTH
    root = synthetic_root(cfg)
    summary = generate_synthetic(root, s.IMAGES_PER_DOMAIN, s.TEST_IMAGES_PER_DOMAIN, s.IMAGE_SIZE, s.SEED)
    if _registered_root != root:
        register_synthetic(root)
    return summary


def format_summary(summary: dict) -> str:
    """A per-domain text table of a :func:`generate_synthetic` summary."""
    from tabulate import tabulate

    rows = []
    for domain, d in summary["domains"].items():
        rows.append([domain + (" (rare)" if domain == RARE_DOMAIN else ""), ", ".join(d["classes"]), d["image_ext"],
                     d["train_images"], d["train_boxes"], d["test_images"], d["test_boxes"]])
    total_train = sum(d["train_images"] for d in summary["domains"].values())
    rows.append(["total", "", "", total_train, sum(d["train_boxes"] for d in summary["domains"].values()),
                 sum(d["test_images"] for d in summary["domains"].values()),
                 sum(d["test_boxes"] for d in summary["domains"].values())])
    headers = ["domain", "classes", "ext", "train imgs", "train boxes", "test imgs", "test boxes"]
    return tabulate(rows, headers=headers, tablefmt="github")
