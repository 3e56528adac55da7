"""build_mobilenet_v2_backbone: stages equal torchvision's features, pretrained weights load everywhere
(GEMDINO, the planner's frozen backbone), FrozenBN / FREEZE_AT as detectron2's ResNet."""
import gem_d2  # noqa: F401  (shims + registrations before detectron2)

# isort: split
import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_backbone, build_model
from torch import nn

from gem_d2 import model_zoo
from gem_d2.config import add_gem_config
from gem_d2.model_zoo import pretrained
from gem_d2.modeling.backbone.mobilenet import STAGES, MobileNetV2Backbone, torchvision_to_backbone_keys
from gem_d2.planner import build_frozen_backbone

URL = "gem_d2://ImageNetPretrained/mobilenet_v2"
ALL = [s[0] for s in STAGES]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def torchvision_state():
    return torch.load(pretrained.verified_file(URL), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def torchvision_model(torchvision_state):
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torchvision_state)
    return model.eval()


def mobilenet_cfg(out_features=ALL, norm="FrozenBN", freeze_at=0, weights=""):
    cfg = add_gem_config(get_cfg())
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = "build_mobilenet_v2_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    cfg.MODEL.MOBILENET.OUT_FEATURES = list(out_features)
    cfg.MODEL.MOBILENET.NORM = norm
    cfg.MODEL.WEIGHTS = weights
    return cfg


def pretrained_backbone(**kw):
    backbone = build_backbone(mobilenet_cfg(**kw))
    holder = nn.Module()
    holder.backbone = backbone
    DetectionCheckpointer(holder).load(URL)
    return backbone.eval()


def assert_backbone_holds_the_imagenet_weights(backbone, torchvision_state, prefix=""):
    expected = torchvision_to_backbone_keys(torchvision_state)
    state = {k[len(prefix):]: v for k, v in backbone.state_dict().items() if k.startswith(prefix)}
    assert state, "no backbone keys"
    missing = sorted(k for k in state if k not in expected and not k.endswith("num_batches_tracked"))
    assert not missing, f"backbone keys without an ImageNet weight: {missing[:5]}"
    differ = [k for k in state if k in expected and not torch.equal(state[k], expected[k])]
    assert not differ, f"backbone keys not loaded from the checkpoint: {differ[:5]}"


@pytest.mark.parametrize("norm", ["BN", "FrozenBN"])
def test_stages_equal_torchvision_features_on_imagenet_weights(torchvision_model, norm):
    """Exactly, in eval mode without gradients (FrozenBatchNorm2d then runs the same batch_norm op)."""
    backbone = pretrained_backbone(norm=norm)
    x = torch.randn(2, 3, 75, 101, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = backbone(x)
        ref = x
        start = 0
        for name, first, stop, stride, channels in STAGES:
            assert first == start
            ref = torchvision_model.features[first:stop](ref)  # = features[:stop](x)
            start = stop
            got = out[name]
            assert got.shape == ref.shape == (2, channels, -(-75 // stride), -(-101 // stride)), name
            assert torch.equal(got, ref), f"{name}: max |diff| {(got - ref).abs().max().item()}"
    shapes = backbone.output_shape()
    assert shapes == {s[0]: ShapeSpec(channels=s[4], stride=s[3]) for s in STAGES}
    assert backbone.size_divisibility == 0


def test_out_features_select_outputs_and_later_stages_are_not_built():
    backbone = build_backbone(mobilenet_cfg(out_features=["res4", "res2"], norm="BN"))
    assert backbone.stage_names == ["stem", "res2", "res3", "res4"] and not hasattr(backbone, "res5")
    assert list(backbone.output_shape()) == ["res2", "res4"]
    out = backbone(torch.zeros(1, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"res2": (1, 24, 16, 16), "res4": (1, 96, 4, 4)}
    with pytest.raises(ValueError, match="OUT_FEATURES"):
        MobileNetV2Backbone(["res6"])
    with pytest.raises(ValueError, match="NORM"):
        MobileNetV2Backbone(norm="GN")
    with pytest.raises(ValueError, match="FREEZE_AT"):
        MobileNetV2Backbone(freeze_at=6)


def _stage_pattern(stage: nn.Module):
    """(every parameter trains, no parameter trains, BatchNorm classes) of a stage."""
    params = list(stage.parameters())
    norms = sorted({type(m).__name__ for m in stage.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))})
    return (all(p.requires_grad for p in params), not any(p.requires_grad for p in params), norms)


@pytest.mark.parametrize("norm", ["BN", "FrozenBN"])
@pytest.mark.parametrize("freeze_at", [0, 1, 2, 3, 4, 5])
def test_norm_and_freeze_at_follow_detectron2_resnet(norm, freeze_at):
    cfg = mobilenet_cfg(norm=norm, freeze_at=freeze_at)
    mobilenet = build_backbone(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    resnet = build_backbone(cfg)
    for index, name in enumerate(ALL, start=1):
        ours, d2 = _stage_pattern(getattr(mobilenet, name)), _stage_pattern(getattr(resnet, name))
        assert ours == d2, f"{name} (FREEZE_AT {freeze_at}, NORM {norm}): MobileNet {ours} vs ResNet {d2}"
        frozen = freeze_at >= index
        assert ours[1] if frozen else ours[0]  # frozen stages never train, the others train every parameter
        if frozen or norm == "FrozenBN":
            assert ours[2] == ["FrozenBatchNorm2d"]  # no trainable BatchNorm parameters
    trainable = {k.split(".", 1)[0] for k, p in mobilenet.named_parameters() if p.requires_grad}
    assert trainable == set(ALL[freeze_at:])
    assert not any(p.requires_grad for m in mobilenet.modules() if isinstance(m, FrozenBatchNorm2d)
                   for p in m.parameters())


def test_syncbn_converts_every_batchnorm():
    backbone = MobileNetV2Backbone(norm="SyncBN", freeze_at=1)
    norms = (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)
    types = {type(m) for m in backbone.modules() if isinstance(m, norms)}
    assert types == {nn.SyncBatchNorm, FrozenBatchNorm2d}
    assert {type(m) for m in backbone.stem.modules() if isinstance(m, norms)} == {FrozenBatchNorm2d}


def test_gemdino_loads_every_backbone_weight(torchvision_state):
    cfg = mobilenet_cfg(out_features=["res3", "res4", "res5"], norm="FrozenBN", freeze_at=1, weights=URL)
    cfg.MODEL.META_ARCHITECTURE = "GEMDINO"
    d = cfg.MODEL.DINO
    d.IN_FEATURES = ["res3", "res4", "res5"]
    d.NUM_FEATURE_LEVELS, d.NUM_CLASSES = 4, 5
    d.HIDDEN_DIM, d.DIM_FEEDFORWARD, d.ENC_LAYERS, d.DEC_LAYERS = 32, 64, 1, 1
    d.NUM_QUERIES, d.DN_NUMBER, d.NUM_SELECT = 10, 0, 10
    cfg.MODEL.GEM.ROUTER, cfg.MODEL.GEM.MOE_LAYERS = "dense", []
    model = build_model(cfg)
    checkpointer = DetectionCheckpointer(model)
    incompatible = checkpointer._load_model(checkpointer._load_file(checkpointer.path_manager.get_local_path(URL)))
    assert not [k for k in incompatible.missing_keys if k.startswith("backbone.")]
    assert not incompatible.unexpected_keys and not incompatible.incorrect_shapes
    assert_backbone_holds_the_imagenet_weights(model.backbone, torchvision_state)
    model.eval()
    image = torch.randint(0, 256, (3, 70, 90), dtype=torch.uint8)
    with torch.no_grad():
        (out,) = model([{"image": image, "class_block": (0, 5), "dataset_id": 0, "height": 70, "width": 90}])
    assert len(out["instances"]) == 10


def test_planner_frozen_backbone_loads_the_url(torchvision_state):
    backbone = build_frozen_backbone(mobilenet_cfg(out_features=["res5"], norm="FrozenBN", weights=URL))
    assert_backbone_holds_the_imagenet_weights(backbone, torchvision_state)
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())


@pytest.mark.parametrize("name", ["Base-GEM-DINO.yaml", "dino_synth_small.yaml"])
def test_shipped_configs_normalise_as_torchvision_imagenet_weights_expect(name):
    """torchvision's weights expect RGB in [0, 1] normalised by ImageNet's mean/std; GEMDINO normalises 0-255 images
    by PIXEL_MEAN/PIXEL_STD in INPUT.FORMAT order, so these must be the same numbers times 255, in RGB order."""
    cfg = model_zoo.get_config(name)
    assert cfg.INPUT.FORMAT == "RGB"
    assert cfg.MODEL.PIXEL_MEAN == pytest.approx([255 * v for v in (0.485, 0.456, 0.406)], abs=1e-9)
    assert cfg.MODEL.PIXEL_STD == pytest.approx([255 * v for v in (0.229, 0.224, 0.225)], abs=1e-9)
