"""What the cheap commands import: `dice --help` and a rerun with nothing to do must not import torch (nor
pandas or matplotlib), and a real `dice train` must not import scikit-learn, scipy or pandas. Checked in a
fresh interpreter, where sys.modules tells what a user's process paid for."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import FAST

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "pandas", "matplotlib", "sklearn", "scipy")


def imported(cwd: Path, *args: str) -> dict:
    """Run `dice ARGS` in a new interpreter; return its exit code, stdout and which HEAVY modules it loaded."""
    code = ("import json, sys\n"
            "from dice_cli import cli\n"
            "rc = 0\n"
            "try:\n"
            f"    cli.main({list(args)!r})\n"
            "except SystemExit as e:\n"
            "    rc = e.code or 0\n"
            f"print(json.dumps({{'rc': rc, 'mods': sorted(m for m in {HEAVY!r} if m in sys.modules)}}))\n")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    return {**json.loads(lines[-1]), "stdout": "\n".join(lines[:-1])}


def test_help_imports_nothing_heavy(tmp_path):
    r = imported(tmp_path, "--help")
    assert r["rc"] == 0 and r["mods"] == [] and "commands:" in r["stdout"]


def test_nothing_to_do_reruns_do_not_import_torch(dice, tmp_path):
    train = ["train", *FAST, "out=run"]
    attacked = ["train", *FAST, "attack=label_flip", "attack.nodes=[1]", "out=att"]
    gt = ["gt", "run=run", "hops=1", "rounds=2", "progress=false"]
    est = ["estimate", "run=run", "hops=1", "rounds=2", "method=first_order", "progress=false"]
    det = ["detect", "run=att", "progress=false"]
    for args in (train, attacked, gt, est, det):
        assert dice(*args)[0] == 0
    for args in (train, gt, est, det):
        r = imported(tmp_path, *args)
        assert r["rc"] == 0 and "nothing to do" in r["stdout"], (args, r)
        assert r["mods"] == [], (args, r["mods"])


def test_train_does_not_import_sklearn_scipy_or_pandas(tmp_path):
    r = imported(tmp_path, "train", *FAST, "out=fresh")
    assert r["rc"] == 0 and (tmp_path / "fresh" / "metrics.png").exists()
    assert "torch" in r["mods"] and not {"sklearn", "scipy", "pandas"} & set(r["mods"]), r["mods"]


def test_background_figures_equal_inline_and_report_failures(tmp_path, monkeypatch):
    """plots.background(): figures drawn by the child process are byte-identical to inline ones, wait()
    blocks until they are written, and a figure that fails raises in the parent."""
    import numpy as np
    import pytest

    from dice_cli import plots

    W = np.roll(np.eye(6), 1, 1) / 3 + np.eye(6) / 3 + np.roll(np.eye(6), -1, 1) / 3
    metrics = {"round": np.repeat(np.arange(5), 6), "node": np.tile(np.arange(6), 5),
               **{c: np.linspace(0.1, 1, 30) for c in ("train_loss", "probe_loss", "probe_acc",
                                                       "consensus_distance")}}
    monkeypatch.setenv("DICE_PLOTS", "inline")
    plots.topology_plot(W, tmp_path / "inline_topo.png", title="ring")
    plots.metrics_plot(metrics, tmp_path / "inline_metrics.png")
    monkeypatch.setenv("DICE_PLOTS", "background")
    with plots.background():
        assert plots._painter is not None
        plots.topology_plot(W, tmp_path / "bg_topo.png", title="ring")
        plots.metrics_plot(metrics, tmp_path / "bg_metrics.png")
        plots.wait()
        assert (tmp_path / "bg_topo.png").exists() and (tmp_path / "bg_metrics.png").exists()
    assert plots._painter is None
    for name in ("topo", "metrics"):
        assert (tmp_path / f"bg_{name}.png").read_bytes() == (tmp_path / f"inline_{name}.png").read_bytes()
    with pytest.raises(RuntimeError, match="drawing metrics_plot failed in the plot process"):
        with plots.background():
            plots.metrics_plot({"round": np.arange(3)}, tmp_path / "broken.png")   # no probe_loss column
    assert plots._painter is None
