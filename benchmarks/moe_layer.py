"""moe_layer: forward+backward time of one GEM MoE FFN layer against the dense FFN, at DINO-4scale shapes.

Cases: ``--shapes`` encoder (2 images x 17,821 tokens: the four levels of an 800x1066 image, a padding mask
present as the encoder has one) and decoder (2 images x 1,100 queries: 900 matching + 200 denoising);
``--batches`` uniform (both images from one dataset) and mixed (two datasets mapped to different experts);
``--k`` 1 and 2 (each dataset's row has k experts, weights 1/k). d_model 256, FFN 2048, 8 experts.

Variants: ``dense`` (:class:`gem_d2.layers.mlp.FFN`, the layer GEM replaces), ``dense-again`` (the same dense
layer timed a second time: its ratio, ideally 1, shows how far identical work scatters on this machine),
``dense-k`` (k > 1 only: the dense FFN run k times on the same input, outputs weighted 1/k and summed: the work of
k experts per token without any routing, :class:`DenseTimesK`), ``gem``
(:class:`MoEFFN` with the gem router: per-image dispatch, each expert on an image's contiguous tokens) and
``gem-per-token`` (the same layer forced through the general gather/scatter dispatch). The experts start as copies
of the dense FFN. One repeat times one forward+backward (input gradient included, parameter gradients reset to
None as ``zero_grad`` does) of every variant, in an order shuffled per repeat (seeded), so a change of load, or an
effect of what ran just before, hits all of them alike. Reported per variant: median wall and process CPU ms, and
the median over repeats of its time / dense's time in the same repeat (``ratio``, with a 95% bootstrap interval
of that median, scipy, seeded; ``/k``: the gem variants' ratio divided by k, since k experts per token do k times
the FFN work; ``ops``: ATen operators one forward+backward dispatches; ``vs dense-k``: the median over repeats of
the gem variant's time / dense-k's, the cost of routing alone, as k FFN outputs held at once also cost memory that
``/k`` charges to the routing). ``--profile-steps N`` then profiles N steps of each variant and prints the time per
step it spends in operators the dense layer never runs (:func:`profile_own_operators`): a figure of the routing's
own work that the machine's scatter, which mostly hits the matmuls, does not blur.
``--token-scale`` shrinks the token counts (a loaded or small machine), ``--amp``
runs under autocast (CUDA). ``--threads 1`` by default, as the ``step`` benchmark (OpenMP spin-waiting on cores
shared with other jobs makes multi-threaded timings erratic); ``--threads 0``: all cores.

    python tools/benchmark.py moe_layer [--shapes encoder decoder] [--batches uniform mixed] [--k 1 2]
        [--device cpu] [--repeats 10] [--warmup 2] [--token-scale 1.0] [--amp bfloat16] [--profile-steps 0]
"""
from __future__ import annotations

import argparse
import random
import statistics

from benchmarks.common import add_output, add_threads, device_name, load_average, set_threads, timed, write_json

SHAPES = {"encoder": 100 * 134 + 50 * 67 + 25 * 34 + 13 * 17, "decoder": 900 + 200}  # tokens per image
VARIANTS = ("dense", "dense-again", "dense-k", "gem", "gem-per-token")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["encoder", "decoder"])
    parser.add_argument("--batches", nargs="+", choices=["uniform", "mixed"], default=["uniform", "mixed"])
    parser.add_argument("--k", nargs="+", type=int, choices=[1, 2], default=[1, 2])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="dense always runs (the reference); dense-k only where k > 1")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ffn", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--token-scale", type=float, default=1.0, help="multiply the tokens per image")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="", choices=["", "float16", "bfloat16"], help="autocast dtype (CUDA)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="after the timing, profile this many steps per variant (torch.profiler): the time in "
                             "operators the dense layer never runs")
    add_threads(parser)  # 1 by default, as the step benchmark (steady timings on shared cores); 0 = all cores
    add_output(parser, "moe_layer")


class DenseTimesK:
    """``(x (N, L, C), ctx) -> (N, L, C)``: ``ffn`` run ``k`` times on ``x``, each output weighted 1/k, summed."""

    def __init__(self, ffn, k: int):
        self.ffn, self.k = ffn, int(k)

    def parameters(self):
        return self.ffn.parameters()

    def __call__(self, x, ctx):
        import torch

        y = self.ffn(x, ctx) * (1.0 / self.k)
        for _ in range(self.k - 1):
            y = torch.add(y, self.ffn(x, ctx), alpha=1.0 / self.k)
        return y


def build_layers(args, k: int, device):
    """The dense FFN and the gem MoEFFN (experts copied from it), datasets 0/1 mapped to disjoint experts."""
    import torch

    from gem_d2.layers.mlp import FFN
    from gem_d2.modeling.moe import MoEFFN
    from gem_d2.modeling.moe.context import MoESpec
    from gem_d2.planner.mapping import GemMapping

    if args.experts < 2 * k:
        raise ValueError(f"moe_layer: --experts {args.experts} < 2k = {2 * k} (two datasets with disjoint rows)")
    torch.manual_seed(0)
    dense = FFN(args.d_model, args.d_ffn).to(device)
    rows = [list(range(k)), list(range(k, 2 * k))]
    tables = GemMapping.create(["ds0", "ds1"], rows, [[1.0 / k] * k] * 2,
                               num_experts=args.experts).router_tables(["ds0", "ds1"])
    spec = MoESpec(["encoder.0"], args.experts, "gem", {"tables": tables}, num_datasets=2)
    moe = MoEFFN("encoder.0", args.d_model, args.d_ffn, 0.0, "relu", spec).to(device)
    moe.load_from_ffn(dense)
    return dense, moe


def measure_case(args, shape: str, batch: str, k: int) -> dict:
    import torch

    from gem_d2.modeling.moe.context import RoutingContext

    device = torch.device(args.device)
    tokens = max(1, round(SHAPES[shape] * args.token_scale))
    dense, moe = build_layers(args, k, device)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.images, tokens, args.d_model, generator=g, device=device).requires_grad_(True)
    grad_out = torch.randn(args.images, tokens, args.d_model, generator=g, device=device)
    ids = torch.tensor([0] * args.images if batch == "uniform" else [i % 2 for i in range(args.images)],
                       device=device)
    mask = torch.zeros(args.images, tokens, dtype=torch.bool, device=device) if shape == "encoder" else None
    amp = getattr(torch, args.amp) if args.amp else None

    def step(layer, per_image: bool):
        if hasattr(layer, "per_image"):
            layer.per_image = per_image
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        with torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = layer(x, RoutingContext(dataset_ids=ids, key_padding_mask=mask))
        out.backward(grad_out.to(out.dtype))

    dense_k = DenseTimesK(dense, k)
    calls = {"dense": lambda: step(dense, True), "dense-again": lambda: step(dense, True),
             "dense-k": lambda: step(dense_k, True), "gem": lambda: step(moe, True),
             "gem-per-token": lambda: step(moe, False)}
    variants = [v for v in VARIANTS if (v in args.variants or v == "dense") and (v != "dense-k" or k > 1)]
    for _ in range(args.warmup):
        for v in variants:
            calls[v]()
    ops = {v: count_operators(calls[v]) for v in variants}  # after the warm-up: cached tables already built
    wall = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    order = random.Random(0)
    for _ in range(args.repeats):
        for v in order.sample(variants, len(variants)):
            _, w, c = timed(calls[v], device)
            wall[v].append(w)
            cpu[v].append(c)
    own = profile_own_operators(calls, variants, args.profile_steps, device) if args.profile_steps > 0 else {}
    rows = []
    for v in variants:
        ratios = [a / b for a, b in zip(wall[v], wall["dense"])]
        cpu_ratios = [a / b for a, b in zip(cpu[v], cpu["dense"])]
        per = k if v.startswith("gem") else 1
        vs_dense_k = None
        if v.startswith("gem") and "dense-k" in wall:
            vs_dense_k = statistics.median(a / b for a, b in zip(wall[v], wall["dense-k"]))
        rows.append({"shape": shape, "batch": batch, "k": k, "variant": v, "tokens_per_image": tokens,
                     "median_ms": statistics.median(wall[v]), "min_ms": min(wall[v]),
                     "cpu_median_ms": statistics.median(cpu[v]), "ratio": statistics.median(ratios),
                     "ratio_ci95": median_interval(ratios), "ratio_per_expert": statistics.median(ratios) / per,
                     "ratio_vs_dense_k": vs_dense_k, "operators": ops[v],
                     "cpu_ratio": statistics.median(cpu_ratios), "wall_ms": wall[v], "cpu_ms": cpu[v],
                     "own_operators_ms": own.get(v)})
    return {"rows": rows}


def count_operators(call) -> int:
    """ATen operators ``call()`` dispatches (forward and backward), counted by a ``TorchDispatchMode``: on a GPU
    most of them are kernel launches, which bound a layer of this size there."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.count += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        call()
    return Counter.count


def profile_own_operators(calls: dict, variants: list, steps: int, device) -> dict:
    """Per variant but dense, ``{operator: ms per step}`` of the top-level operators it runs that the dense layer
    never does, largest first (torch.profiler over ``steps`` forward+backward steps after the timing).

    Top-level: not called by another profiled operator, i.e. what the forward calls and each backward node's
    ``autograd::engine::evaluate_function: <Node>``; their time is inclusive (the CPU's, or the GPU kernels' on
    CUDA), so an extra out-of-place ``masked_fill`` counts with the copy it makes, and a backward node with the
    kernels it runs, less the matmuls and sums (:data:`FFN_WORK`) they call: those are the FFN's own work (a
    segmented linear's, say), which the dense layer does too. Unlike a time ratio this does not scatter with the
    machine's load (the matmuls take that scatter), but it is a lower bound of a variant's extra work: extra calls
    of what the dense layer also runs (a second expert's linears, the gradient accumulation) are not in it."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    per_step = {}
    for v in variants:
        with profile(activities=activities) as prof:
            for _ in range(steps):
                calls[v]()
        times = {}
        for event in prof.events():
            if event.cpu_parent is None and event.device_type.name == "CPU":
                us = _time(event, cuda) - sum(_time(m, cuda) for m in _ffn_work_within(event))
                times[event.name] = times.get(event.name, 0.0) + us / 1e3 / steps
        per_step[v] = times
    dense_ops = set(per_step["dense"])
    return {v: dict(sorted(((op, ms) for op, ms in per_step[v].items() if op not in dense_ops),
                           key=lambda item: -item[1])) for v in variants if v != "dense"}


# what a linear layer's forward and backward compute, whoever calls it; "aten::sum": a bias gradient
FFN_WORK = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::sum")


def _time(event, cuda: bool) -> float:
    return event.device_time_total if cuda else event.cpu_time_total


def _ffn_work_within(event) -> list:
    """The outermost :data:`FFN_WORK` operators called (at any depth) by a profiled operator."""
    found, stack = [], list(event.cpu_children)
    while stack:
        child = stack.pop()
        if child.name in FFN_WORK:
            found.append(child)
        else:
            stack.extend(child.cpu_children)
    return found


def median_interval(values) -> list:
    """95% percentile-bootstrap interval [low, high] of the median of ``values`` (scipy, seeded), or
    [median, median] when there are fewer than 3 values or they are all equal."""
    import numpy as np
    from scipy.stats import bootstrap

    values = np.asarray(values, dtype=np.float64)
    if len(values) < 3 or np.all(values == values[0]):
        m = float(np.median(values))
        return [m, m]
    ci = bootstrap((values,), np.median, confidence_level=0.95, n_resamples=2000, method="percentile",
                   random_state=np.random.default_rng(0)).confidence_interval
    return [float(ci.low), float(ci.high)]


def run(args) -> dict:
    import torch

    set_threads(args.threads)
    device = torch.device(args.device)
    if args.amp and device.type != "cuda":
        raise ValueError(f"moe_layer: --amp {args.amp} needs a CUDA --device, got {args.device!r}")
    header = (f"{'shape':<8} {'batch':<8} {'k':>2} {'variant':<14} {'tokens':>7} {'f+b ms':>9} {'cpu ms':>9} "
              f"{'ratio':>6} {'95% interval':>14} {'/k':>6} {'vs dense-k':>10} {'cpu ratio':>9} {'ops':>5}")
    print(header)
    print("-" * len(header))
    results = []
    for shape in args.shapes:
        for batch in args.batches:
            for k in args.k:
                for r in measure_case(args, shape, batch, k)["rows"]:
                    results.append(r)
                    low, high = r["ratio_ci95"]
                    print(f"{shape:<8} {batch:<8} {k:>2} {r['variant']:<14} {r['tokens_per_image']:>7} "
                          f"{r['median_ms']:>9.1f} {r['cpu_median_ms']:>9.1f} {r['ratio']:>6.3f} "
                          f"{f'[{low:.3f}, {high:.3f}]':>14} {r['ratio_per_expert']:>6.3f} "
                          f"{'' if r['ratio_vs_dense_k'] is None else format(r['ratio_vs_dense_k'], '.3f'):>10} "
                          f"{r['cpu_ratio']:>9.3f} {r['operators']:>5}", flush=True)
                    if r["own_operators_ms"] is not None and r["variant"] != "dense":
                        own = r["own_operators_ms"]
                        top = ", ".join(f"{op.replace('autograd::engine::evaluate_function: ', '')} {ms:.1f}"
                                        for op, ms in list(own.items())[:4])
                        total = sum(own.values())
                        print(f"    operators dense never runs: {total:.1f} ms/step "
                              f"({total / r['median_ms']:.2%} of this variant's time){': ' + top if top else ''}")
    report = {
        "benchmark": "moe_layer", "device": str(device), "device_name": device_name(device),
        "amp": args.amp or None, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "images": args.images, "d_model": args.d_model, "d_ffn": args.d_ffn, "experts": args.experts,
        "token_scale": args.token_scale, "repeats": args.repeats, "warmup": args.warmup,
        "profile_steps": args.profile_steps,
        "statistic": "median; ratio = median over repeats of variant / dense in the same repeat; ratio_ci95: "
                     "95% percentile-bootstrap interval of that median",
        "load_average": load_average(), "results": results,
    }
    if args.output:
        write_json(args.output, report)
        print(f"wrote {args.output}")
    return report
