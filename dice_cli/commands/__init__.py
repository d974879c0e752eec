"""Hydra entry points, one module per ``dice`` subcommand.

Each module holds a ``@hydra.main`` around an undecorated function that converts the composed config to a
typed dataclass and calls the core code. Hydra objects stop here.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import USAGE_EXIT_CODE, UserError

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


def _run_dir(out, command: str) -> str:
    """hydra.run.dir: the user's out=, else outputs/<command>/<timestamp>."""
    if out not in (None, "", "None", "null"):
        return str(out)
    return f"outputs/{command}/{time.strftime('%Y-%m-%d_%H-%M-%S')}"


def _job_dirname(num, overrides) -> str:
    """Sweep job folder: '<num>__<key=value__...>' with Hydra's escapes and path-hostile characters removed."""
    name = str(overrides or "").replace("\\", "")
    for bad, good in ((":", "-"), ("/", "_"), (",", "+"), (" ", ""), ("[", ""), ("]", ""), ("'", ""), ('"', "")):
        name = name.replace(bad, good)
    return f"{num}__{name}" if name else str(num)


if not OmegaConf.has_resolver("dice_run_dir"):
    OmegaConf.register_new_resolver("dice_run_dir", _run_dir)
if not OmegaConf.has_resolver("dice_job_dirname"):
    OmegaConf.register_new_resolver("dice_job_dirname", _job_dirname)


@contextmanager
def user_errors(command: str) -> Iterator[None]:
    """Turn UserError / config validation errors into a one-paragraph message and exit code 2."""
    from ..cli import task_started

    task_started()
    try:
        yield
    except UserError as e:
        _discard_empty_job_dir()
        print(f"dice {command}: error: {e}", file=sys.stderr)
        sys.exit(USAGE_EXIT_CODE)
    except OmegaConfBaseException as e:
        _discard_empty_job_dir()
        print(f"dice {command}: config error: {e}", file=sys.stderr)
        sys.exit(USAGE_EXIT_CODE)


def _discard_empty_job_dir() -> None:
    """Hydra makes the job directory before the task runs; a job refused at once leaves nothing behind."""
    from hydra.core.hydra_config import HydraConfig

    from ..run import RunDir

    if HydraConfig.initialized() and HydraConfig.get().runtime.output_dir != os.getcwd():
        RunDir(HydraConfig.get().runtime.output_dir).discard_if_empty()


def job_out_dir(cfg_out, command: str) -> Path:
    """The run directory: out= if given, else the directory Hydra made for this job (unique per -m job)."""
    if cfg_out:
        return Path(cfg_out)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def sweep_job_dir():
    """Under ``-m`` the job's own sweep directory (so sweep points never collide), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().runtime.output_dir)
    return None


def plain_config(cfg) -> dict:
    """The composed config without Hydra's node, as plain containers (what config.yaml stores)."""
    d = OmegaConf.to_container(cfg, resolve=True)
    d.pop("hydra", None)
    return d
