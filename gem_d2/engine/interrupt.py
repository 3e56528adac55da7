"""Ctrl-C in the command-line tools: one line saying what the output folder keeps, exit status 130.

Checkpoints, ``last_checkpoint``, configs, results and plan files are all written atomically, so an
interrupted run leaves only complete files; a traceback would add nothing. Multi-process runs: the
spawned workers ignore the interrupt (torch's spawn wrapper), the launching process reports it.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator, Optional, Union

from gem_d2.engine.resume import resume_checkpoint

__all__ = ["INTERRUPTED_EXIT_CODE", "exit_on_interrupt", "interrupted_message"]

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what shells report for a process stopped by Ctrl-C


def interrupted_message(output_dir: str) -> str:
    """``"interrupted; OUTPUT_DIR keeps the last complete checkpoint <path>"`` (the one ``--resume`` would load)."""
    path = resume_checkpoint(output_dir) if output_dir else ""
    if path:
        return f"interrupted; OUTPUT_DIR keeps the last complete checkpoint {path}"
    return f"interrupted; OUTPUT_DIR ({output_dir or 'not set'}) holds no complete checkpoint yet"


@contextlib.contextmanager
def exit_on_interrupt(output_dir: Union[str, Callable[[], str]] = "",
                      message: Optional[Callable[[str], str]] = None) -> Iterator[None]:
    """Turn ``KeyboardInterrupt`` inside the block into one line on stderr and ``SystemExit(130)``.

    Args:
        output_dir: the run's output folder, or a function returning it (called only on interrupt).
        message: ``folder -> line``; default :func:`interrupted_message` (the last complete checkpoint).
    """
    try:
        yield
    except KeyboardInterrupt:
        folder = output_dir() if callable(output_dir) else output_dir
        print((message or interrupted_message)(folder), file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED_EXIT_CODE) from None
