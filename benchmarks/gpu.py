"""gpu: the GPU check in one command: every GPU measurement and run of this repository, one report.

    python tools/benchmark.py gpu [--output-dir output/gpu_check] [--quick] [--parts msda moe_layer ...]

On a machine with CUDA it runs these parts, in this order, each in its own subprocess (a failing part is
recorded with the end of its log and the next one runs):

- ``msda``: the msda benchmark with both implementations (``--impls pytorch ext``), without and with AMP;
- ``moe_layer``: the gem MoE layer against the dense FFN, without and with AMP;
- ``nccl``: a 1-GPU launch with a real NCCL process group (world size 1: ``gem_d2.engine.launch`` runs in-process
  without one, so this part makes its own): DDP-wrapped tiny model, two training steps and an all-reduce;
- ``train``: a short run of the demo (``tools/train_net.py`` on ``configs/gem_dino_synth_demo.yaml``: data
  generation, planning, ``--train-iters`` iterations, evaluation) on the GPU;
- ``step`` and ``inference``: the model benchmarks (rows dense, gem; routings dataset, auto) with
  ``MODEL.DINO.MSDA_IMPL`` pytorch and ext, each without and with ``--amp`` (``SOLVER.AMP.DTYPE``).

It writes ``<output-dir>/gpu_report.json`` (every part's command, status, seconds, JSON result, log tail) and
``<output-dir>/gpu_report.md`` (the same as tables), both rewritten after every part (a stopped run keeps what
finished), and prints the latter. Nothing in it needs detectron2's compiled ops (the bootstrap installs
detectron2 without them). ``ext`` rows need ``torch-ms-deform-attn`` built with CUDA kernels (the bootstrap
builds them where the build sees a GPU and the CUDA toolkit); otherwise msda reports them as skipped and the
model benchmarks' ``ext`` rows fail with the reason.
Without CUDA the command exits with status 2 and a message, having run nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

from benchmarks.common import REPO, machine_context, subprocess_env, write_json, write_text

PARTS = ("msda", "moe_layer", "nccl", "train", "step", "inference")
DEMO = "configs/gem_dino_synth_demo.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="output/gpu_check")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats and training iterations, no step memory subprocesses (a smoke run)")
    parser.add_argument("--amp-dtype", default="bfloat16", choices=["float16", "bfloat16"])
    parser.add_argument("--train-iters", type=int, default=100)
    parser.add_argument("--part-timeout", type=int, default=1200, help="seconds before a part is stopped")
    parser.add_argument("--nccl-worker", default="", help=argparse.SUPPRESS)  # internal: the nccl part's process


def cuda_problem() -> Optional[str]:
    """Why this machine cannot run the GPU check, or None."""
    import torch

    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (torch.cuda.is_available() is False)"
    return None


def bench(*args: str) -> List[str]:
    return [sys.executable, "-m", "benchmarks", *args]


def plan(args, out: Path) -> List[dict]:
    """The commands of the selected parts: [{"part", "name", "cmd", "json"}]."""
    q = args.quick
    reps = ["--repeats", "3" if q else "10", "--warmup", "1" if q else "3"]
    jobs = []

    def add(part, name, cmd, result=True):
        path = out / f"{name}.json"
        if result:  # right after the subcommand: step and inference end with KEY VALUE config overrides
            cmd = cmd[:4] + ["--output", str(path)] + cmd[4:]
        jobs.append({"part": part, "name": name, "cmd": cmd,
                     "json": str(path) if result else None})

    amps = [("fp32", []), (f"amp-{args.amp_dtype}", ["--amp", args.amp_dtype])]
    for part in PARTS:  # the cheap, most telling parts first (a stopped run keeps what finished)
        if part not in args.parts:
            continue
        if part in ("msda", "moe_layer"):
            sizes = ["--sizes", "dino4scale", "--impls", "pytorch", "ext"] if part == "msda" else []
            for tag, amp_flag in amps:
                add(part, f"{part}-{tag}", bench(part, "--device", "cuda", *sizes, *amp_flag, *reps))
        elif part in ("step", "inference"):
            for tag, amp_flag in amps:
                for impl in ("pytorch", "ext"):
                    opts = ["SOLVER.AMP.DTYPE", args.amp_dtype, "MODEL.DINO.MSDA_IMPL", impl]
                    flag = ["--amp"] if amp_flag else []
                    if part == "step":
                        cmd = bench("step", "--device", "cuda", "--routers", "dense", "gem", "--threads", "0",
                                    "--memory-jobs", "0" if q else "2", *flag, *reps, *opts)
                    else:
                        cmd = bench("inference", "--device", "cuda", "--threads", "0", "--repeats",
                                    "5" if q else "20", *flag, *opts)
                    add(part, f"{part}-{tag}-{impl}", cmd)
        elif part == "train":
            iters = 20 if q else args.train_iters
            add("train", "train", [sys.executable, "tools/train_net.py", "--config-file", DEMO, "MODEL.DEVICE",
                                   "cuda", "SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({max(1, iters - 10)},)",
                                   "SOLVER.CHECKPOINT_PERIOD", str(iters), "OUTPUT_DIR", str(out / "demo")],
                result=False)
        else:  # nccl
            add("nccl", "nccl", bench("gpu", "--nccl-worker", str(out / "nccl.json")), result=False)
            jobs[-1]["json"] = str(out / "nccl.json")
    return jobs


def run_part(job: dict, out: Path, timeout: int) -> dict:
    log = out / f"{job['name']}.log"
    t0 = time.time()
    with open(log, "w") as f:
        f.write("$ " + " ".join(job["cmd"]) + "\n")
        f.flush()
        try:
            rc = subprocess.run(job["cmd"], cwd=str(REPO), stdout=f, stderr=subprocess.STDOUT, env=subprocess_env(),
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    seconds = time.time() - t0
    result = None
    if job["json"] and rc == 0 and Path(job["json"]).is_file():
        result = json.loads(Path(job["json"]).read_text())
    tail = log.read_text().splitlines()[-25:]
    status = "ok" if rc == 0 else f"failed ({rc})"
    print(f"[gpu] {job['name']}: {status} in {seconds:.0f}s", flush=True)
    return {"part": job["part"], "name": job["name"], "command": " ".join(job["cmd"]), "status": status,
            "seconds": round(seconds, 1), "log": str(log), "result": result, "log_tail": tail}


def synth_batch(cfg, size: int) -> list:
    """One generated image of each of two domains, as the mapper gives them to the model (no files needed)."""
    import numpy as np
    import torch
    from detectron2.structures import Boxes, Instances

    from gem_d2.data.label_space import UnifiedLabelSpace
    from gem_d2.data.synthetic_styles import STYLES, render_image

    space = UnifiedLabelSpace.from_cfg(cfg)
    batch = []
    for i, domain in enumerate(("photo", "cartoon")):
        style = STYLES[domain]
        image, boxes = render_image(style, np.random.default_rng([0, i]), size, style.classes[0])
        index = space.dataset_index(f"synth_{domain}_train")
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor([[x0, y0, x1 + 1, y1 + 1] for _, x0, y0, x1, y1 in boxes],
                                           dtype=torch.float32))
        inst.gt_classes = torch.tensor([space.block(index)[0] + style.classes.index(c) for c, *_ in boxes])
        batch.append({"image": torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1),
                      "instances": inst, "dataset_id": index, "class_block": space.block(index),
                      "height": size, "width": size})
    return batch


def nccl_worker(path: str) -> None:
    """World size 1 over NCCL: the tiny GEM-DINO in DDP, two training steps and an all-reduce; a JSON record."""
    import socket

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import gem_d2  # noqa: F401  (shims before detectron2)

    # isort: split
    from detectron2.modeling import build_model

    from benchmarks.common import QUICK_TRAIN_OPTS, fixed_gem_mapping
    from gem_d2.engine.setup import build_cfg

    t0 = time.time()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    torch.cuda.set_device(0)
    cfg = build_cfg(DEMO, QUICK_TRAIN_OPTS + ["MODEL.DEVICE", "cuda"])
    fixed_gem_mapping(cfg)
    torch.manual_seed(0)
    model = DistributedDataParallel(build_model(cfg), device_ids=[0], broadcast_buffers=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs = synth_batch(cfg, int(cfg.INPUT.MAX_SIZE_TRAIN))
    losses = []
    for _ in range(2):
        loss = sum(model(inputs).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    total = torch.tensor([1.0], device="cuda")
    dist.all_reduce(total)
    torch.cuda.synchronize()
    record = {"backend": dist.get_backend(), "world_size": dist.get_world_size(),
              "nccl": ".".join(map(str, torch.cuda.nccl.version())), "losses": losses, "all_reduce": float(total),
              "seconds": round(time.time() - t0, 1)}
    dist.destroy_process_group()
    write_json(path, record)
    print(json.dumps(record))


def markdown(report: dict) -> str:
    c = report["context"]
    lines = [f"# GPU check, {c['date']}", "", f"machine: {c['machine']}  ", f"{c['versions']}  ",
             f"command: `{c['command']}`  ", f"torch-ms-deform-attn: {report['msda_ext']}", "",
             "| part | status | s |", "| --- | --- | ---: |"]
    lines += [f"| {p['name']} | {p['status']} | {p['seconds']:.0f} |" for p in report["parts"]]
    for p in report["parts"]:
        r = p["result"] or {}
        rows = r.get("results") or r.get("rows") or []
        if not rows and not r:
            continue
        lines += ["", f"## {p['name']}", ""]
        if isinstance(rows, list) and rows and isinstance(rows[0], dict):
            keys = [k for k in rows[0] if not isinstance(rows[0][k], (list, dict))][:12]
            lines += ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
            for row in rows:
                lines.append("| " + " | ".join(_cell(row.get(k)) for k in keys) + " |")
        else:
            lines.append("```\n" + json.dumps({k: v for k, v in r.items() if k != "results"}, indent=1)[:3000]
                         + "\n```")
    failed = [p for p in report["parts"] if not p["status"].startswith("ok")]
    for p in failed:
        lines += ["", f"## {p['name']}: {p['status']}", "", "```", *p["log_tail"], "```"]
    return "\n".join(lines) + "\n"


def _cell(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def run(args) -> Optional[dict]:
    if args.nccl_worker:
        nccl_worker(args.nccl_worker)
        return None
    problem = cuda_problem()
    if problem:
        print(f"gpu: no GPU check on this machine: {problem}. Run `python tools/benchmark.py gpu` on a machine "
              "with a CUDA GPU and a CUDA build of torch; nothing was run.", file=sys.stderr)
        sys.exit(2)
    import torch

    from gem_d2.layers.ms_deform_attn import ext_status, ext_supports

    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ok, why = ext_supports(torch.device("cuda"), torch.float32)
    ext = f"{ext_status()[0].__version__}, CUDA kernels" if ok else f"not usable on CUDA: {why}"
    report = {"benchmark": "gpu", "context": machine_context(), "device_name": torch.cuda.get_device_name(0),
              "msda_ext": ext, "env": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "NCCL_DEBUG")},
              "parts": []}
    for job in plan(args, out):
        report["parts"].append(run_part(job, out, args.part_timeout))
        text = markdown(report)  # rewritten after every part: a stopped run still leaves its report
        write_json(str(out / "gpu_report.json"), report)
        write_text(str(out / "gpu_report.md"), text)
    print(text)
    print(f"wrote {out / 'gpu_report.json'} and {out / 'gpu_report.md'}")
    return report
