"""`dice gt` and `dice estimate` end to end through the CLI: files, columns, alignment, bad input."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest


GT_COLUMNS = ["round", "source", "unit", "sample", "target", "hop", "distance", "influence", "loss_with",
              "loss_without"]
EST_COLUMNS = ["round", "source", "unit", "sample", "target", "hop", "distance", "influence", "method"]


@pytest.fixture
def run16(dice, tmp_path):
    code, _, err = dice("train", "nodes=16", "rounds=8", "batch_size=8", "progress=false", "dtype=float64",
                        "lr=0.05", "topology=exponential", "out=run")
    assert code == 0, err
    return tmp_path / "run"


def test_gt_and_estimate_write_tables_and_alignment(dice, run16):
    sel = ["run=run", "hops=2", "rounds=[2,5]", "progress=false"]
    code, out, err = dice("gt", *sel)
    assert code == 0, err
    gt = pd.read_csv(run16 / "gt/influence.csv")
    assert list(gt.columns) == GT_COLUMNS
    # 2 rounds x 16 sources x (1 direct + 2 hops x 16 targets)
    assert len(gt) == 2 * 16 * (1 + 2 * 16)
    assert set(gt["unit"]) == {"batch"} and (gt["sample"] == -1).all()
    assert np.allclose(gt.influence, gt.loss_with - gt.loss_without, atol=1e-15)
    direct = gt[gt.hop == 0]
    assert (direct.source == direct.target).all()
    summary = json.loads((run16 / "gt/summary.json").read_text())
    assert summary["noise_floor"]["null_unit_max_abs_gt"] == 0.0
    for f in ["decay.png", "heatmap.png", "manifest.json", "config.yaml"]:
        assert (run16 / "gt" / f).exists()

    for method in ["first_order", "exact"]:
        code, out, err = dice("estimate", *sel, f"method={method}", f"out=run/est_{method}")
        assert code == 0, err
        est = pd.read_csv(run16 / f"est_{method}/influence.csv")
        assert list(est.columns) == EST_COLUMNS and len(est) == len(gt) and set(est.method) == {method}
        report = json.loads((run16 / f"est_{method}/alignment.json").read_text())
        assert set(report) >= {"overall", "per_hop", "per_unit_total"}
        # exponential n=16: a batch reaches itself and 4 out-neighbours in one hop; the rest are exact zeros
        assert report["per_hop"]["1"]["n"] == 2 * 16 * 5
        assert report["per_hop"]["1"]["n_both_zero"] == 2 * 16 * 11
        assert report["per_hop"]["1"]["spearman"] > 0.9
        assert (run16 / f"est_{method}/alignment.png").exists()
    exact = json.loads((run16 / "est_exact/alignment.json").read_text())
    assert exact["per_hop"]["2"]["spearman"] > 0.95


def test_sample_units_sum_to_batch_unit_through_the_cli(dice, run16):
    base = ["run=run", "hops=1", "rounds=3", "sources=[4]", "progress=false"]
    assert dice("estimate", *base, "out=run/eb")[0] == 0
    assert dice("estimate", *base, "unit=sample", "out=run/es")[0] == 0
    b = pd.read_csv(run16 / "eb/influence.csv")
    s = pd.read_csv(run16 / "es/influence.csv")
    assert len(s) == 8 * len(b) and (s["sample"] >= 0).all()
    plan = np.load(run16 / "plan.npy")
    assert set(s["sample"]) == set(plan[3, 4])
    summed = s.groupby(["target", "hop"])["influence"].sum()
    assert np.allclose(summed.values, b.set_index(["target", "hop"])["influence"].loc[summed.index].values,
                       rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("args, needle", [
    (["run=nowhere"], "does not exist"),
    (["method=newton"], "method='newton'"),
    (["rounds=[99]"], "rounds must lie in [0, 7]"),
    (["hops=9"], "hops=9"),
    (["rounds=7", "hops=2"], "rounds must lie in [0, 6]"),
    (["unit=sample", "samples=[123456]"], "123456"),
    (["unit=token"], "unit='token'"),
    (["sources=[16]"], "16"),
])
def test_bad_selection_exits_2(dice, run16, args, needle):
    code, out, err = dice("estimate", "run=run", "progress=false", *args)
    assert code == 2, out + err
    assert needle in out + err
    assert not (run16 / "estimate").exists()


def test_incomplete_run_is_refused(dice, run16):
    (run16 / "plan.npy").unlink()
    code, _, err = dice("gt", "run=run", "progress=false")
    assert code == 2 and "missing plan.npy" in err


def test_gt_rerun_with_other_selection_is_refused(dice, run16):
    assert dice("gt", "run=run", "progress=false", "rounds=2")[0] == 0
    code, out, _ = dice("gt", "run=run", "progress=false", "rounds=2")
    assert code == 0 and "nothing to do" in out
    code, _, err = dice("gt", "run=run", "progress=false", "rounds=3")
    assert code == 2 and "overwrite=true" in err


def test_agreement_leaves_out_exact_zero_pairs():
    from dice_cli.influence.alignment import agreement

    x = np.array([0.0, 0.0, 0.0, 1.0, 2.0, 3.0, -1.0])
    y = np.array([0.0, 0.0, 0.5, 1.1, 1.9, 3.2, -0.8])
    a = agreement(x, y)
    assert a["n"] == 5 and a["n_both_zero"] == 2
    assert a["spearman"] == pytest.approx(1.0)          # ranks of [0,1,2,3,-1] and [.5,1.1,1.9,3.2,-.8] agree
    assert a["sign_agreement"] == 1.0                   # over pairs where both are non-zero


def test_paths_breakdown_sums_to_first_order(dice, run16):
    base = ["run=run", "hops=2", "rounds=3", "sources=[1,6]", "progress=false"]
    code, out, err = dice("estimate", *base, "paths=true", "out=run/ep")
    assert code == 0, err
    paths = pd.read_csv(run16 / "ep/paths.csv")
    est = pd.read_csv(run16 / "ep/influence.csv")
    assert list(paths.columns[:4]) == ["round", "source", "unit", "sample"]
    assert all(str(p).split(">")[0] == str(s) for p, s in zip(paths["path"], paths["source"]))
    summed = paths.groupby(["source", "target", "hop"])["value"].sum()
    ref = est.set_index(["source", "target", "hop"])["influence"]
    assert np.allclose(summed.values, ref.loc[summed.index].values, rtol=1e-9, atol=1e-15)
    code, _, err = dice("estimate", *base, "paths=true", "method=exact", "out=run/ex")
    assert code == 2 and "method=first_order" in err


def test_every_k_means_every_kth_round_not_only_checkpointed_ones():
    from dice_cli.influence.measure import parse_rounds

    assert parse_rounds("every:3", 10, 1, recorded=[0, 5, 10]) == [0, 3, 6, 9]
    assert parse_rounds("every:4", 10, 2) == [0, 4, 8]


def test_samples_of_the_wrong_type_exit_2(dice, run16):
    code, _, err = dice("gt", "run=run", "unit=sample", "samples=2.5", "progress=false")
    assert code == 2 and "samples=2.5" in err


def test_gt_for_another_run_in_the_same_out_is_refused(dice, run16, tmp_path):
    assert dice("train", "nodes=16", "rounds=8", "batch_size=8", "progress=false", "dtype=float64",
                "lr=0.05", "topology=exponential", "seed=1", "out=run2")[0] == 0
    assert dice("gt", "run=run", "rounds=2", "out=g", "progress=false")[0] == 0
    code, _, err = dice("gt", "run=run2", "rounds=2", "out=g", "progress=false")
    assert code == 2 and "run:" in err
