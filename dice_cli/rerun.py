"""The cheap path of a rerun: a command whose result is already complete with the same config does nothing,
and finds that out before anything heavy (torch, pandas, matplotlib) is imported.

Every command that writes a result directory (``dice train``, ``gt``, ``estimate``, ``detect``) asks
``already_complete`` first; this module imports only the run-directory helpers (yaml, json), and
tests/test_cli.py checks in a subprocess that such a rerun leaves ``torch`` out of ``sys.modules``.

    dice train out=outputs/ring        # second time: "... already complete with this config; nothing to do."
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .run import RunDir


def already_complete(kind: str, out: Path, identity: dict, overwrite: bool, what: str = "config",
                     wait: bool = False, hold: Optional[str] = None) -> bool:
    """True (after saying so) when ``out`` holds a complete ``kind`` result made with ``identity``.

    A different config without ``overwrite``, or a result of another kind, raises the same UserError the
    command itself would (``RunDir.check``), before anything is written. ``wait`` / ``hold``: how the
    directory's lock is taken (``RunDir.lock``; shard jobs wait and hold it only to claim).
    """
    rd = RunDir(out, kind)
    rd.lock(wait=wait, hold=hold)
    if kind == "train":
        from .errors import UserError
        from .extend import extension_base

        try:
            if extension_base(rd, identity) is not None:
                return False                    # more rounds for a finished run: training extends it
        except UserError:                       # fewer rounds: refused, unless it is to be replaced
            if not overwrite:
                raise
            return False
    if rd.check(identity, overwrite) != "complete":
        return False
    print(f"dice {kind}: {out} is already complete with this {what}; nothing to do.")
    return True
