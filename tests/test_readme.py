"""The README cannot drift: every `dice ...` command in its bash blocks is checked through the CLI's own
precheck and then composed by Hydra and validated by its schema (without running: most of them train for
minutes or need data); the quick start's `dice train` and a `dice show` of its run are run as written."""
from __future__ import annotations

import re
import shlex
from typing import List, Tuple

import pytest

from conftest import ROOT
from dice_cli import cli

README = ROOT / "README.md"
PREFIXES = ("dice", ".venv/bin/dice")


def readme_commands() -> List[Tuple[int, str, List[str]]]:
    """(line number, command, arguments) of every dice invocation in the README's bash blocks."""
    out, block, text = [], False, README.read_text().splitlines()
    for no, line in enumerate(text, 1):
        if line.startswith("```"):
            block = line.strip() == "```bash" if not block else False
            continue
        if not block:
            continue
        for part in re.split(r"&&|\|", line):
            words = shlex.split(part, comments=True)
            while words and words[0] not in PREFIXES:
                words = words[1:]
            if len(words) >= 2:
                out.append((no, words[1], words[2:]))
    return out


COMMANDS = readme_commands()


def test_the_readme_has_commands_of_every_kind():
    names = {c for _, c, _ in COMMANDS}
    assert {"train", "gt", "estimate", "value", "detect", "pipeline", "report", "show"} <= names


def _first_of_sweeps(args: List[str]) -> List[str]:
    """A -m sweep's first job: key=a,b,c -> key=a (lists [a,b] kept); Hydra/launcher overrides dropped."""
    out = []
    for a in args:
        if a == "-m" or a.startswith(("hydra/", "hydra.")):
            continue
        if "=" in a:
            k, v = a.split("=", 1)
            if "," in v and not v.startswith("["):
                v = v.split(",")[0]
            a = f"{k}={v}"
        out.append(a)
    return out


@pytest.mark.parametrize("no, name, args", COMMANDS, ids=[f"L{no}-{name}" for no, name, _ in COMMANDS])
def test_readme_command_is_valid(no, name, args):
    assert name in cli.COMMANDS, f"README line {no}: unknown command dice {name}"
    assert cli.precheck(name, args) is None, f"README line {no}: {cli.precheck(name, args)}"
    if name in cli.SCHEMAS:
        import importlib

        from hydra import compose, initialize_config_dir

        from dice_cli import config
        from dice_cli.commands import CONFIG_DIR, typed_config

        importlib.import_module(cli.COMMANDS[name][0])              # registers the command's schema
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name=name, overrides=_first_of_sweeps(args))
        typed_config(cfg, getattr(config, cli.SCHEMAS[name]), name)    # unknown keys, choices, ranges
    elif name == "report":
        assert args and all(not a.startswith("-") or a in ("--out", "--overwrite") for a in args)
    elif name == "show":
        flags = {a for a in args if a.startswith("-")}
        assert len(args) - len(flags) <= 1 and flags <= {"--json"}


def test_quick_start_runs_as_written(dice, tmp_path):
    quick = [(no, name, args) for no, name, args in COMMANDS if name == "train" and not args]
    assert quick, "the README's quick start `dice train` is gone"
    code, out, err = dice("train", *quick[0][2])
    assert code == 0, err
    assert "final probe acc" in out
    code, out, err = dice("show")
    assert code == 0 and "dice train run, complete (200/200 rounds)" in out, err
