"""benchmarks gpu (the one-command GPU check) off CUDA, its planned commands, and moe_layer at a tiny size."""
import gem_d2  # noqa: F401,I001  (compat shims before detectron2)

import argparse
import json

import pytest
import torch

from benchmarks import gpu
from benchmarks.cli import build_parser, main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_gpu_check_without_cuda_exits_with_a_clear_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["gpu", "--output-dir", str(tmp_path / "gpu")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no GPU check on this machine" in err and "nothing was run" in err
    assert not (tmp_path / "gpu").exists()


def test_gpu_check_plans_valid_commands_for_every_part(tmp_path):
    """Every benchmark command the check would run parses with the dispatcher (no stale flags)."""
    args = build_parser().parse_args(["gpu", "--quick"])
    jobs = gpu.plan(args, tmp_path)
    assert {j["part"] for j in jobs} == set(gpu.PARTS)
    names = [j["name"] for j in jobs]
    assert len(names) == len(set(names))
    for impl in ("pytorch", "ext"):  # both implementations, with and without AMP, for the model benchmarks
        for tag in ("fp32", "amp-bfloat16"):
            assert f"step-{tag}-{impl}" in names and f"inference-{tag}-{impl}" in names
    for job in jobs:
        cmd = job["cmd"]
        if cmd[1:3] == ["-m", "benchmarks"]:
            parsed = build_parser().parse_args(cmd[3:])
            if parsed.command != "gpu":  # the nccl part writes its record itself
                assert "--output" not in getattr(parsed, "opts", []) and parsed.output == job["json"]
            assert isinstance(parsed, argparse.Namespace) and parsed.command in ("msda", "moe_layer", "step",
                                                                                 "inference", "gpu")
        else:
            assert cmd[1] == "tools/train_net.py" and "MODEL.DEVICE" in cmd


def test_gpu_report_markdown_lists_parts_and_failures():
    report = {"context": {"date": "d", "machine": "m", "versions": "v", "command": "c"}, "msda_ext": "x",
              "parts": [{"name": "msda-fp32", "status": "ok", "seconds": 3.0, "log_tail": [],
                         "result": {"results": [{"size": "s", "forward_ms": 1.5, "levels": [[1, 2]]}]}},
                        {"name": "train", "status": "failed (1)", "seconds": 9.0, "result": None,
                         "log_tail": ["Traceback", "boom"]}]}
    text = gpu.markdown(report)
    assert "| msda-fp32 | ok | 3 |" in text and "| s | 1.5 |" in text
    assert "## train: failed (1)" in text and "boom" in text


def test_moe_layer_benchmark_tiny(tmp_path):
    out = tmp_path / "moe_layer.json"
    main(["moe_layer", "--shapes", "decoder", "--token-scale", "0.01", "--d-model", "16", "--d-ffn", "32",
          "--repeats", "2", "--warmup", "0", "--profile-steps", "1", "--output", str(out)])
    report = json.loads(out.read_text())
    rows = report["results"]
    cases = {(r["batch"], r["k"]) for r in rows}
    assert cases == {("uniform", 1), ("uniform", 2), ("mixed", 1), ("mixed", 2)}
    assert {r["variant"] for r in rows} == {"dense", "dense-again", "dense-k", "gem", "gem-per-token"}
    assert {r["k"] for r in rows if r["variant"] == "dense-k"} == {2}
    ops = {(r["batch"], r["k"], r["variant"]): r["operators"] for r in rows}
    assert ops[("uniform", 1, "dense")] == ops[("mixed", 2, "dense-again")] > 0
    assert ops[("uniform", 1, "gem")] < ops[("mixed", 1, "gem")]  # a mixed batch runs two experts
    assert all((r["ratio_vs_dense_k"] is not None) == (r["variant"].startswith("gem") and r["k"] == 2) for r in rows)
    assert all(r["tokens_per_image"] == 11 and r["median_ms"] > 0 for r in rows)
    assert all(r["ratio"] == 1.0 and r["ratio_ci95"] == [1.0, 1.0] for r in rows if r["variant"] == "dense")
    for r in rows:
        assert r["ratio_per_expert"] == pytest.approx(r["ratio"] / (r["k"] if r["variant"].startswith("gem") else 1))
    own = {(r["batch"], r["k"], r["variant"]): r["own_operators_ms"] for r in rows}
    assert own[("uniform", 1, "dense")] is None and own[("uniform", 1, "dense-again")] == {}
    assert "aten::select" in own[("uniform", 1, "gem")]  # an expert's slice of the stacked weights
    assert "aten::index" in own[("uniform", 1, "gem-per-token")]  # the gather the per-image path does not do
    assert "aten::index" not in own[("uniform", 1, "gem")] and "aten::index" not in own[("mixed", 2, "gem")]
    with pytest.raises(ValueError, match="needs a CUDA"):
        main(["moe_layer", "--amp", "bfloat16", "--output", str(tmp_path / "x.json")])
