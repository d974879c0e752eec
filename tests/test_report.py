"""`dice report`: n per cell, no std from one run, keys only some runs have are not swept, results found by
their manifests' run wherever out= put them, and report.png's panels."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import FAST
from dice_cli import plots


def fake_run(path, config, final=None, status="complete"):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    m = {"kind": "train", "status": status}
    if final is not None:
        m["final"] = {"probe_acc": final}
    (path / "manifest.json").write_text(json.dumps(m))
    return path


def fake_estimate(path, run, method, overall, per_hop, status="complete"):
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"kind": "estimate", "status": status, "run": str(run.resolve()),
                                                    "method": method}))
    (path / "alignment.json").write_text(json.dumps({
        "method": method, "overall": {"spearman": overall},
        "per_hop": {h: {"spearman": v} for h, v in per_hop.items()}}))


@pytest.fixture
def study(tmp_path):
    s = tmp_path / "study"
    r0 = fake_run(s / "r0", {"seed": 0, "lr": 0.1, "nodes": 4}, 0.5)
    fake_run(s / "r1", {"seed": 1, "lr": 0.1, "nodes": 4}, 0.7)
    fake_run(s / "r2", {"seed": 0, "lr": 0.2, "nodes": 4, "extra": {"key": 3}}, 0.9)
    # an estimate written with a custom out=, far from its run and under a misleading folder name
    fake_estimate(s / "elsewhere/first_order_of_r2", r0, "exact", 0.9, {"0": 0.95, "1": 0.8})
    fake_estimate(s / "r1/estimate", s / "r1", "exact", 0.1, {"0": 0.1}, status="running")
    return s


def test_report_counts_every_cell_and_needs_two_runs_for_a_std(dice, study, monkeypatch):
    figs = []
    real = plots.report_plot
    monkeypatch.setattr(plots, "report_plot", lambda *a, **k: figs.append(real(*a, **k)) or figs[-1])
    code, out, err = dice("report", str(study))
    assert code == 0, err
    rep = pd.read_csv(study / "report/report.csv")
    assert list(rep["lr"]) == [0.1, 0.2] and list(rep["n_runs"]) == [2, 1]
    a, b = rep.iloc[0], rep.iloc[1]
    assert a["final_acc_mean"] == pytest.approx(0.6) and a["final_acc_n"] == 2
    assert a["final_acc_std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert b["final_acc_n"] == 1 and np.isnan(b["final_acc_std"])            # one run: no std, not 0
    assert a["spearman_exact_n"] == 1 and np.isnan(a["spearman_exact_std"])  # the custom-out estimate of r0
    assert a["spearman_exact_mean"] == pytest.approx(0.9) and a["spearman_exact_hop1_mean"] == pytest.approx(0.8)
    assert b["spearman_exact_n"] == 0
    md = (study / "report/report.md").read_text()
    row_a = next(l for l in md.splitlines() if l.startswith("| 0.1 |"))
    row_b = next(l for l in md.splitlines() if l.startswith("| 0.2 |"))
    assert "0.600 ± 0.141" in row_a and "0.900 (n=1 of 2)" in row_a
    assert "| 0.900 |" in row_b and "± 0.000" not in row_b and "— (0 of 1 runs)" in row_b
    # keys only some runs have are not swept (and so not grouped by); they are named
    assert "swept keys: lr, seed." in md and "extra.key" not in md.split("\n\n")[1]
    assert "keys only some runs have" in md and "extra.key" in md
    # the running estimate is left out, and said so
    assert "r1/estimate" in md and "'running'" in md
    runs = pd.read_csv(study / "report/runs.csv")
    assert runs.set_index("run").loc[str(study / "r2"), "extra.key"] == 3
    # report.png: points with error bars, one panel per metric, the hops of one method in one panel
    fig = figs[-1]
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["final_acc", "alignment of exact with gt (Spearman)"]
    acc = next(ax for ax in fig.axes if ax.get_title() == "final_acc")
    assert not acc.patches                                                   # no bars from zero
    assert acc.get_xlim()[0] > 0.3
    assert any("n=1/2" in t.get_text() for t in fig.axes[1].texts)


def test_nothing_swept_still_reports_n(dice, tmp_path):
    s = tmp_path / "s"
    fake_run(s / "a", {"seed": 0, "lr": 0.1}, 0.5)
    code, out, err = dice("report", str(s))
    assert code == 0, err
    rep = pd.read_csv(s / "report/report.csv")
    assert len(rep) == 1 and rep["n_runs"][0] == 1 and rep["final_acc_n"][0] == 1
    assert "| 1 | 0.500 |" in (s / "report/report.md").read_text()


def test_report_finds_real_results_written_with_custom_out(dice, tmp_path):
    base = [*FAST, "topology=exponential", "lr=0.05"]
    assert dice("train", *base, "out=study/a")[0] == 0
    assert dice("train", *base, "seed=1", "out=study/b")[0] == 0
    sel = ["hops=1", "rounds=3", "progress=false"]
    assert dice("gt", "run=study/a", *sel, "out=study/influence/a_truth")[0] == 0
    code, _, err = dice("estimate", "run=study/a", *sel, "gt=study/influence/a_truth", "method=exact",
                        "out=study/influence/a_est")
    assert code == 0, err
    assert dice("detect", "run=study/b", "window=3", "progress=false", "out=study/det_b")[0] == 0
    code, out, err = dice("report", "study")
    assert code == 0, err
    runs = pd.read_csv(tmp_path / "study/report/runs.csv").set_index("run")
    a, b = runs.loc["study/a"], runs.loc["study/b"]
    est = json.loads((tmp_path / "study/influence/a_est/alignment.json").read_text())
    assert a["spearman_exact"] == pytest.approx(est["overall"]["spearman"])
    assert not np.isnan(a["gt_mean_abs_hop1"]) and np.isnan(b["gt_mean_abs_hop1"])
    rep = pd.read_csv(tmp_path / "study/report/report.csv")
    assert rep["spearman_exact_n"][0] == 1 and rep["n_runs"][0] == 2
    assert "(n=1 of 2)" in (tmp_path / "study/report/report.md").read_text()
