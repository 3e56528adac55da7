"""``python -m benchmarks <subcommand> ...``: the same as ``python tools/benchmark.py <subcommand> ...``."""
from benchmarks.cli import main

main()
