"""User-facing errors: what the user got wrong, named precisely, with the fix.

Every mistake a user can make (a bad key, an unknown choice, a missing run directory) raises
``UserError``; the ``dice`` dispatcher prints its message and exits with code 2, no traceback.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

USAGE_EXIT_CODE = 2


class UserError(Exception):
    """A mistake in the user's input. ``str(err)`` is the complete message shown to the user."""


def bad_value(key: str, value: Any, choices: Optional[Iterable[Any]] = None, fix: str = "") -> UserError:
    """Build the standard message: the key, the value, the allowed choices and the fix.

    >>> str(bad_value("engine", "jax", ["vmap", "loop"]))
    "engine='jax' is not valid; choose one of: vmap, loop"
    """
    msg = f"{key}={value!r} is not valid"
    if choices is not None:
        msg += "; choose one of: " + ", ".join(str(c) for c in choices)
    if fix:
        msg += f". {fix}"
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
