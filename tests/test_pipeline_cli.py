"""`dice detect`, `dice pipeline` and `dice report` end to end through the CLI."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import FAST

SMALL = ["nodes=6", "rounds=12", "batch_size=8", "progress=false", "influence.rounds=every:6",
         "influence.hops=1", "detect.window=6"]


def test_detect_without_attack_explains_and_writes_tables(dice, tmp_path):
    assert dice("train", *FAST, "rounds=10", "out=run")[0] == 0
    code, out, err = dice("detect", "run=run", "window=5", "progress=false")
    assert code == 0, err
    d = tmp_path / "run/detect"
    summary = json.loads((d / "summary.json").read_text())
    assert summary["roc_auc"] is None and "no attack" in summary["note"]
    assert summary["window"] == [5, 10]
    pairs = pd.read_csv(d / "pairs.csv")
    w = np.load(tmp_path / "run/mixing.npy")
    assert len(pairs) == int(((w > 0) & ~np.eye(4, dtype=bool)).sum())   # every edge, no self pairs
    rounds = pd.read_csv(d / "rounds.csv")
    assert sorted(rounds["round"].unique()) == [5, 6, 7, 8, 9]
    assert set(pd.read_csv(d / "senders.csv").columns) >= {"sender", "score", "flagged", "anomalous"}
    assert (d / "topology.png").exists() and not (d / "roc.png").exists()


@pytest.mark.parametrize("args, needle", [(["window=0"], "window=0"), (["window=11"], "window=11"),
                                          (["window=7:3"], "window='7:3'"), (["score=gt"], "score='gt'"),
                                          (["normalize=zscore"], "normalize='zscore'")])
def test_detect_bad_input_exits_2(dice, tmp_path, args, needle):
    assert dice("train", *FAST, "rounds=10", "out=run")[0] == 0
    code, out, err = dice("detect", "run=run", "progress=false", *args)
    assert code == 2 and needle in out + err
    assert not (tmp_path / "run/detect").exists()


def test_pipeline_runs_every_stage_and_resumes_as_done(dice, tmp_path):
    code, out, err = dice("pipeline", *SMALL, "out=p")
    assert code == 0, err
    p = tmp_path / "p"
    for f in ["pipeline.yaml", "gt/influence.csv", "estimate_exact/alignment.json",
              "estimate_first_order/alignment.json", "detect/summary.json", "metrics.csv"]:
        assert (p / f).exists(), f
    gt = pd.read_csv(p / "gt/influence.csv")
    assert sorted(gt["round"].unique()) == [0, 6]
    code, out, _ = dice("pipeline", *SMALL, "out=p")
    assert code == 0 and out.count("nothing to do") == 5   # train, gt, 2 estimates, detect


def test_pipeline_stages_are_skippable(dice, tmp_path):
    assert dice("pipeline", *SMALL, "stages=[train,detect]", "out=p")[0] == 0
    assert (tmp_path / "p/detect/summary.json").exists()
    assert not (tmp_path / "p/gt").exists() and not (tmp_path / "p/estimate_exact").exists()
    code, _, err = dice("pipeline", *SMALL, "stages=[train,predict]", "out=q")
    assert code == 2 and "predict" in err


def test_report_groups_swept_keys_and_averages_seeds(dice, tmp_path):
    code, _, err = dice("pipeline", "-m", *SMALL, "stages=[train,gt,estimate]", "methods=[exact]",
                        "seed=0,1", "topology=ring,complete")
    assert code == 0, err
    sweep = next((tmp_path / "outputs/multirun/pipeline").iterdir())
    code, out, err = dice("report", str(sweep))
    assert code == 0, err
    rep = pd.read_csv(sweep / "report/report.csv")
    runs = pd.read_csv(sweep / "report/runs.csv")
    assert len(runs) == 4 and set(rep["topology.name"]) == {"ring", "complete"}
    assert (rep["n_runs"] == 2).all()
    for topo in ["ring", "complete"]:
        vals = runs[runs["topology.name"] == topo]["final_acc"]
        row = rep[rep["topology.name"] == topo].iloc[0]
        assert row["final_acc_mean"] == pytest.approx(vals.mean())
        assert row["final_acc_std"] == pytest.approx(vals.std(ddof=1))
    assert "spearman_exact_hop1_mean" in rep.columns
    md = (sweep / "report/report.md").read_text()
    assert "| topology.name | runs | final_acc |" in md and " ± " in md
    assert (sweep / "report/report.png").exists()
    code, _, err = dice("report", str(sweep))
    assert code == 2 and "--overwrite" in err


def test_report_bad_input_exits_2(dice, tmp_path):
    code, _, err = dice("report", "nowhere")
    assert code == 2 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    code, _, err = dice("report", "empty")
    assert code == 2 and "no dice train/pipeline runs" in err


@pytest.mark.slow
def test_submitit_local_pipeline_sweep_and_report(dice, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    code, out, err = dice("pipeline", "-m", "hydra/launcher=submitit_local", *SMALL,
                          "stages=[train,detect]", "seed=0,1")
    assert code == 0, out + err
    sweep = next((tmp_path / "outputs/multirun/pipeline").iterdir())
    code, out, err = dice("report", str(sweep))
    assert code == 0, err
    assert len(pd.read_csv(sweep / "report/runs.csv")) == 2


def test_attacked_pipeline_sweep_reports_detection_auc(dice, tmp_path):
    code, _, err = dice("pipeline", "-m", "nodes=8", "rounds=40", "batch_size=8", "progress=false",
                        "dtype=float64", "topology=exponential", "stages=[train,detect]",
                        "attack=label_flip,sign_flip", "attack.count=1", "seed=0,1")
    assert code == 0, err
    sweep = next((tmp_path / "outputs/multirun/pipeline").iterdir())
    for summary in sweep.glob("*/detect/summary.json"):
        s = json.loads(summary.read_text())
        assert s["anomalous"] and s["roc_auc"] is not None
        assert s["roc_auc"] >= 6 / 7                       # the attacker ranks first or second of 8 senders
    code, out, err = dice("report", str(sweep))
    assert code == 0, err
    rep = pd.read_csv(sweep / "report/report.csv")
    assert set(rep["attack.name"]) == {"label_flip", "sign_flip"}
    assert (rep["roc_auc_mean"] >= 6 / 7).all() and (rep["n_runs"] == 2).all()
