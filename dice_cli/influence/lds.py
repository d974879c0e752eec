"""Linear datamodeling score (VALUE.md §4): do additive unit influences predict removing many units at once?

Draw M seeded random subsets S_1 … S_M of the units (each unit in with probability α), retrain each
counterfactual on the copies axis (``retrain.gt_values(member=subsets)``), and for every target k compare

    actual_m(k) = q_k [L_k(θ_k^{T_e}) − L_k(θ_{k∖S_m}^{T_e})]    with    predicted_m(k) = Σ_{u ∈ S_m} I(u, k)

    LDS(k) = Spearman over m of (predicted_m(k), actual_m(k)),   LDS = mean over targets

with a percentile bootstrap interval over the M subsets (resampled with replacement). Targets whose actual
or predicted values do not vary over the subsets have no rank correlation and are left out (counted).
Given I = GT_run itself, LDS measures the additivity of the true single-unit effects.

    subsets = draw_subsets(U, 50, 0.5, seed=0)
    report = lds_score(subsets @ table, actual)
"""
from __future__ import annotations

from typing import Dict

import numpy as np
from scipy.stats import rankdata

# Default inclusion probability per unit kind (Ilyas et al. 2022 / TRAK use α = 0.5 for coarse units; sample
# units use 0.1 so a subset removes a modest share of the data).
DEFAULT_ALPHA = {"node": 0.5, "participant": 0.5, "batch": 0.1, "sample": 0.1}
BOOTSTRAP = 1000


def draw_subsets(U: int, M: int, alpha: float, seed: int) -> np.ndarray:
    """M subsets of U units, each unit in with probability α: bool [M, U] (``default_rng([seed, 13])``)."""
    return np.random.default_rng([int(seed), 13]).random((M, U)) < alpha


def spearman_columns(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column pair of x, y [M, D] (average ranks for ties): [D]; NaN where a
    column is constant."""
    rx, ry = rankdata(x, axis=0), rankdata(y, axis=0)
    rx = rx - rx.mean(0)
    ry = ry - ry.mean(0)
    den = np.sqrt((rx ** 2).sum(0) * (ry ** 2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (rx * ry).sum(0) / den
    r[den == 0] = np.nan
    return r


def lds_score(predicted: np.ndarray, actual: np.ndarray, boot: int = BOOTSTRAP, seed: int = 0,
              level: float = 0.95) -> Dict[str, object]:
    """LDS of predicted vs actual [M, D]: {"lds": mean over targets, "ci": [lo, hi], "per_target": [D],
    "targets_scored", "targets_constant", "subsets"}."""
    predicted, actual = np.asarray(predicted, float), np.asarray(actual, float)
    M, D = actual.shape
    per = spearman_columns(predicted, actual)
    ok = ~np.isnan(per)
    mean = float(np.mean(per[ok])) if ok.any() else float("nan")
    lo = hi = float("nan")
    if ok.any() and M >= 3 and boot > 0:
        rng = np.random.default_rng([int(seed), 17])
        means = []
        for _ in range(boot):
            i = rng.integers(0, M, M)
            r = spearman_columns(predicted[i], actual[i])
            if np.isfinite(r).any():
                means.append(np.nanmean(r))
        if means:
            lo, hi = (float(v) for v in np.percentile(means, [50 * (1 - level), 50 * (1 + level)]))
    return {"lds": mean, "ci": [lo, hi], "level": level, "per_target": [None if np.isnan(v) else float(v) for v in per],
            "targets_scored": int(ok.sum()), "targets_constant": int((~ok).sum()), "subsets": int(M)}
