"""scripts/contrib_study.py and scripts/bench_contrib.py run end to end at toy sizes and print what they measured."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import SUBPROCESS_TIMEOUT

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=SUBPROCESS_TIMEOUT, env=env)
    assert r.returncode == 0, f"{name} exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.mark.slow
def test_contrib_study_smoke(tmp_path):
    """Every study at 4-5 nodes: the tables exist, gt is LOO by definition (Spearman 1), and the inflate
    attacker's probe value rises while its held-out value does not."""
    out = run_script("contrib_study.py", "--smoke", "--out", str(tmp_path))
    for study in ("bad", "position", "large", "gaming"):
        assert f"[{study}] " in out, study
    res = pd.read_csv(tmp_path / "bad" / "results.csv")
    loo = res[(res.reference == "loo") & (res.dice == "gt") & (res.player == "data") & (res["eval"] == "probe")]
    assert len(loo) and (loo.spearman.dropna() > 1 - 1e-9).all()
    assert (tmp_path / "large" / "mc.csv").exists() and (tmp_path / "position" / "position.csv").exists()
    g = pd.read_csv(tmp_path / "gaming" / "results.csv")
    att, hon = g[g.run == "inflate"].iloc[0], g[g.run == "honest"].iloc[0]
    assert att["DICE exact (probe): share"] > hon["DICE exact (probe): share"]
    assert att["Shapley (heldout) = true effect: share"] < att["DICE exact (probe): share"]
    assert (tmp_path / "gaming" / "gaming.png").stat().st_size > 0


def test_bench_contrib_prints_both_sides():
    out = run_script("bench_contrib.py", "--nodes", "3", "--rounds", "4", "--single", "2", "--separate", "1")
    for needle in ["vectorised: one pass of 8 copies", "passes of 32 copies", "one coalition at a time",
                   "separate `dice train` runs, fresh processes (1, ×8/1)", "whole command: dice contrib",
                   "speed-up of the vectorised pass over 8 separate dice train runs", "Σφ ="]:
        assert needle in out, needle
