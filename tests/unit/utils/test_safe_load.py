"""gem_d2.utils.safe_load: weight files are read as data; payloads that would run code are refused unrun."""
import builtins
import os
import pickle
import re
import struct
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

import gem_d2  # noqa: F401  (shims before detectron2)

# isort: split
from detectron2.checkpoint import DetectionCheckpointer

from gem_d2.utils.safe_load import (
    CorruptFileError,
    RestrictedUnpickler,
    SafeCheckpointLoadMixin,
    UnsafePickleError,
    checkpoint_problem,
    is_readable_checkpoint,
    load_pickle_weights,
    load_torch_file,
    safe_checkpoint_load,
)


class _Payload:
    """Pickles as ``func(*args)``: what a malicious weight file does on load."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker):
    """Objects whose unpickling would create ``marker`` (each through a different global)."""
    m = str(marker)
    return {
        "os.system": _Payload(os.system, f"touch {m}"),
        "open": _Payload(builtins.open, m, "w"),
        "subprocess": _Payload(subprocess.call, ["touch", m]),
        "eval": _Payload(builtins.eval, f"open({m!r}, 'w')"),
        "exec": _Payload(builtins.exec, f"open({m!r}, 'w')"),
    }


def _dump(path, obj, protocol=pickle.HIGHEST_PROTOCOL):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return str(path)


# ---------------------------------------------------------------------------------------------------------
# A Python 2 (Caffe2-era) pickle, written opcode by opcode: byte strings as str, numpy.core names.


def _sbs(s) -> bytes:  # SHORT_BINSTRING
    b = s.encode("latin1") if isinstance(s, str) else s
    return b"U" + bytes([len(b)]) + b


def _py2_array(a: np.ndarray) -> bytes:
    assert a.dtype == np.float64 and a.flags.c_contiguous
    dtype = (b"cnumpy\ndtype\n" + _sbs("f8") + b"K\x00K\x01\x87R"
             + b"(K\x03" + _sbs("<") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    shape = b"(" + b"".join(b"K" + bytes([n]) for n in a.shape) + b"t"
    data = a.tobytes()
    return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + b"K\x00\x85" + _sbs("b") + b"\x87R"
            + b"(K\x01" + shape + dtype + b"\x89" + b"T" + struct.pack("<i", len(data)) + data + b"tb")


def _py2_blobs_pickle(blobs) -> bytes:
    items = b"".join(_sbs(k) + _py2_array(v) for k, v in blobs.items())
    return b"\x80\x02}(" + _sbs("blobs") + b"}(" + items + b"uu."


# ---------------------------------------------------------------------------------------------------------
# load_pickle_weights


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_weights_round_trip(tmp_path, protocol):
    from collections import OrderedDict

    w = np.arange(6.0).reshape(2, 3)
    data = {"model": OrderedDict(w=w, h=np.ones(3, np.float16), n=np.int64(7), s={1, 2}, c=1 + 2j, e=b""),
            "__author__": "someone", "matching_heuristics": True, "raw": b"\x00\xffbytes"}
    path = _dump(tmp_path / "w.pkl", data, protocol)
    out = load_pickle_weights(path)
    assert isinstance(out["model"], OrderedDict)
    np.testing.assert_array_equal(out["model"]["w"], w)
    assert out["model"]["w"].dtype == np.float64 and out["model"]["h"].dtype == np.float16
    assert out["model"]["n"] == 7 and out["model"]["s"] == {1, 2} and out["model"]["c"] == 1 + 2j
    assert out["raw"] == b"\x00\xffbytes" and out["model"]["e"] == b""
    assert out["__author__"] == "someone" and out["matching_heuristics"] is True


def test_python2_caffe2_pickle_with_latin1_strings(tmp_path):
    w = np.arange(6.0).reshape(2, 3)
    path = tmp_path / "c2.pkl"
    path.write_bytes(_py2_blobs_pickle({"conv1_w": w, "conv1_w_momentum": -w}))
    out = load_pickle_weights(str(path))
    np.testing.assert_array_equal(out["blobs"]["conv1_w"], w)
    # detectron2 reads the same bytes the same way (its loader: pickle.load(encoding="latin1"))
    with open(path, "rb") as f:
        reference = pickle.load(f, encoding="latin1")
    np.testing.assert_array_equal(reference["blobs"]["conv1_w_momentum"], out["blobs"]["conv1_w_momentum"])


@pytest.mark.parametrize("kind", ["os.system", "open", "subprocess", "eval", "exec"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_code_running_pickles_are_refused_unrun(tmp_path, kind, protocol):
    marker = tmp_path / "marker"
    payload = _payloads(marker)[kind]
    path = _dump(tmp_path / "evil.pkl", {"model": {"w": np.zeros(2), "x": payload}, "__author__": "x"}, protocol)
    with pytest.raises(UnsafePickleError, match=r"evil\.pkl: refused to load: .*Python global [\w.]+\.\w+") as info:
        load_pickle_weights(path)
    # the refused global is named: posix.system, io.open, commands.call (protocol 2's name of subprocess)...
    assert re.search(rf"global \w+\.{payload.func.__name__}\b", str(info.value))
    assert not marker.exists()


def test_the_payloads_do_run_under_plain_pickle(tmp_path):
    # control: the files refused above are real attacks (plain pickle.load runs them)
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps({"x": _payloads(marker)["open"]}, protocol=2))["x"].close()
    assert marker.exists()


def test_refused_globals_hidden_in_object_arrays_and_python2_names(tmp_path):
    marker = tmp_path / "marker"
    obj = np.array([_payloads(marker)["os.system"]], dtype=object)
    with pytest.raises(UnsafePickleError, match=r"posix\.system|nt\.system"):
        load_pickle_weights(_dump(tmp_path / "obj.pkl", {"model": {"w": obj}}, 2))
    # the Python 2 name of builtins is not a way around the list, nor another numpy function
    for name, raw in (("__builtin__.eval", b"c__builtin__\neval\n"), ("numpy.load", b"cnumpy\nload\n")):
        path = tmp_path / "crafted.pkl"
        path.write_bytes(b"\x80\x02" + raw + _sbs(f"open({str(marker)!r}, 'w')") + b"\x85R.")
        with pytest.raises(UnsafePickleError, match=rf"crafted\.pkl.*{name.replace('.', '[.]')}"):
            load_pickle_weights(str(path))
    assert not marker.exists()


def test_codecs_encode_only_for_latin1(tmp_path):
    path = tmp_path / "codec.pkl"
    path.write_bytes(b"\x80\x02c_codecs\nencode\n" + _sbs("abc") + _sbs("rot13") + b"\x86R.")
    with pytest.raises(CorruptFileError, match="only allowed for latin1"):
        load_pickle_weights(str(path))


def test_truncated_and_missing_pickles(tmp_path):
    good = _dump(tmp_path / "w.pkl", {"model": {"w": np.arange(100.0)}}, 4)
    blob = open(good, "rb").read()
    (tmp_path / "cut.pkl").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CorruptFileError, match=r"cut\.pkl: cannot read it as a pickled dict of numpy arrays"):
        load_pickle_weights(str(tmp_path / "cut.pkl"))
    with pytest.raises(FileNotFoundError, match=r"nope\.pkl"):
        load_pickle_weights(str(tmp_path / "nope.pkl"))
    with open(good, "rb") as f:
        assert isinstance(RestrictedUnpickler(f, source="x").load(), dict)
    assert checkpoint_problem(good) is None and "cut.pkl" in checkpoint_problem(str(tmp_path / "cut.pkl"))


# ---------------------------------------------------------------------------------------------------------
# load_torch_file and checkpoint_problem


def test_torch_files_load_whatever_the_extension(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "iteration": 3}
    for name in ("a.pth", "a.pt", "a.bin", "noext"):
        torch.save(state, tmp_path / name)
        out = load_torch_file(tmp_path / name)
        assert out["iteration"] == 3 and torch.equal(out["model"]["w"], torch.arange(4.0))
    assert torch.equal(load_torch_file(tmp_path / "a.pth", mmap=True)["model"]["w"], torch.arange(4.0))
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert load_torch_file(tmp_path / "legacy.pth", mmap=True)["iteration"] == 3


def test_corrupt_torch_files_name_the_path_and_the_format(tmp_path):
    torch.save({"model": {"w": torch.arange(1000.0)}}, tmp_path / "ok.pth")
    blob = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "text.pth").write_bytes(b"hello, not a checkpoint")
    for name in ("cut.pth", "empty.pth", "text.pth"):
        pattern = re.escape(name) + r": cannot read it as a torch\.save file"
        with pytest.raises(CorruptFileError, match=pattern):
            load_torch_file(tmp_path / name)
        assert not is_readable_checkpoint(tmp_path / name)
        assert name in checkpoint_problem(tmp_path / name)
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        load_torch_file(tmp_path / "missing.pth")
    assert checkpoint_problem(tmp_path / "missing.pth").endswith("no such file")
    assert checkpoint_problem(tmp_path / "ok.pth") is None and is_readable_checkpoint(tmp_path / "ok.pth")
    # damaged tensor bytes in the middle of an intact archive: found by the zip CRC check
    damaged = bytearray(blob)
    start = blob.index(np.arange(1000.0, dtype=np.float32).tobytes()[:64])
    damaged[start + 100] ^= 0xFF
    (tmp_path / "flip.pth").write_bytes(bytes(damaged))
    assert "CRC" in checkpoint_problem(tmp_path / "flip.pth")


def test_code_running_torch_file_is_refused_unrun(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"model": {"w": torch.zeros(2)}, "x": _payloads(marker)["os.system"]}, tmp_path / "evil.pth")
    with pytest.raises(UnsafePickleError, match=r"evil\.pth: refused to load: .*posix\.system|nt\.system"):
        load_torch_file(tmp_path / "evil.pth")
    assert "refused" in checkpoint_problem(tmp_path / "evil.pth")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------
# safe_checkpoint_load and detectron2's DetectionCheckpointer


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)


class _SafeCheckpointer(SafeCheckpointLoadMixin, DetectionCheckpointer):
    pass


def _assert_same(a, b):
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict))
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_same_result_as_detectron2_on_benign_files(tmp_path):
    w = np.arange(6.0, dtype=np.float32).reshape(2, 3)
    files = {
        "zoo.pkl": lambda p: _dump(p, {"model": {"linear.weight": w}, "__author__": "d2", "matching_heuristics": True}),
        "c2.pkl": lambda p: _dump(p, {"blobs": {"fc_w": w, "fc_w_momentum": w}, "other": 1}, 2),
        "imagenet.pkl": lambda p: _dump(p, {"fc_w": w, "fc_b_momentum": w[0]}, 2),
        "py2.pkl": lambda p: p.write_bytes(_py2_blobs_pickle({"conv1_w": w.astype(np.float64)})),
        "full.pth": lambda p: torch.save({"model": {"a": torch.ones(2)}, "iteration": 5}, p),
        "bare.pth": lambda p: torch.save({"a": torch.ones(2)}, p),
        "pycls.pyth": lambda p: torch.save({"model_state": {"a": torch.ones(1), "bn.num_batches_tracked":
                                                            torch.tensor(1)}}, p),
    }
    reference = DetectionCheckpointer(_Tiny())
    for name, write in files.items():
        write(tmp_path / name)
        ours = safe_checkpoint_load(str(tmp_path / name))
        _assert_same(ours, reference._load_file(str(tmp_path / name)))
    assert safe_checkpoint_load(str(tmp_path / "c2.pkl"))["__author__"] == "Caffe2"
    assert list(safe_checkpoint_load(str(tmp_path / "pycls.pyth"))["model"]) == ["a"]


def test_detection_checkpointer_with_the_mixin(tmp_path):
    w = np.arange(6.0, dtype=np.float32).reshape(2, 3)
    b = np.array([0.5, -0.5], dtype=np.float32)
    # detectron2 model-zoo .pkl: numpy arrays, loaded through the name-matching heuristics
    _dump(tmp_path / "zoo.pkl", {"model": {"linear.weight": w, "linear.bias": b}, "__author__": "test",
                                 "matching_heuristics": True}, 2)
    model = _Tiny()
    _SafeCheckpointer(model).load(str(tmp_path / "zoo.pkl"))
    np.testing.assert_array_equal(model.linear.weight.detach().numpy(), w)
    np.testing.assert_array_equal(model.linear.bias.detach().numpy(), b)
    # a .pth
    source = _Tiny()
    torch.save({"model": source.state_dict()}, tmp_path / "m.pth")
    model = _Tiny()
    _SafeCheckpointer(model).load(str(tmp_path / "m.pth"))
    assert torch.equal(model.linear.weight, source.linear.weight)
    # malicious files: refused, not run
    marker = tmp_path / "marker"
    _dump(tmp_path / "evil.pkl", {"model": {"linear.weight": _payloads(marker)["os.system"]}, "__author__": "x"}, 2)
    torch.save({"model": {"linear.weight": _payloads(marker)["open"]}}, tmp_path / "evil.pth")
    for name in ("evil.pkl", "evil.pth"):
        with pytest.raises(UnsafePickleError, match=name.replace(".", "[.]")):
            _SafeCheckpointer(_Tiny()).load(str(tmp_path / name))
    assert not marker.exists()


def test_not_a_dict_is_an_error(tmp_path):
    torch.save(torch.ones(2), tmp_path / "t.pth")
    with pytest.raises(CorruptFileError, match=r"t\.pth: holds a Tensor, expected a dict"):
        safe_checkpoint_load(str(tmp_path / "t.pth"))
    _dump(tmp_path / "l.pkl", [1, 2])
    with pytest.raises(CorruptFileError, match=r"l\.pkl: holds a list"):
        safe_checkpoint_load(str(tmp_path / "l.pkl"))
    torch.save({"x": 1}, tmp_path / "p.pyth")
    with pytest.raises(CorruptFileError, match="model_state"):
        safe_checkpoint_load(str(tmp_path / "p.pyth"))
