"""scripts/robust_study.py and scripts/bench_robust.py run end to end at toy sizes and write what the docs cite."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def run(*argv: str, timeout: float = 300) -> str:
    # DICE_LATEST (set per test by conftest) keeps the studies' dice train runs off the checkout's outputs/latest
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "DICE_LATEST": os.environ["DICE_LATEST"]}
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_robust_study_smoke(tmp_path):
    out = run("scripts/robust_study.py", "--smoke", "--study", "detection", "select", "--workers", "1",
              "--out", str(tmp_path))
    assert "robust_study: detection" in out
    auc = pd.read_csv(tmp_path / "detection" / "auc.csv")
    assert set(auc.attack) == {"label_flip", "alie"} and "proximal_influence" in auc.columns
    targets = pd.read_csv(tmp_path / "detection" / "targets.csv")
    assert set(targets.columns) >= {"within_0.02", "beats_simple", "best_other_score"}
    assert (tmp_path / "detection" / "auc.png").exists()
    sel = pd.read_csv(tmp_path / "select" / "results.csv")
    assert set(sel.selector) == {"influence", "similarity", "static random_regular degree 3", "static complete graph"}
    log = (tmp_path / "detection" / "log.txt").read_text()
    assert "$ dice train " in log and "$ dice detect " in log


def test_bench_robust_prints_ratios():
    out = run("scripts/bench_robust.py", "--rounds", "2", "--reps", "1", "--window", "2", "--topologies", "ring")
    assert "| dice | " in out and "× undefended" in out and "| all scores |" in out
