"""benchmarks step, inference and msda (``tools/benchmark.py <subcommand>``) end to end through the
dispatcher's main, at a tiny size.

A tiny GEM-DINO (hidden 32, 1+3 layers, 96 px, 10 queries, batch 2) on the session's small generated
data; one timed round, no warm-up. Checks the JSON: a row per router / per (routing, batch), positive
times, the dense row's ratios exactly 1.0, and peak memory from the per-router subprocesses.
"""
import gem_d2  # noqa: F401,I001  (compat shims before detectron2)

import json
import math

import pytest

from benchmarks.cli import main

ROUTERS = ["dense", "dense-moe", "gem", "topk", "softmoe", "remoe", "moepp", "damex"]


def _tiny_opts(summary):
    p = summary["params"]
    return [
        "DATASETS.SYNTH.ROOT", summary["root"], "DATASETS.SYNTH.IMAGES_PER_DOMAIN", str(p["images_per_domain"]),
        "DATASETS.SYNTH.TEST_IMAGES_PER_DOMAIN", str(p["test_images_per_domain"]),
        "DATASETS.SYNTH.IMAGE_SIZE", str(p["image_size"]), "DATASETS.SYNTH.SEED", str(p["seed"]),
        "MODEL.DINO.HIDDEN_DIM", "32", "MODEL.DINO.DIM_FEEDFORWARD", "64", "MODEL.DINO.ENC_LAYERS", "1",
        "MODEL.DINO.NUM_QUERIES", "10", "MODEL.DINO.DN_NUMBER", "10", "MODEL.DINO.NUM_SELECT", "20",
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "96",
        "INPUT.MAX_SIZE_TEST", "96", "SOLVER.IMS_PER_BATCH", "2",
    ]


def _positive(*values):
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


@pytest.mark.slow
def test_step_benchmark_rows_per_router(small_synth, tmp_path):
    out = tmp_path / "step.json"
    main(["step", "--repeats", "1", "--warmup", "0", "--memory-jobs", "0", "--output", str(out)]
         + _tiny_opts(small_synth))
    report = json.loads(out.read_text())
    rows = {r["router"]: r for r in report["rows"]}
    assert list(rows) == ROUTERS
    for r in rows.values():
        assert _positive(r["median_ms"], r["cpu_median_ms"], r["ratio"], r["cpu_ratio"], r["params"]), r
        assert len(r["wall_ms"]) == 1 and math.isfinite(r["last_loss"])
        assert "memory" not in r
    assert rows["dense"]["ratio"] == 1.0 and rows["dense"]["cpu_ratio"] == 1.0
    assert rows["dense"]["paired_ratio"] == 1.0
    # equal active FFN parameters per token: one FFN for dense and gem, at most one for the top-1 routers
    for name in ("dense", "dense-moe", "gem"):
        assert rows[name]["ffn_evals_per_token"] == 1.0
    for name in ("topk", "damex", "moepp", "softmoe"):
        assert 0 <= rows[name]["ffn_evals_per_token"] <= 1.0
    assert rows["gem"]["expert_params"] > 0 and rows["dense"]["expert_params"] == 0
    assert report["mapping"] == [[i % 4] for i in range(5)] and report["gem_ratio"] == rows["gem"]["ratio"]

    # peak memory: one subprocess per router (two here, to stay quick)
    out_mem = tmp_path / "step_mem.json"
    main(["step", "--repeats", "1", "--warmup", "0", "--routers", "gem", "--output", str(out_mem)]
         + _tiny_opts(small_synth))
    rows = {r["router"]: r for r in json.loads(out_mem.read_text())["rows"]}
    assert list(rows) == ["dense", "gem"]  # the ratio base is always measured
    for r in rows.values():
        assert _positive(r["peak_mib"], r["step_mib"], r["step_mib_ratio"]), r
        assert r["peak_mib"] >= r["step_mib"]
    assert rows["dense"]["step_mib_ratio"] == 1.0


def test_inference_benchmark_rows_per_setting(small_synth, tmp_path):
    out = tmp_path / "inference.json"
    main(["inference", "--repeats", "1", "--warmup", "0", "--pool", "8", "--classifier-images", "2",
          "--output", str(out)] + _tiny_opts(small_synth))
    report = json.loads(out.read_text())
    assert [(r["routing"], r["batch"]) for r in report["rows"]] == [("dataset", 1), ("dataset", 8), ("auto", 1),
                                                                    ("auto", 8)]
    for r in report["rows"]:
        assert _positive(r["median_ms"], r["p90_ms"], r["images_per_s"], r["cpu_median_ms"]), r
        assert r["p90_ms"] >= r["median_ms"] - 1e-9
        if r["routing"] == "auto":
            assert r["routed_images"] == r["batch"] and 0 <= r["routed_right"] <= 1
        else:
            assert r["routed_right"] is None
    assert report["auto_router"].startswith("fitted")


def test_inference_benchmark_amp_needs_cuda(small_synth, tmp_path):
    with pytest.raises(ValueError, match="SOLVER.AMP.ENABLED=True needs MODEL.DEVICE cuda"):
        main(["inference", "--amp", "--repeats", "1", "--output", str(tmp_path / "x.json")] + _tiny_opts(small_synth))
    assert not (tmp_path / "x.json").exists()


def test_msda_benchmark_small_case_and_amp_errors(tmp_path):
    from gem_d2.layers.ms_deform_attn import ext_status

    out = tmp_path / "msda.json"
    main(["msda", "--sizes", "small", "--attn", "decoder", "--repeats", "1", "--warmup", "0", "--output", str(out)])
    report = json.loads(out.read_text())
    assert report["amp"] is None and report["device"] == "cpu"
    impls = ["pytorch", "ext"] if ext_status()[0] is not None else ["pytorch"]  # ext: skipped with a reason
    assert list(report["skipped"]) == [i for i in ["ext"] if i not in impls]
    assert [(r["target"], r["impl"], r["queries"], r["tokens"]) for r in report["results"]] == [
        (t, i, 200, 1360) for t in ("core", "module") for i in impls]
    # small: 256 px -> levels 32x32, 16x16, 8x8, 4x4 = 1360 tokens
    assert report["results"][0]["levels"] == [[32, 32], [16, 16], [8, 8], [4, 4]]
    for r in report["results"]:
        assert _positive(r["forward_ms"], r["forward_backward_ms"], r["forward_cpu_ms"])
    with pytest.raises(ValueError, match="--amp float16 needs a CUDA --device, got 'cpu'"):
        main(["msda", "--amp", "float16", "--output", str(tmp_path / "y.json")])
    with pytest.raises(ValueError, match="--dtype float64"):
        main(["msda", "--amp", "float16", "--device", "cuda", "--dtype", "float64",
              "--output", str(tmp_path / "y.json")])
