"""``dice``: the subcommand dispatcher.

``dice <command> [hydra overrides...]`` pops the command name and hands the rest of argv to that command's
own ``@hydra.main`` app, so overrides, ``-m`` multirun, ``--cfg job``, ``--help`` and launchers all work
unchanged. Before that, every ``key=value`` override is checked against the command's schema and every
``group=choice`` against configs/<group>/, so a typo stops with the nearest valid name ("did you mean
`rounds`?") instead of Hydra's generic message (or, for ``+key=``, instead of being silently stored).

Exit codes: 0 success, 2 usage errors (bad key, value or choice; missing, partial or changed run
directory; a directory in use), 1 bugs, 130 Ctrl-C, 143 SIGTERM.

    dice --help
    dice train nodes=32 topology=exponential
    python -m dice_cli train nodes=32         # the same
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import List, Optional

from .errors import USAGE_EXIT_CODE, interrupt_exit_code, suggest

# The registry: one line per subcommand -> (module with main(), one-line help).
COMMANDS = {
    "train": ("dice_cli.commands.train", "simulate decentralized SGD and record a replayable run directory"),
    "gt": ("dice_cli.commands.gt", "ground-truth influence by counterfactual re-simulation (DICE-GT)"),
    "estimate": ("dice_cli.commands.estimate", "DICE estimates (first order or exact), aligned with gt"),
    "value": ("dice_cli.commands.value", "whole-run influence of every node's data / sample (exact sweep, GT, LDS)"),
    "contrib": ("dice_cli.commands.contrib", "node contributions (given, received, reciprocity, Gini) and LOO / Shapley baselines"),
    "detect": ("dice_cli.commands.detect", "find bad neighbours by proximal influence; ROC against the attack record"),
    "pipeline": ("dice_cli.commands.pipeline", "train -> gt -> estimate -> detect in one job (stages skippable)"),
    "report": ("dice_cli.report", "one table over runs or sweeps: swept keys vs results, mean ± std over seeds"),
    "show": ("dice_cli.show", "what a run or result is, in a few lines: config, status, accuracy, results (--json)"),
}

_state = {"task_started": False}


def task_started() -> None:
    """Called by a command as soon as Hydra has composed its config and handed over control."""
    _state["task_started"] = True


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: dice <command> [key=value ...] [-m] [--cfg job] [--help]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Each command is a Hydra app: `dice <command> --help` lists its keys (defaults, one line each).",
              "Docs: README.md. Exit codes: 0 ok, 2 usage error, 1 internal error, 130/143 interrupted."]
    return "\n".join(lines)


# The typed schema of each Hydra command (``dice report`` parses its own arguments).
SCHEMAS = {"train": "TrainConfig", "gt": "GtConfig", "estimate": "EstimateConfig", "detect": "DetectConfig",
           "value": "ValueConfig", "pipeline": "PipelineConfig", "contrib": "ContribConfig"}
GROUP_COMMANDS = {"train", "pipeline"}     # the commands whose defaults list config groups


def _groups() -> dict:
    """{group: [choices]} from configs/<group>/<choice>.yaml (Hydra's own groups excluded)."""
    from .commands import CONFIG_DIR

    root = Path(CONFIG_DIR)
    return {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in root.iterdir()
            if d.is_dir() and d.name != "hydra"}


def precheck(name: str, args: List[str]) -> Optional[str]:
    """The first unknown key or group choice among ``args`` (Hydra overrides) as a message, else None.

    Checked: ``key=value``, ``+key=value``, ``++key=value`` (dotted keys against the schema's dataclasses;
    a key is known once the schema stops at a non-dataclass type such as a list), and ``group=choice``
    (also each choice of a ``-m`` sweep ``group=a,b``). Left to Hydra: ``hydra.*`` / ``hydra/...``,
    deletions ``~key``, sweep functions ``key=choice(...)`` / ``range(...)``, and options (``-m``, ``--cfg``)."""
    import dataclasses

    from . import config
    from .config import _dataclass_of, schema_fields

    if name not in SCHEMAS:
        return None
    schema = getattr(config, SCHEMAS[name])
    groups = _groups() if name in GROUP_COMMANDS else {}
    for arg in args:
        if arg.startswith("-") or arg.startswith("~") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+").split("@", 1)[0]
        if not key or key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        if key in groups:
            if "(" in value:
                continue
            for choice in (c.strip() for c in value.split(",")):
                if choice and choice not in groups[key] and choice not in ("null", "None"):
                    return (f"{key}={choice!r} is not a choice of config group `{key}`; choose one of: "
                            f"{', '.join(groups[key])}.{suggest(choice, groups[key])}")
            continue
        node, done = schema, []
        for part in key.split("."):
            fields = schema_fields(node) if dataclasses.is_dataclass(node) else None
            if fields is None:
                break
            if part not in fields:
                full = ".".join(done + [part])
                near = suggest(part, fields)
                if near and done:
                    near = near.replace("`", "`" + ".".join(done) + ".", 1)
                if not near and not done:
                    near = suggest(part, list(groups))
                return (f"unknown key `{full}` for dice {name}.{near} `dice {name} --help` lists the keys "
                        f"(schema: dice_cli/config.py {schema.__name__})")
            done.append(part)
            node = _dataclass_of(fields[part]) or None
            if node is None:
                break
    return None


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
        print(f"dice: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}.{suggest(name, COMMANDS)}"
              f"\n\n{usage()}", file=sys.stderr)
        sys.exit(USAGE_EXIT_CODE)
    problem = precheck(name, rest)
    if problem:
        print(f"dice {name}: error: {problem}", file=sys.stderr)
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
    except KeyboardInterrupt as e:         # before the command's own handler took over (config composition)
        print(f"dice {name}: interrupted", file=sys.stderr)
        sys.exit(interrupt_exit_code(e))
    except BrokenPipeError:                # `dice train --help | head`: the reader left; not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


if __name__ == "__main__":
    main()
