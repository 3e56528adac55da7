"""Package-level behaviour: compat shims, config keys, model zoo, the bootstrap's reuse path."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import gem_d2
from gem_d2 import _compat, model_zoo
from gem_d2.config import add_gem_config

ROOT = Path(__file__).resolve().parents[2]


def test_compat_restores_removed_names_and_is_idempotent():
    import numpy as np
    from PIL import Image

    _compat.apply()
    _compat.apply()
    assert np.float is float and np.int is int and np.str is str
    assert Image.LINEAR == Image.BILINEAR
    # detectron2's modules that use them import and run after the shims
    from detectron2.data import transforms as T

    assert T.ExtentTransform((0, 0, 4, 4), (2, 2)).interp == Image.BILINEAR


def test_add_gem_config_adds_every_key_once():
    from detectron2.config import get_cfg

    cfg = add_gem_config(get_cfg())
    assert cfg.MODEL.GEM.ROUTER == "gem"
    assert cfg.MODEL.DINO.NUM_QUERIES == 900
    cfg.MODEL.GEM.NUM_EXPERTS = 3
    add_gem_config(cfg)  # idempotent: must not reset values
    assert cfg.MODEL.GEM.NUM_EXPERTS == 3


def test_every_config_key_has_a_one_line_comment():
    """config.py's style rule: each assignment of a key carries a trailing comment."""
    src = (ROOT / "gem_d2" / "config.py").read_text().splitlines()
    tree = ast.parse("\n".join(src))
    missing = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
            if isinstance(node.value, ast.Call):  # sub-node creation: CN()
                continue
            line = src[node.lineno - 1]
            if "#" not in line and not any("#" in src[i] for i in range(node.lineno, node.end_lineno)):
                missing.append(f"config.py:{node.lineno}: {line.strip()}")
    assert not missing, "keys without a comment:\n" + "\n".join(missing)


def test_model_zoo_lists_and_loads_shipped_configs():
    names = model_zoo.list_configs()
    assert names, "no configs shipped"
    with pytest.raises(FileNotFoundError, match="not a gem_d2 model-zoo config"):
        model_zoo.get_config_file("nope.yaml")
    for name in names:
        if name.startswith("Base"):
            continue
        cfg = model_zoo.get_config(name)
        assert cfg.MODEL.META_ARCHITECTURE == "GEMDINO", name


def test_bootstrap_second_run_reuses_the_environment():
    out = subprocess.run(["python3", str(ROOT / "tools" / "bootstrap.py")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "building environment" not in out.stdout
    assert "environment ready" in out.stdout
    assert (ROOT / ".venv").resolve() == Path(sys.prefix).resolve()


def test_version():
    assert gem_d2.__version__


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph():
    """{module: {gem_d2 modules it imports}} over every import statement, those inside functions included."""
    files = {_module_name(p): p for p in (ROOT / "gem_d2").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base
                                                                                                        else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def test_gem_d2_has_no_import_cycle():
    graph = _import_graph()
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_no_module_of_gem_d2_is_over_450_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "gem_d2").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long


def test_every_config_key_is_read_somewhere():
    """A key nothing reads is deleted: every leaf key of add_gem_config occurs in code outside config.py."""
    src = (ROOT / "gem_d2" / "config.py").read_text()
    keys = {node.targets[0].attr for node in ast.walk(ast.parse(src))
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute)
            and not isinstance(node.value, ast.Call)}
    code = "\n".join(p.read_text() for folder in ("gem_d2", "tools", "benchmarks")
                     for p in (ROOT / folder).rglob("*.py") if p.name != "config.py")
    unread = sorted(k for k in keys if f".{k}" not in code and f'"{k}"' not in code)
    assert unread == [], unread
