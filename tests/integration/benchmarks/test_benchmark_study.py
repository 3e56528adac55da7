"""benchmarks.study (``tools/benchmark.py study``): its statistics, and the router comparison end to end at
--quick size through the dispatcher."""
import gem_d2  # noqa: F401,I001  (compat shims before detectron2)

import json
import math

import numpy as np
import pytest

from benchmarks import study
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
    assert "ahead on 2/3 seeds" in study.verdict_text(v)


@pytest.mark.slow
def test_study_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["study", "--quick", "--routers", "gem,dense,damex", "--output-dir", str(out)]
    main(argv)
    result = json.loads((out / "study.json").read_text())
    assert result["routers"] == ["gem", "dense", "damex"] and result["seeds"] == [0, 1] and result["quick"]
    assert len(result["runs"]) == 6
    domains = result["domains"]
    assert len(domains) == 5 and study.RARE in domains
    for r in result["routers"]:
        s = result["summary"][r]
        for d in domains:
            mean, std = s["ap50"][d]
            assert 0.0 <= mean <= 100.0 and std >= 0.0
        runs = [x for x in result["runs"] if x["router"] == r]
        # the average is the unweighted mean of the per-domain AP50s of each run
        for x in runs:
            assert x["avg_ap50"] == pytest.approx(np.mean([x["ap50"][d] for d in domains]), abs=1e-9)
        assert s["avg_ap50"][0] == pytest.approx(np.mean([x["avg_ap50"] for x in runs]))
    # dense has no expert layer; gem's fixed mapping sends each dataset to one of 4 experts
    assert result["summary"]["dense"]["mi_bits"] == {}
    gem_mi = result["summary"]["gem"]["mi_bits"]["decoder.0"][0]
    assert 0.5 < gem_mi <= 2.0 + 1e-9
    assert [v["baseline"] for v in result["verdicts"]] == ["dense", "damex"]
    text = (out / "study.md").read_text()
    assert "GEM" in text and "vs **damex**" in text and "rare domain" in text
    assert (out / "study_ap50.png").stat().st_size > 0 and (out / "study_specialisation.png").stat().st_size > 0
    # a second invocation finds every run finished and reproduces the same table without training
    capsys.readouterr()
    main(argv)
    printed = capsys.readouterr().out
    assert "training 2 iterations" not in printed and printed.count("finished earlier") == 6
    again = json.loads((out / "study.json").read_text())
    assert again["summary"] == result["summary"]
    assert again["minutes"] < 0.5


def test_study_rejects_unknown_router(tmp_path):
    with pytest.raises(SystemExit, match="unknown"):
        main(["study", "--quick", "--routers", "gem,bogus", "--output-dir", str(tmp_path)])
