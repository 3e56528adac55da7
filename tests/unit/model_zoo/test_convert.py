"""Importing IDEA-Research/DINO and detrex DINO checkpoints: key tables against the references' state-dict
names (tests/fixtures), a round trip into GEMDINO (dense and MoE), class rows by name, sparse upcycling that
keeps the model's outputs, and the errors for other files."""
import argparse
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import gem_d2  # noqa: F401  (shims + registrations before detectron2)

# isort: split
from detectron2.modeling import build_model

from gem_d2 import model_zoo
from gem_d2.data import register_voc_dataset
from gem_d2.model_zoo.convert import (
    ALIAS,
    VOC_COCO_ALIASES,
    coco_class_names,
    config_mismatches,
    convert_state_dict,
    detect_format,
    load_reference_checkpoint,
    map_key,
    upcycle_dense_ffns,
)
from gem_d2.utils.safe_load import UnsafePickleError

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "dino_reference_state_dicts.json"
REFERENCE = {fmt: [(k, tuple(s)) for k, s in d["keys"]] for fmt, d in json.loads(FIXTURE.read_text()).items()}
COCO_ROWS = {"idea": 91, "detrex": 80}
T = "dino.transformer."


_FAKE = {}


def fake_checkpoint(fmt):
    """A shallow copy of :func:`_fake_checkpoint` (made once per format): replace entries, never modify them."""
    if fmt not in _FAKE:
        _FAKE[fmt] = _fake_checkpoint(fmt)
    return dict(_FAKE[fmt])


def _fake_checkpoint(fmt, seed=0):
    """A state dict with the reference's names and shapes and random values; aliases repeat their entry, and
    IDEA-Research/DINO's decoder heads are one module (its default)."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=g) for k, shape in REFERENCE[fmt]}
    for key in state:
        m = re.fullmatch(r"(class_embed|bbox_embed)\.\d+\.(.+)", key)
        if fmt == "idea" and m:
            state[key] = state[f"{m.group(1)}.0.{m.group(2)}"]
    for key in state:
        target = map_key(fmt, key)
        if isinstance(target, tuple):
            state[key] = state[target[1]]
    return state


def _r50_cfg(**dino):
    cfg = model_zoo.get_config("Base-GEM-DINO.yaml")
    cfg.MODEL.DEVICE = "cpu"
    for k, v in dino.items():
        cfg.MODEL.DINO[k] = v
    return cfg


@pytest.fixture(scope="module")
def dense_r50():
    torch.manual_seed(0)
    return build_model(_r50_cfg(NUM_CLASSES=91)).state_dict()


@pytest.mark.parametrize("fmt", ["idea", "detrex"])
def test_key_tables_cover_every_reference_entry(fmt, dense_r50):
    """Every reference entry is mapped to a GEMDINO entry of the same shape, or dropped on purpose; every
    GEMDINO entry of the dense R-50 model is filled."""
    names = dict(REFERENCE[fmt])
    filled, dropped = {}, []
    for key, shape in REFERENCE[fmt]:
        target = map_key(fmt, key)
        if target is None:
            dropped.append(key)
        elif isinstance(target, tuple):
            assert target[0] == ALIAS and names[target[1]] == shape, key
            dropped.append(key)
        else:
            assert target in dense_r50, (key, target)
            assert target not in filled, (key, filled.get(target))
            if "class" not in target and "label_enc" not in target:
                assert tuple(dense_r50[target].shape) == shape, (key, target)
            filled[target] = key
    assert sorted(set(dense_r50) - set(filled)) == []
    # what is dropped: the heads registered a second time inside the decoder, weights and biases (IDEA: 6 class
    # heads and 6 three-layer box heads, 48 entries; detrex: 7 of each, the last pair being the encoder's, 56)
    assert all(k.startswith(("transformer.decoder.class_embed.", "transformer.decoder.bbox_embed.")) for k in dropped)
    assert len(dropped) == {"idea": 48, "detrex": 56}[fmt]


def test_key_table_details():
    # IDEA-Research/DINO names decoder norms by module: its norm2 (after self-attention) is gem-d2's norm1
    assert map_key("idea", "transformer.decoder.layers.3.norm2.weight") == T + "decoder.layers.3.norm1.weight"
    assert map_key("idea", "transformer.decoder.layers.3.norm1.bias") == T + "decoder.layers.3.norm2.bias"
    assert map_key("idea", "backbone.0.body.layer1.2.bn3.running_var") == "backbone.res2.2.conv3.norm.running_var"
    assert map_key("idea", "backbone.0.body.layer4.0.downsample.1.weight") == "backbone.res5.0.shortcut.norm.weight"
    assert map_key("idea", "input_proj.3.1.bias") == "dino.neck.extra_convs.0.1.bias"
    assert map_key("idea", "transformer.enc_out_class_embed.weight") == T + "enc_class_head.weight"
    # detrex: heads 0..5 decode, head 6 is the encoder's
    assert map_key("detrex", "class_embed.5.bias") == T + "decoder.class_heads.5.bias"
    assert map_key("detrex", "bbox_embed.6.layers.2.weight") == T + "enc_box_head.layers.2.weight"
    assert map_key("detrex", "transformer.decoder.layers.0.norms.1.weight") == T + "decoder.layers.0.norm2.weight"
    assert map_key("detrex", "neck.extra_convs.0.norm.weight") == "dino.neck.extra_convs.0.1.weight"
    assert map_key("detrex", "backbone.res4.5.conv2.norm.num_batches_tracked") is None
    with pytest.raises(KeyError, match="matches no rule"):
        map_key("detrex", "transformer.decoder.layers.0.extra.weight")


# ------------------------------------------------------------------------------------------ round trip

CLASSES_A = ("person", "dining_table", "widget")  # "dining table" in COCO; no "widget"
CLASSES_B = ("aeroplane", "car")  # "airplane" in COCO (a VOC alias)


@pytest.fixture(scope="module")
def moe_r50(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    register_voc_dataset("t_conv_a_train", str(root), "train", CLASSES_A)
    register_voc_dataset("t_conv_b_train", str(root), "train", CLASSES_B)
    cfg = _r50_cfg()
    cfg.DATASETS.TRAIN = ("t_conv_a_train", "t_conv_b_train")
    cfg.MODEL.GEM.ROUTER, cfg.MODEL.GEM.NUM_EXPERTS = "topk", 2
    cfg.MODEL.GEM.MOE_LAYERS = ["encoder.1", "decoder.0", "decoder.4"]
    torch.manual_seed(0)
    model = build_model(cfg)
    yield cfg, model
    from gem_d2.data import catalog

    for name in ("t_conv_a_train", "t_conv_b_train"):
        catalog.unregister(name)


@pytest.mark.parametrize("fmt", ["idea", "detrex"])
def test_round_trip_into_moe_gemdino(fmt, moe_r50):
    cfg, model = moe_r50
    src = fake_checkpoint(fmt)
    row_keys = (T + "decoder.class_heads.0.weight", T + "enc_class_head.bias", "dino.label_enc.weight")
    init = {k: model.state_dict()[k].clone() for k in row_keys}
    names = list(CLASSES_A + CLASSES_B)
    out, report = convert_state_dict({"model": src, "epoch": 11}, model.state_dict(), "auto", names,
                                     aliases=VOC_COCO_ALIASES)
    assert report.format == fmt
    result = model.load_state_dict(out, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    state = model.state_dict()
    # only the routers' gates and the (test-time) dataset classifier keep their initialisation
    assert report.kept_init == ["dataset_classifier.bias", "dataset_classifier.ready", "dataset_classifier.weight"] + [
        f"{T}{layer}.ffn.router.gate.weight" for layer in ("decoder.layers.0", "decoder.layers.4", "encoder.layers.1")]
    assert report.upcycled == [T + "decoder.layers.0.ffn", T + "decoder.layers.4.ffn", T + "encoder.layers.1.ffn"]

    def src_key(idea, detrex):
        return idea if fmt == "idea" else detrex

    # sparse upcycling: every expert is the checkpoint's FFN
    w1 = src[src_key("transformer.decoder.layers.4.linear1.weight",
                     "transformer.decoder.layers.4.ffns.0.layers.0.0.weight")]
    b2 = src[src_key("transformer.encoder.layers.1.linear2.bias", "transformer.encoder.layers.1.ffns.0.layers.1.bias")]
    for e in range(2):
        assert torch.equal(state[T + "decoder.layers.4.ffn.experts.w1"][e], w1)
        assert torch.equal(state[T + "encoder.layers.1.ffn.experts.b2"][e], b2)
    # a dense FFN stays dense
    assert torch.equal(state[T + "decoder.layers.1.ffn.linear2.weight"],
                       src[src_key("transformer.decoder.layers.1.linear2.weight",
                                   "transformer.decoder.layers.1.ffns.0.layers.1.weight")])
    assert torch.equal(state[T + "decoder.layers.2.norm1.weight"],
                       src[src_key("transformer.decoder.layers.2.norm2.weight",
                                   "transformer.decoder.layers.2.norms.0.weight")])
    assert torch.equal(state["backbone.res3.1.conv2.norm.running_mean"],
                       src[src_key("backbone.0.body.layer2.1.bn2.running_mean",
                                   "backbone.res3.1.conv2.norm.running_mean")])
    assert torch.equal(state[T + "tgt_embed.weight"], src["transformer.tgt_embed.weight"])
    enc_head = src_key("transformer.enc_out_class_embed", "class_embed.6")

    # class rows: person, dining_table, aeroplane (alias), car copied from COCO's rows; widget as initialised
    coco = coco_class_names(fmt)
    expected = {0: "person", 1: "dining table", 3: "airplane", 4: "car"}
    assert report.class_rows == {t: coco.index(n) for t, n in expected.items()}
    assert report.unmatched_classes == ["widget"]
    for t, s in report.class_rows.items():
        assert torch.equal(state[T + "decoder.class_heads.2.weight"][t], src["class_embed.2.weight"][s])
        assert torch.equal(state[T + "enc_class_head.bias"][t], src[enc_head + ".bias"][s])
        assert torch.equal(state["dino.label_enc.weight"][t], src["label_enc.weight"][s])
    for key in row_keys:
        assert torch.equal(state[key][2], init[key][2])  # widget: DINO's initialisation
    assert state[T + "decoder.class_heads.5.bias"][2].item() == pytest.approx(-math.log(99))
    # the checkpoint's settings differ from the base config's exactly where the references differ
    assert config_mismatches(cfg, fmt) == ([] if fmt == "detrex" else [
        "MODEL.DINO.PE_TEMPERATURE is 10000; the idea reference uses 20",
        "MODEL.DINO.PE_OFFSET is -0.5; the idea reference uses 0.0"])


def test_class_rows_by_index(moe_r50):
    _, model = moe_r50
    src = fake_checkpoint("detrex")
    out, report = convert_state_dict(src, model.state_dict(), "detrex", match="index")
    assert report.class_rows == {i: i for i in range(5)} and report.unmatched_classes == []
    assert torch.equal(out[T + "enc_class_head.weight"], src["class_embed.6.weight"][:5])


def test_shared_heads_need_equal_source_heads(moe_r50):
    _, model = moe_r50
    target = dict(model.state_dict())
    for i in range(1, 6):  # as a model with MODEL.DINO.SHARE_CLASS_HEAD True: one tensor under every index
        for p in ("weight", "bias"):
            target[f"{T}decoder.class_heads.{i}.{p}"] = target[f"{T}decoder.class_heads.0.{p}"]
    names = list(CLASSES_A + CLASSES_B)
    with pytest.raises(ValueError, match="SHARE_CLASS_HEAD"):
        convert_state_dict(fake_checkpoint("detrex"), target, "detrex", names)  # detrex: one head per layer
    convert_state_dict(fake_checkpoint("idea"), target, "idea", names)  # IDEA's are shared: fine


def test_errors_for_other_files(moe_r50, tmp_path):
    _, model = moe_r50
    target = model.state_dict()
    names = list(CLASSES_A + CLASSES_B)
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        convert_state_dict({"conv.weight": torch.ones(1)}, target, "auto", names)
    with pytest.raises(ValueError, match="already a gem-d2 checkpoint"):
        convert_state_dict(target, target, "auto", names)
    with pytest.raises(ValueError, match="not a checkpoint"):
        convert_state_dict({"model": {"epoch": 3}}, target, "auto", names)
    src = fake_checkpoint("idea")
    src["transformer.tgt_embed.weight"] = torch.zeros(300, 256)
    with pytest.raises(ValueError, match=r"tgt_embed.*\(300, 256\).*\(900, 256\).*NUM_QUERIES"):
        convert_state_dict(src, target, "idea", names)
    src = fake_checkpoint("idea")
    src["class_embed.0.weight"] = src["transformer.decoder.class_embed.0.weight"] = torch.zeros(80, 256)
    with pytest.raises(ValueError, match="80 class rows"):
        convert_state_dict(src, target, "idea", names)
    src = fake_checkpoint("detrex")
    src["transformer.decoder.class_embed.1.bias"] = torch.zeros(80)
    with pytest.raises(ValueError, match="should repeat 'class_embed.1.bias'"):
        convert_state_dict(src, target, "detrex", names)
    src = {k: v for k, v in fake_checkpoint("detrex").items() if "encoder.layers.5." not in k}
    with pytest.raises(ValueError, match="nothing for 16 model entries"):  # a 5-layer encoder
        convert_state_dict(src, target, "detrex", names)
    src = {k: v for k, v in fake_checkpoint("detrex").items() if "decoder.layers.5." not in k}
    with pytest.raises(ValueError, match="no place in the model"):  # 5 decoder layers: head 5 is the encoder's
        convert_state_dict(src, target, "detrex", names)
    with pytest.raises(ValueError, match="target_class_names"):
        convert_state_dict(fake_checkpoint("detrex"), target, "detrex")


class _Opaque:
    pass


def test_reference_files_are_read_as_data(tmp_path):
    def part(fmt):  # decoder layer 0 (holds the format's marker entry) and the label embedding: small files
        return {k: v for k, v in fake_checkpoint(fmt).items() if "decoder.layers.0." in k or k == "label_enc.weight"}

    src = part("idea")
    path = tmp_path / "checkpoint0011_4scale.pth"
    # IDEA-Research/DINO saves its command line (a Namespace) next to the weights
    torch.save({"model": src, "args": argparse.Namespace(lr=1e-4, options={"a": 1}), "epoch": 11}, path)
    state = load_reference_checkpoint(path)
    assert detect_format(state) == "idea" and torch.equal(state["label_enc.weight"], src["label_enc.weight"])
    torch.save({"model": {"module." + k: v for k, v in part("detrex").items()}}, path)
    assert detect_format(load_reference_checkpoint(path)) == "detrex"  # DDP prefix removed
    torch.save({"model": src, "extra": _Opaque()}, path)
    with pytest.raises(UnsafePickleError, match="refused"):
        load_reference_checkpoint(path)


# ------------------------------------------------------------------------------------------ upcycling


def _tiny_cfg(moe):
    cfg = model_zoo.get_config("dino_synth_small.yaml")
    cfg.MODEL.DEVICE = "cpu"
    d = cfg.MODEL.DINO
    d.HIDDEN_DIM, d.DIM_FEEDFORWARD, d.ENC_LAYERS, d.DEC_LAYERS, d.NUM_QUERIES = 64, 128, 2, 2, 20
    if moe:
        g = cfg.MODEL.GEM
        g.ROUTER, g.NUM_EXPERTS, g.MOE_LAYERS = "gem", 3, ["encoder.0", "decoder.0", "decoder.1"]
        g.UNITS = list(cfg.DATASETS.TRAIN)
        g.MAPPING = [[0], [1], [2], [1], [0]]
    return cfg


def test_upcycled_moe_model_equals_the_dense_one():
    """Every expert a copy of the dense FFN (GEM routing, weight 1 per token): the same detections."""
    torch.manual_seed(0)
    dense = build_model(_tiny_cfg(False)).eval()
    moe = build_model(_tiny_cfg(True)).eval()
    state, layers = upcycle_dense_ffns(dense.state_dict(), moe.state_dict())
    assert layers == [T + "decoder.layers.0.ffn", T + "decoder.layers.1.ffn", T + "encoder.layers.0.ffn"]
    moe.load_state_dict(state, strict=True)
    rng = np.random.default_rng(0)
    inputs = []
    for i, (h, w) in enumerate([(96, 128), (128, 96), (96, 96)]):
        block = dense.dataset_blocks[i].tolist()
        inputs.append({"image": torch.tensor(rng.integers(0, 256, size=(3, h, w)), dtype=torch.uint8),
                       "dataset_id": i, "class_block": tuple(block), "height": h, "width": w})
    with torch.no_grad():
        a, b = dense(inputs), moe(inputs)
    for x, y in zip(a, b):
        torch.testing.assert_close(x["instances"].scores, y["instances"].scores, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x["instances"].pred_boxes.tensor, y["instances"].pred_boxes.tensor, atol=1e-4,
                                   rtol=1e-5)
    # and the experts really are used: a perturbed expert 2 changes only dataset 2's detections
    with torch.no_grad():
        moe.dino.transformer.decoder.layers[0].ffn.experts.w2[2].mul_(3.0)
        c = moe(inputs)
    assert torch.equal(c[0]["instances"].scores, b[0]["instances"].scores)
    assert not torch.allclose(c[2]["instances"].scores, b[2]["instances"].scores)
