"""`dice show`: a run or result in a few lines (and --json), without importing torch; bad paths exit 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import FAST, ROOT
from dice_cli import cli


@pytest.fixture(scope="module")
def shown_run(tmp_path_factory):
    """One small attacked run with gt, estimate, a custom out= gt and detect, built once for the module."""
    root = tmp_path_factory.mktemp("show")
    sel = ["run=run", "rounds=[2]", "hops=1", "progress=false"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("DICE_LATEST", str(root / "outputs" / "latest"))
        for args in (["train", *FAST, "attack=sign_flip", "attack.nodes=[1]", "out=run"], ["gt", *sel],
                     ["estimate", *sel, "method=exact"],
                     ["gt", *sel, "unit=sample", "samples=1", "out=run/mine/gt_samples"],
                     ["detect", "run=run", "progress=false"]):
            try:
                cli.main(args)
            except SystemExit as e:
                assert not e.code, (args, e.code)
    return root / "run"


def test_show_a_run_and_its_results(dice, shown_run):
    code, out, err = dice("show", str(shown_run))
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) <= 10, out
    assert lines[0] == f"{shown_run}: dice train run, complete (6/6 rounds)"
    assert "digits, mlp; ring n=4" in lines[1] and "attack sign_flip on [1]" in lines[1]
    assert lines[2].startswith("  final probe acc ") and "honest nodes" in lines[2]
    body = "\n".join(lines)
    assert "gt/: gt, complete; 4 batch units, round(s) [2], 1 hop(s); mean |influence| (reachable) hop 0" in body
    assert "estimate/: estimate exact, complete" in body and "vs gt: spearman" in body
    assert "mine/gt_samples/: gt, complete; 4 sample units" in body
    assert "detect/: detect, complete; ROC AUC" in body and "attackers [1]" in body

    code, out, _ = dice("show", str(shown_run), "--json")
    f = json.loads(out)
    assert f["status"] == "complete" and f["rounds"] == 6 and f["config"]["nodes"] == 4
    assert 0 <= f["final"]["probe_acc"] <= 1 and f["checkpoints"]["count"] == 7
    kinds = {r["path"]: r["kind"] for r in f["results"]}
    assert kinds == {"detect": "detect", "estimate": "estimate", "gt": "gt", "mine/gt_samples": "gt"}
    est = next(r for r in f["results"] if r["kind"] == "estimate")
    assert set(est["headline"]["alignment"]) == {"spearman", "pearson", "sign_agreement", "n"}


def test_show_a_result_names_its_run(dice, shown_run):
    code, out, err = dice("show", str(shown_run / "detect"))
    assert code == 0, err
    assert out.startswith(f"{shown_run}/detect: detect, complete; ROC AUC") and "(6/6 rounds)" in out
    assert f"of run {shown_run}: dice train run" in out
    f = json.loads(dice("show", str(shown_run / "gt"), "--json")[1])
    assert f["kind"] == "gt" and f["of_run"]["status"] == "complete"


def test_show_an_unfinished_run_says_how_to_resume(dice, tmp_path):
    assert dice("train", *FAST, "out=run")[0] == 0
    m = json.loads((tmp_path / "run/manifest.json").read_text())
    m["status"], m["interrupted"] = "interrupted", "at round 4"
    m.pop("final")
    (tmp_path / "run/manifest.json").write_text(json.dumps(m))
    code, out, _ = dice("show", "run")
    assert code == 0 and "interrupted" in out and "at round 4" in out and "dice train out=run" in out


def test_show_bad_paths_exit_2_with_the_fix(dice, tmp_path):
    code, _, err = dice("show", "nope")
    assert code == 2 and "'nope' does not exist" in err and "dice show outputs/latest" in err
    (tmp_path / "plain").mkdir()
    code, _, err = dice("show", "plain")
    assert code == 2 and "not a dice directory" in err and "Traceback" not in err
    (tmp_path / "sweep/0").mkdir(parents=True)
    (tmp_path / "sweep/0/manifest.json").write_text('{"kind": "train"}')
    code, _, err = dice("show", "sweep")
    assert code == 2 and "sweep/0" in err and "dice report sweep" in err


def test_show_does_not_import_torch_and_is_fast(shown_run):
    probe = ("import sys\nfrom dice_cli.cli import main\ntry:\n    main(['show', sys.argv[1]])\n"
             "except SystemExit as e:\n    assert not e.code, e.code\n"
             "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', 'numpy' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", probe, str(shown_run)], capture_output=True, text=True, env=env,
                       timeout=120)
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("NO-TORCH False"), r.stdout
    assert "gt/: gt, complete" in r.stdout
    assert seconds < 30                       # a loose bound for a loaded machine; typically well under 1 s
