"""User-facing errors: what the user got wrong, named precisely, with the fix.

Every mistake a user can make (a bad key, an unknown choice, a missing run directory) raises
``UserError``; the ``dice`` dispatcher prints its message and exits with code 2, no traceback.
Unknown keys and choices come with the nearest valid spelling ("did you mean `rounds`?").

Exit codes: 0 success, 1 a bug (traceback), 2 a usage error or a run directory that cannot be used as it is,
130 interrupted by Ctrl-C (SIGINT), 143 stopped by SIGTERM (a scheduler's time limit, ``kill``).
"""
from __future__ import annotations

import difflib
import signal
from typing import Any, Dict, Iterable, Optional

USAGE_EXIT_CODE = 2
INTERRUPT_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class UserError(Exception):
    """A mistake in the user's input. ``str(err)`` is the complete message shown to the user."""


class DivergenceError(UserError):
    """Training diverged (NaN/inf, or a loss or parameter norm past the ``divergence`` bound): the message
    names the round and node; ``details`` (round, node, quantity, value, bound) goes into the manifest."""

    def __init__(self, message: str, **details: Any):
        super().__init__(message)
        self.details: Dict[str, Any] = details


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) turned into an exception, so every ``except KeyboardInterrupt`` clean-up runs."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interrupt_exit_code(e: BaseException) -> int:
    """130 for Ctrl-C (a plain KeyboardInterrupt), 143 for SIGTERM."""
    return INTERRUPT_EXIT_CODES.get(getattr(e, "signum", signal.SIGINT), 130)


def note_where(e: BaseException, where: str) -> None:
    """Record on an interrupt or error what the command was doing (the innermost caller's words win)."""
    if not getattr(e, "dice_where", None):
        try:
            e.dice_where = where
        except AttributeError:
            pass


def suggest(word: Any, candidates: Iterable[Any]) -> str:
    """' Did you mean `rounds`?' for the closest candidate to ``word``, or '' when none is close."""
    names = [str(c) for c in candidates]
    close = difflib.get_close_matches(str(word), names, n=1, cutoff=0.6)
    return f" Did you mean `{close[0]}`?" if close else ""


def bad_value(key: str, value: Any, choices: Optional[Iterable[Any]] = None, fix: str = "") -> UserError:
    """Build the standard message: the key, the value, the allowed choices and the fix.

    >>> str(bad_value("engine", "jax", ["vmap", "loop"]))
    "engine='jax' is not valid; choose one of: vmap, loop"
    >>> str(bad_value("engine", "lop", ["vmap", "loop"]))
    "engine='lop' is not valid; choose one of: vmap, loop. Did you mean `loop`?"
    """
    msg = f"{key}={value!r} is not valid"
    hint = ""
    if choices is not None:
        choices = list(choices)
        msg += "; choose one of: " + ", ".join(str(c) for c in choices)
        hint = suggest(value, choices)
    if fix:
        msg += f". {fix}"
    if hint:
        msg += ("" if msg.endswith(".") else ".") + hint
    return UserError(msg)


def check_choice(key: str, value: Any, choices: Iterable[Any], fix: str = "") -> None:
    """Raise ``bad_value`` unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise bad_value(key, value, choices, fix)


def check_range(key: str, value: float, lo: Optional[float] = None, hi: Optional[float] = None,
                lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise a UserError unless lo <= value <= hi (strict where *_open)."""
    ok = True
    if lo is not None:
        ok &= value > lo if lo_open else value >= lo
    if hi is not None:
        ok &= value < hi if hi_open else value <= hi
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise UserError(f"{key}={value!r} is out of range; it must lie in {rng}")
