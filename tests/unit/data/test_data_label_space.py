"""Unified label space (disjoint blocks in DATASETS.TRAIN order) and COCO-JSON registration of a user domain."""
import json

import pytest
import torch
from PIL import Image

import gem_d2  # noqa: F401  (shims before detectron2)

# isort: split
from detectron2.data import DatasetCatalog, MetadataCatalog

from gem_d2.data import UnifiedLabelSpace, register_coco_dataset, register_voc_dataset


@pytest.fixture
def three_domains(tmp_path, write_voc, registered_names):
    """a: 3 classes, b: 2 classes, c: 1 class (train + test each), registered without reading anything."""
    specs = {"a": ["x", "y", "z"], "b": ["p", "q"], "c": ["only"]}
    for key, classes in specs.items():
        for split in ("train", "test"):
            name = f"t_ls{key}_{split}"
            registered_names.append(name)
            register_voc_dataset(name, tmp_path / key, split, classes)
    return specs


def test_blocks_offsets_and_names(three_domains, data_cfg):
    space = UnifiedLabelSpace(["t_lsb_train", "t_lsa_train", "t_lsc_train"])
    assert space.num_classes == 6
    assert space.offsets == (0, 2, 5)
    assert [space.block(i) for i in range(3)] == [(0, 2), (2, 5), (5, 6)]
    assert space.class_names == ("t_lsb:p", "t_lsb:q", "t_lsa:x", "t_lsa:y", "t_lsa:z", "t_lsc:only")
    assert space.dataset_names == ("t_lsb_train", "t_lsa_train", "t_lsc_train")
    assert space.dataset_index("t_lsa_train") == 1 and space.dataset_index("t_lsa_test") == 1
    assert space.block_of("t_lsc_test") == (5, 6)
    assert space.to_unified(1, 2) == 4 and space.to_unified(0, 0) == 0
    assert space.to_unified(1, torch.tensor([0, 2])).tolist() == [2, 4]
    assert [space.to_local(u) for u in range(6)] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 0)]
    # deterministic: the same list gives an equal space, another order a different one
    assert space == UnifiedLabelSpace(["t_lsb_train", "t_lsa_train", "t_lsc_train"])
    assert space != UnifiedLabelSpace(["t_lsa_train", "t_lsb_train", "t_lsc_train"])


def test_from_cfg_gives_each_test_dataset_its_domains_block(three_domains, data_cfg):
    one = UnifiedLabelSpace.from_cfg(data_cfg(train=["t_lsa_train", "t_lsb_train"], test=["t_lsb_test"]))
    two = UnifiedLabelSpace.from_cfg(data_cfg(train=["t_lsb_train", "t_lsa_train"], test=["t_lsa_test"]))
    assert one.block_of("t_lsb_train") == one.block_of("t_lsb_test") == (3, 5)
    assert two.block_of("t_lsb_train") == (0, 2) and two.block_of("t_lsa_test") == (2, 5)


def test_extended_with_appends_a_block(three_domains):
    space = UnifiedLabelSpace(["t_lsa_train", "t_lsb_train"])
    bigger = space.extended_with("t_lsc_train")
    assert bigger.num_classes == 6 and bigger.block(2) == (5, 6)
    assert [bigger.block(i) for i in range(2)] == [space.block(i) for i in range(2)]  # old blocks unchanged
    assert space.num_classes == 5  # the original is not modified
    with pytest.raises(ValueError, match="both of domain 't_lsa'"):
        space.extended_with("t_lsa_test")


def test_bad_inputs(three_domains, data_cfg):
    with pytest.raises(KeyError, match="dataset 'nope_train' is not registered"):
        UnifiedLabelSpace(["t_lsa_train", "nope_train"])
    with pytest.raises(ValueError, match="at least one training dataset"):
        UnifiedLabelSpace([])
    with pytest.raises(ValueError, match="listed twice"):
        UnifiedLabelSpace(["t_lsa_train", "t_lsa_train"])
    with pytest.raises(KeyError, match="DATASETS.TEST has 't_lsc_test'.*DATASETS.TRAIN"):
        UnifiedLabelSpace.from_cfg(data_cfg(train=["t_lsa_train"], test=["t_lsc_test"]))
    space = UnifiedLabelSpace(["t_lsa_train", "t_lsb_train"])
    with pytest.raises(KeyError, match="'t_lsc_test' .* not in the label space"):
        space.dataset_index("t_lsc_test")
    with pytest.raises(IndexError, match="block 2 out of range"):
        space.block(2)
    with pytest.raises(ValueError, match="class id 2 out of range for 't_lsb_train'"):
        space.to_unified(1, 2)
    with pytest.raises(ValueError, match=r"unified class id 5 out of range \[0, 5\)"):
        space.to_local(5)


def test_test_dataset_with_other_classes_is_rejected(tmp_path, three_domains, registered_names):
    registered_names.append("t_lsa_val")
    register_voc_dataset("t_lsa_val", tmp_path / "a", "val", ["x", "y"])
    with pytest.raises(ValueError, match="'t_lsa_val' has classes \\['x', 'y'\\].*'t_lsa_train'"):
        UnifiedLabelSpace(["t_lsa_train"]).dataset_index("t_lsa_val")


def _coco_json(path, image_dir, categories):
    image_dir.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30)).save(image_dir / "im1.jpg")
    data = {"images": [{"id": 1, "file_name": "im1.jpg", "height": 30, "width": 40}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 12], "area": 120,
                             "iscrowd": 0}],
            "categories": categories}
    path.write_text(json.dumps(data))


def test_coco_json_user_domain(tmp_path, registered_names, three_domains):
    registered_names += ["t_shop_train", "t_shop_test"]
    cats = [{"id": 7, "name": "bottle"}, {"id": 3, "name": "can"}]  # ids neither sorted nor contiguous
    _coco_json(tmp_path / "train.json", tmp_path / "img", cats)
    register_coco_dataset("t_shop_train", tmp_path / "train.json", tmp_path / "img")
    register_coco_dataset("t_shop_test", str(tmp_path / "train.json"), str(tmp_path / "img"),
                          class_names=["can", "bottle"])
    assert MetadataCatalog.get("t_shop_train").evaluator_type == "gem_uodb"
    assert MetadataCatalog.get("t_shop_train").get("thing_classes") is None  # lazy: JSON not read yet
    space = UnifiedLabelSpace(["t_lsc_train", "t_shop_train"])  # reads the JSON for the class list
    assert space.class_names[1:] == ("t_shop:can", "t_shop:bottle")  # category-id order
    assert space.dataset_index("t_shop_test") == 1
    (record,) = DatasetCatalog.get("t_shop_train")
    assert record["dataset_name"] == "t_shop_train"
    assert record["annotations"][0]["category_id"] == 1  # id 7 = second in id order


def test_coco_class_names_must_match_the_json(tmp_path, registered_names):
    registered_names.append("t_shop2_train")
    _coco_json(tmp_path / "a.json", tmp_path / "img", [{"id": 7, "name": "bottle"}, {"id": 3, "name": "can"}])
    register_coco_dataset("t_shop2_train", tmp_path / "a.json", tmp_path / "img", class_names=["bottle", "can"])
    with pytest.raises(ValueError, match=r"categories of .*a\.json .* differ from the class_names"):
        DatasetCatalog.get("t_shop2_train")
    register_coco_dataset("t_shop2_train", tmp_path / "missing.json", tmp_path / "img")
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        DatasetCatalog.get("t_shop2_train")
