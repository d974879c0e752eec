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
    """Probe loss, probe accuracy and consensus distance against the round (mean over nodes, min–max band)."""
    plt = _pyplot()
    g = metrics.groupby("round")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, col, title in zip(axes, ["probe_loss", "probe_acc", "consensus_distance"],
                              ["probe loss", "probe accuracy", "consensus distance ‖θ_k − θ̄‖²"]):
        mean, lo, hi = g[col].mean(), g[col].min(), g[col].max()
        ax.plot(mean.index, mean.values, label="mean over nodes")
        ax.fill_between(mean.index, lo.values, hi.values, alpha=0.25, label="min–max")
        ax.set_title(title)
        ax.set_xlabel("round")
        if col == "consensus_distance" and (mean > 0).all():
            ax.set_yscale("log")
    tl = g["train_loss"].mean()
    axes[0].plot(tl.index, tl.values, alpha=0.6, label="train batch loss")
    axes[0].legend(fontsize=8)
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


# ---------------------------------------------------------------------------------------------- dice value
def _node_ticks(ax, n: int, axis: str = "both") -> None:
    """Every node labelled up to 16 nodes, else about 8 evenly spaced labels."""
    if n <= 16:
        ticks = np.arange(n)
    else:
        step = int(np.ceil(n / 8))
        step = min((v for v in (2, 4, 5, 8, 10, 16, 20, 25, 32, 50, 64, 100, 128) if v >= step), default=step)
        ticks = np.arange(0, n, step)
        ticks = np.append(ticks, n - 1) if n - 1 - ticks[-1] > step / 2 else np.append(ticks[:-1], n - 1)
    if axis in ("both", "x"):
        ax.set_xticks(ticks)
    if axis in ("both", "y"):
        ax.set_yticks(ticks)


def value_heatmap(df: pd.DataFrame, n: int, path: Path, title: str = "") -> None:
    """Source j × target k: Σ of the influence of j's units on k (``dice value``). Symmetric-log colours
    centred at 0 (red: removing j's units would lower k's loss, i.e. they hurt; blue: they helped), so the
    usually dominant self-influence does not hide the cross-node structure."""
    from matplotlib.colors import SymLogNorm

    plt = _pyplot()
    d = df.groupby(["source", "target"])["influence"].sum()
    m = np.zeros((n, n))
    for (j, k), v in d.items():
        if 0 <= int(k) < n:
            m[int(j), int(k)] = v
    lim = float(np.abs(m).max()) or 1.0
    side = 5.6 if n <= 32 else 7.5
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    im = ax.imshow(m, cmap="RdBu_r", norm=SymLogNorm(linthresh=lim * 1e-3, vmin=-lim, vmax=lim, base=10),
                   interpolation="nearest")
    _node_ticks(ax, n)
    ax.set_xlabel("target node k (whose final probe loss)")
    ax.set_ylabel("source node j (whose units are removed)")
    ax.set_title(title or "whole-run influence of source on target", fontsize=9)
    cb = fig.colorbar(im, ax=ax, shrink=0.85)
    cb.set_label("Σ influence = loss with − loss without (+ hurt, − helped; symlog)", fontsize=8)
    atomic.save_figure(path, fig)


def value_sources(df: pd.DataFrame, n: int, path: Path, network: bool = False, title: str = "") -> None:
    """Per source j: the total influence of its units summed over targets (bars) and, for targets=all, the
    spread of its per-target influence (box: quartiles, whiskers 5–95%)."""
    plt = _pyplot()
    per = df.groupby(["source", "target"])["influence"].sum().unstack(fill_value=0.0)
    per = per.reindex(range(n), fill_value=0.0)
    total = per.sum(axis=1).to_numpy()
    width = min(16.0, 5.0 + 0.28 * n)
    fig, axes = plt.subplots(1 if network else 2, 1, figsize=(width, 3.2 if network else 6.0), squeeze=False,
                             sharex=True)
    ax = axes[0, 0]
    ax.bar(np.arange(n), total, color=np.where(total > 0, "#d6604d", "#4393c3"), width=0.8)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_ylabel("total over targets k" if not network else "influence on the network loss")
    ax.set_title(title or "influence per source", fontsize=9)
    if not network:
        ax2 = axes[1, 0]
        ax2.boxplot([per.loc[j].to_numpy() for j in range(n)], positions=np.arange(n), widths=0.6,
                    whis=(5, 95), showfliers=False, manage_ticks=False)
        ax2.axhline(0, color="grey", lw=0.6)
        ax2.set_ylabel("per-target influence\n(spread over targets k)")
        ax2.set_xlabel("source node j")
        _node_ticks(ax2, n, "x")
    else:
        ax.set_xlabel("source node j")
        _node_ticks(ax, n, "x")
    atomic.save_figure(path, fig)


def value_scatter(x: np.ndarray, y: np.ndarray, path: Path, xlabel: str, ylabel: str, title: str = "") -> None:
    """An estimate (y) against GT_run (x), one point per (unit, target), with the y = x line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.4, 5.2))
    s = 10 if len(x) < 2000 else 3
    ax.scatter(x, y, s=s, alpha=0.5 if len(x) < 2000 else 0.25, color="#2171b5", lw=0)
    both = np.concatenate([x, y]) if len(x) else np.array([-1.0, 1.0])
    lo, hi = float(np.nanmin(both)), float(np.nanmax(both))
    pad = 0.05 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    if lo < 0 < hi:
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
    import matplotlib.ticker as mticker

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(mticker.MaxNLocator(5))
    ax.ticklabel_format(style="sci", scilimits=(-2, 3), axis="both")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    atomic.save_figure(path, fig)


def lds_scatter(results: Dict[str, tuple], actual: np.ndarray, path: Path, unit: str = "") -> None:
    """LDS: per method, predicted (Σ of the removed units' influences) against the actual retrained effect of
    each subset, both standardised per target (LDS is a per-target rank correlation, so each target's scale
    is irrelevant); the last panel shows the distribution of the per-target LDS.

    results: {method: (predicted [M, D], lds_score report)}; actual [M, D]."""
    plt = _pyplot()
    k = len(results)
    fig, axes = plt.subplots(1, k + 1, figsize=(4.3 * (k + 1), 4.2), squeeze=False)

    def z(a):
        sd = a.std(0, keepdims=True)
        return (a - a.mean(0, keepdims=True)) / np.where(sd > 0, sd, 1.0)

    za = z(actual)
    for ax, (name, (pred, rep)) in zip(axes[0], results.items()):
        ax.scatter(za.reshape(-1), z(pred).reshape(-1), s=6, alpha=0.35, lw=0)
        ax.plot([-3, 3], [-3, 3], "k--", lw=0.7)
        ax.set_xlabel("actual effect of the subset (z-score per target)")
        ax.set_ylabel("predicted: Σ of I(u, k) over u in S (z-score per target)")
        lo, hi = rep["ci"]
        ax.set_title(f"{name}: LDS {rep['lds']:.3f} [{lo:.3f}, {hi:.3f}]\n{rep['subsets']} subsets of {unit} units, "
                     f"{rep['targets_scored']} targets", fontsize=9)
    ax = axes[0, -1]
    for name, (_, rep) in results.items():
        v = [x for x in rep["per_target"] if x is not None]
        if v:
            ax.hist(v, bins=min(20, max(5, len(v))), range=(-1, 1), alpha=0.5, label=name)
    ax.set_xlabel("LDS(k): Spearman over subsets")
    ax.set_ylabel("targets")
    ax.set_title("per-target LDS", fontsize=9)
    ax.legend(fontsize=8)
    atomic.save_figure(path, fig)
