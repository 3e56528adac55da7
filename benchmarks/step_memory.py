"""The ``step`` benchmark's peak-memory measurement: one fresh subprocess per router.

:func:`measure_memory` (in the benchmark's process) writes a spec per router and runs
``python -m benchmarks step --probe-spec <spec>``; there :func:`run_probe` builds the router's model and
optimizer exactly as the timed run does (:mod:`benchmarks.step`), runs the steps and prints one line
``BENCH_STEP_PROBE {json}`` with the peak. See the ``step`` module docstring for what is measured.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import autocast_dtype, set_threads, subprocess_env, sync

PROBE_MARK = "BENCH_STEP_PROBE "


def rss_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM, ...) in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_probe(spec_path: str) -> dict:
    """Inside a memory subprocess: build one row's model, run steps, print and return the peak memory."""
    import resource

    import torch

    import gem_d2  # noqa: F401
    from benchmarks.step import BASE, base_cfg, build_router_model, make_step
    from gem_d2.engine.setup import prepare_datasets

    spec = json.loads(Path(spec_path).read_text())
    set_threads(spec["threads"])
    cfg = base_cfg(spec["config_file"], spec["opts"], spec["device"], spec["seed"])
    prepare_datasets(cfg)
    device = torch.device(cfg.MODEL.DEVICE)
    batch = torch.load(spec["batch_file"], weights_only=False)
    # the same history in every probe (the dense reference built, copied from and freed), so the
    # allocator starts each router's steps from the same state
    reference, _ = build_router_model(cfg, BASE, spec["seed"])
    model, optimizer = build_router_model(cfg, spec["router"], spec["seed"], reference)
    del reference
    step = make_step(model, optimizer, batch, device, autocast_dtype(cfg, spec["amp"]))
    out = {"router": spec["router"], "steps": spec["steps"]}
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        for i in range(spec["steps"]):
            torch.manual_seed(spec["seed"] + i)
            step()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        out.update(method="torch.cuda.max_memory_allocated", peak_mib=peak / 2**20,
                   step_mib=(peak - before) / 2**20, after_build_mib=before / 2**20)
    else:
        import gc

        gc.collect()
        reset = reset_peak_rss()
        before = rss_kib("VmRSS")
        for i in range(spec["steps"]):
            torch.manual_seed(spec["seed"] + i)
            step()
        peak = rss_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out.update(method="VmHWM after clear_refs reset" if reset else "ru_maxrss (whole process life)",
                   peak_mib=peak / 1024, step_mib=(peak - before) / 1024, after_build_mib=before / 1024,
                   process_peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(PROBE_MARK + json.dumps(out), flush=True)
    return out


def measure_memory(args, routers, batch_file: str, device: str) -> dict:
    """Peak memory per router, one fresh subprocess each (``--memory-jobs`` at a time)."""
    tmp = Path(batch_file).parent

    def one(router: str) -> dict:
        spec = {"router": router, "config_file": args.config_file, "opts": list(args.opts), "device": device,
                "seed": args.seed, "amp": args.amp, "threads": args.threads, "batch_file": batch_file,
                "steps": max(2, args.memory_steps)}
        path = tmp / f"probe_{router}.json"
        path.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, "-m", "benchmarks", "step", "--probe-spec", str(path)],
                              capture_output=True, text=True, cwd=os.getcwd(), env=subprocess_env())
        for line in proc.stdout.splitlines():
            if line.startswith(PROBE_MARK):
                return json.loads(line[len(PROBE_MARK):])
        raise RuntimeError(f"memory subprocess for {router!r} failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")

    with ThreadPoolExecutor(max_workers=max(1, args.memory_jobs)) as pool:
        return dict(zip(routers, pool.map(one, routers)))
