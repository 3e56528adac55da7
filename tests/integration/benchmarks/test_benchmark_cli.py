"""The benchmark dispatcher: ``tools/benchmark.py --list`` and the subcommands it builds."""
import subprocess
import sys

from benchmarks.cli import SUBCOMMANDS, build_parser, main
from benchmarks.common import REPO, subprocess_env

EXPECTED = ["adapt", "eval", "gpu", "inference", "moe_layer", "msda", "params", "planner", "step", "study"]


def test_list_names_every_subcommand(capsys):
    assert main(["--list"]) is None
    assert capsys.readouterr().out.strip() == "subcommands: " + ", ".join(EXPECTED)
    assert list(SUBCOMMANDS) == EXPECTED
    for name, module in SUBCOMMANDS.items():
        assert callable(module.run) and callable(module.add_arguments), name
    args = build_parser().parse_args(["msda", "--sizes", "small"])
    assert (args.command, args.sizes, args.output) == ("msda", ["small"], "output/benchmarks/msda.json")


def test_tools_shim_runs_the_dispatcher():
    # a script in tools/ imports from tools/, not the checkout: the package must come from the install
    # (here: the checkout on PYTHONPATH, as the study and adapt subprocesses get it)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "benchmark.py"), "--list"], capture_output=True,
                          text=True, cwd=str(REPO / "tools"), env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "subcommands: " + ", ".join(EXPECTED)
