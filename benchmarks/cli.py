"""gem-d2 benchmarks: one subcommand per measurement, each printing a table and writing JSON.

    python tools/benchmark.py <subcommand> [options]     # e.g. planner, eval, msda
    python tools/benchmark.py --list
    python -m benchmarks <subcommand> [options]          # the same

Each subcommand is a module of the ``benchmarks`` package (``benchmarks/<name>.py``, listed in
:data:`SUBCOMMANDS`) exposing ``add_arguments(parser)`` and ``run(args) -> dict``. This dispatcher prints
the machine, library versions and the command line before running it, so every published figure carries
its context (copy it into BENCHMARKS.md), and gives torch back its thread count afterwards.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from benchmarks import adapt, gpu, inference, moe_layer, msda, params, planner, step, study
from benchmarks import eval as eval_benchmark
from benchmarks.common import machine_header, restored_num_threads

SUBCOMMANDS = {
    "adapt": adapt,
    "eval": eval_benchmark,
    "gpu": gpu,
    "inference": inference,
    "moe_layer": moe_layer,
    "msda": msda,
    "params": params,
    "planner": planner,
    "step": step,
    "study": study,
}


def build_parser() -> argparse.ArgumentParser:
    """The dispatcher's parser: ``--list`` and one subparser per entry of :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list the subcommands")
    sp = parser.add_subparsers(dest="command")
    for name, module in SUBCOMMANDS.items():
        doc = (module.__doc__ or "").strip().splitlines()
        module.add_arguments(sp.add_parser(name, help=doc[0] if doc else name))
    return parser


def main(argv: Optional[Sequence[str]] = None):
    """Parse ``argv`` (default ``sys.argv[1:]``), print the machine header, run the subcommand; returns its result."""
    args = build_parser().parse_args(argv)
    if args.list or not args.command:
        print("subcommands: " + ", ".join(SUBCOMMANDS))
        return None
    print(machine_header(argv), flush=True)
    with restored_num_threads():  # subcommands may set their own (--threads); callers in this process keep theirs
        return SUBCOMMANDS[args.command].run(args)
