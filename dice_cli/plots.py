"""Figures written next to the CSVs (matplotlib, Agg backend, atomic PNG writes).

    dice gt hops=3          # -> <run>/gt/decay.png, heatmap.png
    dice estimate hops=3    # -> <run>/estimate/alignment.png (when a gt result exists), decay.png, heatmap.png

Drawing costs a command ~1 s (importing matplotlib, rendering), as much as its other work beyond importing
torch. Inside ``with background():`` (each ``dice`` command's entry point) the figure functions below hand
their arguments to a child process (``python -m dice_cli.plots``) started at the block's entry: it imports
matplotlib on the other core while the parent imports torch and computes, draws in submission order, and
``wait()`` (called before a result is marked complete) and the block's exit join it, raising if a figure
failed. The files are the same as drawn inline; inline drawing is used when matplotlib is already imported
(a library or test process that has drawn before), with ``DICE_PLOTS=inline``, on one CPU, or when the
child cannot start; ``DICE_PLOTS=background`` always uses the child.
"""
from __future__ import annotations

import functools
import json
import os
import pickle
import struct
import subprocess
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Mapping, Optional

import numpy as np

from . import atomic

if TYPE_CHECKING:        # pandas only where a table is plotted (imported by the caller that has one)
    import pandas as pd

DEFAULT_NODE_COLOR = "#9ecae1"
_DRAW: Dict[str, Callable] = {}          # figure name -> the function that draws it here


class _Painter:
    """The child process that draws: length-prefixed pickles (name, args, kwargs) in, one line per figure
    out ("ok" or "err" and a JSON traceback)."""

    def __init__(self):
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen([sys.executable, "-m", "dice_cli.plots"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)
        self.pending: List[str] = []
        self.submitted = 0

    def submit(self, name: str, args, kwargs) -> None:
        data = pickle.dumps((name, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.proc.stdin.write(struct.pack("<Q", len(data)) + data)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass                            # the child died: wait() reports it
        self.pending.append(name)
        self.submitted += 1

    def wait(self) -> None:
        errors = []
        for name in self.pending:
            line = self.proc.stdout.readline().decode()
            if line.startswith("ok"):
                continue
            detail = json.loads(line[4:]) if line.startswith("err ") else "the plot process exited"
            errors.append(f"drawing {name} failed in the plot process:\n{detail}")
            if not line:
                break
        self.pending = []
        if errors:
            raise RuntimeError("\n".join(errors))

    def close(self) -> None:
        if not self.submitted:          # nothing to draw (e.g. a rerun with nothing to do): do not wait
            self.kill()                 # for the child to finish importing matplotlib
            return
        try:
            self.wait()
        finally:
            self.proc.stdin.close()
            self.proc.wait()
            self.proc.stdout.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


_painter: Optional[_Painter] = None


@contextmanager
def background() -> Iterator[None]:
    """Draw this block's figures in a child process (see the module docstring); joined on exit."""
    global _painter
    mode = os.environ.get("DICE_PLOTS", "auto")          # auto | inline | background
    inline = _painter is not None or mode == "inline" or (
        mode != "background" and ("matplotlib" in sys.modules or (os.cpu_count() or 1) < 2))
    painter = None
    if not inline:
        try:
            painter = _Painter()
        except OSError:
            painter = None
    if painter is None:
        yield
        return
    _painter = painter
    try:
        yield
    except BaseException:
        _painter = None
        painter.kill()
        raise
    _painter = None
    painter.close()


def wait() -> None:
    """Block until every figure handed to the background process is written (raise if one failed)."""
    if _painter is not None:
        _painter.wait()


def _figure(fn: Callable) -> Callable:
    """A figure function: drawn here, or handed to the background process inside ``background()``."""
    _DRAW[fn.__name__] = fn

    @functools.wraps(fn)
    def draw(*args, **kwargs) -> None:
        if _painter is not None:
            _painter.submit(fn.__name__, args, kwargs)
        else:
            fn(*args, **kwargs)
    return draw


def _serve() -> None:
    """The background process: import matplotlib at once, then draw what arrives, in order."""
    _pyplot()
    import networkx  # noqa: F401  (topology_plot's, imported now rather than on the first figure)

    stdin, stdout = sys.stdin.buffer, sys.stdout
    while True:
        head = stdin.read(8)
        if len(head) < 8:
            return
        (size,) = struct.unpack("<Q", head)
        data = stdin.read(size)
        try:
            name, args, kwargs = pickle.loads(data)
            _DRAW[name](*args, **kwargs)
            stdout.write("ok\n")
        except BaseException:
            stdout.write("err " + json.dumps(traceback.format_exc()) + "\n")
        stdout.flush()


def _pyplot():
    """matplotlib.pyplot on the Agg backend, imported on first use (it costs ~1 s of startup)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@_figure
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


@_figure
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


@_figure
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


@_figure
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


@_figure
def metrics_plot(metrics: Mapping[str, np.ndarray], path: Path, attackers=()) -> None:
    """Probe loss, probe accuracy and consensus distance against the round (mean over nodes, min–max band).

    ``metrics``: the metrics.csv columns by name (a dict of arrays, or a DataFrame), one entry per
    (round, node).
    """
    plt = _pyplot()
    rnd = np.asarray(metrics["round"])
    order = np.argsort(rnd, kind="stable")
    rounds, starts = np.unique(rnd[order], return_index=True)
    counts = np.diff(np.append(starts, len(rnd)))

    def per_round(col):
        v = np.asarray(metrics[col], dtype=np.float64)[order]
        return (np.add.reduceat(v, starts) / counts, np.minimum.reduceat(v, starts),
                np.maximum.reduceat(v, starts))

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, col, title in zip(axes, ["probe_loss", "probe_acc", "consensus_distance"],
                              ["probe loss", "probe accuracy", "consensus distance ‖θ_k − θ̄‖²"]):
        mean, lo, hi = per_round(col)
        ax.plot(rounds, mean, label="mean over nodes")
        ax.fill_between(rounds, lo, hi, alpha=0.25, label="min–max")
        ax.set_title(title)
        ax.set_xlabel("round")
        if col == "consensus_distance" and (mean > 0).all():
            ax.set_yscale("log")
    axes[0].plot(rounds, per_round("train_loss")[0], alpha=0.6, label="train batch loss")
    axes[0].legend(fontsize=8)
    # fixed margins instead of bbox_inches="tight": one render instead of two (~0.15 s at the end of every
    # dice train), the same panels
    fig.subplots_adjust(left=0.045, right=0.99, bottom=0.14, top=0.91, wspace=0.2)
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


@_figure
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


if __name__ == "__main__":
    _serve()
    sys.stdout.flush()
    os._exit(0)      # every figure is written and acknowledged: skip tearing down matplotlib (~0.1 s)
