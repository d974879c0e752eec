"""`dice contrib` end to end through the CLI: files, columns, values against the value tables, the Shapley
baselines and their comparison with DICE, rerun safety, and every bad input (exit 2 with the fix)."""
from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pandas as pd
import pytest

from dice_cli import cli

COLUMNS = ["node", "given", "received", "self", "reciprocity", "ratio", "free_rider", "harmful"]
BASE = ["run=run", "progress=false"]
TRAIN = ["nodes=4", "rounds=6", "batch_size=8", "progress=false", "dtype=float64", "lr=0.05", "topology=exponential"]


def _cli(root, *args):
    cwd, argv = os.getcwd(), list(sys.argv)
    os.chdir(root)
    try:
        cli.main(list(args))
    except SystemExit as e:
        assert not e.code, (args, e.code)
    finally:
        os.chdir(cwd)
        sys.argv = argv


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny float64 run where node 1 is a free rider (sends update 0), with gt, exact and first_order node
    value tables: made once per module, copied per test."""
    root = tmp_path_factory.mktemp("contrib_run")
    _cli(root, "train", *TRAIN, "attack=free_rider", "attack.nodes=[1]", "out=run")
    _cli(root, "value", "run=run", "progress=false", "method=gt", "out=run/value_gt")
    _cli(root, "value", "run=run", "progress=false")
    _cli(root, "value", "run=run", "progress=false", "method=first_order", "out=run/value_fo")
    return root / "run"


@pytest.fixture
def run4(tmp_path, trained):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def _influence(d):
    t = pd.read_csv(d / "influence.csv")
    V = np.zeros((4, 4))
    V[t.source, t.target] = -t.influence
    return V


def test_accounting_and_exact_shapley_end_to_end(dice, run4):
    code, out, err = dice("contrib", *BASE, "valuation=shapley_exact")
    assert code == 0, err
    d = run4 / "contrib"
    c = pd.read_csv(d / "contributions.csv")
    assert list(c.columns) == COLUMNS and c.node.tolist() == [0, 1, 2, 3]
    V = _influence(run4 / "value")                                   # the default table: exact
    off = V - np.diag(np.diag(V))
    np.testing.assert_allclose(c.given, off.sum(1), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(c.received, off.sum(0), rtol=1e-12)
    np.testing.assert_allclose(c["self"], np.diag(V), rtol=1e-12)
    np.testing.assert_allclose(c.reciprocity, c.given - c.received, rtol=1e-12, atol=1e-300)
    m = pd.read_csv(d / "matrix.csv")
    assert list(m.columns) == ["source", "0", "1", "2", "3"]
    np.testing.assert_allclose(m[["0", "1", "2", "3"]].to_numpy(), V, rtol=1e-15)
    # the free rider's data does nothing: it gives 0 and is flagged; its data Shapley value is 0
    assert c.given[1] == 0.0 and c.free_rider.tolist() == [False, True, False, False] and not c.harmful.any()
    sh = pd.read_csv(d / "shapley.csv")
    assert list(sh.columns) == ["node", "value", "stderr"] and (sh.stderr == 0).all()
    assert abs(sh.value[1]) <= 1e-12 * sh.value.abs().max()
    s = json.loads((d / "summary.json").read_text())
    assert s["coalitions"] == 16 and s["seconds"] > 0 and s["valuation"] == "shapley_exact"
    assert s["utility_all"] > s["utility_empty"]
    assert abs(sh.value.sum() - (s["utility_all"] - s["utility_empty"])) < 1e-10 * abs(s["utility_all"])
    assert s["attack"]["name"] == "free_rider" and s["attack"]["nodes"] == [1]
    assert s["free_riders"] == [1] and len(s["ranks"]["given"]) == 4 and s["ranks"]["given"][1] == 4
    assert s["gini"]["given"] is not None and 0 <= s["gini"]["given"] <= 1
    # comparison: every DICE table of the run against LOO and the Shapley values; gt is LOO by definition
    comp = pd.read_csv(d / "comparison.csv")
    assert set(comp.dice) == {"gt", "exact", "first_order"} and set(comp.reference) == {"loo", "shapley_exact"}
    assert comp.columns.tolist()[:3] == ["dice", "table", "reference"]
    row = comp[(comp.dice == "gt") & (comp.reference == "loo")].iloc[0]
    assert row.spearman == pytest.approx(1.0) and row.kendall == pytest.approx(1.0)
    np.testing.assert_allclose(_influence(run4 / "value_gt").sum(1), s["loo"]["values"], rtol=1e-10)
    assert (comp.reference_coalitions[comp.reference == "shapley_exact"] == 16).all()
    for f in ["values.png", "flows.png", "lorenz.png", "graph.png", "comparison.png", "manifest.json", "config.yaml"]:
        assert (d / f).exists(), f
    assert json.loads((d / "manifest.json").read_text())["status"] == "complete"
    # rerun: nothing to do; other keys into the same directory are refused
    assert "nothing to do" in dice("contrib", *BASE, "valuation=shapley_exact")[1]
    code, _, err = dice("contrib", *BASE, "valuation=loo")
    assert code == 2 and "different config" in err


def test_accounting_only_participants_mc_and_heldout(dice, run4):
    code, _, err = dice("contrib", *BASE, "value=run/value_gt", "out=run/c_gt")
    assert code == 0, err
    d = run4 / "c_gt"
    assert not (d / "shapley.csv").exists() and not (d / "comparison.csv").exists()
    c = pd.read_csv(d / "contributions.csv")
    V = _influence(run4 / "value_gt")
    np.testing.assert_allclose(c.given, (V - np.diag(np.diag(V))).sum(1), rtol=1e-12, atol=1e-300)
    assert json.loads((d / "summary.json").read_text())["value_method"] == "gt"

    code, _, err = dice("contrib", *BASE, "valuation=shapley_mc", "player=participant", "utility=honest",
                        "budget=40", "tolerance=0.02", "out=run/c_mc")
    assert code == 0, err
    s = json.loads((run4 / "c_mc/summary.json").read_text())
    assert s["player"] == "participant" and s["utility"] == "honest" and s["coalitions"] <= 40
    assert s["stopped"] == "tolerance" and s["permutations"] >= 10 and s["coalitions"] <= 2 ** 4
    sh = pd.read_csv(run4 / "c_mc/shapley.csv")
    span = s["utility_all"] - s["utility_empty"]
    assert (sh.stderr <= 0.02 * abs(span)).all() and (sh.stderr > 0).any() and np.isfinite(sh.value).all()

    # heldout losses: the gt table measured there is LOO measured there, and is compared under its label
    code, _, err = dice("value", *BASE, "method=gt", "eval=heldout", "out=run/value_gt_held")
    assert code == 0, err
    assert "eval: heldout" in (run4 / "value_gt_held/config.yaml").read_text()
    assert "eval" not in (run4 / "value_gt/config.yaml").read_text()          # the default stays out of the identity
    code, _, err = dice("contrib", *BASE, "valuation=loo", "eval=heldout", "out=run/c_held")
    assert code == 0, err
    held = json.loads((run4 / "c_held/summary.json").read_text())
    assert held["eval"] == "heldout" and held["coalitions"] == 6
    comp = pd.read_csv(run4 / "c_held/comparison.csv")
    assert set(comp.dice) == {"gt", "exact", "first_order", "gt@heldout"} and set(comp.reference) == {"loo"}
    assert comp.set_index("dice").spearman["gt@heldout"] == pytest.approx(1.0)
    np.testing.assert_allclose(_influence(run4 / "value_gt_held").sum(1), held["loo"]["values"], rtol=1e-10)
    assert dice("value", *BASE, "method=first_order", "out=run/v_again")[0] == 0
    assert "nothing to do" in dice("value", *BASE, "method=first_order", "eval=probe", "out=run/v_again")[1]
    code, _, err = dice("contrib", *BASE, "valuation=loo", "out=run/c_probe")
    assert code == 0, err
    assert json.loads((run4 / "c_probe/summary.json").read_text())["utility_all"] != held["utility_all"]


def test_bad_inputs_exit_2_with_the_fix(dice, run4, tmp_path):
    assert dice("value", *BASE, "unit=batch", "method=first_order", "out=run/vb")[0] == 0
    assert dice("value", *BASE, "targets=network", "out=run/vn")[0] == 0
    assert dice("value", *BASE, "sources=[0,2]", "out=run/vs")[0] == 0
    cases = [
        (["value=run/vb"], ["batch units", "unit=node"]),
        (["value=run/vn"], ["targets=network", "targets=all"]),
        (["value=run/vs"], ["covers 8 of the 4 × 4", "sources=all"]),
        (["value=run/nothing"], ["dice value run="]),
        (["valuation=shapley"], ["valuation='shapley' is not valid", "shapley_exact", "shapley_mc"]),
        (["player=node"], ["player='node' is not valid", "data", "participant"]),
        (["utility=some"], ["utility='some' is not valid"]),
        (["eval=test"], ["eval='test' is not valid", "heldout"]),
        (["valuation=shapley_mc", "budget=0"], ["budget=0 is not valid", ">= 1"]),
        (["valuation=shapley_mc", "budget=4"], ["budget=4 is too small", "budget >= 5"]),
        (["valuation=shapley_mc", "tolerance=0"], ["tolerance=0"]),
        (["truncation=1.5"], ["truncation=1.5 is out of range"]),
        (["chunk=0"], ["chunk=0 is out of range"]),
        (["valution=loo"], ["unknown key `valution`", "valuation"]),
    ]
    for args, needles in cases:
        code, _, err = dice("contrib", *BASE, *args)
        assert code == 2, (args, err)
        for needle in needles:
            assert needle in err, (args, needle, err)
    assert not (run4 / "contrib").exists()
    # another run's table
    shutil.copytree(run4, tmp_path / "other", ignore=shutil.ignore_patterns("value*", "v?"))
    code, _, err = dice("contrib", "run=other", "progress=false", f"value={run4 / 'value'}")
    assert code == 2 and "computed from run" in err


def test_too_many_nodes_for_exact_and_no_heldout_set(dice, tmp_path):
    code, _, err = dice("train", "nodes=13", "rounds=2", "batch_size=8", "progress=false", "probe.size=360", "out=big")
    assert code == 0, err
    code, _, err = dice("contrib", "run=big", "progress=false", "valuation=shapley_exact")
    assert code == 2 and "2^13 = 8,192" in err and "valuation=shapley_mc" in err and "valuation=loo" in err
    code, _, err = dice("contrib", "run=big", "progress=false", "valuation=loo", "eval=heldout")
    assert code == 2 and "eval=heldout needs test samples" in err and "probe.size" in err
    code, _, err = dice("contrib", "run=big", "progress=false")
    assert code == 2 and "holds no dice value result" in err and "dice value run=" in err


def test_participants_need_plain_gossip(dice, tmp_path):
    """A defense aggregates non-linearly: removing participants has no defined meaning there (exit 2, before any
    output), while player=data retrains the recorded defense and still satisfies efficiency."""
    code, _, err = dice("train", *TRAIN, "defense=median", "out=med")
    assert code == 0, err
    assert dice("value", "run=med", "progress=false", "method=gt")[0] == 0
    code, _, err = dice("contrib", "run=med", "progress=false", "valuation=loo", "player=participant")
    assert code == 2 and "player=participant" in err and "defense=median" in err and "player=data" in err
    assert not (tmp_path / "med/contrib").exists()
    code, _, err = dice("contrib", "run=med", "progress=false", "valuation=shapley_exact")
    assert code == 0, err
    s = json.loads((tmp_path / "med/contrib/summary.json").read_text())
    assert s["coalitions"] == 16 and abs(s["efficiency"]["gap"]) < 1e-10 * abs(s["utility_all"])
    # gt's node value is LOO by definition, also through a non-linear aggregation
    V = pd.read_csv(tmp_path / "med/value/influence.csv")
    d = -V.groupby("source").influence.sum().to_numpy()
    np.testing.assert_allclose(d, s["loo"]["values"], rtol=1e-10)


def test_an_inflate_run_is_valued_on_the_probe_and_on_the_heldout_set(dice, tmp_path):
    """attack=inflate (issue 13: the attacker trains on the probe set) through dice value and dice contrib: the
    gt node value is LOO on either evaluation set, exact Shapley shares out U(all) − U(∅) on the held-out set,
    and the attacker's data is worth more on the probe it trained on than on the samples nobody sees."""
    code, _, err = dice("train", *TRAIN, "attack=inflate", "attack.nodes=[2]", "out=inf")
    assert code == 0, err
    for extra in ([], ["eval=heldout", "out=inf/value_held"]):
        assert dice("value", "run=inf", "progress=false", "method=gt", *extra)[0] == 0
    sums = {}
    for ev in ("probe", "heldout"):
        code, _, err = dice("contrib", "run=inf", "progress=false", "valuation=shapley_exact", f"eval={ev}",
                            f"out=inf/c_{ev}")
        assert code == 0, err
        s = sums[ev] = json.loads((tmp_path / f"inf/c_{ev}/summary.json").read_text())
        assert s["attack"]["name"] == "inflate" and s["attack"]["nodes"] == [2] and s["eval"] == ev
        assert abs(s["efficiency"]["gap"]) < 1e-10 * abs(s["utility_all"])
        table = "inf/value" if ev == "probe" else "inf/value_held"
        V = pd.read_csv(tmp_path / table / "influence.csv")
        np.testing.assert_allclose(-V.groupby("source").influence.sum().to_numpy(), s["loo"]["values"], rtol=1e-10)
    comp = pd.read_csv(tmp_path / "inf/c_heldout/comparison.csv")
    assert "gt@heldout" in set(comp.dice)
    share = {ev: s["loo"]["values"][2] / np.abs(s["loo"]["values"]).sum() for ev, s in sums.items()}
    phi = {ev: pd.read_csv(tmp_path / f"inf/c_{ev}/shapley.csv").value.to_numpy() for ev in sums}
    assert share["probe"] > share["heldout"] + 0.05               # measured: 0.290 vs 0.185
    assert phi["probe"][2] / np.abs(phi["probe"]).sum() > phi["heldout"][2] / np.abs(phi["heldout"]).sum()
