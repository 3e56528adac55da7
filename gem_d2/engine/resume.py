"""Which checkpoint ``--resume`` uses: :func:`resume_checkpoint`, the one place that decides it.

Both the checkpointer (``GemCheckpointer.get_checkpoint_file``, hence ``resume_or_load``) and
``gem_d2.engine.planning.checkpoint_to_load`` (whose GEM mapping is read before the model is built)
call it, so the mapping and the weights always come from the same file.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Dict, List, Set, Tuple

from gem_d2.utils.safe_load import checkpoint_problem

__all__ = ["resume_checkpoint", "LAST_CHECKPOINT"]

LAST_CHECKPOINT = "last_checkpoint"  # the file naming the newest checkpoint (fvcore's convention)
_NUMBERED = re.compile(r"^model_(\d+)\.pth$")
logger = logging.getLogger(__name__)
_problems: Dict[Tuple[str, int, int], object] = {}  # (path, mtime_ns, size) -> problem or None
_warned: Set[str] = set()  # the planner and the checkpointer both ask: each warning is logged once


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def _problem(path: str) -> object:
    """``checkpoint_problem(path)``, computed (and warned about) once per version of the file."""
    try:
        st = os.stat(path)
    except OSError:
        return checkpoint_problem(path)
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size)
    if key not in _problems:
        _problems[key] = problem = checkpoint_problem(path)
        if problem is not None:
            _warn_once(f"--resume: skipping an unreadable checkpoint: {problem if path in str(problem) else path}"
                       + ("" if path in str(problem) else f": {problem}"))
    return _problems[key]


def _candidates(output_dir: str, skip: str) -> List[str]:
    """``model_*.pth`` files of ``output_dir``, newest first: model_final, then by iteration in the name."""
    def rank(name: str):
        m = _NUMBERED.match(name)
        order = float("inf") if name == "model_final.pth" else (int(m.group(1)) if m else -1.0)
        return order, os.path.getmtime(os.path.join(output_dir, name))

    names = [n for n in os.listdir(output_dir) if n.startswith("model_") and n.endswith(".pth")]
    paths = [os.path.join(output_dir, n) for n in sorted(names, key=rank, reverse=True)]
    return [p for p in paths if os.path.abspath(p) != os.path.abspath(skip)]


def resume_checkpoint(output_dir: str) -> str:
    """The checkpoint ``--resume`` loads from ``output_dir``, or "" when there is nothing to resume.

    - no ``last_checkpoint`` file (or an empty one): "" (a fresh run: MODEL.WEIGHTS is loaded instead);
    - the file it names is readable (``checkpoint_problem`` finds nothing): that file;
    - otherwise (truncated, corrupt, missing): a warning names it and the problem, and the newest
      readable ``model_*.pth`` of ``output_dir`` is used (``model_final.pth`` first, then by iteration);
      when none is readable, a warning says training starts fresh and "" is returned.
    """
    tag = os.path.join(output_dir, LAST_CHECKPOINT)
    try:
        with open(tag) as f:
            name = f.read().strip()
    except OSError:
        return ""
    if not name:
        return ""
    named = os.path.join(output_dir, name)
    if _problem(named) is None:
        return named
    for path in _candidates(output_dir, skip=named):
        if _problem(path) is None:
            _warn_once(f"--resume: {tag} names the unreadable {named}; resuming from {path}, the newest "
                           f"readable checkpoint")
            return path
    _warn_once(f"--resume: {tag} names the unreadable {named} and no other model_*.pth in {output_dir} is "
                   f"readable: starting fresh (from MODEL.WEIGHTS, iteration 0)")
    return ""
