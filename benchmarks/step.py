"""step: training step time and peak memory of one model under each MoE router, at equal active parameters.

    python tools/benchmark.py step [--repeats 8] [--warmup 2] [--device cpu] [--amp] [KEY VALUE ...]

The model is ``--config-file`` (default configs/gem_dino_synth_demo.yaml: the small DINO on the ImageNet MobileNetV2,
hidden 128, 3+3 layers, MoE FFNs in decoder layers 0 and 2 with 4 experts) on the generated synth
data, with only ``MODEL.GEM.ROUTER`` (and the router's own keys) changed between rows:

=============  =====================================================================================
row            setting (each token gets at most one FFN of width ``DIM_FEEDFORWARD``)
=============  =====================================================================================
dense          ROUTER dense, MOE_LAYERS [] (the repository's dense baseline, baseline_dense_uodb.yaml):
               a plain FFN in every layer. Every ratio is to this row.
dense-moe      ROUTER dense in the MoE layers: an MoEFFN holding one expert (the wrapper's own cost)
gem            the mapping in the config, or when it is empty (or has k != 1) the fixed valid mapping
               dataset i -> expert i % NUM_EXPERTS (MODEL.GEM.UNITS/MAPPING; the planner is not run),
               EXPERTS_PER_UNIT 1
topk           TOPK.K 1 (Switch), capacity factor from the config (overflow tokens get no FFN)
softmoe        SOFTMOE.SLOTS_PER_EXPERT 1: the FFNs process E slots per image and query segment, not
               the tokens, so its FFN evaluations per token are far below 1
remoe          REMOE.TARGET_K 1: the *target*; ReLU gates of a fresh model are positive for about half
               the experts, and the L1 penalty only pushes that toward 1 over training, so in this
               benchmark a ReMoE token uses ~E/2 experts (the measured figure is in the table)
moepp          MOEPP.K 1 (the config default 2 could send a token to two FFN experts): the top-1 route
               is an FFN expert or a zero / copy / constant expert, so <= 1 FFN per token
damex          top-1 gate trained toward the hand-written map's expert (benchmarks.common.synth_damex_map)
=============  =====================================================================================

"FFN evals/token" is measured, not assumed: the rows the expert banks processed in the MoE layers
divided by the valid tokens entering them (one untimed training-mode forward on the batch, before
warm-up). "params" is the model's total; the active parameters per token differ between rows only
by that figure times one expert's size (plus the gates' few thousand weights).

Method. One batch (``SOLVER.IMS_PER_BATCH`` images) is drawn once from the synth training loader
(``SEED`` = ``--seed`` when the config's is random, global generators seeded with ``--seed`` for the
augmentation) and reused by every router and every step.
Every model is built after ``torch.manual_seed(--seed)`` and then given the dense model's weights
(every expert a copy of the dense FFN), so the models differ only in their routers. A step is
forward + losses + ``zero_grad`` + backward + ``optimizer.step`` (gem_d2's AdamW with the config's
full-model gradient clipping; with ``--amp``: autocast + GradScaler as ``GemAMPTrainer``), with
``torch.manual_seed(--seed + repeat)`` before it so every router draws the same denoising noise in
a repeat. After ``--warmup`` steps of each, ``--repeats`` rounds run one step of every router
(round-robin, the starting router rotating each round), so load changes on a shared machine hit
every router alike. Reported: median wall and median process CPU time (all threads; steadier on a
busy machine) in ms, their ratios to dense, and the median of the per-round paired ratios (JSON).

Threads: ``--threads 1`` by default. With several threads on cores shared with other jobs, OpenMP's
spin-waiting makes both the wall and the CPU time of a step swing 2-5x from step to step (measured
on the 2-core machine of BENCHMARKS.md: 3.4-28 s per step with 2 threads at load 4-5, 1.5-2.2 s with 1),
which drowns differences of a few per cent; one thread keeps the comparison between routers
honest. ``--threads 0`` uses torch's default (all cores) for absolute figures on an idle machine.

Peak memory is measured per router in a fresh subprocess (``--memory-jobs`` at a time) that loads
the same batch, builds the same model and optimizer and runs ``--memory-steps`` steps (>= 2, so Adam
state exists): on CPU the process's peak resident set (Linux ``VmHWM``, i.e. ``ru_maxrss``) and
``step MiB`` = that peak minus the resident set after building (the peak is first reset to the
current RSS through ``/proc/self/clear_refs`` so build-time transients do not count; where that is
not possible the increase is over the whole process life). It covers gradients, optimizer state and
the step's activations. A subprocess per router, because a process's peak RSS only ever grows and
freed memory stays with the allocator. On CUDA: ``torch.cuda.max_memory_allocated`` (reset after
building) in the same way. ``--memory-jobs 0`` skips the memory columns. (The subprocesses are in
:mod:`benchmarks.step_memory`.)
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from benchmarks.common import (
    add_config_opts,
    add_model_arguments,
    add_output,
    add_threads,
    autocast_dtype,
    device_name,
    fixed_gem_mapping,
    load_average,
    set_threads,
    synth_damex_map,
    timed,
    write_json,
)

ROUTERS = ("dense", "dense-moe", "gem", "topk", "softmoe", "remoe", "moepp", "damex")
BASE = "dense"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--routers", nargs="+", choices=ROUTERS, default=list(ROUTERS),
                        help=f"rows to measure; {BASE!r} (the ratio base) is always included")
    parser.add_argument("--repeats", type=int, default=8, help="timed rounds (one step of every router each)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per router before the rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--amp", action="store_true", help="mixed precision (CUDA only; SOLVER.AMP.DTYPE)")
    add_threads(parser)
    parser.add_argument("--memory-steps", type=int, default=2, help="steps per memory subprocess (>= 2)")
    parser.add_argument("--memory-jobs", type=int, default=2,
                        help="memory subprocesses at a time (they are not timed); 0 = no memory measurement")
    add_output(parser, "step")
    parser.add_argument("--probe-spec", default="", help=argparse.SUPPRESS)  # internal: memory subprocess
    add_config_opts(parser, "SOLVER.IMS_PER_BATCH 2")


# ---------------------------------------------------------------------------------------------- config


def base_cfg(config_file: str, opts, device: str, seed: int):
    """The config shared by every row: file + overrides, device, a fixed data seed and a fixed k=1 mapping."""
    from gem_d2.engine.setup import build_cfg

    cfg = build_cfg(config_file, opts)
    if device:
        cfg.MODEL.DEVICE = device
    if cfg.SEED < 0:
        cfg.SEED = seed
    g = cfg.MODEL.GEM
    if not g.MOE_LAYERS:
        raise ValueError(f"{config_file}: MODEL.GEM.MOE_LAYERS is empty; the routers need MoE layers to differ")
    g.EXPERTS_PER_UNIT = 1
    if not g.MAPPING or any(len(row) != 1 for row in g.MAPPING):
        fixed_gem_mapping(cfg)  # dataset i -> expert i % E instead of running the planner
    if not g.DAMEX.DATASET_TO_EXPERT and all(d.startswith("synth_") for d in cfg.DATASETS.TRAIN):
        g.DAMEX.DATASET_TO_EXPERT = synth_damex_map(cfg.DATASETS.TRAIN, int(g.NUM_EXPERTS))  # damex's hand map
    return cfg


def router_cfg(cfg, router: str):
    """``cfg`` for one row (see the module docstring): equal active FFN parameters per token."""
    c = cfg.clone()
    g = c.MODEL.GEM
    g.ROUTER = "dense" if router in ("dense", "dense-moe") else router
    if router == "dense":
        g.MOE_LAYERS = []
    g.TOPK.K = 1
    g.SOFTMOE.SLOTS_PER_EXPERT = 1
    g.REMOE.TARGET_K = 1
    g.MOEPP.K = 1
    g.TEST_ROUTING = "dataset"
    return c


def router_setting(cfg, router: str) -> str:
    g = cfg.MODEL.GEM
    return {
        "dense": "plain FFN, MOE_LAYERS []",
        "dense-moe": "MoEFFN, 1 expert",
        "gem": f"mapping {[row[0] for row in g.MAPPING]}, k=1",
        "topk": f"K=1, cf {g.TOPK.CAPACITY_FACTOR}",
        "softmoe": "1 slot/expert",
        "remoe": "TARGET_K=1",
        "moepp": f"K=1, +{g.MOEPP.NUM_ZERO}z/{g.MOEPP.NUM_COPY}c/{g.MOEPP.NUM_CONSTANT}k",
        "damex": f"top-1, cf {g.DAMEX.CAPACITY_FACTOR}",
    }[router]


# ---------------------------------------------------------------------------------------------- model


def build_router_model(cfg, router: str, seed: int, reference=None):
    """Model + optimizer of one row, seeded; with ``reference`` (the dense model) its weights copied in."""
    import torch
    from detectron2.modeling import build_model

    from gem_d2.engine import build_gem_optimizer

    torch.manual_seed(seed)
    model = build_model(router_cfg(cfg, router))
    if reference is not None:
        copy_dense_weights(reference, model)
    model.train()
    return model, build_gem_optimizer(cfg, model)


def copy_dense_weights(dense, model) -> None:
    """Every tensor of ``model`` that ``dense`` has with the same name and shape, and every expert of each
    MoE layer from the dense FFN at the same place: the models then differ only in their routers."""
    import torch

    from gem_d2.layers.mlp import FFN
    from gem_d2.modeling.moe import MoEFFN

    dense_modules = dict(dense.named_modules())
    own = model.state_dict()
    shared = {k: v for k, v in dense.state_dict().items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(shared, strict=False)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, MoEFFN):
                src = dense_modules.get(name)
                if isinstance(src, FFN):
                    module.load_from_ffn(src)


def make_step(model, optimizer, batch, device, amp_dtype=None):
    """One training step on ``batch``: forward, losses, zero_grad, backward, optimizer step; returns the loss."""
    import torch

    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16) if amp_dtype is not None else None

    def step() -> float:
        with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            losses = model(batch)
            loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
        return loss.detach()

    return step


def ffn_evals_per_token(model, batch) -> float:
    """FFN rows computed by the MoE layers' expert banks / valid tokens entering them (one no-grad forward).
    Per-image dispatch also computes padded tokens (then multiplies their outputs by 0), so with padding this
    exceeds k.

    1.0 for a plain-FFN model by definition (every token of every FFN layer goes through one FFN)."""
    import torch

    from gem_d2.modeling.moe import MoEFFN
    from gem_d2.modeling.moe.ffn_count import count_ffn_evaluations

    layers = [m for m in model.modules() if isinstance(m, MoEFFN)]
    if not layers:
        return 1.0
    count_ffn_evaluations(model)  # the banks' own row counter (GEMDINO installs it already; idempotent)
    counts = {"rows": 0, "tokens": 0}

    def add_layer_counts(module, inputs, output):  # after the counter's own hook; before the next call resets it
        x, ctx = inputs[0], inputs[1]
        n = x.shape[0] * x.shape[1]
        if ctx.key_padding_mask is not None:
            n -= int(ctx.key_padding_mask.sum())
        counts["tokens"] += n
        counts["rows"] += module.experts.ffn_rows

    handles = [layer.register_forward_hook(add_layer_counts) for layer in layers]
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return counts["rows"] / max(counts["tokens"], 1)


# ---------------------------------------------------------------------------------------------- run


def batch_summary(batch) -> list:
    return [{"dataset": x.get("dataset_name"), "dataset_id": int(x["dataset_id"]), "hw": list(x["image"].shape[1:]),
             "boxes": len(x["instances"])} for x in batch]


def run(args) -> dict:
    """Run the benchmark (or, with ``--probe-spec``, one memory probe in this subprocess)."""
    from benchmarks.step_memory import measure_memory, run_probe

    if args.probe_spec:
        return run_probe(args.probe_spec)
    import torch

    import gem_d2  # noqa: F401  (shims and registrations before detectron2)
    from gem_d2.data import build_gem_train_loader
    from gem_d2.engine.setup import prepare_datasets

    # isort: split
    from detectron2.utils.env import seed_all_rng

    set_threads(args.threads)
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    routers = [BASE] + [r for r in ROUTERS if r in args.routers and r != BASE]
    cfg = base_cfg(args.config_file, args.opts, args.device, args.seed)
    prepare_datasets(cfg)
    device = torch.device(cfg.MODEL.DEVICE)
    amp = autocast_dtype(cfg, args.amp)  # a clear error off CUDA
    t0 = time.perf_counter()
    seed_all_rng(args.seed)  # the mapper's augmentation draws from numpy's and Python's global generators
    batch = next(iter(build_gem_train_loader(cfg)))  # one real batch, reused by every router and step
    print(f"batch: {len(batch)} images from the synth training loader "
          f"({', '.join(str(x.get('dataset_name')) for x in batch)}), {time.perf_counter() - t0:.1f} s", flush=True)

    models, steps, info = {}, {}, {}
    for r in routers:
        model, optimizer = build_router_model(cfg, r, args.seed, models.get(BASE))
        models[r] = model
        steps[r] = make_step(model, optimizer, batch, device, amp)
        torch.manual_seed(args.seed)
        info[r] = {
            "setting": router_setting(cfg, r),
            "params": sum(p.numel() for p in model.parameters()),
            "expert_params": sum(p.numel() for n, p in model.named_parameters() if ".experts." in n),
            "ffn_evals_per_token": ffn_evals_per_token(model, batch),
        }
    print(f"built {len(routers)} models; warm-up {args.warmup} step(s) each", flush=True)
    losses = {r: [] for r in routers}
    for w in range(args.warmup):
        for r in routers:
            torch.manual_seed(args.seed + w)
            losses[r].append(float(steps[r]()))

    wall = {r: [] for r in routers}
    cpu = {r: [] for r in routers}
    for rep in range(args.repeats):
        shift = rep % len(routers)
        for r in routers[shift:] + routers[:shift]:  # round-robin, rotating the first router
            torch.manual_seed(args.seed + args.warmup + rep)
            loss, w, c = timed(steps[r], device)
            wall[r].append(w)
            cpu[r].append(c)
            losses[r].append(float(loss))
        print(f"round {rep + 1}/{args.repeats}: " + ", ".join(f"{r} {wall[r][-1]:.0f}" for r in routers) + " ms",
              flush=True)
    for r in routers:
        bad = [v for v in losses[r] if not torch.isfinite(torch.tensor(v))]
        if bad:
            raise FloatingPointError(f"router {r}: non-finite training loss {bad[0]}")
    del models, steps

    memory = {}
    if args.memory_jobs > 0:
        print(f"peak memory: {len(routers)} subprocesses, {args.memory_jobs} at a time", flush=True)
        with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
            batch_file = os.path.join(tmp, "batch.pt")
            torch.save(batch, batch_file)
            memory = measure_memory(args, routers, batch_file, str(device))

    base_wall, base_cpu = statistics.median(wall[BASE]), statistics.median(cpu[BASE])
    rows = []
    for r in routers:
        mw, mc = statistics.median(wall[r]), statistics.median(cpu[r])
        row = dict(router=r, **info[r], wall_ms=wall[r], cpu_ms=cpu[r], median_ms=mw, cpu_median_ms=mc,
                   min_ms=min(wall[r]), max_ms=max(wall[r]),
                   ratio=1.0 if r == BASE else mw / base_wall, cpu_ratio=1.0 if r == BASE else mc / base_cpu,
                   paired_ratio=1.0 if r == BASE else statistics.median(a / b for a, b in zip(wall[r], wall[BASE])),
                   paired_ratios=[a / b for a, b in zip(wall[r], wall[BASE])],
                   first_loss=losses[r][0], last_loss=losses[r][-1])
        if r in memory:
            m = memory[r]
            row["memory"] = m
            row["peak_mib"], row["step_mib"] = m["peak_mib"], m["step_mib"]
            row["step_mib_ratio"] = 1.0 if r == BASE else m["step_mib"] / memory[BASE]["step_mib"]
        rows.append(row)

    header = (f"{'router':<10} {'setting':<29} {'params':>10} {'FFN/tok':>7} {'step ms':>8} {'x dense':>7} "
              f"{'paired':>7} {'CPU ms':>8} {'x dense':>7} {'peak MiB':>9} {'step MiB':>9} {'x dense':>7}")
    print(header)
    print("-" * len(header))
    for row in rows:
        mem = (f" {row['peak_mib']:>9.0f} {row['step_mib']:>9.0f} {row['step_mib_ratio']:>7.2f}"
               if "memory" in row else f" {'-':>9} {'-':>9} {'-':>7}")
        print(f"{row['router']:<10} {row['setting']:<29} {row['params']:>10,} {row['ffn_evals_per_token']:>7.2f} "
              f"{row['median_ms']:>8.0f} {row['ratio']:>7.3f} {row['paired_ratio']:>7.3f} {row['cpu_median_ms']:>8.0f} "
              f"{row['cpu_ratio']:>7.3f}"
              + mem)
    gem = next((row for row in rows if row["router"] == "gem"), None)
    if gem is not None:
        verdict = "met" if gem["ratio"] <= 1.05 else "NOT met"
        print(f"gem / dense step time: {gem['ratio']:.3f} wall, {gem['cpu_ratio']:.3f} CPU, "
              f"{gem['paired_ratio']:.3f} paired (target <= 1.05: {verdict})")

    report = {
        "benchmark": "step", "config_file": args.config_file, "opts": list(args.opts),
        "device": str(device), "device_name": device_name(device), "amp": str(amp) if amp else None,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed, "statistic": "median",
        "schedule": "round-robin over routers per repeat, first router rotating",
        "base": BASE, "num_experts": int(cfg.MODEL.GEM.NUM_EXPERTS), "moe_layers": list(cfg.MODEL.GEM.MOE_LAYERS),
        "units": list(cfg.MODEL.GEM.UNITS), "mapping": [list(m) for m in cfg.MODEL.GEM.MAPPING],
        "batch": batch_summary(batch),
        "load_average": load_average(),
        "gem_ratio": gem["ratio"] if gem else None, "gem_target": 1.05,
        "rows": rows,
    }
    if args.output:
        write_json(args.output, report)
        print(f"wrote {args.output}")
    return report
