"""msda: forward and forward+backward time of multi-scale deformable attention, per implementation.

``--impls``: ``pytorch`` (the grid_sample reference) and ``ext`` (the ``torch-ms-deform-attn`` kernels,
``MODEL.DINO.MSDA_IMPL ext``; skipped with a note where the package cannot run the device/dtype).
Measures the sampling core (``ms_deform_attn`` with that implementation) and the whole ``MSDeformAttn``
module (projections included) for
encoder self-attention (queries = all tokens) and decoder cross-attention (900 matching + 200 DN
queries) at DINO-4scale sizes (batch 2, 800x1066 image -> levels 100x134, 50x67, 25x34, 13x17,
8 heads x 32 channels, 4 points) and at a small CPU size (256x256 image). Reports the median of
``--repeats`` timed runs after ``--warmup`` runs, in milliseconds: wall time, and process CPU time
(summed over threads), which is the steadier figure on a shared machine. ``--amp float16|bfloat16``
(CUDA only) runs both passes under ``torch.autocast`` with float32 inputs and parameters, as mixed-precision
training does; ``--dtype`` instead casts everything.

    python tools/benchmark.py msda [--sizes small dino4scale] [--impls pytorch ext] [--device cpu] [--repeats 5]
        [--amp float16]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics

from benchmarks.common import add_output, add_threads, device_name, load_average, set_threads, timed, write_json

SIZES = {
    # name: (batch, image H, W, decoder queries)
    "small": (2, 256, 256, 100 + 100),
    "dino4scale": (2, 800, 1066, 900 + 200),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["small", "dino4scale"])
    parser.add_argument("--targets", nargs="+", choices=["core", "module"], default=["core", "module"],
                        help="the sampling core alone and/or the MSDeformAttn module")
    parser.add_argument("--impls", nargs="+", choices=["pytorch", "ext"], default=["pytorch", "ext"],
                        help="implementations to measure (MODEL.DINO.MSDA_IMPL)")
    parser.add_argument("--attn", nargs="+", choices=["encoder", "decoder"], default=["encoder", "decoder"])
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--amp", default="", choices=["", "float16", "bfloat16"],
                        help="autocast dtype (CUDA only; empty = no autocast)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    add_threads(parser, default=0, help="torch.set_num_threads (0 = leave as is)")
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--points", type=int, default=4)
    add_output(parser, "msda")


def level_shapes(height: int, width: int, levels: int) -> list:
    """Feature sizes of DINO's levels: strides 8, 16, 32 from the backbone, then stride-2 convs."""
    shapes = [(math.ceil(height / 8), math.ceil(width / 8))]
    while len(shapes) < levels:
        h, w = shapes[-1]
        shapes.append((math.ceil(h / 2), math.ceil(w / 2)))
    return shapes


def time_calls(fn, device, repeats: int, warmup: int) -> dict:
    """Median wall time and median process CPU time (all threads; robust to a shared, busy machine)."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        _, w, c = timed(fn, device)
        wall.append(w)
        cpu.append(c)
    return {"median_ms": statistics.median(wall), "min_ms": min(wall), "max_ms": max(wall),
            "cpu_median_ms": statistics.median(cpu), "repeats": repeats}


def measure_case(args, size: str, attn: str, target: str, impl: str = "pytorch") -> dict:
    import torch

    from gem_d2.layers.ms_deform_attn import MSDeformAttn, ms_deform_attn

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    batch, height, width, dec_queries = SIZES[size]
    shapes = level_shapes(height, width, args.levels)
    s = sum(h * w for h, w in shapes)
    lq = s if attn == "encoder" else dec_queries
    m, d, p, num_levels = args.heads, args.head_dim, args.points, args.levels
    spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.rand(*shape, generator=g, device=device, dtype=dtype)

    if target == "core":
        value = rand(batch, s, m, d).requires_grad_(True)
        loc = rand(batch, lq, m, num_levels, p, 2).requires_grad_(True)
        weights = rand(batch, lq, m, num_levels, p).softmax(-1).detach().requires_grad_(True)
        leaves = [value, loc, weights]

        def forward():
            return ms_deform_attn(value, spatial_shapes, None, loc, weights, impl)
    else:
        module = MSDeformAttn(m * d, num_levels, m, p, impl=impl).to(device=device, dtype=dtype)
        query = rand(batch, lq, m * d).requires_grad_(True)
        value = rand(batch, s, m * d).requires_grad_(True)
        ref = rand(batch, lq, num_levels, 2 if attn == "encoder" else 4)
        areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
        start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
        mask = torch.zeros(batch, s, dtype=torch.bool, device=device)
        leaves = [query, value] + list(module.parameters())

        def forward():
            return module(query, ref, value, spatial_shapes, start_index, mask)

    grad_out = None

    def forward_backward():
        nonlocal grad_out
        for leaf in leaves:
            leaf.grad = None
        out = forward()
        if grad_out is None:
            grad_out = torch.ones_like(out)
        out.backward(grad_out)

    amp = getattr(torch, args.amp) if args.amp else None

    def autocast():
        return torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None)

    def forward_no_grad():
        with torch.no_grad(), autocast():
            return forward()

    def forward_backward_amp():
        with autocast():
            forward_backward()

    fwd = time_calls(forward_no_grad, device, args.repeats, args.warmup)
    fwd_bwd = time_calls(forward_backward_amp, device, args.repeats, args.warmup)
    return {"size": size, "attn": attn, "target": target, "impl": impl, "batch": batch, "image": [height, width],
            "levels": shapes, "tokens": s, "queries": lq, "heads": m, "head_dim": d, "points": p,
            "forward_ms": fwd["median_ms"], "forward_backward_ms": fwd_bwd["median_ms"],
            "forward_cpu_ms": fwd["cpu_median_ms"], "forward_backward_cpu_ms": fwd_bwd["cpu_median_ms"],
            "forward": fwd, "forward_backward": fwd_bwd}


def run(args) -> dict:
    import torch

    set_threads(args.threads)
    device = torch.device(args.device)
    if args.amp and device.type != "cuda":
        raise ValueError(f"msda: --amp {args.amp} needs a CUDA --device, got {args.device!r} "
                         "(mixed precision is CUDA-only here)")
    if args.amp and args.dtype != "float32":
        raise ValueError(f"msda: --amp {args.amp} autocasts float32 inputs; got --dtype {args.dtype}")
    from gem_d2.layers.ms_deform_attn import ext_status, ext_supports

    impls, skipped = [], {}
    for impl in args.impls:
        ok, why = (True, "") if impl == "pytorch" else ext_supports(device, getattr(torch, args.dtype))
        if ok:
            impls.append(impl)
        else:
            skipped[impl] = why
            print(f"msda: skipping --impls {impl}: {why}")
    results = []
    header = (f"{'size':<11} {'attn':<8} {'target':<7} {'impl':<8} {'tokens':>7} {'queries':>7} {'fwd ms':>9} "
              f"{'fwd+bwd ms':>11} {'fwd cpu ms':>11} {'f+b cpu ms':>11}")
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        for attn in args.attn:
            for target in args.targets:
                for impl in impls:
                    r = measure_case(args, size, attn, target, impl)
                    results.append(r)
                    print(f"{size:<11} {attn:<8} {target:<7} {impl:<8} {r['tokens']:>7} {r['queries']:>7} "
                          f"{r['forward_ms']:>9.1f} {r['forward_backward_ms']:>11.1f} {r['forward_cpu_ms']:>11.1f} "
                          f"{r['forward_backward_cpu_ms']:>11.1f}", flush=True)
    module = ext_status()[0]
    report = {
        "benchmark": "msda",
        "implementations": {"pytorch": "grid_sample reference",
                            "ext": f"torch-ms-deform-attn {module.__version__}" if module else None},
        "skipped": skipped,
        "device": str(device), "device_name": device_name(device), "dtype": args.dtype, "amp": args.amp or None,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "repeats": args.repeats, "warmup": args.warmup, "statistic": "median",
        "load_average": load_average(),
        "results": results,
    }
    if args.output:
        write_json(args.output, report)
        print(f"wrote {args.output}")
    return report
