"""Shared fixtures: tiny float64 problems on CPU, and an in-process `dice` runner."""
from __future__ import annotations

import os
import sys
from typing import List, Tuple

import pytest

from dice_cli import cli

# In-process `dice` calls draw their figures inline: a background plot process per call (plots.background)
# would re-import matplotlib every time. Tests that start `dice` as its own process get the default.
os.environ.setdefault("DICE_PLOTS", "inline")


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
