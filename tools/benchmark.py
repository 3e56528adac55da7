#!/usr/bin/env python3
"""gem-d2 benchmarks: one subcommand per measurement, each printing a table and writing JSON.

    python tools/benchmark.py <subcommand> [options]     # e.g. planner, eval, msda
    python tools/benchmark.py --list

The subcommands live in the ``benchmarks`` package beside ``gem_d2`` (installed with it); see benchmarks/cli.py.
"""
from benchmarks.cli import main

if __name__ == "__main__":
    main()
