"""gt, estimate, detect and value draw a tqdm bar with ETA on a terminal, as train does, and none when
stderr is not a terminal (a log file, CI) or with progress=false."""
from __future__ import annotations

import io
import sys

import pytest

from conftest import FAST
from dice_cli import cli

COMMANDS = {
    "gt": ["rounds=[1,3]", "hops=1"],
    "estimate": ["rounds=[1,3]", "hops=1"],
    "detect": [],
    "value": ["window=1:5"],
}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("DICE_LATEST", str(root / "outputs" / "latest"))
        try:
            cli.main(["train", *FAST, "out=run"])
        except SystemExit as e:
            assert not e.code
    return root / "run"


def _run(args, stderr) -> int:
    old = sys.stderr
    sys.stderr = stderr
    try:
        cli.main(args)
    except SystemExit as e:
        return e.code or 0
    finally:
        sys.stderr = old
    return 0


@pytest.mark.parametrize("command", list(COMMANDS))
def test_bar_on_a_terminal_and_none_elsewhere(command, run_dir, tmp_path, capsys):
    args = [command, f"run={run_dir}", *COMMANDS[command]]
    tty = Terminal()
    assert _run([*args, f"out={tmp_path / 'a'}"], tty) == 0, tty.getvalue()
    drawn = tty.getvalue()
    assert f"dice {command}" in drawn and "100%" in drawn and "/s]" in drawn, drawn   # rate and ETA shown
    plain = io.StringIO()                                    # not a terminal: no bar even with progress=true
    assert _run([*args, "progress=true", f"out={tmp_path / 'b'}"], plain) == 0, plain.getvalue()
    assert "%|" not in plain.getvalue() and "/s]" not in plain.getvalue()
    off = Terminal()
    assert _run([*args, "progress=false", f"out={tmp_path / 'c'}"], off) == 0
    assert "%|" not in off.getvalue()
    capsys.readouterr()


def test_gt_bar_counts_units(run_dir, tmp_path):
    tty = Terminal()
    assert _run(["gt", f"run={run_dir}", "rounds=[1,3]", "hops=1", "chunk=2", f"out={tmp_path / 'g'}"], tty) == 0
    assert "8/8" in tty.getvalue() and "unit" in tty.getvalue()          # 4 batch units x 2 rounds
