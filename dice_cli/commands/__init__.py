"""Hydra entry points, one module per ``dice`` subcommand.

Each module holds a ``@hydra.main`` around an undecorated function that converts the composed config to a
typed dataclass and calls the core code. Hydra objects stop here.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import USAGE_EXIT_CODE, UserError, interrupt_exit_code
from ..lock import scope

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")
# OS errors that are about the user's files or machine (full disk, permissions, names), not bugs: exit 2
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG,
               errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.EFBIG, errno.EIO}


def _run_dir(out, command: str) -> str:
    """hydra.run.dir of older configs: the user's out=, else a unique outputs/<command>/<time>_<suffix>."""
    from ..run import default_run_name

    if out not in (None, "", "None", "null"):
        return str(out)
    return default_run_name(command)


def _job_dirname(num, overrides) -> str:
    """Sweep job folder: '<num>__<key=value__...>' with Hydra's escapes and path-hostile characters removed."""
    name = str(overrides or "").replace("\\", "")
    for bad, good in ((":", "-"), ("/", "_"), (",", "+"), (" ", ""), ("[", ""), ("]", ""), ("'", ""), ('"', "")):
        name = name.replace(bad, good)
    return f"{num}__{name}" if name else str(num)


def _keys_help(command: str, *, _root_) -> str:
    """``hydra.help.template``'s key section: the command's own keys with descriptions and the composed
    values (``$`` doubled: Hydra passes the template through string.Template)."""
    from .. import config
    from ..cli import GROUP_COMMANDS, SCHEMAS, _groups
    from ..keyhelp import help_text

    raw = OmegaConf.to_container(_root_, resolve=False)
    hydra_node = raw.pop("hydra", {}) or {}
    try:
        values = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    except OmegaConfBaseException:
        values = raw
    choices = {k: v for k, v in ((hydra_node.get("runtime") or {}).get("choices") or {}).items()
               if not k.startswith("hydra")}
    groups = _groups() if command in GROUP_COMMANDS else None
    text = help_text(getattr(config, SCHEMAS[command]), values, groups, choices)
    return text.replace("$", "$$")


if not OmegaConf.has_resolver("dice_keys_help"):
    OmegaConf.register_new_resolver("dice_keys_help", _keys_help)
if not OmegaConf.has_resolver("dice_run_dir"):
    OmegaConf.register_new_resolver("dice_run_dir", _run_dir, use_cache=True)
if not OmegaConf.has_resolver("dice_job_dirname"):
    OmegaConf.register_new_resolver("dice_job_dirname", _job_dirname)


@contextmanager
def _signals() -> Iterator[None]:
    """SIGTERM (a scheduler's time limit, ``kill``) raises ``Interrupted`` like Ctrl-C raises
    KeyboardInterrupt, so the same clean-up runs; a second SIGTERM during that clean-up is ignored."""
    from ..errors import Interrupted

    def on_term(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Interrupted(signum)

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:                       # not the main thread: leave signals alone
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _read_errors() -> tuple:
    """Exceptions of file readers meaning 'this file is not what it should be' (truncated, garbage)."""
    import pickle

    import pandas as pd
    import yaml

    return (yaml.YAMLError, json.JSONDecodeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError,
            pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError)


def fail(command: str, message: str, code: int = USAGE_EXIT_CODE) -> None:
    _discard_empty_job_dir()
    print(f"dice {command}: {message}", file=sys.stderr)
    sys.exit(code)


@contextmanager
def user_errors(command: str) -> Iterator[None]:
    """Turn every expected failure into one message and an exit code, never a traceback: UserError and
    config errors exit 2; full disks, permissions and unreadable files exit 2 naming the file; Ctrl-C exits
    130 and SIGTERM 143 with "interrupted at ...; run the same command again to resume". Directories this
    command locked are released (``dice_cli.lock.scope``) and marked interrupted/failed/diverged first."""
    from ..cli import task_started

    task_started()
    try:
        with _signals(), scope():
            yield
    except UserError as e:
        fail(command, f"error: {e}")
    except OmegaConfBaseException as e:
        fail(command, f"config error: {e}")
    except KeyboardInterrupt as e:
        where = getattr(e, "dice_where", None)
        again = "resume" if command in ("train", "pipeline") else "finish it"
        fail(command, f"interrupted{' ' + where if where else ''}; run the same command again to {again}",
             interrupt_exit_code(e))
    except OSError as e:
        if e.errno not in USER_ERRNOS:
            raise
        name = f" {e.filename}" if e.filename else ""
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            fail(command, f"error: no space left on the device (writing{name or ' a file'}); the run stopped "
                          f"and is marked 'failed'. Free some space, then run the same command again to resume")
        fail(command, f"error: {e.strerror or e}{':' + name if name else ''}; fix that (a path you may write, "
                      f"a shorter name), then run the same command again")
    except _read_errors() as e:
        fail(command, f"error: a file could not be read ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
                      f"it is truncated or not what dice wrote. Restore it, or delete it and run the command that "
                      f"wrote it again")


def _discard_empty_job_dir() -> None:
    """Hydra makes the job directory before the task runs; a job refused at once leaves nothing behind."""
    from hydra.core.hydra_config import HydraConfig

    from ..run import RunDir

    if HydraConfig.initialized() and HydraConfig.get().runtime.output_dir != os.getcwd():
        RunDir(HydraConfig.get().runtime.output_dir).discard_if_empty()


def job_out_dir(cfg_out, command: str) -> Path:
    """The run directory: out= if given, the job's sweep directory under -m, else a new unique
    outputs/<command>/<date>_<time>-<ms>_<random> (two runs started in the same second never share one)."""
    if cfg_out:
        return Path(cfg_out)
    job = sweep_job_dir()
    if job is not None:
        return job
    from hydra.core.hydra_config import HydraConfig

    from ..run import default_run_name

    if HydraConfig.initialized():
        out = Path(HydraConfig.get().runtime.output_dir)
        if out.resolve() != Path.cwd().resolve():
            return out                       # a config that still sets hydra.run.dir
    return Path(default_run_name(command))


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


def typed_config(cfg, schema, command: str):
    """The composed config, checked key by key against ``schema`` (so ``+foo=1`` or a preset's stray key
    is an error, with the nearest valid key suggested), as the validated dataclass."""
    from ..config import check_known_keys, to_dataclass

    check_known_keys(plain_config(cfg), schema, command)
    return to_dataclass(cfg, schema)
