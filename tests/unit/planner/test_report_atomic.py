"""plan/ files are written atomically: a write that fails half-way keeps the previous file and leaves no partial one."""
import json

import numpy as np
import pytest
from matplotlib.figure import Figure

from gem_d2.planner import plan_mapping, report, write_report


def _plan():
    return plan_mapping(np.array([[0.9, 0.1], [0.2, 0.8]]), [1.0, 1.0], unit_names=["a", "b"], milp=False)


def test_a_failed_report_write_keeps_the_previous_files(tmp_path, monkeypatch):
    plan = _plan()
    paths = write_report(plan, str(tmp_path))
    before = {k: open(p, "rb").read() for k, p in paths.items()}
    assert json.loads(before["report"])["units_count"] == 2

    summary = report.plan_summary
    monkeypatch.setattr(report, "plan_summary", lambda p: dict(summary(p), later=object()))  # fails mid-dump
    with pytest.raises(TypeError):
        write_report(plan, str(tmp_path), heatmap=False)
    monkeypatch.setattr(report, "plan_summary", summary)

    real_savefig = Figure.savefig

    def crashing_savefig(self, fname, *args, **kwargs):
        real_savefig(self, fname, *args, **kwargs)
        if hasattr(fname, "truncate"):
            fname.truncate(10)
        else:
            with open(fname, "r+b") as f:
                f.truncate(10)
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", crashing_savefig)
    with pytest.raises(OSError, match="disk full"):
        write_report(plan, str(tmp_path))
    assert {k: open(p, "rb").read() for k, p in paths.items()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan_heatmap.png", "plan_report.json"]
