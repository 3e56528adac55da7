#!/usr/bin/env python3
"""Create (once) and reuse the cached environment gem-d2 runs in. Standard library only.

    python3 tools/bootstrap.py          # build or reuse the env, install this checkout, link .venv

The environment lives outside the clone, in ``$GEM_D2_CACHE`` (default ``~/.cache/gem-d2``), under a
name derived from the pinned requirements, this script and the Python version: changing a pin builds
a new one, a second run with the same pins takes seconds. Steps, each checked:

1. ``python -m venv``; ``pip install -c requirements/lock.txt -r requirements/top.txt`` from the
   package registries. With ``GEM_D2_SYSTEM_TORCH=1`` the venv sees the interpreter's own torch
   (e.g. a CUDA image) and torch/torchvision are neither installed nor pinned.
2. detectron2: no package of that name exists on the registries; ``pb1-detectron2==0.6`` is upstream
   v0.6 without its C++ sources. We download it (sha256-checked), build it with no compiled
   extension, and add a pure-Python ``detectron2/_C.py`` whose ops raise a clear error (only
   rotated boxes, deformable conv and the fast COCO eval need them; gem_d2 uses none of them).
   This is the only change made to third-party code; runtime shims live in ``gem_d2/_compat.py``.
3. ``pip install --no-deps -e .`` of this checkout (redone when the env last served another clone).
4. ``.venv`` in the checkout becomes a symlink to the environment.

A half-built environment has no completion marker and is rebuilt from scratch on the next run.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock.txt"
TOP = ROOT / "requirements" / "top.txt"
D2_DIST, D2_VERSION = "pb1-detectron2", "0.6"
D2_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
D2_EXT_LINE = "ext_modules=get_extensions(),"
COMPLETE = ".gem_d2_complete"
PROJECT_MARK = ".gem_d2_project"

C_STANDIN = '''"""Stand-in for detectron2's compiled extension, written by gem-d2's tools/bootstrap.py.

The pb1-detectron2 sdist ships without its C++/CUDA sources, so these ops do not exist here:
rotated-box IoU/NMS, ROIAlignRotated, detectron2's deformable conv and the C++ COCOeval.
"""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise NotImplementedError(
        f"detectron2._C.{name} is not available: this detectron2 was installed without its compiled "
        "extension (see gem-d2 tools/bootstrap.py). Axis-aligned detection does not need it; for "
        "COCOEvaluator pass use_fast_impl=False."
    )
'''


def log(msg: str) -> None:
    print(f"[bootstrap] {msg}", flush=True)


def run(cmd: list[str], what: str, **kw) -> None:
    """Run a command; on failure stop with a message naming the step."""
    t0 = time.time()
    res = subprocess.run(cmd, **kw)
    if res.returncode != 0:
        sys.exit(f"[bootstrap] FAILED while {what} (exit {res.returncode}): {' '.join(cmd)}")
    log(f"{what}: done in {time.time() - t0:.0f}s")


def use_system_torch() -> bool:
    return os.environ.get("GEM_D2_SYSTEM_TORCH", "0") == "1"


def env_key() -> str:
    h = hashlib.sha256()
    for p in (LOCK, TOP, Path(__file__).resolve()):
        h.update(p.read_bytes())
    h.update(sys.version.encode())
    h.update(b"system-torch" if use_system_torch() else b"pinned-torch")
    return h.hexdigest()[:16]


def requirement_files(tmp: Path) -> tuple[Path, Path]:
    """The lock and top-level lists, without torch/torchvision when the system's torch is used."""
    if not use_system_torch():
        return LOCK, TOP
    skip = ("torch", "torchvision")
    out = []
    for src in (LOCK, TOP):
        lines = [ln for ln in src.read_text().splitlines() if ln.split("==")[0].strip().lower() not in skip]
        dst = tmp / src.name
        dst.write_text("\n".join(lines) + "\n")
        out.append(dst)
    return out[0], out[1]


def install_detectron2(py: str, cache: Path) -> None:
    """Download the pb1-detectron2 sdist, verify it, build it without the C++ extension."""
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    sdist = downloads / f"{D2_DIST}-{D2_VERSION}.tar.gz"
    if not sdist.exists() or hashlib.sha256(sdist.read_bytes()).hexdigest() != D2_SHA256:
        sdist.unlink(missing_ok=True)
        # setup.py imports torch even for metadata, hence --no-build-isolation (torch is installed).
        run([py, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "--no-binary", ":all:",
             "-d", str(downloads), f"{D2_DIST}=={D2_VERSION}"], "downloading the detectron2 sdist")
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != D2_SHA256:
        sys.exit(f"[bootstrap] {sdist}: sha256 {digest} != expected {D2_SHA256}; refusing to install it")
    with tempfile.TemporaryDirectory(prefix="gem-d2-d2src-") as tmp:
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data")
        src = Path(tmp) / f"{D2_DIST}-{D2_VERSION}"
        setup_py = src / "setup.py"
        text = setup_py.read_text()
        if text.count(D2_EXT_LINE) != 1:
            sys.exit(f"[bootstrap] {setup_py}: expected exactly one '{D2_EXT_LINE}' to disable the "
                     "C++ extension; the sdist changed, update tools/bootstrap.py")
        setup_py.write_text(text.replace(D2_EXT_LINE, "ext_modules=[],"))
        (src / "detectron2" / "_C.py").write_text(C_STANDIN)
        run([py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", str(src)],
            "building detectron2 (pure Python)")


def build_env(env: Path, cache: Path) -> None:
    if env.exists():
        log(f"removing incomplete environment {env}")
        shutil.rmtree(env)
    args = [sys.executable, "-m", "venv", str(env)]
    if use_system_torch():
        args.insert(3, "--system-site-packages")
    run(args, "creating the virtualenv")
    py = str(env / "bin" / "python")
    with tempfile.TemporaryDirectory() as tmp:
        lock, top = requirement_files(Path(tmp))
        run([py, "-m", "pip", "install", "-q", "-c", str(lock), "setuptools", "wheel"], "pinning setuptools")
        run([py, "-m", "pip", "install", "-q", "-c", str(lock), "-r", str(top)],
            "installing pinned requirements (torch takes ~2 min)")
    install_detectron2(py, cache)
    run([py, "-c", "import torch, torchvision, detectron2, pulp, pycocotools, scipy, fvcore; "
         "print('torch', torch.__version__, 'detectron2', detectron2.__version__)"], "checking imports")
    (env / COMPLETE).write_text(env_key() + "\n")


def install_project(env: Path) -> None:
    mark = env / PROJECT_MARK
    if mark.exists() and mark.read_text().strip() == str(ROOT):
        return
    py = str(env / "bin" / "python")
    run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(ROOT)],
        f"installing gem_d2 from {ROOT} (editable)")
    mark.write_text(str(ROOT) + "\n")


def link_venv(env: Path) -> None:
    link = ROOT / ".venv"
    if link.is_symlink() and os.readlink(link) == str(env):
        return
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        sys.exit(f"[bootstrap] {link} is a real directory; remove it so it can point at {env}")
    link.symlink_to(env)


def main() -> None:
    t0 = time.time()
    cache = Path(os.environ.get("GEM_D2_CACHE", Path.home() / ".cache" / "gem-d2")).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    env = cache / f"env-{env_key()}"
    with open(cache / ".lock", "w") as lockfile:
        fcntl.flock(lockfile, fcntl.LOCK_EX)  # two concurrent runs must not build the same env
        if not (env / COMPLETE).exists():
            log(f"building environment {env} (first run with these pins)")
            build_env(env, cache)
        install_project(env)
        link_venv(env)
    log(f"environment ready: {ROOT / '.venv'} -> {env} ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
