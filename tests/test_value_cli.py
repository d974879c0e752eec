"""`dice value` end to end through the CLI: files, columns, alignment, LDS, shards and every bad input."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

COLUMNS = ["source", "unit", "round", "sample", "target", "influence"]
GT_COLUMNS = COLUMNS + ["loss_with", "loss_without"]
BASE = ["run=run", "progress=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny float64 run per module (trained through the CLI); tests get their own copy."""
    import os
    import sys

    from dice_cli import cli

    root = tmp_path_factory.mktemp("value_run")
    cwd, argv = os.getcwd(), list(sys.argv)
    os.chdir(root)
    try:
        cli.main(["train", "nodes=4", "rounds=6", "batch_size=8", "progress=false", "dtype=float64", "lr=0.05",
                  "topology=exponential", "out=run"])
    except SystemExit as e:
        assert not e.code, e.code
    finally:
        os.chdir(cwd)
        sys.argv = argv
    return root / "run"


@pytest.fixture
def run4(dice, tmp_path, trained):
    import shutil

    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def test_gt_then_exact_with_alignment_and_lds(dice, run4):
    code, out, err = dice("value", *BASE, "method=gt", "out=run/value_gt", "lds=6")
    assert code == 0, err
    gt = pd.read_csv(run4 / "value_gt/influence.csv")
    assert list(gt.columns) == GT_COLUMNS and len(gt) == 4 * 4
    assert set(gt.unit) == {"node"} and (gt["round"] == -1).all() and (gt["sample"] == -1).all()
    assert np.allclose(gt.influence, gt.loss_with - gt.loss_without, rtol=0, atol=1e-15)
    s = json.loads((run4 / "value_gt/summary.json").read_text())
    assert s["noise_floor"]["null_unit_max_abs_gt"] == 0.0 and s["window"] == [0, 6] and s["horizon"] == 6
    assert set(s["lds"]) == {"gt"} and s["lds"]["gt"]["subsets"] == 6

    code, out, err = dice("value", *BASE, "lds=6")                        # default: exact, node, <run>/value
    assert code == 0, err
    d = run4 / "value"
    ex = pd.read_csv(d / "influence.csv")
    assert list(ex.columns) == COLUMNS
    assert (ex[["source", "target"]].to_numpy() == gt[["source", "target"]].to_numpy()).all()
    s = json.loads((d / "summary.json").read_text())
    assert s["alignment"]["gt"].endswith("value_gt") and s["alignment"]["spearman"] > 0.8
    assert set(s["lds"]) == {"exact", "gt"}
    for k in ("lds", "ci", "per_target", "targets_scored"):
        assert k in s["lds"]["exact"]
    lo, hi = s["lds"]["exact"]["ci"]
    assert lo <= s["lds"]["exact"]["lds"] <= hi
    assert s["seconds"]["compute"] > 0 and s["seconds"]["total"] >= s["seconds"]["compute"]
    for f in ["heatmap.png", "sources.png", "alignment.png", "lds.png", "lds.csv", "lds_subsets.npy",
              "manifest.json", "config.yaml"]:
        assert (d / f).exists(), f
    assert json.loads((d / "manifest.json").read_text())["status"] == "complete"
    # a rerun with the same config is a no-op; another config there is refused (exit 2)
    assert "nothing to do" in dice("value", *BASE, "lds=6")[1]
    code, _, err = dice("value", *BASE, "lds=0")
    assert code == 2 and "different config" in err


def test_units_and_network_target(dice, run4):
    plan = np.load(run4 / "plan.npy")
    code, _, err = dice("value", *BASE, "unit=batch", "window=2:4", "horizon=5", "method=first_order", "out=run/b")
    assert code == 0, err
    b = pd.read_csv(run4 / "b/influence.csv")
    assert sorted(set(b["round"])) == [2, 3] and len(b) == 2 * 4 * 4 and (b["sample"] == -1).all()
    code, _, err = dice("value", *BASE, "unit=sample", "samples=2", "sources=[1]", "method=cascade_sum",
                        "hops=2", "out=run/s")
    assert code == 0, err
    s = pd.read_csv(run4 / "s/influence.csv")
    assert (s.source == 1).all() and s["sample"].nunique() == 2 and set(s["sample"]) <= set(plan[:, 1].ravel())
    assert (s["round"] == -1).all() and json.loads((run4 / "s/summary.json").read_text())["hops"] == 2
    code, _, err = dice("value", *BASE, "unit=participant", "method=gt", "targets=network", "out=run/p")
    assert code == 0, err
    p = pd.read_csv(run4 / "p/influence.csv")
    assert list(p.columns) == GT_COLUMNS and len(p) == 4 and (p.target == -1).all() and (p.unit == "participant").all()
    assert (run4 / "p/sources.png").exists() and not (run4 / "p/heatmap.png").exists()


@pytest.mark.parametrize("method", ["gt", "exact"])
def test_shards_merge_to_the_unsharded_table(dice, run4, method):
    code, _, err = dice("value", *BASE, f"method={method}", "unit=batch", "window=1:5", f"out=run/{method}_one")
    assert code == 0, err
    for i in (0, 1):
        code, out, err = dice("value", *BASE, f"method={method}", "unit=batch", "window=1:5", f"shard={i}/2",
                              f"out=run/{method}_sharded")
        assert code == 0, err
    one = (run4 / f"{method}_one/influence.csv").read_text()
    sharded = (run4 / f"{method}_sharded/influence.csv").read_text()
    assert one == sharded
    assert json.loads((run4 / f"{method}_sharded/summary.json").read_text())["shards"] == 2


@pytest.mark.parametrize("args, needles", [
    (["window=4:9"], ["window='4:9'", "0 <= a < b <= 6", "rounds 0..5"]),
    (["window=3:3"], ["window='3:3'"]),
    (["window=0:4", "horizon=2"], ["horizon=2 is before the window ends", "horizon= in 4..6"]),
    (["horizon=9"], ["horizon=9 is outside the run", "horizon= in 6..6"]),
    (["unit=participant"], ["unit=participant with method='exact'", "method=gt"]),
    (["unit=participant", "method=first_order"], ["participant", "mixing matrices"]),
    (["scale=0.01"], ["scale=0.01 only applies to method=gt"]),
    (["method=gt", "scale=0"], ["scale=0", "[-1, 1]"]),
    (["lds=5", "sources=[2]"], ["lds=5 needs at least 2 units", "selects 1"]),
    (["lds=2"], ["lds=2", ">= 3"]),
    (["unit=grain"], ["unit='grain'", "node, batch, sample, participant"]),
    (["method=newton"], ["method='newton'", "gt, exact, first_order, cascade_sum"]),
    (["targets=some"], ["targets='some'", "all, network"]),
    (["unit=node", "samples=3"], ["samples=3 only applies to unit=sample"]),
    (["unit=sample", "samples=[99999]"], ["99999"]),
    (["shard=3/2"], ["shard='3/2'"]),
    (["frobnicate=1"], ["frobnicate"]),
    (["run=nowhere"], ["does not exist"]),
])
def test_bad_input_exits_2_naming_key_value_and_fix(dice, run4, args, needles):
    code, out, err = dice("value", *BASE, *args)
    assert code == 2, (args, out, err)
    for needle in needles:
        assert needle in out + err, (needle, err)
    assert not (run4 / "value" / "influence.csv").exists()


def test_missing_checkpoints_are_explained(dice, run4):
    for p in (run4 / "checkpoints").glob("round_00000[0-2].pt"):
        p.unlink()
    # the run's integrity check (issue 8) names the deleted files and the fix before any sweep starts
    code, _, err = dice("value", *BASE, "window=1:6")
    assert code == 2
    for needle in ["checkpoints/round_000000.pt", "dice train", "again"]:
        assert needle in err, needle


def test_multirun_and_help(dice, run4):
    code, out, err = dice("value", "-m", "run=run", "progress=false", "method=exact,first_order")
    assert code == 0, err
    code, out, _ = dice("--help")
    assert "value" in out
    code, out, _ = dice("value", "--help")
    assert code == 0 and "dice value" in out
