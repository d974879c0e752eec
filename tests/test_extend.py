"""Extending a finished run: `dice train rounds=7 out=R` on a 3-round R continues from round 3 and ends
bit-identical (float64) to a 7-round run trained from scratch; shrinking or a length-dependent schedule
is refused before anything changes."""
from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest
import torch
import yaml

BASE = ["nodes=4", "batch_size=8", "progress=false", "dtype=float64", "eval_every=2"]
STATIC = ["plan.npy", "partition.csv", "probe.npy", "graph.json"]


def sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("extra", [[], ["topology=one_peer_exponential", "attack=sign_flip", "attack.nodes=[1]",
                                        "optim.momentum=0.5"]])
def test_extended_run_equals_the_longer_run_from_scratch(dice, tmp_path, extra):
    assert dice("train", *BASE, *extra, "rounds=3", "out=R")[0] == 0
    code, out, err = dice("train", *BASE, *extra, "rounds=7", "out=R")
    assert code == 0, err
    assert "extending R from 3 to 7 rounds" in out and "only rounds changed" in out
    assert dice("train", *BASE, *extra, "rounds=7", "out=S")[0] == 0
    R, S = tmp_path / "R", tmp_path / "S"
    # metrics: the old last round (2) is no longer an evaluated round of a 7-round run with eval_every=2
    a, b = pd.read_csv(R / "metrics.csv"), pd.read_csv(S / "metrics.csv")
    assert sorted(a["round"].unique()) == [1, 3, 5, 6]
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    names = sorted(p.name for p in (S / "checkpoints").iterdir())
    assert sorted(p.name for p in (R / "checkpoints").iterdir()) == names
    for name in names:
        x = torch.load(R / "checkpoints" / name, weights_only=True)
        y = torch.load(S / "checkpoints" / name, weights_only=True)
        assert x.keys() == y.keys(), name
        for k, v in x.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, y[k]), (name, k)
    mixing = "mixing_schedule.npz" if extra else "mixing.npy"
    for f in STATIC + [mixing]:
        assert sha(R / f) == sha(S / f), f
    assert yaml.safe_load((R / "config.yaml").read_text())["rounds"] == 7
    m = json.loads((R / "manifest.json").read_text())
    assert m["status"] == "complete" and m["rounds"] == 7 and m["record_every"] == 1
    assert [(e["from"], e["to"]) for e in m["extended"]] == [(3, 7)]
    if extra:
        assert m["attack"]["rounds"] == [0, 7]
    for rel, rec in m["files"].items():          # integrity hashes match what is on disk
        if rec.get("sha256"):
            assert sha(R / rel) == rec["sha256"], rel
    code, out, err = dice("train", *BASE, *extra, "rounds=7", "out=R")
    assert code == 0 and "already complete" in out
    code, _, err = dice("detect", "run=R", "progress=false")     # readers verify the extended run
    assert code == 0, err


def test_extending_keeps_the_recorded_checkpoint_stride(dice, tmp_path):
    assert dice("train", *BASE, "rounds=4", "record.every=2", "out=R")[0] == 0
    code, _, err = dice("train", *BASE, "rounds=8", "record.every=2", "out=R")
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "R/checkpoints").iterdir())
    assert names == [f"round_{t:06d}.pt" for t in (0, 2, 4, 6, 8)]


def test_shrinking_or_a_length_dependent_schedule_is_refused(dice, tmp_path):
    assert dice("train", *BASE, "rounds=4", "out=R")[0] == 0
    before = (tmp_path / "R/config.yaml").read_text()
    code, _, err = dice("train", *BASE, "rounds=2", "out=R")
    assert code == 2 and "shorten" in err and "overwrite=true" in err
    code, _, err = dice("train", *BASE, "rounds=6", "lr=0.2", "out=R")       # not only rounds: a new config
    assert code == 2 and "different config" in err and "lr" in err
    assert (tmp_path / "R/config.yaml").read_text() == before
    assert dice("train", *BASE, "rounds=4", "optim.schedule=cosine", "out=C")[0] == 0
    code, _, err = dice("train", *BASE, "rounds=6", "optim.schedule=cosine", "out=C")
    assert code == 2 and "optim.schedule=cosine" in err and "new out=" in err
    assert yaml.safe_load((tmp_path / "C/config.yaml").read_text())["rounds"] == 4
    assert json.loads((tmp_path / "C/manifest.json").read_text())["status"] == "complete"


def test_shrinking_with_overwrite_replaces(dice, tmp_path):
    assert dice("train", *BASE, "rounds=4", "out=R")[0] == 0
    code, _, err = dice("train", *BASE, "rounds=2", "overwrite=true", "out=R")
    assert code == 0, err
    assert json.loads((tmp_path / "R/manifest.json").read_text())["rounds"] == 2
