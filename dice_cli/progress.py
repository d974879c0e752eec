"""The progress bar every long command shows: tqdm on stderr with rate and ETA, drawn only when stderr is a
terminal (``disable=None``), and never with ``progress=false``.

    with bar(cfg.progress, total=len(units), desc="dice gt", unit="unit") as b: ...
"""
from __future__ import annotations

import sys


def bar(enabled: bool, total: int, desc: str, unit: str = "round", **kw):
    """A tqdm bar (also a context manager); a no-op one when ``enabled`` is false or stderr is no terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr,
                disable=None if enabled else True, **kw)
