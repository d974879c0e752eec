"""Shared fixtures: tiny float64 problems on CPU, and an in-process `dice` runner."""
from __future__ import annotations

import sys
from typing import List, Tuple

import pytest

from dice_cli import cli


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


FAST = ["nodes=4", "rounds=6", "batch_size=8", "progress=false", "dtype=float64"]
