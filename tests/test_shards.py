"""shard=i/n for `dice gt` / `dice estimate`: parts computed by separate jobs merge into the table of an
unsharded run; done parts are skipped on rerun; mixed selections and bad shard strings exit 2."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from conftest import FAST
from dice_cli.influence.measure import parse_shard, shard_bounds

SEL = ["run=run", "hops=2", "rounds=[1,3]", "unit=sample", "samples=2", "progress=false"]
# 2 rounds x 5 sources x 2 samples = 20 units


@pytest.fixture
def run5(dice, tmp_path):
    code, _, err = dice("train", *FAST, "nodes=5", "optim.momentum=0.5", "topology=exponential", "out=run")
    assert code == 0, err
    return tmp_path / "run"


def same_table(a, b):
    pd.testing.assert_frame_equal(pd.read_csv(a / "influence.csv"), pd.read_csv(b / "influence.csv"),
                                  check_exact=True)
    assert (a / "influence.csv").read_text() == (b / "influence.csv").read_text()


def test_parse_and_bounds():
    assert parse_shard(None) is None and parse_shard("2/3") == (2, 3) and parse_shard(" 0 / 1 ") == (0, 1)
    parts = [shard_bounds(20, i, 3) for i in range(3)]
    assert parts == [(0, 6), (6, 13), (13, 20)]
    assert all(hi - lo in (6, 7) for lo, hi in parts)


@pytest.mark.parametrize("kind, extra", [("gt", []), ("estimate", ["method=exact"]),
                                         ("estimate", ["method=first_order"])], ids=["gt", "exact", "first_order"])
def test_three_shards_merge_into_the_unsharded_table(dice, run5, kind, extra):
    assert dice(kind, *SEL, *extra, "out=run/full")[0] == 0
    sh = run5 / "sh"
    for i in [0, 2]:
        code, out, err = dice(kind, *SEL, *extra, f"shard={i}/3", "out=run/sh")
        assert code == 0, err
        assert (sh / f"shards/shard_{i}_of_3.csv").exists() and (sh / f"shards/shard_{i}_of_3.json").exists()
    assert "2 of 3 shards done" in out and not (sh / "influence.csv").exists()
    # a rerun of a done part skips it (its file is not rewritten)
    before = (sh / "shards/shard_0_of_3.csv").stat().st_mtime_ns
    code, out, _ = dice(kind, *SEL, *extra, "shard=0/3", "out=run/sh")
    assert code == 0 and "shard 0/3 is already done" in out and "wrote shard" not in out
    assert (sh / "shards/shard_0_of_3.csv").stat().st_mtime_ns == before
    # the last part merges
    code, out, err = dice(kind, *SEL, *extra, "shard=1/3", "out=run/sh")
    assert code == 0, err
    assert "merged from 3 shards" in out
    same_table(run5 / "full", sh)
    meta = json.loads((sh / "shards/shard_1_of_3.json").read_text())
    assert meta["status"] == "complete" and meta["units"] == [6, 13]
    manifest = json.loads((sh / "manifest.json").read_text())
    assert manifest["status"] == "complete" and set(manifest["shards"]) == {"0/3", "1/3", "2/3"}
    full_summary = json.loads((run5 / "full/summary.json").read_text())
    summary = json.loads((sh / "summary.json").read_text())
    for key in ["rows", "units", "rounds", "mean_abs_influence_per_hop_reachable", "structural_zero_rows"]:
        assert summary[key] == full_summary[key]
    if kind == "gt":
        assert summary["noise_floor"]["null_unit_max_abs_gt"] == 0.0
    assert "shard" not in yaml.safe_load((sh / "config.yaml").read_text())
    # complete: any later shard job has nothing to do
    code, out, _ = dice(kind, *SEL, *extra, "shard=2/3", "out=run/sh")
    assert code == 0 and "nothing to do" in out


def test_multirun_shards_meet_in_out_and_in_the_default_dir(dice, run5, tmp_path):
    assert dice("gt", *SEL, "out=run/full")[0] == 0
    code, _, err = dice("gt", "-m", "shard=0/3,1/3,2/3", *SEL, "out=run/gm")
    assert code == 0, err
    same_table(run5 / "full", run5 / "gm")
    # without out=, -m jobs would each get their own sweep directory: shard jobs use <run>/gt instead
    code, _, err = dice("gt", "-m", "shard=0/2,1/2", *SEL)
    assert code == 0, err
    same_table(run5 / "full", run5 / "gt")
    assert not [p for p in (tmp_path / "outputs/multirun").rglob("*shard=0_2*")]     # no empty job folders


def test_plain_run_finishes_missing_shards_then_merges(dice, run5):
    assert dice("estimate", *SEL, "method=exact", "out=run/full")[0] == 0
    assert dice("estimate", *SEL, "method=exact", "shard=1/3", "out=run/sh")[0] == 0
    code, out, err = dice("estimate", *SEL, "method=exact", "out=run/sh")
    assert code == 0, err
    assert "wrote shard 0/3" in out and "wrote shard 2/3" in out and "wrote shard 1/3" not in out
    same_table(run5 / "full", run5 / "sh")


def test_other_selection_or_other_split_in_one_out_is_refused(dice, run5):
    assert dice("gt", *SEL, "shard=0/2", "out=run/sh")[0] == 0
    code, out, err = dice("gt", *SEL, "hops=1", "shard=1/2", "out=run/sh")
    assert code == 2 and "different config" in err and "hops" in err
    code, out, err = dice("gt", *SEL, "shard=1/3", "out=run/sh")
    assert code == 2 and "shards of n=2" in err
    assert sorted(p.name for p in (run5 / "sh/shards").iterdir()) == ["shard_0_of_2.csv", "shard_0_of_2.json"]


@pytest.mark.parametrize("spec", ["4/4", "a/b", "1/0", "-1/3", "1/2/3", "3", "merge"])
def test_bad_shard_strings_exit_2(dice, run5, spec):
    code, out, err = dice("gt", *SEL, f"shard={spec}")
    assert code == 2, out + err
    assert "shard=i/n with integers 0 <= i < n" in err
    assert not (run5 / "gt").exists()


def test_more_shards_than_units_exit_2(dice, run5):
    code, _, err = dice("gt", *SEL, "shard=0/21")
    assert code == 2 and "only 20 units" in err
    assert not (run5 / "gt").exists()
