"""Assemble UODB from the original dataset releases (the official UODB download is gone).

``prepare(names, source, output)`` converts each original release found under ``source`` into the folder
layout that ``gem_d2.data.uodb.register_uodb(output)`` reads, with the UODB splits and class lists; one
module per source format (kitti, widerface, vocdevkit, lisa, dota, coco, kitchen, deeplesion). Runs are
idempotent (a per-folder manifest with the source fingerprint; up-to-date datasets are skipped) and atomic
(staging folder + rename). ``check(names, output)`` validates an existing tree without writing.
The choices made for each dataset, and where they come from, are in ``docs/preparing_uodb.md``.
"""
from typing import Dict, List, Optional, Sequence

from gem_d2.data.uodb import UODB_DATASETS
from gem_d2.prepare.base import Context, Converter
from gem_d2.prepare.check import CheckResult, check_dataset
from gem_d2.prepare.coco import CocoConverter
from gem_d2.prepare.deeplesion import DeepLesionConverter
from gem_d2.prepare.dota import DotaConverter
from gem_d2.prepare.errors import MissingSourceError, SourceFormatError
from gem_d2.prepare.images import LINK_MODES
from gem_d2.prepare.kitchen import DEFAULT_TEST_SCENES, KitchenConverter
from gem_d2.prepare.kitti import KittiConverter
from gem_d2.prepare.lisa import LisaConverter
from gem_d2.prepare.records import DatasetReport, SplitStats
from gem_d2.prepare.runner import prepare_dataset, tqdm_progress
from gem_d2.prepare.summary import format_problems, format_reports
from gem_d2.prepare.vocdevkit import art_converter, voc_converter
from gem_d2.prepare.widerface import WiderFaceConverter

__all__ = ["CheckResult", "Context", "Converter", "DatasetReport", "LINK_MODES", "MissingSourceError",
           "SourceFormatError", "SplitStats", "check", "converters", "format_problems", "format_reports",
           "prepare", "prepare_dataset", "resolve_names"]


def converters(kitchen_test_scenes: Sequence[int] = DEFAULT_TEST_SCENES) -> Dict[str, Converter]:
    """One converter per UODB dataset, keyed like ``gem_d2.data.uodb.UODB_DATASETS``."""
    convs = [KittiConverter(), WiderFaceConverter(), voc_converter(), LisaConverter(), DotaConverter(),
             CocoConverter(), art_converter("watercolor"), art_converter("clipart"), art_converter("comic"),
             KitchenConverter(kitchen_test_scenes), DeepLesionConverter()]
    out = {c.key: c for c in convs}
    assert list(out) == list(UODB_DATASETS), "every UODB dataset needs exactly one converter"
    return out


def resolve_names(names: Sequence[str]) -> List[str]:
    """Dataset keys from ``names`` (``all`` = every dataset), in UODB order; unknown names raise."""
    known = list(UODB_DATASETS)
    wanted = set()
    for n in names:
        if n == "all":
            wanted.update(known)
        elif n in known:
            wanted.add(n)
        else:
            raise ValueError(f"unknown dataset {n!r}; choose from: all, {', '.join(known)}")
    return [k for k in known if k in wanted]


def prepare(names: Sequence[str], source: str, output: str, *, link_mode: str = "hardlink", force: bool = False,
            progress: bool = True, source_dirs: Optional[Dict[str, str]] = None,
            kitchen_test_scenes: Sequence[int] = DEFAULT_TEST_SCENES) -> List[DatasetReport]:
    """Convert the datasets ``names`` (keys or ``all``) from ``source`` into ``output``; returns one report each.

    ``source_dirs`` overrides the folder of a dataset (key -> path) instead of ``<source>/<its default name>``.
    Stops at the first dataset that fails; datasets converted before it stay converted.
    """
    convs = converters(kitchen_test_scenes)
    bar = tqdm_progress(progress)
    return [prepare_dataset(convs[k], source, output, source_dir=(source_dirs or {}).get(k), link_mode=link_mode,
                            force=force, progress=bar) for k in resolve_names(names)]


def check(names: Sequence[str], output: str) -> List[CheckResult]:
    """Validate the datasets ``names`` under ``output`` without writing (see ``check.py``)."""
    return [check_dataset(k, output) for k in resolve_names(names)]
