"""benchmarks.study (``tools/benchmark.py study``): its statistics, and the router comparison end to end at
--quick size through the dispatcher."""
import gem_d2  # noqa: F401,I001  (compat shims before detectron2)

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks import study, study_report
from benchmarks.cli import main


def test_mutual_information_hand_computed():
    # independent dataset and expert: 0 bits
    assert study.mutual_information_bits([[2, 2], [1, 1]]) == pytest.approx(0.0, abs=1e-12)
    # a permutation with uniform datasets: log2(3) bits
    assert study.mutual_information_bits(np.eye(3)[[2, 0, 1]] * 7) == pytest.approx(math.log2(3))
    # p = [[1/2, 0], [1/4, 1/4]]: H(E) - H(E|D) = H(3/4) - 1/2 * 1
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert study.mutual_information_bits([[2, 0], [1, 1]]) == pytest.approx(h - 0.5)
    assert study.mutual_information_bits(np.zeros((2, 3))) == 0.0
    with pytest.raises(ValueError, match="non-negative 2-D"):
        study.mutual_information_bits([[1, -1]])


def test_verdict_words():
    v = study.verdict((50.0, 1.0), (40.0, 1.0))
    assert v["word"] == "beats" and v["beyond_spread"] and v["difference"] == 10.0
    v = study.verdict((40.0, 3.0), (41.0, 4.0))
    assert v["word"] == "does not beat" and not v["beyond_spread"] and v["spread"] == pytest.approx(5.0)
    assert v["seeds_compared"] == 0


def test_paired_seed_differences():
    # gem ahead of topk on seeds 0 and 2 only; seed 3 has no topk run and is not compared
    runs = {"gem": [{"seed": s, "avg_ap50": a} for s, a in ((0, 40.0), (1, 30.0), (2, 35.0), (3, 99.0))],
            "topk": [{"seed": s, "avg_ap50": a} for s, a in ((2, 34.0), (0, 38.5), (1, 31.0))]}
    diffs = study.paired_differences(runs, "topk", lambda x: x["avg_ap50"])
    assert diffs == pytest.approx([1.5, -1.0, 1.0])
    v = study.verdict((35.0, 5.0), (34.5, 3.5), diffs)
    assert (v["seeds_ahead"], v["seeds_compared"]) == (2, 3)
    assert "ahead on 2/3 seeds" in study_report.verdict_text(v) and v["paired"] == pytest.approx(diffs)
    assert v["paired_mean_std"][0] == pytest.approx(0.5)


def test_study_ffn_evaluations_are_the_hooks(tmp_path):
    """The FFN evaluations per token the study reports for a run are the expert-bank counter's values, averaged
    over the training steps, after the real routing-statistics hook and metrics writer."""
    import torch
    from detectron2.utils.events import EventStorage, JSONWriter

    from benchmarks.common import read_metrics
    from gem_d2.engine import RoutingStatsHook
    from gem_d2.modeling.moe import MoEFFN
    from gem_d2.modeling.moe.context import MoESpec, RoutingContext
    from gem_d2.modeling.moe.ffn_count import count_ffn_evaluations

    torch.manual_seed(0)
    layers = [MoEFFN(n, 8, 16, 0.0, "relu", MoESpec([n], 4, "remoe", {}, num_datasets=2))
              for n in ("decoder.0", "decoder.2")]
    model = torch.nn.ModuleList(layers)
    assert count_ffn_evaluations(model) == 2
    model.routing_stats = {}
    trainer = SimpleNamespace(model=model, iter=0)
    hook = RoutingStatsHook(20, ["a", "b"], str(tmp_path))
    hook.trainer = trainer
    writer = JSONWriter(str(tmp_path / "metrics.json"))
    hooked = {"decoder.0": [], "decoder.2": []}
    with EventStorage(0) as storage:
        trainer.storage = storage
        for it in range(45):  # windows of 20, 20 and 5 steps
            trainer.iter = storage.iter = it
            ctx = RoutingContext(dataset_ids=torch.tensor([0, 1]))
            x = torch.randn(2, 7, 8)
            for layer in layers:
                x = layer(x, ctx)
            model.routing_stats = {k: v.detach() for k, v in ctx.stats.items()}
            for name in hooked:
                hooked[name].append(float(ctx.stats[f"{name}/ffn_evals_per_token"]))
            hook.after_step()
            if (it + 1) % 20 == 0:
                writer.write()
        hook.after_train()
        writer.write()
    writer.close()
    got = study.ffn_evals_from_metrics(read_metrics(str(tmp_path / "metrics.json")))
    assert got == {name: pytest.approx(np.mean(values), rel=1e-12) for name, values in hooked.items()}
    assert len({round(v, 6) for v in hooked["decoder.0"]}) > 1  # ReMoE's count varies step to step
    # what the study collects for the run and prints in its table: the mean over the layers
    per = {"synth_photo_test": {"AP50_voc07": 10.0, "AP": 5.0}}
    (tmp_path / "results.json").write_text(json.dumps({"datasets": per, "average": per["synth_photo_test"]}))
    run = study.collect_run(str(tmp_path))
    want = np.mean([np.mean(v) for v in hooked.values()])
    assert run["ffn_evals"] == pytest.approx(want, rel=1e-12)
    run.update(router="remoe", seed=0, seconds=60.0, setting="5on2")
    part = study.summarize([run], ["remoe"], [0])
    part.update(study.SETTINGS["5on2"], run_minutes=1.0)
    row = next(line for line in study_report.setting_markdown("5on2", part) if line.startswith("| remoe |"))
    assert f"| {want:.2f} ± 0.00 |" in row


def test_study_end_mutual_information_reads_the_last_windows():
    records = [{"iteration": 19, "routing/decoder.0/a/expert0": 0.5, "routing/decoder.0/a/expert1": 0.5,
                "routing/decoder.0/b/expert0": 0.5, "routing/decoder.0/b/expert1": 0.5},
               {"iteration": 39, "routing/decoder.0/a/expert0": 1.0, "routing/decoder.0/b/expert1": 1.0}]
    counts = {"decoder.0": [[30, 10], [10, 30]]}  # P(dataset) = 1/2 each
    assert study.end_mutual_information(records, counts, ["a", "b"]) == {"decoder.0": pytest.approx(1.0)}
    assert study.end_mutual_information(records, counts, ["a", "b"], fraction=0.6)["decoder.0"] == pytest.approx(
        study.mutual_information_bits([[0.75, 0.25], [0.25, 0.75]]))


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 24 tiny runs, 2 at a time: ~3 min on 2 idle cores, several times that on a busy machine
def test_study_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "study"
    routers = list(study.QUICK_ROUTERS)  # one of each kind: no MoE, gem, hand map, capped gate, ablations, k = 2
    argv = ["study", "--quick", "--output-dir", str(out)]
    main(argv)
    result = json.loads((out / "study.json").read_text())
    assert result["routers"] == routers and result["seeds"] == [0, 1] and result["quick"]
    assert list(result["settings"]) == ["5on2", "5on4"]
    assert len(result["runs"]) == 2 * len(routers) * 2
    for name, part in result["settings"].items():
        domains = part["domains"]
        assert len(domains) == 5 and study.RARE in domains
        for r in routers:
            s = part["summary"][r]
            for d in domains:
                mean, std = s["ap50"][d]
                assert 0.0 <= mean <= 100.0 and std >= 0.0
            runs = [x for x in result["runs"] if x["router"] == r and x["setting"] == name]
            for x in runs:  # the average is the unweighted mean of the per-domain AP50s of each run
                assert x["avg_ap50"] == pytest.approx(np.mean([x["ap50"][d] for d in domains]), abs=1e-9)
                want_ffn = {"dense": 1.0, "gem_k2": 2.0}.get(r, None)
                if want_ffn is not None:
                    assert x["ffn_evals"] == pytest.approx(want_ffn)
                else:
                    assert 0.0 <= x["ffn_evals"] <= 1.0 + 1e-9  # compute-matched
            assert s["avg_ap50"][0] == pytest.approx(np.mean([x["avg_ap50"] for x in runs]))
        assert part["summary"]["dense"]["mi_bits"] == {}
        # gem's mapping sends the 5 domains to all experts: MI > 0 (at most log2 of the expert count)
        gem_mi = part["summary"]["gem"]["mi_bits"]["decoder.0"][0]
        assert 0.3 < gem_mi <= np.log2(2 if name == "5on2" else 4) + 1e-9
        assert "decoder.0" in part["summary"]["remoe"]["mi_end_bits"]
        kinds = {v["other"]: v["kind"] for v in part["verdicts"]}
        assert kinds == {r: "ablation" if r.startswith("gem_") else "baseline" for r in routers if r != "gem"}
        assert all(v["avg"]["seeds_compared"] == 2 for v in part["verdicts"])
        assert all(isinstance(v["same_grouping_seeds"], list) for v in part["verdicts"] if v["kind"] == "ablation")
    text = (out / "study.md").read_text()
    assert "vs **damex**" in text and "vs **gem_random**" in text and "rare domain" in text
    assert set(routers) >= {"gem", "dense", "damex", "gem_random", "gem_k2"}
    assert "GEM against each planner ablation" in text and "FFN/token" in text
    for fig in ("study_ap50.png", "study_paired.png", "study_specialisation_5on2.png",
                "study_specialisation_5on4.png"):
        assert (out / fig).stat().st_size > 0
    # a second invocation finds every run finished and reproduces the same tables without training
    capsys.readouterr()
    main(argv)
    printed = capsys.readouterr().out
    assert "training 2 iterations" not in printed and printed.count("finished earlier") == len(result["runs"])
    again = json.loads((out / "study.json").read_text())
    assert again["settings"] == result["settings"]
    assert again["minutes"] < 0.5


def test_study_rejects_unknown_router_and_setting(tmp_path):
    with pytest.raises(SystemExit, match="unknown"):
        main(["study", "--quick", "--routers", "gem,bogus", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown"):
        main(["study", "--quick", "--settings", "5on9", "--output-dir", str(tmp_path)])


def test_study_runs_are_compute_matched_and_damex_gets_a_hand_map():
    opts = study.run_opts("remoe", 1, 100, "/tmp/x", None, 160, "5on2")
    pairs = dict(zip(opts[::2], opts[1::2]))
    assert pairs["MODEL.GEM.NUM_EXPERTS"] == "2" and pairs["MODEL.GEM.REMOE.ACTIVE_CAP"] == "1.0"
    assert pairs["MODEL.GEM.MOEPP.K"] == pairs["MODEL.GEM.TOPK.K"] == "1"
    damex = dict(zip(*[iter(study.router_opts("damex", 4))] * 2))
    assert "synth_sketch_train', 0" in damex["MODEL.GEM.DAMEX.DATASET_TO_EXPERT"]  # sketch on photo's expert
    assert dict(zip(*[iter(study.router_opts("gem_k2", 2))] * 2))["MODEL.GEM.EXPERTS_PER_UNIT"] == "2"
