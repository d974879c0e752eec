"""The long influence tables that gt, estimate and value write, and how they are read back exactly.

Every influence command writes one row per (unit, target[, hop]) in long format, floats at ``%.17g`` so a
ground-truth difference of 1e-15 survives the file, and reads it back bit-exactly.

    write_table(out / "influence.csv", df)
    df = read_table(out / "influence.csv")
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import pandas as pd

from .. import atomic

# read %.17g floats back bit-exactly: pandas >= 3 does by default (and deprecates the option)
_EXACT_FLOATS = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}


def write_table(path: Union[str, Path], df: pd.DataFrame) -> None:
    """Write ``df`` atomically as CSV with every float at full precision (%.17g)."""
    atomic.write_text(path, df.to_csv(index=False, float_format="%.17g"))


def read_table(path: Union[str, Path]) -> pd.DataFrame:
    """Read a table written by ``write_table``; floats come back bit-identical."""
    return pd.read_csv(path, **_EXACT_FLOATS)
