"""Figures written next to the CSVs (matplotlib, Agg backend, atomic PNG writes).

    dice gt hops=3          # -> <run>/gt/decay.png, heatmap.png
    dice estimate hops=3    # -> <run>/estimate/alignment.png (when a gt result exists), decay.png, heatmap.png
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from . import atomic  # noqa: E402


def alignment_scatter(merged: pd.DataFrame, path: Path, title: str = "") -> None:
    """GT (x) against the estimate (y), one colour per hop, with the y = x line."""
    fig, ax = plt.subplots(figsize=(5.2, 5))
    hops = sorted(merged["hop"].unique())
    cmap = plt.get_cmap("viridis", max(len(hops), 2))
    for i, h in enumerate(hops):
        d = merged[merged["hop"] == h]
        ax.scatter(d["gt"], d["est"], s=8, alpha=0.6, color=cmap(i), label=f"hop {h}")
    lim = np.nanmax(np.abs(merged[["gt", "est"]].to_numpy())) if len(merged) else 1.0
    ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.8)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("ground truth (loss with − loss without)")
    ax.set_ylabel("estimate")
    ax.set_title(title)
    ax.legend(fontsize=8, markerscale=2)
    atomic.save_figure(path, fig)


def hop_decay(tables: Dict[str, pd.DataFrame], path: Path) -> None:
    """Mean |influence| per hop (log scale), one line per table (e.g. gt, exact, first_order)."""
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for name, df in tables.items():
        per_unit = df.groupby(["round", "source", "sample", "hop"])["influence"].apply(lambda v: v.abs().sum())
        m = per_unit.groupby("hop").mean()
        ax.plot(m.index, m.values, marker="o", label=name)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("hop s (0 = direct, pre-gossip)")
    ax.set_ylabel("mean over units of Σ_k |influence|")
    ax.set_title("influence decay with hops")
    ax.legend(fontsize=8)
    atomic.save_figure(path, fig)


def node_heatmap(df: pd.DataFrame, n: int, path: Path, title: str = "") -> None:
    """Source × target influence, summed over units, rounds and hops ≥ 1 (diverging, centred at 0)."""
    d = df[df["hop"] >= 1].groupby(["source", "target"])["influence"].sum()
    m = np.zeros((n, n))
    for (j, k), v in d.items():
        m[int(j), int(k)] = v
    lim = np.abs(m).max() or 1.0
    fig, ax = plt.subplots(figsize=(5.6, 4.8))
    im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_xlabel("target node k")
    ax.set_ylabel("source node j")
    ax.set_title(title or "influence of source on target (hops ≥ 1; + hurts, − helps)")
    fig.colorbar(im, ax=ax, shrink=0.85)
    atomic.save_figure(path, fig)


def roc_curve_plot(fpr: np.ndarray, tpr: np.ndarray, auc: Optional[float], path: Path, title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot(fpr, tpr, lw=2, label=f"AUC = {auc:.3f}" if auc is not None else None)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title or "ROC")
    if auc is not None:
        ax.legend(loc="lower right")
    atomic.save_figure(path, fig)
