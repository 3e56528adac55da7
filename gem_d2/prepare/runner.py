"""Running converters: skip what is up to date, stage, record the manifest, commit atomically."""
import os
from collections import Counter
from typing import Callable, Dict, Iterable, Optional

from gem_d2.data.uodb import UodbSpec
from gem_d2.prepare.base import Context, Converter, FolderSplit
from gem_d2.prepare.manifest import fingerprint, is_up_to_date, manifest_payload, write_manifest
from gem_d2.prepare.records import DatasetReport, SplitStats
from gem_d2.prepare.staging import commit, refuse_foreign, staging_area


def aggregate(key: str, spec: UodbSpec, stats: Dict[FolderSplit, SplitStats], dropped: Counter) -> DatasetReport:
    """Sum per-(folder, split file) stats into the loader's UODB splits (e.g. VOC2007+VOC2012 trainval)."""
    report = DatasetReport(key, dropped=Counter(dropped))
    for split, sources in spec.splits.items():
        total = SplitStats()
        for source in sources:
            if source in stats:
                total.add(stats[source])
        report.splits[split] = total
    return report


def tqdm_progress(enabled: bool = True) -> Callable[..., Iterable]:
    """A progress factory: ``progress(items, desc=...)`` wraps ``items`` in one tqdm bar (or returns them)."""
    from tqdm import tqdm

    def progress(items, desc=""):
        items = list(items)
        return tqdm(items, desc=f"{desc:<10}", total=len(items), unit="img", disable=not enabled, dynamic_ncols=True)

    return progress


def prepare_dataset(converter: Converter, source_root: str, output: str, *, source_dir: Optional[str] = None,
                    link_mode: str = "hardlink", force: bool = False,
                    progress: Optional[Callable[..., Iterable]] = None) -> DatasetReport:
    """Convert one dataset from ``<source_root>/<converter.source_dir>`` (or ``source_dir``) into ``output``.

    Skips (``report.skipped``) when every output folder holds a manifest matching the source fingerprint and the
    options, unless ``force``. Otherwise the dataset is written to a staging folder in ``output`` and renamed
    into place; on any error the staging folder is removed and the previous output is left untouched.
    """
    src = os.path.abspath(source_dir or os.path.join(source_root, converter.source_dir))
    folders = converter.folders
    options = converter.options()
    source_fp = fingerprint(src, converter.inputs(src))
    if not force:
        done = is_up_to_date(output, folders, converter.key, source_fp, options)
        if done is not None:
            return DatasetReport.from_json(converter.key, done, skipped=True)
        refuse_foreign(output, folders)
    with staging_area(output, converter.key) as stage:
        ctx = Context(stage, link_mode, progress or (lambda items, desc="": items))
        stats = converter.convert(src, ctx)
        report = aggregate(converter.key, converter.spec, stats, ctx.dropped)
        payload = manifest_payload(converter.key, source_fp, options, report.to_json())
        for folder in folders:
            write_manifest(os.path.join(stage, folder), payload)
        commit(stage, output, folders)
    return report
