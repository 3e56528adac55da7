#!/usr/bin/env python3
"""gem-d2 benchmarks: one subcommand per measurement, each printing a table and writing JSON.

    python tools/benchmark.py <subcommand> [options]     # e.g. planner, eval, msda
    python tools/benchmark.py --list

Each subcommand lives in ``tools/bench_<name>.py`` and exposes ``add_arguments(parser)`` and
``run(args) -> dict``. This dispatcher prints the machine, library versions and the command line
before running it, so every published figure carries its context (copy it into BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent


def available() -> dict:
    """Subcommand name -> path of its module."""
    return {p.stem[len("bench_"):]: p for p in sorted(TOOLS.glob("bench_*.py"))}


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def machine_header() -> str:
    """One block naming date, machine, Python/torch versions and the command."""
    import torch

    try:
        import detectron2

        d2 = detectron2.__version__
    except ImportError:
        d2 = "not installed"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return "\n".join([
        f"date: {datetime.date.today().isoformat()}",
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, {gpu}",
        f"python {platform.python_version()}, torch {torch.__version__}, detectron2 {d2}",
        f"command: python tools/benchmark.py {' '.join(sys.argv[1:])}",
    ])


def main(argv=None) -> None:
    subs = available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list the subcommands")
    sp = parser.add_subparsers(dest="command")
    modules = {}
    for name, path in subs.items():
        modules[name] = load(path)
        doc = (modules[name].__doc__ or "").strip().splitlines()
        p = sp.add_parser(name, help=doc[0] if doc else name)
        modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    if args.list or not args.command:
        print("subcommands: " + ", ".join(subs))
        return
    sys.path.insert(0, str(TOOLS.parent))
    print(machine_header(), flush=True)
    import torch

    threads = torch.get_num_threads()  # subcommands may set their own (--threads); callers in this process keep theirs
    try:
        modules[args.command].run(args)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
