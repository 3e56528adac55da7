"""Per-dataset manifest: what was converted, from which source files, with which options, and the counts.

A re-run skips a dataset whose manifest (in each of its output folders) matches the current source
fingerprint and options. The fingerprint hashes the relative path, size and modification time of every
source file the converter reads (the way make/rsync detect changes), not their contents.
"""
import hashlib
import json
import os
from typing import Iterable, Optional

MANIFEST_NAME = "uodb_prepare.json"
FORMAT_VERSION = 1  # bump when a converter's output changes for the same source


def fingerprint(source_root: str, files: Iterable[str]) -> str:
    """sha256 over ``(path relative to source_root, size, mtime_ns)`` of ``files``, in sorted order."""
    h = hashlib.sha256()
    for path in sorted(set(os.fspath(f) for f in files)):
        st = os.stat(path)
        rel = os.path.relpath(path, source_root).replace(os.sep, "/")
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def manifest_payload(key: str, source_fingerprint: str, options: dict, report_json: dict) -> dict:
    return {"dataset": key, "format_version": FORMAT_VERSION, "source_fingerprint": source_fingerprint,
            "options": options, **report_json}


def write_manifest(folder_dir: str, payload: dict) -> None:
    with open(os.path.join(folder_dir, MANIFEST_NAME), "w", encoding="utf-8", newline="\n") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
        f.write("\n")


def read_manifest(folder_dir: str) -> Optional[dict]:
    """The manifest in ``folder_dir``, or None when absent or unreadable (treated as not done)."""
    path = os.path.join(folder_dir, MANIFEST_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_up_to_date(output: str, folders, key: str, source_fingerprint: str, options: dict) -> Optional[dict]:
    """The manifest if every folder of dataset ``key`` holds one matching fingerprint and options, else None."""
    found = None
    for folder in folders:
        m = read_manifest(os.path.join(output, folder))
        if (m is None or m.get("dataset") != key or m.get("format_version") != FORMAT_VERSION
                or m.get("source_fingerprint") != source_fingerprint or m.get("options") != options):
            return None
        found = m
    return found
