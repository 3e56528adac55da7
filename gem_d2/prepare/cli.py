"""The command line of tools/prepare_uodb.py: build the UODB tree from the original releases, or check one.

    python tools/prepare_uodb.py --source ~/downloads --output $DETECTRON2_DATASETS all
    python tools/prepare_uodb.py --output $DETECTRON2_DATASETS --check all

The expected source files of each dataset are listed by ``--list-sources`` and in docs/preparing_uodb.md.
"""
import argparse
import os
import sys

from gem_d2.data.uodb import UODB_DATASETS
from gem_d2.prepare import (
    LINK_MODES,
    MissingSourceError,
    SourceFormatError,
    check,
    converters,
    format_problems,
    format_reports,
    prepare,
    resolve_names,
)
from gem_d2.prepare.kitchen import DEFAULT_TEST_SCENES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("datasets", nargs="*", help=f"'all' or some of: {', '.join(UODB_DATASETS)}")
    p.add_argument("--source", help="folder holding the original downloads, one sub-folder per dataset")
    p.add_argument("--output", default=os.environ.get("DETECTRON2_DATASETS", "datasets"),
                   help="UODB root the loader reads (default: $DETECTRON2_DATASETS, else ./datasets)")
    p.add_argument("--check", action="store_true", help="validate the existing tree under --output; write nothing")
    p.add_argument("--link", choices=LINK_MODES, default="hardlink",
                   help="how images kept unchanged are placed (hardlink falls back to copy across file systems)")
    p.add_argument("--force", action="store_true",
                   help="convert even when up to date, and replace output folders this tool did not write")
    p.add_argument("--dataset-source", action="append", default=[], metavar="NAME=PATH",
                   help="take dataset NAME from PATH instead of <source>/<its default folder> (repeatable)")
    p.add_argument("--kitchen-test-scenes", default=",".join(map(str, DEFAULT_TEST_SCENES)),
                   help="GMU Kitchen scene numbers of the test split (default: %(default)s)")
    p.add_argument("--keep-going", action="store_true",
                   help="after a dataset fails (e.g. its download is missing), go on with the others")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--list-sources", action="store_true", help="print the expected source files and exit")
    args = p.parse_args(argv)
    if not args.list_sources and not args.datasets:
        p.error("name the datasets to prepare (or 'all')")
    if not args.check and not args.list_sources and not args.source:
        p.error("--source is required unless --check or --list-sources")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    scenes = [int(s) for s in args.kitchen_test_scenes.split(",") if s.strip()]
    if args.list_sources:
        for key, conv in converters(scenes).items():
            print(f"{key:<11} <source>/{conv.source_dir}: {conv.expected}")
        return 0
    if args.check:
        results = check(args.datasets, args.output)
        print(format_reports([r.report for r in results if r.report is not None],
                             ["ok" if r.ok else "PROBLEMS" for r in results if r.report is not None]))
        for r in results:
            if r.problems:
                print(format_problems(r.key, r.problems))
            elif not r.has_manifest:
                print(f"{r.key}: no manifest (not written by this tool); counts not compared")
        return 0 if all(r.ok for r in results) else 1
    source_dirs = {}
    for item in args.dataset_source:
        name, sep, path = item.partition("=")
        if not sep or name not in UODB_DATASETS:
            raise SystemExit(f"--dataset-source expects NAME=PATH with NAME in {list(UODB_DATASETS)}, got {item!r}")
        source_dirs[name] = path
    try:
        names = resolve_names(args.datasets)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    reports, failed = [], []
    for name in names:
        try:
            reports += prepare([name], args.source, args.output, link_mode=args.link, force=args.force,
                               progress=not args.no_progress, source_dirs=source_dirs, kitchen_test_scenes=scenes)
        except (SourceFormatError, MissingSourceError, FileExistsError, ValueError) as e:
            print(f"error: {name}: {e}", file=sys.stderr)
            failed.append(name)
            if not args.keep_going:
                break
    if reports:
        print(format_reports(reports))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 2 if failed else 0
