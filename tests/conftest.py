"""Shared fixtures: tiny float64 problems on CPU, and an in-process `dice` runner.

The suite never touches the checkout's own outputs/: every test runs in its own temporary directory, and
DICE_LATEST points `outputs/latest` there too (also for the subprocesses tests start, such as the study
scripts, which work from the repository root); a session check fails if the checkout's link moved anyway.
Subprocesses get SUBPROCESS_TIMEOUT (DICE_TEST_TIMEOUT, default an hour) so a loaded machine is slow,
not failing.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Tuple

import pytest

from dice_cli import cli

# In-process `dice` calls draw their figures inline: a background plot process per call (plots.background)
# would re-import matplotlib every time. Tests that start `dice` as its own process get the default.
os.environ.setdefault("DICE_PLOTS", "inline")
ROOT = Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT = float(os.environ.get("DICE_TEST_TIMEOUT", 3600))


def _link_state(link: Path):
    return os.readlink(link) if link.is_symlink() else ("file" if link.exists() else None)


@pytest.fixture(scope="session", autouse=True)
def checkout_outputs_untouched():
    """The checkout's outputs/latest is the same after the suite as before it."""
    link = ROOT / "outputs" / "latest"
    before = _link_state(link)
    yield
    assert _link_state(link) == before, f"the test suite moved {link}"


@pytest.fixture(autouse=True)
def outside_the_checkout(tmp_path):
    """Each test works in its own tmp_path; `outputs/latest` (DICE_LATEST) lies there too. A private
    MonkeyPatch, so a test's own ``monkeypatch.undo()`` cannot bring it back into the checkout."""
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp_path)
    mp.setenv("DICE_LATEST", str(tmp_path / "outputs" / "latest"))
    yield
    mp.undo()


@pytest.fixture
def dice(monkeypatch, tmp_path, capsys):
    """Run `dice ...` in-process inside tmp_path; returns (exit_code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> Tuple[int, str, str]:
        argv_backup = list(sys.argv)
        code = 0
        try:
            cli.main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            sys.argv = argv_backup
        out, err = capsys.readouterr()
        return code, out, err

    return run


def partitioned_problem(n: int, per: int, batch: int, classes: int, shape, rounds: int, dtype):
    """Random data where node k owns samples k*per … (k+1)*per−1, and a plan [rounds, n, batch] drawn
    from each node's own samples. Returns (x, y, parts, plan, generator) — the generator continues the
    same seeded stream for anything else a test draws."""
    import numpy as np
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n * per, *shape, generator=g).to(dtype)
    y = torch.randint(0, classes, (n * per,), generator=g)
    parts = [np.arange(k * per, (k + 1) * per) for k in range(n)]
    plan = torch.stack([torch.stack([k * per + torch.randperm(per, generator=g)[:batch] for k in range(n)])
                        for _ in range(rounds)])
    return x, y, parts, plan, g


FAST = ["nodes=4", "rounds=6", "batch_size=8", "progress=false", "dtype=float64"]
