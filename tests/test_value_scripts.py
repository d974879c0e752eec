"""scripts/value_study.py and scripts/bench_value.py run end to end at toy sizes and print what they measured."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, timeout: float = 300) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"{name} exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.mark.slow
def test_value_study_smoke(tmp_path):
    link = ROOT / "outputs" / "latest"
    before = os.readlink(link) if link.is_symlink() else None
    out = run_script("value_study.py", "--smoke", "--out", str(tmp_path))
    assert "[grid] " in out and f"results under {tmp_path}/" in out
    d = tmp_path / "grid"
    res = pd.read_csv(d / "results.csv")
    assert set(res.method) == {"exact", "first_order", "cascade_sum (hops=1)", "cascade_sum (hops=3)"}
    assert set(res.unit) == {"node", "sample"} and (res.query("method == 'exact'").spearman > 0.5).all()
    lds = pd.read_csv(d / "lds.csv")
    assert "gt" in set(lds.method) and (lds.query("method == 'gt' and unit == 'node'").lds == 1.0).all()
    casc = pd.read_csv(d / "cascade.csv")
    assert abs(casc.query("method == 'gt'").share_mean.sum() - 1) < 1e-9       # shares over distances add up
    assert (d / "cascade.png").stat().st_size > 0 and (d / "log.txt").read_text().count("$ dice value") == 4
    assert (os.readlink(link) if link.is_symlink() else None) == before


def test_bench_value_prints_its_tables():
    out = run_script("bench_value.py", "--nodes", "4", "--rounds", "5", "--reps", "1")
    for needle in ["exact network: tape + sweep", "× training", "gt unit=node", "vectorised, one pass",
                   "one at a time", "whole command", "dice value targets=network"]:
        assert needle in out, needle
