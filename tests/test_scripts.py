"""The scripts under scripts/ run end to end: both studies at --smoke sizes, both benchmarks at toy sizes, and the
study harness they share (scripts/study_harness.py)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pandas as pd
import pytest

from conftest import SUBPROCESS_TIMEOUT

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def load_harness():
    spec = importlib.util.spec_from_file_location("study_harness", SCRIPTS / "study_harness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args: str, timeout: float = SUBPROCESS_TIMEOUT) -> str:
    r = subprocess.run([sys.executable, str(SCRIPTS / name), *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{name} exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture
def latest_kept():
    """The studies train, which repoints outputs/latest: they must put it back (and we remove one they created)."""
    link = ROOT / "outputs" / "latest"
    before = os.readlink(link) if link.is_symlink() else None
    yield
    if before is None:
        if link.is_symlink():
            link.unlink()
    else:
        assert os.readlink(link) == before


def check_tables(study_dir: Path, tables: Dict[str, List[str]]) -> None:
    """Each table's CSV has at least these columns and one row; its Markdown is titled and has a header row."""
    for name, cols in tables.items():
        df = pd.read_csv(study_dir / f"{name}.csv")
        assert set(cols) <= set(df.columns), (study_dir.name, name, list(df.columns))
        assert len(df) > 0, (study_dir.name, name)
        md = (study_dir / f"{name}.md").read_text().splitlines()
        assert md[0].startswith("## ") and md[2].startswith("| ") and md[3].startswith("| --- |"), md[:4]
    assert (study_dir / "log.txt").exists()


AGREEMENT = ["topology", "unit", "method", "hop", "spearman", "pearson", "sign_agreement", "rel_error", "n",
             "spearman_all_rows", "n_all_rows"]


@pytest.mark.slow
def test_faithfulness_smoke(tmp_path, latest_kept):
    out = run_script("faithfulness.py", "--smoke", "--out", str(tmp_path))
    for study in ["digits", "paper", "lr", "topology"]:
        assert f"[{study}] " in out
    assert "faithfulness: digits" in out and f"results under {tmp_path}/" in out
    check_tables(tmp_path / "digits", {"results": AGREEMENT,
                                       "exact_vs_fd": ["topology", "hop", "spearman", "rel_error", "n"]})
    assert (tmp_path / "digits/results.md").read_text().splitlines()[2] == "| " + " | ".join(AGREEMENT) + " |"
    check_tables(tmp_path / "paper", {"results": AGREEMENT})
    assert (tmp_path / "paper/log.txt").read_text().startswith("$ dice train experiment=paper_alignment ")
    check_tables(tmp_path / "lr", {"results": ["lr", "probe_acc", "method", "hop", "spearman", "rel_error"]})
    check_tables(tmp_path / "topology", {
        "by_degree": ["topology", "out_degree", "units", "direct_abs", "total_abs_hops_ge1", "normalised"],
        "same_batch": ["topology", "out_degree", "placements", "total_abs_hops_ge1", "normalised"],
        "decay": ["hop", "star", "exponential"]})
    for csv in ["per_unit.csv", "topology.png"]:
        assert (tmp_path / "topology" / csv).exists()
    for png in ["digits/spearman_per_hop.png", "digits/scatter.png", "lr/lr_sweep.png"]:
        assert (tmp_path / png).stat().st_size > 0
    checks = pd.read_json(tmp_path / "paper/checks.json", typ="series")
    assert checks["cifar100_offline"]["exit"] == 2 and checks["cifar100_offline"]["ok"]


@pytest.mark.slow
def test_detect_study_smoke(tmp_path, latest_kept):
    out = run_script("detect_study.py", "--smoke", "--out", str(tmp_path))
    for study in ["attacks", "stealth", "window", "paper", "cost"]:
        assert f"[{study}] " in out
    assert "detect_study: attacks" in out and f"results under {tmp_path}/" in out
    check_tables(tmp_path / "attacks", {
        "results": ["topology", "attack", "probe_acc", "prox_auc", "prox_ap", "dot_auc", "dot_ap", "target"]})
    grid = pd.read_csv(tmp_path / "attacks/grid.csv")
    assert np.allclose(grid["cli_auc_diff"], 0)      # dice detect (CLI path) gives the sliced replay's AUC
    check_tables(tmp_path / "stealth", {"results": ["strength", "topology", "probe_acc", "prox_auc_w4", "dot_auc_w4"]})
    check_tables(tmp_path / "window", {
        "by_end": ["score", "topology"], "by_length": ["score", "topology"], "by_length_per_attack": ["attack"],
        "combos": ["window", "score", "normalize", "aggregation", "auc_all_attacks", "worst_attack"],
        "windows_ranked": ["window", "auc_all_attacks"], "combos_per_attack": ["score", "label_flip"],
        "attacks_whole_run": ["topology", "attack", "prox_auc", "dot_auc", "target"]})
    check_tables(tmp_path / "paper", {"results": ["detector", "auc", "ap", "auc_values", "probe_acc"]})
    assert len(pd.read_csv(tmp_path / "paper/per_seed.csv")) == 4          # 1 seed x 4 detectors
    check_tables(tmp_path / "cost", {"results": ["quantity", "median_ms", "vs_train_cli_round"]})


def test_bench_train_prints_its_table():
    out = run_script("bench_train.py", "--nodes", "4", "--rounds", "5", "--loop-rounds", "2", "--reps", "1",
                     "--warmup", "1")
    assert "vs loop" in out and "ms/round" in out and "TARGET per round at default recording" in out
    assert any(line.split()[:3] == ["4", "digits", "vmap"] for line in out.splitlines())


def test_bench_influence_prints_its_tables():
    out = run_script("bench_influence.py", "--nodes", "4", "--batch-size", "8", "--round", "3", "--hops", "1",
                     "--reps", "1", "--loop-units", "2", "--scale", "4", "6", "--scale-hops", "2")
    assert "one training round" in out and "rounds" in out
    assert "gt (1 hop)" in out and "first_order (1 hop)" in out and "speed-up" in out
    assert "TARGET gt 4 -> 6 nodes, 2 hop(s)" in out and "TARGET exact hops=2, 6 / 4 nodes" in out


def test_bench_whole_times_processes(tmp_path):
    out = run_script("bench_whole.py", "--reps", "1", "--nodes", "4", "--rounds", "3", "--batch-size", "8",
                     "--no-startup", timeout=300)
    assert "paper-style / dice train" in out and "dice train (4 nodes)" in out and "rounds/s" in out


def test_paper_style_script_trains(tmp_path):
    out = run_script("paper_style_train.py", "--nodes", "4", "--rounds", "3", "--out", str(tmp_path / "r.json"))
    assert "paper-style: 4 nodes, 3 rounds" in out
    assert len(pd.read_json(tmp_path / "r.json", typ="series")["probe_loss"]) == 4


def test_harness_tables_and_smoke_defaults(tmp_path, capsys):
    h = load_harness()
    assert h.fmt(0.5) == "0.5000" and h.fmt(1.5e-5) == "1.500e-05" and h.fmt(np.nan) == "nan" and h.fmt(3) == "3"
    assert h.fmt(1.5e-5, decimals=3, sci=False) == "0.000"
    st = h.Study(tmp_path, "s")
    df = pd.DataFrame({"a": [1, 2], "b": [0.25, 1e6]})
    md = h.save_table(st, df, "title", columns=["b"])
    assert md.splitlines() == ["| b |", "| --- |", "| 0.2500 |", "| 1.000e+06 |"]
    assert "== title" in capsys.readouterr().out
    assert list(pd.read_csv(tmp_path / "s/results.csv").columns) == ["a", "b"]
    assert (tmp_path / "s/results.md").read_text().startswith("## title\n\n| b |")
    ap = h.main_parser("doc", {"x": None}, "outputs/x", {"nodes": 16, "lr": 0.1, "topologies": ["ring"]}, {})
    assert h.parse(ap, [], {"nodes": 4}).nodes == 16
    assert h.parse(ap, ["--smoke"], {"nodes": 4}).nodes == 4
    assert h.parse(ap, ["--smoke", "--nodes", "8"], {"nodes": 4}).nodes == 8   # explicit options win
