"""``dice``: the subcommand dispatcher.

``dice <command> [hydra overrides...]`` pops the command name and hands the rest of argv to that command's
own ``@hydra.main`` app, so overrides, ``-m`` multirun, ``--cfg job``, ``--help`` and launchers all work
unchanged. Exit codes: 0 success, 2 usage errors (bad key, value or choice; missing run directory), 1 bugs.

    dice --help
    dice train nodes=32 topology=exponential
"""
from __future__ import annotations

import importlib
import sys
from typing import List, Optional

from .errors import USAGE_EXIT_CODE

# The registry: one line per subcommand -> (module with main(), one-line help).
COMMANDS = {
    "train": ("dice_cli.commands.train", "simulate decentralized SGD and record a replayable run directory"),
    "gt": ("dice_cli.commands.gt", "ground-truth influence by counterfactual re-simulation (DICE-GT)"),
    "estimate": ("dice_cli.commands.estimate", "DICE estimates (first order or exact), aligned with gt"),
    "value": ("dice_cli.commands.value", "whole-run influence of every node's data / sample (exact sweep, GT, LDS)"),
    "detect": ("dice_cli.commands.detect", "find bad neighbours by proximal influence; ROC against the attack record"),
    "pipeline": ("dice_cli.commands.pipeline", "train -> gt -> estimate -> detect in one job (stages skippable)"),
    "report": ("dice_cli.report", "one table over runs or sweeps: swept keys vs results, mean ± std over seeds"),
}

_state = {"task_started": False}


def task_started() -> None:
    """Called by a command as soon as Hydra has composed its config and handed over control."""
    _state["task_started"] = True


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: dice <command> [key=value ...] [-m] [--cfg job] [--help]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Each command is a Hydra app: `dice <command> --help` lists its config groups and keys.",
              "Docs: README.md. Exit codes: 0 ok, 2 usage error, 1 internal error."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if argv else USAGE_EXIT_CODE)
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"dice-cli {__version__}")
        sys.exit(0)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dice: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}\n\n{usage()}",
              file=sys.stderr)
        sys.exit(USAGE_EXIT_CODE)
    module = importlib.import_module(COMMANDS[name][0])
    sys.argv = [f"dice {name}", *rest]
    _state["task_started"] = False
    try:
        module.main()
    except SystemExit as e:
        # Hydra reports composition errors (unknown key, wrong type, unknown group choice) with exit 1
        # before our task runs: those are usage errors.
        if e.code == 1 and not _state["task_started"]:
            sys.exit(USAGE_EXIT_CODE)
        raise


if __name__ == "__main__":
    main()
