"""Read weight files as data: nothing in a checkpoint or model-zoo pickle can run code while it is loaded.

- :func:`load_torch_file`: any ``torch.save`` file (``.pth``, ``.pt``, ``.pyth``, other extensions) with
  ``torch.load(map_location="cpu", weights_only=True)``: tensors, numbers, strings and plain containers
  only. A file that needs more is refused (:class:`UnsafePickleError`); a truncated or corrupt file gives
  :class:`CorruptFileError` naming the path and what was expected. Never falls back to a full unpickle.
- :func:`load_pickle_weights`: detectron2 / Detectron1 (Caffe2) model-zoo ``.pkl`` files through
  :class:`RestrictedUnpickler`, which rebuilds numpy arrays, dtypes and scalars and plain containers and
  refuses every other global (``os.system``, ``builtins.eval``, ``subprocess.*``...) before anything runs.
- :func:`safe_checkpoint_load`: the dict ``DetectionCheckpointer._load_file`` returns, built from the two
  loaders above; :class:`SafeCheckpointLoadMixin` plugs it into a checkpointer class.
- :func:`checkpoint_problem` / :func:`is_readable_checkpoint`: whether a file can be loaded at all (e.g.
  to fall back to an earlier checkpoint on resume when the last one was truncated).
"""
from __future__ import annotations

import codecs
import importlib
import logging
import os
import pickle
import zipfile
from typing import Any, Dict, Optional, Sequence

import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["CorruptFileError", "UnsafePickleError", "RestrictedUnpickler", "load_torch_file", "load_pickle_weights",
           "safe_checkpoint_load", "SafeCheckpointLoadMixin", "checkpoint_problem", "is_readable_checkpoint"]

_logger = logging.getLogger(__name__)

_TORCH_EXPECTED = "a torch.save file (a zip archive, or the legacy pickle format) of tensors and plain containers"
_PICKLE_EXPECTED = "a pickled dict of numpy arrays (a detectron2 / Caffe2 model-zoo .pkl)"


class CorruptFileError(ValueError):
    """A weight file exists but cannot be read as the expected format (truncated, corrupt or something else)."""


class UnsafePickleError(pickle.UnpicklingError):
    """A weight file asks for Python objects beyond plain data; it was refused before any of it ran."""


# ---------------------------------------------------------------------------------------------------------
# Restricted unpickling of model-zoo .pkl files

# numpy globals an array / dtype / scalar pickle names, by submodule of numpy.core (numpy < 2) or numpy._core.
_NUMPY_CORE_ALLOWED = {("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")}
_NUMPY_ALLOWED = {"ndarray", "dtype"}
# Constructors of plain values; "__builtin__" is the Python 2 name of builtins (old Caffe2 pickles).
_BUILTINS_ALLOWED = {"set", "frozenset", "complex", "bytearray", "bytes", "slice"}
_LATIN1_NAMES = {"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "l1"}


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    """Stand-in for ``_codecs.encode``: protocol-2 pickles store ``bytes`` as ``encode(str, "latin1")``."""
    if not isinstance(text, str) or str(encoding).lower() not in _LATIN1_NAMES:
        raise pickle.UnpicklingError(f"_codecs.encode is only allowed for latin1 text, got encoding {encoding!r}")
    return codecs.encode(text, "latin1", errors)


def _numpy_global(submodule: str, name: str):
    for prefix in ("numpy._core.", "numpy.core."):  # numpy >= 2 first: numpy.core warns there
        try:
            module = importlib.import_module(prefix + submodule)
        except ImportError:
            continue
        if hasattr(module, name):
            return getattr(module, name)
    raise pickle.UnpicklingError(f"numpy has no {submodule}.{name} (numpy version too old or too new?)")


def _allowed_global(module: str, name: str):
    """The object a pickle may name as ``module.name``, or None when that global is refused."""
    if module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric"):
        submodule = module.rsplit(".", 1)[1]
        return _numpy_global(submodule, name) if (submodule, name) in _NUMPY_CORE_ALLOWED else None
    if module == "numpy" and name in _NUMPY_ALLOWED:
        import numpy

        return getattr(numpy, name)
    if module in ("builtins", "__builtin__") and name in _BUILTINS_ALLOWED:
        import builtins

        return getattr(builtins, name)
    if module == "collections" and name == "OrderedDict":
        import collections

        return collections.OrderedDict
    if module == "_codecs" and name == "encode":
        return _latin1_encode
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` whose ``find_class`` only returns what rebuilds plain weight data.

    Allowed globals: ``numpy.ndarray``, ``numpy.dtype``, ``numpy.core.multiarray._reconstruct`` / ``.scalar``
    and ``numpy.core.numeric._frombuffer`` (also under their numpy >= 2 name ``numpy._core...``),
    ``collections.OrderedDict``, ``builtins.set/frozenset/complex/bytearray/bytes/slice`` and
    ``_codecs.encode`` restricted to latin1 (how protocol 2 stores bytes). Dicts, lists, tuples, strings and
    numbers need no global. Anything else raises :class:`UnsafePickleError` naming ``source`` and the
    refused ``module.name``; nothing named by the pickle is called before that check. Persistent ids are
    refused by the base class.
    """

    def __init__(self, file, *, source: str = "<pickle>", **kwargs):
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module: str, name: str):
        obj = _allowed_global(module, name)
        if obj is None:
            raise UnsafePickleError(
                f"{self.source}: refused to load: the pickle asks for the Python global {module}.{name}, but weight "
                f"files may only hold numpy arrays, dtypes, scalars and plain containers (expected "
                f"{_PICKLE_EXPECTED}). Loading it would run code named by the file; nothing was run.")
        return obj


def load_pickle_weights(path, encoding: str = "latin1") -> Any:
    """Unpickle a model-zoo ``.pkl`` with :class:`RestrictedUnpickler` (no code from the file runs).

    ``encoding="latin1"`` (detectron2's choice) reads Python 2 pickles of old Caffe2 models: their byte
    strings become ``str`` and numpy rebuilds arrays from them.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafePickleError: the pickle names a global outside the allow list (the message names it).
        CorruptFileError: truncated, corrupt or not a pickle (the message names ``path``).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file not found: {path} (expected {_PICKLE_EXPECTED})")
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, source=path, encoding=encoding).load()
        except UnsafePickleError:
            raise
        except Exception as e:
            raise CorruptFileError(f"{path}: cannot read it as {_PICKLE_EXPECTED}; it is probably truncated or "
                                   f"corrupt ({type(e).__name__}: {_short(e)})") from e


# ---------------------------------------------------------------------------------------------------------
# torch files


def _short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _weights_only_reason(message: str) -> str:
    """The line of torch's weights-only error that says what was refused (its advice to disable it dropped)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or "Unsupported" in ln or "unsupported" in ln:
            return ln
    return lines[-1] if lines else message


def load_torch_file(path, mmap: bool = False, safe_globals: Sequence[type] = ()) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, whatever the file's extension.

    Args:
        path: a local file.
        mmap: memory-map tensor storages (zip-format files only; legacy files are read normally).
        safe_globals: further plain-data classes the file may hold (``torch.serialization.safe_globals``),
            e.g. ``argparse.Namespace`` for checkpoints that store their command line; such objects are
            rebuilt by setting their ``__dict__``, no code of theirs runs.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafePickleError: the file holds objects other than tensors and plain containers (refused, not run);
            there is no fallback to ``weights_only=False``.
        CorruptFileError: truncated, corrupt or not a torch file; the message names ``path`` and the format
            that was expected, with torch's own error.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path} (expected {_TORCH_EXPECTED})")
    use_mmap = bool(mmap) and zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise UnsafePickleError(
                f"{path}: refused to load: torch's weights-only reader found content other than tensors and "
                f"plain containers ({_weights_only_reason(str(e))}). gem_d2 never unpickles checkpoints in full "
                f"(that can run code from the file); nothing was run.") from None
        raise CorruptFileError(f"{path}: cannot read it as {_TORCH_EXPECTED}; it is probably truncated or corrupt "
                               f"({type(e).__name__}: {_short(e)})") from e
    except Exception as e:
        raise CorruptFileError(f"{path}: cannot read it as {_TORCH_EXPECTED}; it is probably truncated or corrupt "
                               f"({type(e).__name__}: {_short(e)})") from e


def checkpoint_problem(path) -> Optional[str]:
    """Why ``path`` cannot be loaded as a checkpoint, or None when it can.

    ``.pkl`` files are unpickled with :func:`load_pickle_weights`. Other files: a zip archive must pass
    its CRC check (every member, read sequentially: catches bytes damaged in transfer), then the file is
    loaded with :func:`load_torch_file` (memory-mapped, so tensors are not copied into memory). Refused
    (unsafe) content counts as a problem too.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        return f"{path}: no such file"
    try:
        if path.endswith(".pkl"):
            load_pickle_weights(path)
            return None
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            if bad is not None:
                return f"{path}: member {bad!r} of the zip archive fails its CRC check (the file is corrupt)"
        load_torch_file(path, mmap=True)
    except (CorruptFileError, UnsafePickleError, zipfile.BadZipFile, OSError) as e:
        return str(e)
    return None


def is_readable_checkpoint(path) -> bool:
    """True when :func:`checkpoint_problem` finds nothing wrong with ``path``."""
    return checkpoint_problem(path) is None


# ---------------------------------------------------------------------------------------------------------
# detectron2 checkpointer integration


def safe_checkpoint_load(path, logger: Optional[logging.Logger] = None) -> Dict[str, Any]:
    """What ``DetectionCheckpointer._load_file(path)`` returns, read without running code from the file.

    - ``.pkl``: :func:`load_pickle_weights`; a dict with ``"model"`` and ``"__author__"`` (detectron2 model
      zoo) is returned as is; otherwise (Caffe2 / Detectron1) its ``"blobs"`` (or the dict itself), without
      keys ending in ``_momentum``, as ``{"model": ..., "__author__": "Caffe2", "matching_heuristics": True}``.
    - ``.pyth`` (pycls): ``{"model": model_state without *num_batches_tracked, "__author__": "pycls",
      "matching_heuristics": True}``.
    - anything else: :func:`load_torch_file`, wrapped as ``{"model": loaded}`` when it has no ``"model"``.

    Raises the errors of the two loaders, and :class:`CorruptFileError` when the content is not a dict.
    """
    log = logger or _logger
    path = os.fspath(path)
    if path.endswith(".pkl"):
        data = load_pickle_weights(path)
        if not isinstance(data, dict):
            raise CorruptFileError(f"{path}: holds a {type(data).__name__}, expected {_PICKLE_EXPECTED}")
        if "model" in data and "__author__" in data:
            log.info("Reading a file from '{}'".format(data["__author__"]))
            return data
        if "blobs" in data:  # detection models have "blobs", ImageNet models do not
            data = data["blobs"]
            if not isinstance(data, dict):
                raise CorruptFileError(f"{path}: 'blobs' is a {type(data).__name__}, expected a dict of arrays")
        data = {k: v for k, v in data.items() if not (isinstance(k, str) and k.endswith("_momentum"))}
        return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
    if path.endswith(".pyth"):
        data = load_torch_file(path)
        if not isinstance(data, dict) or "model_state" not in data:
            raise CorruptFileError(f"{path}: cannot load this .pyth file; pycls checkpoints must be a dict with "
                                   f"'model_state'")
        model_state = {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")}
        return {"model": model_state, "__author__": "pycls", "matching_heuristics": True}
    loaded = load_torch_file(path)
    if not isinstance(loaded, dict):
        raise CorruptFileError(f"{path}: holds a {type(loaded).__name__}, expected a dict (a state dict, or a "
                               f"checkpoint with 'model')")
    if "model" not in loaded:
        loaded = {"model": loaded}
    return loaded


class SafeCheckpointLoadMixin:
    """Makes a ``DetectionCheckpointer`` (sub)class read files with :func:`safe_checkpoint_load`.

    Put it before the checkpointer in the bases: ``class C(SafeCheckpointLoadMixin, DetectionCheckpointer)``.
    Everything else (model-zoo name matching, Caffe2 conversion, ``_load_model``) stays the checkpointer's.
    """

    def _load_file(self, filename: str) -> Dict[str, Any]:
        return safe_checkpoint_load(filename, logger=self.logger)


class SafeDetectionCheckpointer(SafeCheckpointLoadMixin, DetectionCheckpointer):
    """detectron2's ``DetectionCheckpointer`` reading every file as data (:func:`safe_checkpoint_load`)."""
