"""Atomic output: a dataset is written into a staging folder next to the output, then renamed into place.

An interrupted conversion (an exception, Ctrl-C) removes its staging folder, so the output holds either the
previous complete folder or nothing; a process killed outright leaves a ``.uodb-staging-*`` folder that the
next run of the same dataset removes. Every folder of a dataset carries the dataset's manifest (see
``manifest.py``), written inside the staging folder, so a renamed folder is complete by construction.
"""
import glob
import os
import shutil
from contextlib import contextmanager
from typing import Iterator, Sequence

from gem_d2.prepare.manifest import MANIFEST_NAME

STAGING_PREFIX = ".uodb-staging-"


def _staging_glob(output: str, key: str) -> str:
    return os.path.join(output, f"{STAGING_PREFIX}{key}-*")


def remove_stale_staging(output: str, key: str) -> None:
    """Remove staging folders of ``key`` left by a killed run."""
    for path in glob.glob(_staging_glob(output, key)):
        shutil.rmtree(path, ignore_errors=True)


def refuse_foreign(output: str, folders: Sequence[str]) -> None:
    """Raise if an output folder exists but was not written by this tool (no manifest): never delete user data."""
    for folder in folders:
        path = os.path.join(output, folder)
        if os.path.lexists(path) and not os.path.isfile(os.path.join(path, MANIFEST_NAME)):
            raise FileExistsError(f"{path} exists and was not written by prepare_uodb (no {MANIFEST_NAME}); "
                                  "move it away or pass --force to replace it")


@contextmanager
def staging_area(output: str, key: str) -> Iterator[str]:
    """Yield an empty staging folder inside ``output``; it is removed on exit, whatever happens."""
    os.makedirs(output, exist_ok=True)
    remove_stale_staging(output, key)
    path = os.path.join(output, f"{STAGING_PREFIX}{key}-{os.getpid()}")
    os.makedirs(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def commit(staging: str, output: str, folders: Sequence[str]) -> None:
    """Move ``staging/<folder>`` to ``output/<folder>`` for each folder, replacing an older version."""
    for folder in folders:
        src, dst = os.path.join(staging, folder), os.path.join(output, folder)
        if not os.path.isdir(src):
            raise RuntimeError(f"internal error: the conversion did not produce {src}")
        old = None
        if os.path.lexists(dst):
            old = os.path.join(staging, f".old-{folder}")
            os.rename(dst, old)
        os.rename(src, dst)
        if old is not None:
            if os.path.islink(old) or os.path.isfile(old):
                os.remove(old)
            else:
                shutil.rmtree(old)
