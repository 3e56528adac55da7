"""What the benchmarks share: paths, the machine context, timing, report files, subprocesses, options.

- context: :func:`machine_context` / :func:`machine_header` (date, machine, library versions, command line),
  :func:`device_name`, :func:`load_average`;
- timing: :func:`sync` (wait for a CUDA device), :func:`timed` (wall and process CPU time of one call),
  :func:`set_threads`, :func:`restored_num_threads`;
- reports: :func:`write_json`, :func:`write_text` (atomic, through ``gem_d2.utils.files``); training logs:
  :func:`read_metrics`, :func:`step_weighted_mean`;
- training subprocesses (``study``, ``adapt``): :data:`QUICK_TRAIN_OPTS`, :func:`subprocess_env`,
  :func:`run_logged`;
- configs: :func:`fixed_gem_mapping`, :func:`synth_damex_map` / :func:`synth_damex_opts` (damex's hand map of
  the generated domains), :func:`autocast_dtype`;
- options: :func:`add_output`, :func:`add_threads`, :func:`add_model_arguments`, :func:`add_config_opts`.

torch, detectron2 and gem_d2 are imported inside the functions, so ``--list`` and ``--help`` stay fast.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent  # the checkout: tools/, configs/ and the package beside it
DEMO_CONFIG = "configs/gem_dino_synth_demo.yaml"

# The tiny model and data of the training tests, so a ``--quick`` study or adaptation runs in about a minute.
QUICK_TRAIN_OPTS = [
    "DATASETS.SYNTH.IMAGES_PER_DOMAIN", "6", "DATASETS.SYNTH.TEST_IMAGES_PER_DOMAIN", "2",
    "DATASETS.SYNTH.IMAGE_SIZE", "96",
    "MODEL.DINO.HIDDEN_DIM", "32", "MODEL.DINO.DIM_FEEDFORWARD", "64", "MODEL.DINO.NHEADS", "4",
    "MODEL.DINO.ENC_LAYERS", "1", "MODEL.DINO.DEC_LAYERS", "1", "MODEL.DINO.NUM_QUERIES", "12",
    "MODEL.DINO.DN_NUMBER", "8", "MODEL.DINO.NUM_SELECT", "20", "MODEL.GEM.MOE_LAYERS", "['decoder.0']",
    "MODEL.GEM.PLANNER.SAMPLES_PER_UNIT", "2", "MODEL.GEM.PLANNER.IMAGE_SIZE", "64",
    "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "96",
    "INPUT.MAX_SIZE_TEST", "96", "SOLVER.IMS_PER_BATCH", "2",
]

# ---------------------------------------------------------------------------------------------- context


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """The benchmark command as a reader would retype it: ``python tools/benchmark.py <argv>``, or
    ``python -m benchmarks <argv>`` when this process was started that way (``argv``: default ``sys.argv[1:]``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    started = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    prog = "-m benchmarks" if started == REPO / "benchmarks" / "__main__.py" else "tools/benchmark.py"
    return " ".join(["python", prog] + args)


def machine_context(argv: Optional[Sequence[str]] = None) -> dict:
    """Date, machine (architecture, CPU cores, GPU), Python/torch/detectron2 versions and the command line."""
    import torch

    try:
        import detectron2

        d2 = detectron2.__version__
    except ImportError:
        d2 = "not installed"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}",
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, detectron2 {d2}",
        "command": command_line(argv),
    }


def machine_header(argv: Optional[Sequence[str]] = None) -> str:
    """:func:`machine_context` as the block the dispatcher prints before every subcommand."""
    c = machine_context(argv)
    return "\n".join([f"date: {c['date']}", f"machine: {c['machine']}", c["versions"], f"command: {c['command']}"])


def device_name(device) -> str:
    """The GPU's name on CUDA, else the processor's (or "cpu")."""
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def load_average() -> Optional[List[float]]:
    """The 1/5/15-minute load averages where the platform has them (they say how busy a shared machine was)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


# ---------------------------------------------------------------------------------------------- timing


def sync(device) -> None:
    """Wait for ``device``'s queued work (CUDA kernels run asynchronously); nothing to do on CPU or None."""
    import torch

    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device=None):
    """``(fn(), wall ms, process CPU ms)``, ``device`` synchronised before and after. The CPU time is summed
    over this process's threads, the steadier figure on a shared machine (other processes do not inflate it)."""
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    sync(device)
    return result, (time.perf_counter() - w0) * 1e3, (time.process_time() - c0) * 1e3


def set_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)`` when ``threads`` > 0; 0 leaves torch's setting."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def restored_num_threads():
    """Run the block, then give torch back the thread count it had (subcommands may set their own)."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- reports


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8), creating its folder."""
    from gem_d2.utils.files import atomic_write_text

    atomic_write_text(path, text)


def write_json(path: str, obj, indent: int = 2, **kwargs) -> None:
    """Write ``json.dumps(obj, indent=indent, **kwargs)`` to ``path`` atomically, creating its folder."""
    write_text(path, json.dumps(obj, indent=indent, **kwargs))


# ---------------------------------------------------------------------------------------------- subprocesses


def subprocess_env() -> dict:
    """This environment with the checkout first on ``PYTHONPATH``: child processes import this checkout's
    ``gem_d2`` and ``benchmarks``, whatever the interpreter's own paths say."""
    paths = [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


def run_logged(cmd: List[str], log: str, what: str) -> None:
    """Run ``cmd`` in the checkout, stdout and stderr appended to ``log``; on failure raise RuntimeError
    naming ``what`` with the log's tail."""
    with open(log, "a") as f:
        proc = subprocess.run(cmd, cwd=str(REPO), stdout=f, stderr=subprocess.STDOUT, env=subprocess_env())
    if proc.returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{what} failed (exit {proc.returncode}); log {log}:\n{tail}")


def read_metrics(path: str) -> List[dict]:
    """detectron2's ``metrics.json`` (one JSON record per line) as records sorted by ``iteration``; when a resumed
    run logged an iteration again, its latest record counts. Missing file: ``[]``."""
    if not os.path.isfile(path):
        return []
    by_iter = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                record = json.loads(line)
                if "iteration" in record:
                    by_iter[int(record["iteration"])] = record
    return [by_iter[i] for i in sorted(by_iter)]


def step_weighted_mean(records: Sequence[dict], key: str) -> Optional[float]:
    """Mean over training steps of a value logged as window means (e.g. ``routing/<layer>/...``): each record's
    value weighs the iterations since the previous record holding ``key``. None when no record has it."""
    total = steps = 0.0
    last = -1
    for r in records:
        if key in r:
            it = int(r["iteration"])
            total += (it - last) * float(r[key])
            steps += it - last
            last = it
    return total / steps if steps > 0 else None


# ---------------------------------------------------------------------------------------------- configs


def fixed_gem_mapping(cfg) -> None:
    """A fixed valid GEM mapping instead of running the planner: dataset i -> expert i % NUM_EXPERTS."""
    from gem_d2.planner.mapping import GemMapping

    units = list(cfg.DATASETS.TRAIN)
    experts = int(cfg.MODEL.GEM.NUM_EXPERTS)
    GemMapping.create(units, [[i % experts] for i in range(len(units))], num_experts=experts).to_cfg(cfg)


# The damex router's hand-written dataset -> expert map for the generated domains, written by the rule DAMEX's
# UODB map follows: one expert per dataset, datasets of overlapping content merged when experts run out (KITTI
# into LISA's, VOC and Comic into COCO's). Keyed by the number of experts when it is below the number of domains.
SYNTH_DAMEX_GROUPS = {
    4: (("photo", "sketch"), ("cartoon",), ("medical",), ("aerial",)),  # sketch: 2 of its 3 classes are photo's
    2: (("photo", "cartoon", "sketch"), ("medical", "aerial")),  # the shape domains / the scene domains
}


def synth_domain(dataset: str) -> str:
    """``synth_<domain>_<split>...`` -> ``<domain>`` (domain names have no underscore)."""
    return dataset[len("synth_"):].split("_")[0]


def synth_damex_map(train_datasets: Sequence[str], num_experts: int, extra: Sequence[str] = ()) -> List[list]:
    """``[[dataset, expert], ...]`` (``MODEL.GEM.DAMEX.DATASET_TO_EXPERT``) for generated training datasets.

    As many experts as datasets: one each, in order; otherwise :data:`SYNTH_DAMEX_GROUPS`. Each dataset of
    ``extra`` (a domain added later, e.g. by few-shot adaptation) joins the expert of the training domain that
    shares most class names with it (ties: the earlier one)."""
    from gem_d2.data.synthetic import DOMAIN_CLASSES

    names = list(train_datasets)
    domains = [synth_domain(d) for d in names]
    if num_experts >= len(domains):
        expert = {d: i for i, d in enumerate(domains)}
    else:
        groups = SYNTH_DAMEX_GROUPS.get(num_experts, ())
        expert = {d: j for j, group in enumerate(groups) for d in group}
        if sorted(expert) != sorted(domains):
            raise ValueError(f"no hand-written damex map of {domains} onto {num_experts} experts; set "
                             "MODEL.GEM.DAMEX.DATASET_TO_EXPERT")
    table = [[name, expert[d]] for name, d in zip(names, domains)]
    for name in extra:
        shared = [len(set(DOMAIN_CLASSES[synth_domain(name)]) & set(DOMAIN_CLASSES[d])) for d in domains]
        table.append([name, expert[domains[shared.index(max(shared))]]])
    return table


def synth_damex_opts(train_datasets: Sequence[str], num_experts: int, extra: Sequence[str] = ()) -> List[str]:
    """The ``KEY VALUE`` override that gives the damex router :func:`synth_damex_map`."""
    return ["MODEL.GEM.DAMEX.DATASET_TO_EXPERT", repr(synth_damex_map(train_datasets, num_experts, extra))]


def autocast_dtype(cfg, enabled: bool):
    """The dtype ``SOLVER.AMP`` would train in, or None when ``enabled`` is False (a clear error off CUDA)."""
    if not enabled:
        return None
    from gem_d2.engine import amp_dtype

    c = cfg.clone()
    c.defrost()
    c.SOLVER.AMP.ENABLED = True
    return amp_dtype(c)


# ---------------------------------------------------------------------------------------------- options


def add_output(parser: argparse.ArgumentParser, name: str) -> None:
    """``--output``, default ``output/benchmarks/<name>.json``."""
    parser.add_argument("--output", default=f"output/benchmarks/{name}.json", help="JSON result file")


def add_threads(parser: argparse.ArgumentParser, default: int = 1,
                help: str = "torch.set_num_threads (default 1: see the module docstring; 0 = torch's default)") -> None:
    parser.add_argument("--threads", type=int, default=default, help=help)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config-file`` (default the demo config) and ``--device`` of the model benchmarks."""
    parser.add_argument("--config-file", default=DEMO_CONFIG)
    parser.add_argument("--device", default="", help="torch device (default: the config's MODEL.DEVICE)")


def add_config_opts(parser: argparse.ArgumentParser, example: str) -> None:
    """The trailing ``KEY VALUE`` config overrides."""
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help=f"config overrides KEY VALUE ... (e.g. {example})")
