"""gem_d2.config.merge_config_file: detectron2's merge_from_file semantics, but YAML tags are never executed."""
import glob
import os

import pytest

import gem_d2  # noqa: F401  (shims before detectron2)

# isort: split
from detectron2.config import get_cfg

from gem_d2.config import add_gem_config, merge_config_file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))


def _both(path):
    ours = merge_config_file(add_gem_config(get_cfg()), path)
    theirs = add_gem_config(get_cfg())
    theirs.merge_from_file(path)
    return ours, theirs


def test_the_shipped_configs_are_found():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_same_result_as_merge_from_file_on_every_shipped_config(path):
    ours, theirs = _both(path)
    assert ours.dump() == theirs.dump()


def _write(path, text):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def test_base_lists_nesting_and_relative_paths(tmp_path):
    _write(tmp_path / "root.yaml", "SEED: 1\nMODEL:\n  DINO:\n    HIDDEN_DIM: 64\n    NHEADS: 4\n")
    _write(tmp_path / "sub" / "b.yaml",
           "_BASE_: ../root.yaml\nMODEL:\n  DINO:\n    NHEADS: 2\nSOLVER:\n  MAX_ITER: 7\n")
    _write(tmp_path / "a.yaml", "SEED: 5\nSOLVER:\n  MAX_ITER: 3\n  BASE_LR: 0.5\n")
    top = _write(tmp_path / "top.yaml", "_BASE_: [a.yaml, sub/b.yaml]\nMODEL:\n  DINO:\n    NUM_QUERIES: 9\n")
    ours, theirs = _both(top)
    assert ours.dump() == theirs.dump()
    # the later base wins, the file itself wins over its bases, mappings merge key by key
    assert (ours.SEED, ours.SOLVER.MAX_ITER, ours.SOLVER.BASE_LR) == (1, 7, 0.5)
    assert (ours.MODEL.DINO.HIDDEN_DIM, ours.MODEL.DINO.NHEADS, ours.MODEL.DINO.NUM_QUERIES) == (64, 2, 9)
    # an empty file and an empty base list change nothing
    empty = _write(tmp_path / "empty.yaml", "")
    assert merge_config_file(add_gem_config(get_cfg()), empty).dump() == add_gem_config(get_cfg()).dump()
    no_base = _write(tmp_path / "nobase.yaml", "_BASE_: []\nSEED: 4\n")
    assert merge_config_file(add_gem_config(get_cfg()), no_base).SEED == 4


@pytest.mark.parametrize("where", ["file", "base"])
def test_python_tags_are_refused_and_not_run(tmp_path, where):
    marker = tmp_path / "marker"
    evil = f"SEED: !!python/object/apply:os.system ['touch {marker}']\n"
    if where == "file":
        path = _write(tmp_path / "evil.yaml", evil)
    else:
        _write(tmp_path / "evil.yaml", evil)
        path = _write(tmp_path / "top.yaml", "_BASE_: evil.yaml\n")
    with pytest.raises(ValueError, match=r"evil\.yaml: refused YAML tag .*python/object/apply:os\.system.*python tags"):
        merge_config_file(add_gem_config(get_cfg()), path)
    assert not marker.exists()


def test_control_detectron2_runs_the_tag(tmp_path):
    # what merge_config_file protects against: detectron2 falls back to yaml.unsafe_load and runs the command
    marker = tmp_path / "marker"
    path = _write(tmp_path / "evil.yaml", f"SEED: !!python/object/apply:os.system ['touch {marker}']\n")
    add_gem_config(get_cfg()).merge_from_file(path)
    assert marker.exists()


@pytest.mark.parametrize("text", ["!!python/name:os.system\n", "SEED: !custom 3\n",
                                  "SEED: !!python/object/new:builtins.int [3]\n"])
def test_other_tags_are_refused_too(tmp_path, text):
    path = _write(tmp_path / "t.yaml", text)
    with pytest.raises(ValueError, match=r"t\.yaml: refused YAML tag"):
        merge_config_file(add_gem_config(get_cfg()), path)


def test_bad_files_name_the_file(tmp_path):
    cfg = add_gem_config(get_cfg())
    with pytest.raises(FileNotFoundError, match=r"config file not found: .*nope\.yaml"):
        merge_config_file(cfg, str(tmp_path / "nope.yaml"))
    top = _write(tmp_path / "top.yaml", "_BASE_: gone.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"gone\.yaml \(named as _BASE_ in .*top\.yaml\)"):
        merge_config_file(cfg, top)
    _write(tmp_path / "x.yaml", "_BASE_: y.yaml\n")
    _write(tmp_path / "y.yaml", "_BASE_: x.yaml\n")
    with pytest.raises(ValueError, match=r"_BASE_ cycle: .*x\.yaml -> .*y\.yaml -> .*x\.yaml"):
        merge_config_file(cfg, str(tmp_path / "x.yaml"))
    with pytest.raises(ValueError, match=r"bad\.yaml: malformed YAML"):
        merge_config_file(cfg, _write(tmp_path / "bad.yaml", "MODEL: [unclosed\n"))
    with pytest.raises(ValueError, match=r"list\.yaml: the top level is a list"):
        merge_config_file(cfg, _write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(ValueError, match=r"b1\.yaml: _BASE_ must be a path or a list of paths"):
        merge_config_file(cfg, _write(tmp_path / "b1.yaml", "_BASE_: 3\n"))
    _write(tmp_path / "scalar.yaml", "MODEL: 3\n")
    over = _write(tmp_path / "over.yaml", "_BASE_: scalar.yaml\nMODEL:\n  DEVICE: cpu\n")
    with pytest.raises(ValueError, match=r"over\.yaml: cannot inherit key 'MODEL' from base"):
        merge_config_file(cfg, over)
    with pytest.raises(KeyError, match="NO_SUCH_KEY"):  # unknown keys: as merge_from_file
        merge_config_file(cfg, _write(tmp_path / "unknown.yaml", "NO_SUCH_KEY: 1\n"))
