"""How well an estimate tracks ground truth: Pearson, Spearman, sign agreement and n.

Computed overall, per hop, and for the per-unit totals GT_r(u) = Σ_{s ≤ r} Σ_k GT(u, k, s) against E_r(u),
over the (unit, target) pairs the unit can reach (pairs where both are exactly 0 are counted, not correlated).

    dice gt hops=3 && dice estimate hops=3 method=exact     # -> <run>/estimate/alignment.json
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

KEYS = ["round", "source", "unit", "sample", "target", "hop"]


def merge(gt: pd.DataFrame, est: pd.DataFrame) -> pd.DataFrame:
    """Rows present in both tables, with columns gt and est."""
    a = gt[KEYS + ["influence"]].rename(columns={"influence": "gt"})
    b = est[KEYS + ["influence"]].rename(columns={"influence": "est"})
    return a.merge(b, on=KEYS, how="inner")


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r, as ``scipy.stats.pearsonr`` computes it (centred, normalised dot product, clipped to
    [-1, 1]); numpy only, so an estimate does not pay scipy.stats' ~1 s import. tests/test_estimate.py
    checks it and ``average_ranks`` against scipy."""
    xm, ym = x - x.mean(), y - y.mean()
    r = float(np.dot(xm / np.linalg.norm(xm), ym / np.linalg.norm(ym)))
    return max(-1.0, min(1.0, r))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (``scipy.stats.rankdata(method="average")``), so
    that Spearman's rho = pearson(average_ranks(x), average_ranks(y)) as in ``scipy.stats.spearmanr``."""
    order = np.argsort(x, kind="mergesort")
    inv = np.empty(order.size, dtype=np.intp)
    inv[order] = np.arange(order.size)
    xs = x[order]
    obs = np.r_[True, xs[1:] != xs[:-1]]
    dense = obs.cumsum()[inv]
    count = np.r_[np.nonzero(obs)[0], len(obs)]
    return 0.5 * (count[dense] + count[dense - 1] + 1)


def agreement(x: np.ndarray, y: np.ndarray) -> Dict[str, float]:
    """Pearson, Spearman, sign agreement (over pairs where both are non-zero) and n.

    Pairs where ground truth and estimate are both exactly 0 — targets the unit cannot reach within the
    hop — are left out (counted in ``n_both_zero``): they agree by construction, and their block of tied
    zeros would otherwise dominate the rank correlation.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    both_zero = (x == 0) & (y == 0)
    x, y = x[~both_zero], y[~both_zero]
    out: Dict[str, float] = {"n": int(len(x)), "n_both_zero": int(both_zero.sum())}
    if len(x) >= 3 and np.std(x) > 0 and np.std(y) > 0:
        out["pearson"] = pearson(x, y)
        out["spearman"] = pearson(average_ranks(x), average_ranks(y))
    else:
        out["pearson"] = out["spearman"] = float("nan")
    nz = (x != 0) & (y != 0)
    out["sign_agreement"] = float(np.mean(np.sign(x[nz]) == np.sign(y[nz]))) if nz.any() else float("nan")
    out["mean_abs_gt"] = float(np.mean(np.abs(x))) if len(x) else float("nan")
    out["relative_error"] = float(np.sum(np.abs(x - y)) / max(np.sum(np.abs(x)), 1e-300)) if len(x) else float("nan")
    return out


def alignment_report(merged: pd.DataFrame) -> dict:
    """The alignment.json payload: overall, per hop, and per-unit totals up to each hop r."""
    report = {"overall": agreement(merged["gt"], merged["est"]), "per_hop": {}, "per_unit_total": {}}
    for h, d in merged.groupby("hop"):
        report["per_hop"][str(int(h))] = agreement(d["gt"], d["est"])
    unit_keys = ["round", "source", "unit", "sample"]
    for r in sorted(merged["hop"].unique()):
        tot = merged[merged["hop"] <= r].groupby(unit_keys)[["gt", "est"]].sum()
        report["per_unit_total"][str(int(r))] = agreement(tot["gt"], tot["est"])
    return report
