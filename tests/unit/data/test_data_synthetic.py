"""The generated multi-domain dataset: layout, determinism, idempotence, domains, rare share, boxes, registration."""
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import gem_d2  # noqa: F401  (shims before detectron2)

# isort: split
from detectron2.data import DatasetCatalog, MetadataCatalog

from gem_d2.data import synthetic
from gem_d2.data.synthetic import (
    DOMAIN_CLASSES,
    DOMAIN_IMAGE_EXT,
    DOMAINS,
    RARE_DOMAIN,
    ensure_synthetic,
    generate_synthetic,
    images_per_split,
)

TINY = {"images_per_domain": 4, "test_images_per_domain": 1, "image_size": 64, "seed": 0}


def _digest(root) -> dict:
    root = pathlib.Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_domains_classes_and_layout(small_synth):
    assert len(DOMAINS) >= 5 and RARE_DOMAIN in DOMAINS
    assert all(2 <= len(DOMAIN_CLASSES[d]) <= 4 for d in DOMAINS)
    names = [c for d in DOMAINS for c in DOMAIN_CLASSES[d]]
    assert len(set(names)) < len(names)  # some class names are shared across domains
    assert {DOMAIN_IMAGE_EXT[d] for d in DOMAINS} == {".jpg", ".png"}
    root = small_synth["root"]
    for d in DOMAINS:
        for sub in ("Annotations", "ImageSets/Main/train.txt", "ImageSets/Main/test.txt", "JPEGImages"):
            assert os.path.exists(os.path.join(root, d, sub))
    assert json.loads(pathlib.Path(root, "manifest.json").read_text())["params"] == small_synth["params"]


def test_rare_domain_share():
    for n in (4, 6, 50, 120, 1000):
        counts = {d: images_per_split(d, "train", n, 30) for d in DOMAINS}
        assert counts[RARE_DOMAIN] >= 1
        assert counts[RARE_DOMAIN] / sum(counts.values()) <= 0.10
        assert all(counts[d] == n for d in DOMAINS if d != RARE_DOMAIN)
        assert all(images_per_split(d, "test", n, 30) == 30 for d in DOMAINS)


def test_registered_records_match_generated_files(small_synth):
    size = small_synth["params"]["image_size"]
    for d in DOMAINS:
        for split in ("train", "test"):
            name = f"synth_{d}_{split}"
            records = DatasetCatalog.get(name)
            summary = small_synth["domains"][d]
            assert len(records) == summary[f"{split}_images"] > 0
            assert sum(len(r["annotations"]) for r in records) == summary[f"{split}_boxes"]
            meta = MetadataCatalog.get(name)
            assert meta.thing_classes == list(DOMAIN_CLASSES[d]) and meta.domain == f"synth_{d}"
            counts = np.zeros(len(DOMAIN_CLASSES[d]), int)
            for r in records:
                assert r["file_name"].endswith(DOMAIN_IMAGE_EXT[d]) and (r["height"], r["width"]) == (size, size)
                with Image.open(r["file_name"]) as im:
                    assert im.size == (size, size)
                    assert im.mode == ("L" if d == RARE_DOMAIN else "RGB")
                assert 1 <= len(r["annotations"]) <= 5
                for a in r["annotations"]:
                    x0, y0, x1, y1 = a["bbox"]
                    assert 0 <= x0 < x1 <= size - 1 and 0 <= y0 < y1 <= size - 1
                    assert min(x1 - x0, y1 - y0) >= 0.04 * size  # learnable, not specks
                    counts[a["category_id"]] += 1
            if split == "train":
                assert counts.min() > 0, (d, counts)  # every class present
            assert meta.load_stats.clipped == 0 and meta.load_stats.dropped_unknown == {}


def test_objects_differ_from_their_background(small_synth):
    """Inside every box the pixels differ from the image outside the boxes (objects are visible)."""
    for d in DOMAINS:
        for r in DatasetCatalog.get(f"synth_{d}_train")[:3]:
            img = np.asarray(Image.open(r["file_name"]).convert("L"), dtype=np.float32)
            outside = np.ones(img.shape, bool)
            for a in r["annotations"]:
                x0, y0, x1, y1 = map(int, a["bbox"])
                outside[y0:y1 + 1, x0:x1 + 1] = False
            for a in r["annotations"]:
                x0, y0, x1, y1 = map(int, a["bbox"])
                inside = img[y0:y1 + 1, x0:x1 + 1]
                assert abs(inside.mean() - img[outside].mean()) > 2 or inside.std() > img[outside].std() + 2, d


def test_byte_identical_for_a_seed_and_different_for_another(tmp_path):
    a = generate_synthetic(tmp_path / "a", **TINY)
    b = generate_synthetic(tmp_path / "b", **TINY)
    c = generate_synthetic(tmp_path / "c", **dict(TINY, seed=1))
    assert c["params"]["seed"] == 1
    assert a["generated"] and b["generated"]
    da, db, dc = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert da == db and len(da) > 5 * 10
    assert da != dc and set(da) == set(dc)


def test_idempotent_and_atomic_rewrite(tmp_path):
    root = tmp_path / "s"
    generate_synthetic(root, **TINY)
    before = _digest(root)
    mtime = os.path.getmtime(root / "photo" / "ImageSets" / "Main" / "train.txt")
    again = generate_synthetic(root, **TINY)
    assert not again["generated"] and again["domains"] == json.loads((root / "manifest.json").read_text())["domains"]
    assert os.path.getmtime(root / "photo" / "ImageSets" / "Main" / "train.txt") == mtime
    bigger = generate_synthetic(root, **dict(TINY, images_per_domain=5))
    assert bigger["generated"] and bigger["domains"]["photo"]["train_images"] == 5
    assert _digest(root) != before
    assert not os.path.exists(root / "photo" / "JPEGImages" / "photo_train_00005.jpg")
    assert sorted(os.listdir(tmp_path)) == ["s"]  # no temporary or old folders left behind


def test_refuses_foreign_folder_and_bad_parameters(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to overwrite .*mine"):
        generate_synthetic(tmp_path / "mine", **TINY)
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep me"
    for key, value in (("images_per_domain", 0), ("image_size", 32), ("seed", -1), ("test_images_per_domain", 1.5)):
        with pytest.raises(ValueError, match=key):
            generate_synthetic(tmp_path / "x", **dict(TINY, **{key: value}))


def test_ensure_synthetic_follows_the_config(tmp_path, data_cfg, small_synth):
    cfg = data_cfg(**{"DATASETS.SYNTH.ROOT": str(tmp_path / "cfg_root"), "DATASETS.SYNTH.IMAGES_PER_DOMAIN": 4,
                      "DATASETS.SYNTH.TEST_IMAGES_PER_DOMAIN": 1, "DATASETS.SYNTH.IMAGE_SIZE": 64})
    try:
        summary = ensure_synthetic(cfg)
        assert summary["root"] == str(tmp_path / "cfg_root") and summary["params"]["images_per_domain"] == 4
        assert MetadataCatalog.get("synth_photo_train").dirname == str(tmp_path / "cfg_root" / "photo")
        assert len(DatasetCatalog.get("synth_photo_train")) == 4
        assert not ensure_synthetic(cfg)["generated"]
    finally:
        synthetic.register_synthetic(small_synth["root"])
    default = data_cfg(**{"DATASETS.UODB_ROOT": str(tmp_path / "d2")})
    assert synthetic.synthetic_root(default) == str(tmp_path / "d2" / "gem_synth")


def test_make_synthetic_tool_prints_a_summary(tmp_path):
    tool = pathlib.Path(__file__).resolve().parents[3] / "tools" / "make_synthetic.py"
    args = [sys.executable, str(tool), "--root", str(tmp_path / "t"), "--images-per-domain", "4",
            "--test-images-per-domain", "1", "--image-size", "64"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "generated in" in out and f"{RARE_DOMAIN} (rare)" in out
    for d in DOMAINS:
        assert d in out
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already present" in again.stdout
