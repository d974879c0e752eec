"""Figures written next to the CSVs (matplotlib, Agg backend, atomic PNG writes).

    dice gt hops=3          # -> <run>/gt/decay.png, heatmap.png
    dice estimate hops=3    # -> <run>/estimate/alignment.png (when a gt result exists), decay.png, heatmap.png
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pandas as pd

from . import atomic

DEFAULT_NODE_COLOR = "#9ecae1"


def _pyplot():
    """matplotlib.pyplot on the Agg backend, imported on first use (it costs ~1 s of startup)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def alignment_scatter(merged: pd.DataFrame, path: Path, title: str = "") -> None:
    """GT (x) against the estimate (y), one colour per hop, with the y = x line."""
    plt = _pyplot()
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
    import matplotlib.ticker

    plt = _pyplot()
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
    plt = _pyplot()
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


def roc_overlay(curves: Dict[str, tuple], path: Path, title: str = "") -> None:
    """One ROC curve per detector score: curves {score: (fpr, tpr, auc)}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.4, 5.0))
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, lw=1.8, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate (honest senders flagged)")
    ax.set_ylabel("true positive rate (attackers flagged)")
    ax.set_title(title or "ROC of every detector score")
    ax.legend(loc="lower right", fontsize=8)
    atomic.save_figure(path, fig)


def roc_curve_plot(fpr: np.ndarray, tpr: np.ndarray, auc: Optional[float], path: Path, title: str = "") -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot(fpr, tpr, lw=2, label=f"AUC = {auc:.3f}" if auc is not None else None)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title or "ROC")
    if auc is not None:
        ax.legend(loc="lower right")
    atomic.save_figure(path, fig)


def metrics_plot(metrics: pd.DataFrame, path: Path, attackers=()) -> None:
    """Probe loss, probe accuracy and consensus distance against the round: the mean over honest nodes with
    their min–max band and, when the run has attackers, the attackers' mean drawn apart (red, dashed)."""
    plt = _pyplot()
    bad = metrics["node"].isin(list(attackers))
    honest_label = "honest nodes" if bad.any() else "all nodes"
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, col, title in zip(axes, ["probe_loss", "probe_acc", "consensus_distance"],
                              ["probe loss", "probe accuracy", "consensus distance ‖θ_k − θ̄‖²"]):
        # a diverged attacker leaves inf / NaN, a diverging run astronomically large values: off the chart
        finite = metrics[col].where(np.isfinite(metrics[col]) & (metrics[col].abs() < 1e30))
        g = finite[~bad].groupby(metrics.loc[~bad, "round"])
        ga = finite[bad].groupby(metrics.loc[bad, "round"])
        mean, lo, hi = g.mean(), g.min(), g.max()
        ax.plot(mean.index, mean.values, label=f"mean over {honest_label}")
        ax.fill_between(mean.index, lo.values, hi.values, alpha=0.25, label=f"min–max ({honest_label})")
        if bad.any():
            am = ga.mean()
            ax.plot(am.index, am.values, color="#d62728", ls="--", label=f"attackers {sorted(attackers)} (mean)")
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.set_ylabel(col.replace("_", " "))
        if col == "consensus_distance" and len(mean.dropna()) and (mean.dropna() > 0).all():
            ax.set_yscale("log")
    loss = metrics["train_loss"].where(np.isfinite(metrics["train_loss"]) & (metrics["train_loss"].abs() < 1e30))
    tl = loss[~bad].groupby(metrics.loc[~bad, "round"]).mean()
    axes[0].plot(tl.index, tl.values, alpha=0.6, label=f"train batch loss ({honest_label})")
    axes[0].legend(fontsize=8)
    if bad.any():
        axes[1].legend(fontsize=8)
    atomic.save_figure(path, fig)


def topology_plot(W: np.ndarray, path: Path, title: str = "", node_colors: Optional[Dict] = None) -> None:
    """Draw W as a graph and save a PNG at ``path`` (atomic).

    An edge l → k is drawn where W[k, l] > 0 (k ≠ l): arrows point from sender to receiver when the
    pattern is directed; width grows with the weight. ``node_colors`` maps node -> matplotlib colour
    (e.g. flagged nodes); other nodes are light blue. Above 64 nodes: no labels, small nodes.
    Uses a bare Agg-rendered Figure, so pyplot's global backend is not touched.
    """
    import networkx as nx
    from matplotlib.figure import Figure

    W = np.asarray(W, dtype=np.float64)
    n = W.shape[0]
    off = (W > 0) & ~np.eye(n, dtype=bool)
    directed = not np.array_equal(off, off.T)
    G = nx.DiGraph() if directed else nx.Graph()
    G.add_nodes_from(range(n))
    edges, weights = [], []
    for k, l in zip(*np.nonzero(off)):
        if directed:
            edges.append((int(l), int(k)))
            weights.append(W[k, l])
        elif l < k:
            edges.append((int(l), int(k)))
            weights.append(0.5 * (W[k, l] + W[l, k]))
    G.add_edges_from(edges)
    big = n > 64
    node_size = 25 if big else 320
    pos = nx.circular_layout(G)
    colors = [(node_colors or {}).get(i, DEFAULT_NODE_COLOR) for i in range(n)]
    fig = Figure(figsize=(9, 9) if big else (6, 6))
    ax = fig.add_subplot()
    ax.set_axis_off()
    if edges:
        wmax = max(weights)
        widths = [0.3 + 2.7 * w / wmax for w in weights]
        arrows = directed and len(edges) <= 2000     # FancyArrowPatches get slow beyond that
        style = {"arrowsize": 6 if big else 12, "connectionstyle": "arc3,rad=0.08"} if arrows else {}
        nx.draw_networkx_edges(G, pos, ax=ax, edgelist=edges, width=widths, alpha=0.6,
                               edge_color="#555555", node_size=node_size, arrows=arrows, **style)
    nx.draw_networkx_nodes(G, pos, ax=ax, node_size=node_size, node_color=colors,
                           edgecolors="#333333", linewidths=0.5 if big else 1.0)
    if not big:
        nx.draw_networkx_labels(G, pos, ax=ax, font_size=8)
    if title:
        ax.set_title(title)
    if directed:
        ax.text(0.0, 0.0, "arrow l → k: k receives from l (W[k, l] > 0)", transform=ax.transAxes,
                fontsize=7, color="#555555")
    atomic.save_figure(path, fig)
