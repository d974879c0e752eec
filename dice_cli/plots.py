"""Figures written next to the CSVs (matplotlib, Agg, atomic PNG writes).

    dice train              # -> <run>/metrics.png, topology.png
    dice gt hops=3          # -> <run>/gt/decay.png, heatmap.png
    dice estimate hops=3    # -> <run>/estimate/decay.png, heatmap.png; with a matching gt also alignment.png,
                            #    compare.png
    dice detect             # -> <run>/detect/roc.png, topology.png (nodes coloured by detection score)
    dice report DIR         # -> DIR/report/report.png

Every function here builds a bare ``matplotlib.figure.Figure`` (pyplot's global state is not touched),
saves it when ``path`` is given and returns it, so tests can read titles, ticks and lines back.

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
from typing import TYPE_CHECKING, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

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


def _deferrable(fn: Callable) -> Callable:
    """A figure function: drawn here (returning its figure), or handed to the background process inside
    ``background()`` (returning None)."""
    _DRAW[fn.__name__] = fn

    @functools.wraps(fn)
    def draw(*args, **kwargs):
        if _painter is None:
            return fn(*args, **kwargs)          # drawn here: the figure is returned
        _painter.submit(fn.__name__, args, kwargs)
        return None
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


HONEST_COLOR = "#1f77b4"
ATTACKER_COLOR = "#d62728"
METHOD_COLORS = {"gt": "#000000", "exact": "#1f77b4", "first_order": "#ff7f0e"}
FONT = 10                                   # base font size (pt) of the figures


def _pyplot():
    """matplotlib.pyplot on the Agg backend, imported on first use (it costs ~1 s of startup)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(width: float, height: float):
    """A bare Agg figure (no pyplot registry: nothing to close, nothing global)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path: Optional[Path]):
    if path is not None:
        atomic.save_figure(path, fig)
    return fig


def _method_color(name: str, i: int) -> str:
    import matplotlib

    return METHOD_COLORS.get(name, matplotlib.colormaps["tab10"](i % 10))


def _grid(k: int, max_cols: int = 4):
    cols = min(k, max_cols)
    return (k + cols - 1) // cols, cols


def node_ticks(n: int, max_ticks: int = 17) -> List[int]:
    """Integer node ticks 0 … n−1: every node up to ``max_ticks`` nodes, else a power-of-two stride."""
    step = 1
    while (n + step - 1) // step > max_ticks:
        step *= 2
    return list(range(0, n, step))


def _robust_limits(values: np.ndarray, log: bool = False):
    """(lo, hi, clipped): the 5–95 % range widened by its own width, never beyond the data."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if log:
        v = np.log10(v[v > 0])
    if not len(v):
        return None
    lo_all, hi_all = float(v.min()), float(v.max())
    q05, q95 = np.percentile(v, [5, 95])
    width = max(q95 - q05, 1e-12 * max(abs(q95), 1.0))
    lo, hi = max(lo_all, q05 - width), min(hi_all, q95 + width)
    clipped = lo > lo_all or hi < hi_all
    pad = 0.05 * max(hi - lo, 1e-12 * max(abs(hi), 1.0)) if hi > lo else max(abs(hi) * 0.05, 1e-12)
    lo, hi = lo - pad, hi + pad
    if log:
        lo, hi = 10 ** lo, 10 ** hi
    return lo, hi, clipped


# ------------------------------------------------------------------------------- influence figures


@_deferrable
def alignment_scatter(merged: pd.DataFrame, path: Optional[Path], report: dict, method: str = "estimate"):
    """Ground truth (x) against the estimate (y), one panel per hop, with the y = x line.

    Only the pairs the metrics use are drawn: pairs where both are exactly 0 (targets the unit cannot reach)
    are left out, as in ``alignment.json``; every n shown is the n of ``report`` (alignment.json).
    """
    hops = sorted(int(h) for h in merged["hop"].unique())
    rows, cols = _grid(max(len(hops), 1))
    fig = _figure(3.3 * cols, 3.2 * rows + 0.5)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, h in zip(axes, hops):
        d = merged[merged["hop"] == h]
        d = d[~((d["gt"] == 0) & (d["est"] == 0))]
        rep = report["per_hop"][str(h)]
        ax.scatter(d["gt"], d["est"], s=10 if len(d) < 400 else 4, alpha=0.6, color=HONEST_COLOR,
                   edgecolors="none")
        vals = d[["gt", "est"]].to_numpy()
        lo, hi = (float(np.nanmin(vals)), float(np.nanmax(vals))) if len(d) else (-1.0, 1.0)
        pad = 0.05 * (hi - lo or abs(hi) or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8, label="y = x")
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.axhline(0, color="grey", lw=0.4)
        ax.axvline(0, color="grey", lw=0.4)
        ax.set_title(f"hop {h}: Spearman {rep['spearman']:.3f}, n={rep['n']}", fontsize=FONT)
        ax.set_xlabel("ground truth", fontsize=FONT - 1)
        ax.tick_params(labelsize=FONT - 2)
        ax.ticklabel_format(style="sci", scilimits=(-2, 3))
    for ax in axes[len(hops):]:
        ax.set_axis_off()
    axes[0].set_ylabel(f"estimate ({method})", fontsize=FONT - 1)
    o = report["overall"]
    fig.suptitle(f"{method} vs ground truth: Spearman {o['spearman']:.3f} over all hops (n={o['n']}; "
                 f"{o['n_both_zero']} pairs where both are exactly 0 left out)", fontsize=FONT)
    return _save(fig, path)


@_deferrable
def hop_decay(decays: Dict[str, dict], path: Optional[Path]):
    """Mean |influence| per reachable target against hop (left) and against graph distance from the
    source at the last hop H (right, the cascade), one line per table (gt, exact, first_order).

    ``decays``: {name: influence.reach.decay_stats(...)}.
    """
    import matplotlib.ticker

    fig = _figure(8.6, 3.5)
    left, right = fig.subplots(1, 2)
    horizon = max((d["horizon"] for d in decays.values()), default=0)
    for i, (name, d) in enumerate(decays.items()):
        c = _method_color(name, i)
        style = dict(marker="o", color=c, label=name, lw=1.6, ms=5,
                     ls="--" if name != "gt" and "gt" in decays else "-")
        left.plot(d["per_hop"]["hop"], d["per_hop"]["mean_abs"], **style)
        right.plot(d["per_distance"]["distance"], d["per_distance"]["mean_abs"], **style)
    for ax, key in ((left, "per_hop"), (right, "per_distance")):
        v = np.concatenate([d[key]["mean_abs"].to_numpy(float) for d in decays.values()] or [np.array([])])
        pos = v[np.isfinite(v) & (v > 0)]
        if len(pos) > 1 and pos.max() / pos.min() > 20:   # orders of magnitude: log; else linear from 0
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0, top=float(pos.max()) * 1.08 if len(pos) else None)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.tick_params(labelsize=FONT - 1)
        ax.grid(alpha=0.3, lw=0.5)
    left.set_xlabel("hop s (0 = direct term on the source, before gossip)", fontsize=FONT)
    left.set_ylabel("mean |influence| per reachable target", fontsize=FONT)
    left.set_title("against hop", fontsize=FONT)
    right.set_xlabel("graph distance of the target from the source", fontsize=FONT)
    right.set_title(f"against distance, at hop s = {horizon}", fontsize=FONT)
    left.legend(fontsize=FONT - 1)
    fig.suptitle("influence decay: mean |influence| over reachable (unit, target) pairs", fontsize=FONT + 1)
    return _save(fig, path)


def influence_matrix(df: pd.DataFrame, n: int) -> tuple:
    """(matrix [n, n] with NaN rows for unmeasured sources, units per source): entry [j, k] is the mean
    over the source's measured units of Σ_{s ≥ 1} influence(j → k, s)."""
    units = df.groupby("source")[["round", "sample"]].apply(lambda g: len(g.drop_duplicates()))
    d = df[df["hop"] >= 1].groupby(["source", "target"])["influence"].sum()
    m = np.full((n, n), np.nan)
    for j in units.index:
        m[int(j), :] = 0.0
    for (j, k), v in d.items():
        m[int(j), int(k)] = v / units[j]
    return m, units


@_deferrable
def node_heatmap(df: pd.DataFrame, n: int, path: Optional[Path], title: str = ""):
    """Source × target influence (diverging, centred at 0): the mean over each source's measured units
    (rounds × samples) of Σ_{s=1..H} influence(j → k, s). Unmeasured sources are masked (grey)."""
    import matplotlib

    m, units = influence_matrix(df, n)
    horizon = int(df["hop"].max()) if len(df) else 1
    finite = np.abs(m[np.isfinite(m)])
    lim = float(np.percentile(finite, 99) if n > 8 and len(finite) else (finite.max() if len(finite) else 1.0))
    lim = lim or float(finite.max() if len(finite) else 1.0) or 1.0
    clipped = len(finite) and finite.max() > lim * (1 + 1e-9)
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#bdbdbd")
    side = 5.4 if n <= 64 else 7.0
    fig = _figure(side + 1.1, side)
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=-lim, vmax=lim, interpolation="nearest",
                   aspect="equal")
    ticks = node_ticks(n)
    ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=FONT - 1 if n <= 32 else FONT - 2)
    ax.set_yticks(ticks, [str(t) for t in ticks], fontsize=FONT - 1 if n <= 32 else FONT - 2)
    ax.set_xlabel("target node k", fontsize=FONT)
    ax.set_ylabel("source node j", fontsize=FONT)
    missing = int(np.isnan(m).all(axis=1).sum())
    sub = f"; grey: {missing} source{'s' if missing != 1 else ''} not measured" if missing else ""
    rounds = df["round"].nunique() if len(df) else 0
    ax.set_title((title or "influence of source on target") +
                 f"\n{rounds} round{'s' if rounds != 1 else ''}, hops 1..{horizon}{sub}", fontsize=FONT)
    cb = fig.colorbar(im, ax=ax, shrink=0.85, extend="both" if clipped else "neither")
    cb.set_label(f"mean over the source's units of the sum over hops 1..{horizon}\n"
                 f"(+ hurts the target, − helps)" + (" ; colour clipped at the 99th pct" if clipped else ""),
                 fontsize=FONT - 1)
    cb.ax.tick_params(labelsize=FONT - 2)
    return _save(fig, path)


@_deferrable
def compare_plot(compare: pd.DataFrame, methods: Sequence[str], path: Optional[Path], reachable=None):
    """Every estimate method against ground truth, one panel per hop (reachable rows only)."""
    from scipy import stats

    d = compare if reachable is None else compare[np.asarray(reachable, bool)]
    hops = sorted(int(h) for h in d["hop"].unique())
    rows, cols = _grid(max(len(hops), 1))
    fig = _figure(3.3 * cols, 3.2 * rows + 0.5)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, h in zip(axes, hops):
        dh = d[d["hop"] == h]
        vals = []
        for i, m in enumerate(methods):
            ok = dh[["gt", m]].dropna()
            rho = stats.spearmanr(ok["gt"], ok[m])[0] if len(ok) >= 3 and ok["gt"].std() > 0 and ok[m].std() > 0 \
                else float("nan")
            ax.scatter(ok["gt"], ok[m], s=10 if len(ok) < 400 else 4, alpha=0.55, edgecolors="none",
                       color=_method_color(m, i), label=f"{m} (ρ={rho:.3f}, n={len(ok)})",
                       marker="o" if i == 0 else "^")
            vals.append(ok.to_numpy())
        v = np.concatenate(vals) if vals else np.zeros((0, 2))
        lo, hi = (float(np.nanmin(v)), float(np.nanmax(v))) if v.size else (-1.0, 1.0)
        pad = 0.05 * (hi - lo or abs(hi) or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_title(f"hop {h}", fontsize=FONT)
        ax.set_xlabel("ground truth", fontsize=FONT - 1)
        ax.tick_params(labelsize=FONT - 2)
        ax.ticklabel_format(style="sci", scilimits=(-2, 3))
        ax.legend(fontsize=FONT - 3, loc="upper left")
    for ax in axes[len(hops):]:
        ax.set_axis_off()
    axes[0].set_ylabel("estimate", fontsize=FONT - 1)
    fig.suptitle("estimates vs ground truth over the reachable (unit, target) pairs (compare.csv)",
                 fontsize=FONT)
    return _save(fig, path)


# ------------------------------------------------------------------------------- training and detection


@_deferrable
def roc_overlay(curves: Dict[str, tuple], path: Optional[Path], title: str = ""):
    """One ROC curve per detector score: curves {score: (fpr, tpr, auc)}."""
    fig = _figure(5.6, 5.2)
    ax = fig.subplots()
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, lw=1.8, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate (honest senders flagged)", fontsize=FONT)
    ax.set_ylabel("true positive rate (attackers flagged)", fontsize=FONT)
    ax.set_title(title or "ROC of every detector score", fontsize=FONT)
    ax.legend(loc="lower right", fontsize=FONT - 2)
    return _save(fig, path)


@_deferrable
def roc_curve_plot(fpr: np.ndarray, tpr: np.ndarray, auc: Optional[float], path: Optional[Path], title: str = ""):
    fig = _figure(4.6, 4.4)
    ax = fig.subplots()
    ax.plot(fpr, tpr, lw=2, label=f"AUC = {auc:.3f}" if auc is not None else None)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate", fontsize=FONT)
    ax.set_ylabel("true positive rate", fontsize=FONT)
    ax.set_title(title or "ROC", fontsize=FONT)
    if auc is not None:
        ax.legend(loc="lower right", fontsize=FONT - 1)
    return _save(fig, path)


METRIC_PANELS = [("probe_loss", "probe loss", "probe loss (mean over the probe set)", False),
                 ("probe_acc", "probe accuracy", "probe accuracy", False),
                 ("consensus_distance", "consensus distance", "‖θ_k − θ̄‖² (log scale)", True)]


@_deferrable
def metrics_plot(metrics: "pd.DataFrame | Mapping[str, np.ndarray]", path: Optional[Path], attackers: Iterable[int] = ()):
    """Probe loss, probe accuracy and consensus distance against the round: honest nodes as their mean with
    a min–max band, attackers (``attackers``) apart in red; a robust y range (spikes are clipped, and the
    panel says so); the loss panel also shows the honest nodes' mean training-batch loss."""
    import pandas as pd

    if not isinstance(metrics, pd.DataFrame):          # {column: array}, as training.read_metrics gives
        metrics = pd.DataFrame(dict(metrics))
    attackers = sorted({int(a) for a in attackers})
    is_att = metrics["node"].isin(attackers)
    honest, bad = metrics[~is_att], metrics[is_att]
    fig = _figure(13, 3.7)
    axes = fig.subplots(1, 3)
    for ax, (col, title, ylabel, log) in zip(axes, METRIC_PANELS):
        plotted = []
        h = honest.dropna(subset=[col]).groupby("round")[col]
        mean, lo, hi = h.mean(), h.min(), h.max()
        who = "honest nodes" if attackers else "all nodes"
        ax.plot(mean.index, mean.values, color=HONEST_COLOR, lw=1.6, label=f"mean over {who}")
        ax.fill_between(mean.index, lo.values, hi.values, color=HONEST_COLOR, alpha=0.22,
                        label=f"min–max over {who}")
        plotted += [mean.values, lo.values, hi.values]
        if col == "probe_loss" and "train_loss" in honest:
            tl = honest.dropna(subset=["train_loss"]).groupby("round")["train_loss"].mean()
            ax.plot(tl.index, tl.values, color="#7f7f7f", lw=1.0, alpha=0.8, ls=":",
                    label=f"train batch loss ({who}, mean)")
            plotted.append(tl.values)
        if attackers:
            b = bad.dropna(subset=[col])
            if len(attackers) <= 3:
                for k, g in b.groupby("node"):
                    ax.plot(g["round"], g[col], color=ATTACKER_COLOR, lw=1.2, alpha=0.9,
                            ls=["-", "--", "-."][attackers.index(int(k)) % 3], label=f"attacker {int(k)}")
                    plotted.append(g[col].values)
            else:
                bg = b.groupby("round")[col]
                ax.plot(bg.mean().index, bg.mean().values, color=ATTACKER_COLOR, lw=1.4,
                        label=f"mean over {len(attackers)} attackers")
                ax.fill_between(bg.mean().index, bg.min().values, bg.max().values, color=ATTACKER_COLOR,
                                alpha=0.15, label="min–max over attackers")
                plotted += [bg.mean().values, bg.min().values, bg.max().values]
        values = np.concatenate([np.asarray(p, float) for p in plotted]) if plotted else np.array([])
        use_log = log and len(values) and (values[np.isfinite(values)] > 0).all()
        if use_log:
            ax.set_yscale("log")
        lim = _robust_limits(values, log=bool(use_log))
        if lim is not None:
            lo_, hi_, clipped = lim
            if col == "probe_acc":
                lo_, hi_ = max(lo_, -0.02), min(hi_, 1.02)
            if hi_ > lo_:
                ax.set_ylim(lo_, hi_)
            if clipped:
                ax.text(0.99, 0.01, "y range clipped: spikes off the chart", transform=ax.transAxes,
                        ha="right", va="bottom", fontsize=FONT - 3, color="#555555")
        ax.set_title(title, fontsize=FONT + 1)
        ax.set_xlabel("round", fontsize=FONT)
        ax.set_ylabel(ylabel, fontsize=FONT)
        ax.tick_params(labelsize=FONT - 1)
        ax.grid(alpha=0.3, lw=0.5)
        ax.legend(fontsize=FONT - 2)
    return _save(fig, path)


def _is_circulant(P: np.ndarray) -> bool:
    n = P.shape[0]
    return all(np.array_equal(P[k], np.roll(P[0], k)) for k in range(n))


def graph_layout(W: np.ndarray) -> np.ndarray:
    """Node positions [n, 2]: a circle in index order for circulant graphs (ring, exponential, complete,
    one-peer) where the index is the structure; Kamada–Kawai up to 64 nodes, else a seeded spring layout."""
    import networkx as nx

    n = W.shape[0]
    P = (W > 0) & ~np.eye(n, dtype=bool)
    if n <= 2 or _is_circulant(P) or not P.any():
        a = np.pi / 2 - 2 * np.pi * np.arange(n) / max(n, 1)
        return np.stack([np.cos(a), np.sin(a)], axis=1)
    G = nx.Graph()
    G.add_nodes_from(range(n))
    G.add_edges_from((int(l), int(k)) for k, l in zip(*np.nonzero(P)))
    if n <= 64 and nx.is_connected(G):
        pos = nx.kamada_kawai_layout(G)
    else:
        pos = nx.spring_layout(G, seed=0, iterations=100)
    return np.array([pos[i] for i in range(n)])


@_deferrable
def topology_plot(W: np.ndarray, path: Optional[Path], title: str = "", node_colors: Optional[Dict] = None,
                  scores: Optional[Dict[int, float]] = None, score_label: str = "detection score",
                  flagged: Iterable[int] = (), anomalous: Iterable[int] = (), anomalous_label: str = "attacker",
                  legend: Optional[Dict[str, str]] = None):
    """The graph of W (left) and W itself as a matrix (right), saved at ``path``.

    An edge l → k is drawn where W[k, l] > 0 (k ≠ l). Up to 32 nodes: arrows from sender to receiver when
    the pattern is directed, widths growing with the weight, node labels; above: thin straight lines (the
    matrix panel shows direction and weights). Nodes are coloured by ``scores`` (a colour bar names
    ``score_label``) or by ``node_colors`` (node -> colour, explained by ``legend``: label -> colour);
    ``anomalous`` nodes get a red ring, ``flagged`` ones a black triangle, both in the figure's legend.
    """
    import matplotlib
    import networkx as nx
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    W = np.asarray(W, dtype=np.float64)
    n = W.shape[0]
    off = (W > 0) & ~np.eye(n, dtype=bool)
    directed = not np.array_equal(off, off.T)
    small = n <= 32
    node_size = 300 if n <= 16 else 150 if n <= 32 else 50 if n <= 64 else 16
    pos = graph_layout(W)
    fig = _figure(11.5, 5.6)
    ax, axm = fig.subplots(1, 2, width_ratios=[1.15, 1])
    ax.set_axis_off()
    ax.set_aspect("equal")
    ks, ls = np.nonzero(off)
    if directed:
        edges = list(zip(ls.tolist(), ks.tolist()))
        weights = W[ks, ls]
    else:
        keep = ls < ks
        edges = list(zip(ls[keep].tolist(), ks[keep].tolist()))
        weights = 0.5 * (W[ks[keep], ls[keep]] + W[ls[keep], ks[keep]])
    if edges and small:
        G = nx.DiGraph() if directed else nx.Graph()
        G.add_nodes_from(range(n))
        G.add_edges_from(edges)
        widths = [0.4 + 2.2 * w / max(weights) for w in weights]
        style = {"arrowsize": 10, "connectionstyle": "arc3,rad=0.08"} if directed else {}
        nx.draw_networkx_edges(G, dict(enumerate(pos)), ax=ax, edgelist=edges, width=widths, alpha=0.55,
                               edge_color="#555555", node_size=node_size, arrows=directed, **style)
    elif edges:
        segs = np.stack([pos[[a for a, _ in edges]], pos[[b for _, b in edges]]], axis=1)
        ax.add_collection(LineCollection(segs, colors="#555555", linewidths=0.35,
                                         alpha=0.35 if len(edges) <= 2000 else 0.15, zorder=1))
    handles = []
    if scores is not None:
        vals = np.array([scores.get(i, np.nan) for i in range(n)], dtype=float)
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
        fin = vals[np.isfinite(vals)]
        norm = matplotlib.colors.Normalize(*(fin.min(), fin.max()) if len(fin) and fin.max() > fin.min()
                                           else (0.0, 1.0))
        sc = ax.scatter(pos[:, 0], pos[:, 1], s=node_size, c=np.ma.masked_invalid(vals), cmap=cmap, norm=norm,
                        edgecolors="#333333", linewidths=0.6, zorder=3)
        cb = fig.colorbar(sc, ax=ax, shrink=0.7, location="left", pad=0.02)
        cb.set_label(score_label, fontsize=FONT)
        cb.ax.tick_params(labelsize=FONT - 2)
    else:
        colors = [(node_colors or {}).get(i, DEFAULT_NODE_COLOR) for i in range(n)]
        ax.scatter(pos[:, 0], pos[:, 1], s=node_size, c=colors, edgecolors="#333333",
                   linewidths=0.6 if not small else 1.0, zorder=3)
        for label, color in (legend or {}).items():
            handles.append(Line2D([], [], ls="", marker="o", ms=8, mfc=color, mec="#333333", label=label))
    anomalous, flagged = sorted({int(a) for a in anomalous}), sorted({int(f) for f in flagged})
    if anomalous:
        ax.scatter(pos[anomalous, 0], pos[anomalous, 1], s=node_size * 2.6, facecolors="none",
                   edgecolors=ATTACKER_COLOR, linewidths=2.0, zorder=4)
        handles.append(Line2D([], [], ls="", marker="o", ms=11, mfc="none", mec=ATTACKER_COLOR, mew=2,
                              label=f"{anomalous_label} ({len(anomalous)})"))
    if flagged:
        off_y = 0.06 if small else 0.035
        ax.scatter(pos[flagged, 0], pos[flagged, 1] + off_y, s=max(node_size * 0.5, 18), marker="v",
                   color="black", zorder=5)
        handles.append(Line2D([], [], ls="", marker="v", ms=7, color="black", label=f"flagged ({len(flagged)})"))
    if small:
        for i, (x, y) in enumerate(pos):
            ax.text(x, y, str(i), ha="center", va="center", fontsize=FONT - 2 if n <= 16 else FONT - 4, zorder=6)
    else:                                    # no labels for every node; name the marked ones
        centre = pos.mean(axis=0)
        for i in sorted(set(anomalous) | set(flagged)):
            d = pos[i] - centre
            d = d / (np.linalg.norm(d) or 1.0)
            ax.annotate(str(i), pos[i], xytext=(14 * d[0], 14 * d[1]), textcoords="offset points",
                        ha="center", va="center", fontsize=FONT - 2, zorder=6)
    if handles:
        ax.legend(handles=handles, loc="lower left", fontsize=FONT - 1, frameon=False,
                  bbox_to_anchor=(0.0, -0.06))
    note = ("arrow l → k: k receives from l" if directed and small else
            "direction: see the matrix" if directed else "undirected")
    ax.set_title(f"{n} nodes, {len(edges)} {'directed ' if directed else ''}edges ({note})", fontsize=FONT)
    pad = 0.12
    ax.set_xlim(pos[:, 0].min() - pad, pos[:, 0].max() + pad)
    ax.set_ylim(pos[:, 1].min() - pad, pos[:, 1].max() + pad)
    masked = np.ma.masked_where(W <= 0, W)
    cm = matplotlib.colormaps["Blues"].with_extremes(bad="white")
    im = axm.imshow(masked, cmap=cm, vmin=0, vmax=float(W.max()) * 1.15 if W.size else 1.0, interpolation="nearest")
    ticks = node_ticks(n)
    axm.set_xticks(ticks, [str(t) for t in ticks], fontsize=FONT - 2)
    axm.set_yticks(ticks, [str(t) for t in ticks], fontsize=FONT - 2)
    axm.set_xlabel("sender l", fontsize=FONT)
    axm.set_ylabel("receiver k", fontsize=FONT)
    axm.set_title("mixing matrix W[k, l] (row k: what receiver k takes from l)", fontsize=FONT)
    if n <= 8:
        for k in range(n):
            for l in range(n):
                if W[k, l] > 0:
                    axm.text(l, k, f"{W[k, l]:.2g}", ha="center", va="center", fontsize=FONT - 2,
                             color="white" if W[k, l] > 0.6 * W.max() else "black")
    cbm = fig.colorbar(im, ax=axm, shrink=0.8)
    cbm.set_label("weight", fontsize=FONT - 1)
    cbm.ax.tick_params(labelsize=FONT - 2)
    if title:
        fig.suptitle(title, fontsize=FONT + 1)
    return _save(fig, path)


# ------------------------------------------------------------------------------- dice report


def report_plot(grouped: pd.DataFrame, labels: List[str], panels: List[tuple], path: Optional[Path]):
    """One panel per metric (or per method for alignment: its hops as differently coloured points):
    each setting's mean as a point, ± std as an error bar only where several runs went into it, and
    'n=k/N' next to a point computed from fewer runs than its setting has.

    ``panels``: [(title, [(metric column stem, series label), ...], (lo, hi) bounds or None), ...].
    """
    import matplotlib

    if not panels:
        return None
    rows, cols = _grid(len(panels), 3)
    height = max(0.5 * len(labels) + 1.3, 2.4)
    fig = _figure(4.4 * cols + 1.8, height * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False)
    y = np.arange(len(labels))
    total = grouped["n_runs"].to_numpy(int)
    tab = matplotlib.colormaps["tab10"]
    for i, (title, series, bounds) in enumerate(panels):
        ax = axes[i // cols][i % cols]
        k = len(series)
        spread = 0.5 if k > 1 else 0.0
        lows, highs = [], []
        for si, (m, label) in enumerate(series):
            off = (si - (k - 1) / 2) * (spread / max(k - 1, 1)) if k > 1 else 0.0
            mean = grouped[f"{m}_mean"].to_numpy(float)
            std = grouped[f"{m}_std"].to_numpy(float)
            n = grouped[f"{m}_n"].to_numpy(int)
            err = np.where((n >= 2) & np.isfinite(std), std, 0.0)
            ok = np.isfinite(mean)
            color = HONEST_COLOR if k == 1 else tab(si % 10)
            ax.errorbar(mean[ok], y[ok] + off, xerr=err[ok], fmt="o", ms=6, capsize=4, color=color, lw=1.4,
                        label=label if k > 1 else None)
            lows.append(mean[ok] - err[ok])
            highs.append(mean[ok] + err[ok])
            for yy, mm, nn, tot in zip(y + off, mean, n, total):
                if not np.isfinite(mm):
                    ax.text(0.02, yy, f"{label + ': ' if k > 1 else ''}no value (0/{tot} runs)",
                            transform=ax.get_yaxis_transform(), va="center", fontsize=FONT - 2, color="#888888")
                elif nn < tot:
                    ax.annotate(f"n={nn}/{tot}", (mm, yy), xytext=(6, 5), textcoords="offset points",
                                fontsize=FONT - 2, color="#555555")
        ax.set_yticks(y, labels if i % cols == 0 else [""] * len(labels), fontsize=FONT)
        ax.set_ylim(len(labels) - 0.5, -0.5)
        ax.set_title(title, fontsize=FONT + 1)
        ax.tick_params(axis="x", labelsize=FONT - 1)
        ax.grid(axis="x", alpha=0.3, lw=0.5)
        lo_v = np.concatenate(lows) if lows else np.array([])
        hi_v = np.concatenate(highs) if highs else np.array([])
        if len(lo_v):
            lo, hi = float(lo_v.min()), float(hi_v.max())
            pad = 0.08 * (hi - lo) if hi > lo else max(abs(hi) * 0.05, 0.01)
            lo, hi = lo - pad, hi + pad
            if bounds is not None:
                lo, hi = max(lo, bounds[0] - 0.01 * (bounds[1] - bounds[0])), min(hi, bounds[1] + 0.01 * (bounds[1] - bounds[0]))
            ax.set_xlim(lo, hi)
        if k > 1:
            ax.legend(fontsize=FONT - 2, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    for j in range(len(panels), rows * cols):
        axes[j // cols][j % cols].set_axis_off()
    fig.suptitle("mean ± std over runs (error bar only where n ≥ 2; n=k/N: only k of the setting's N runs "
                 "have the value)", fontsize=FONT + 1)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- dice value

def _node_ticks(ax, n: int, axis: str = "both") -> None:
    """Integer node ticks (``node_ticks``) on the x and/or y axis of ``ax``."""
    ticks = node_ticks(n)
    if axis in ("both", "x"):
        ax.set_xticks(ticks)
    if axis in ("both", "y"):
        ax.set_yticks(ticks)


@_deferrable
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


@_deferrable
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


@_deferrable
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


@_deferrable
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


# ------------------------------------------------------------------------------- dice contrib
POSITIVE_COLOR = "#2166ac"
NEGATIVE_COLOR = "#b2182b"
VALUATION_COLORS = {"shapley_exact": "#2ca02c", "shapley_mc": "#2ca02c", "loo": "#9467bd", "gt": "#000000",
                    "exact": "#1f77b4", "first_order": "#ff7f0e", "cascade_sum": "#8c564b", "given": "#17becf",
                    "received": "#bcbd22"}


def _valuation_color(name: str, i: int) -> str:
    """A fixed colour per valuation / DICE method (``DICE exact``, ``cascade_sum_hops3``, ``gt_participant``
    map to their method), tab10 for anything else."""
    import matplotlib

    base = name.replace("DICE ", "").split(" ")[0]
    for key in sorted(VALUATION_COLORS, key=len, reverse=True):
        if base == key or base.startswith(key + "_"):
            return VALUATION_COLORS[key]
    return matplotlib.colormaps["tab10"]((i + 6) % 10)


def _mark_attackers(ax, attackers: Sequence[int]) -> None:
    """Shade the columns of the recorded attackers (x = node index)."""
    for i, a in enumerate(sorted(set(int(a) for a in attackers))):
        ax.axvspan(a - 0.5, a + 0.5, color=ATTACKER_COLOR, alpha=0.12, lw=0,
                   label="recorded attacker" if i == 0 else None)


def contrib_values(series: Dict[str, tuple], path: Optional[Path], attackers: Sequence[int] = (), title: str = ""):
    """Node values. Top: the first series as bars with 95% error bars (1.96 · stderr, where given). Bottom:
    every series as a share of its total, v_j / Σ_l |v_l| (different valuations live on different scales:
    Shapley sums to U(all) − U(∅), LOO and DICE to much less), grouped bars up to 24 nodes, lines above.

    series: {name: (values [n], stderr [n] or None)}."""
    names = list(series)
    n = len(series[names[0]][0])
    x = np.arange(n)
    fig = _figure(min(16.0, 6.0 + 0.22 * n), 7.0)
    ax, ax2 = fig.subplots(2, 1, sharex=True)
    v, se = (np.asarray(a, dtype=float) if a is not None else None for a in series[names[0]])
    err = None if se is None or not np.any(np.nan_to_num(se) > 0) else 1.96 * np.nan_to_num(se)
    ax.bar(x, v, yerr=err, width=0.8, color=np.where(v >= 0, POSITIVE_COLOR, NEGATIVE_COLOR),
           error_kw={"elinewidth": 0.9, "capsize": 2 if n <= 32 else 0, "ecolor": "black"})
    ax.axhline(0, color="grey", lw=0.6)
    _mark_attackers(ax, attackers)
    ax.set_ylabel(f"{names[0]} value\n(loss reduction{'; bars: 95% CI' if err is not None else ''})", fontsize=FONT)
    ax.set_title(title or "node values", fontsize=FONT)
    if attackers:
        ax.legend(fontsize=FONT - 2, loc="best")
    k = len(names)
    for i, name in enumerate(names):
        vals = np.asarray(series[name][0], dtype=float)
        tot = np.sum(np.abs(vals))
        share = vals / tot if tot > 0 else vals
        color = _valuation_color(name, i)
        if n <= 24:
            w = 0.8 / k
            ax2.bar(x - 0.4 + w * (i + 0.5), share, width=w, color=color, label=name)
        else:
            ax2.plot(x, share, marker="o", ms=2.5 if name != "loo" else 5, lw=0.8, color=color, label=name,
                     ls="--" if name == "loo" else "-", mfc="none" if name == "loo" else color)
    ax2.axhline(0, color="grey", lw=0.6)
    _mark_attackers(ax2, attackers)
    ax2.set_ylabel("share of total: v_j / Σ_l |v_l|", fontsize=FONT)
    ax2.set_xlabel("node j", fontsize=FONT)
    ax2.set_title("every valuation and DICE table on one scale (its share of its own total)", fontsize=FONT - 1)
    handles, labels = ax2.get_legend_handles_labels()
    keep = [(h, lab) for h, lab in zip(handles, labels) if lab != "recorded attacker"]
    ax2.legend([h for h, _ in keep], [lab for _, lab in keep], fontsize=FONT - 2, ncol=min(4, k), loc="best")
    ticks = node_ticks(n)
    ax2.set_xticks(ticks, [str(t) for t in ticks], fontsize=FONT - 2)
    ax2.set_xlim(-0.6, n - 0.4)
    return _save(fig, path)


def contrib_flows(given: np.ndarray, received: np.ndarray, path: Optional[Path], attackers: Sequence[int] = (),
                  free_riders: Sequence[int] = (), title: str = ""):
    """Per node: value received from the others' data (x) against value its data gave the others (y), with
    the diagonal given = received (above: gives more than it receives)."""
    given, received = np.asarray(given, float), np.asarray(received, float)
    n = len(given)
    fig = _figure(6.0, 5.6)
    ax = fig.subplots()
    bad = np.zeros(n, dtype=bool)
    bad[list(attackers)] = True
    ax.scatter(received[~bad], given[~bad], s=28 if n <= 64 else 12, color=HONEST_COLOR, label="node", zorder=3)
    if bad.any():
        ax.scatter(received[bad], given[bad], s=40 if n <= 64 else 18, color=ATTACKER_COLOR, marker="D",
                   label="recorded attacker", zorder=4)
    fr = sorted(set(int(f) for f in free_riders))
    if fr:
        ax.scatter(received[fr], given[fr], s=140 if n <= 64 else 60, facecolors="none", edgecolors="#ff7f0e",
                   linewidths=1.6, label="free rider (gives ≈ 0)", zorder=5)
    both = np.concatenate([given, received, [0.0]])
    lo, hi = float(both.min()), float(both.max())
    pad = 0.06 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="given = received")
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    if n <= 16:
        for j in range(n):
            ax.annotate(str(j), (received[j], given[j]), xytext=(4, 4), textcoords="offset points", fontsize=FONT - 2)
    ax.ticklabel_format(style="sci", scilimits=(-2, 3), axis="both")
    ax.set_xlabel("received_k = Σ_{j≠k} V[j, k] (what the others' data did for k)", fontsize=FONT - 1)
    ax.set_ylabel("given_j = Σ_{k≠j} V[j, k] (what j's data did for the others)", fontsize=FONT - 1)
    ax.set_title(title or "given vs received", fontsize=FONT)
    ax.legend(fontsize=FONT - 2, loc="best")
    return _save(fig, path)


def lorenz_plot(curves: Dict[str, tuple], path: Optional[Path], title: str = ""):
    """Lorenz curves, with the line of equality: curves {name: (share of nodes [n+1], share of the total held
    by the poorest [n+1], Gini or None)} (``contrib.lorenz`` / ``contrib.gini``); the legend gives each Gini."""
    fig = _figure(5.6, 5.4)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="equality (Gini 0)")
    for i, (name, (p, L, g)) in enumerate(curves.items()):
        ax.plot(p, L, marker="o" if len(p) <= 33 else None, ms=3, lw=1.4, color=_valuation_color(name, i),
                label=f"{name}: Gini {'-' if g is None else f'{g:.3f}'}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("share of nodes (lowest value first)", fontsize=FONT)
    ax.set_ylabel("share of the total value they hold", fontsize=FONT)
    ax.set_title(title or "Lorenz curves", fontsize=FONT)
    ax.legend(fontsize=FONT - 2, loc="upper left")
    return _save(fig, path)


def value_graph(W: np.ndarray, panels: Dict[str, np.ndarray], path: Optional[Path], attackers: Sequence[int] = (),
                title: str = ""):
    """The graph of W once per panel, node area ∝ |value| (the largest node gets the full size), blue for
    positive and red for negative values; recorded attackers get a red ring; node labels up to 16 nodes."""
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    W = np.asarray(W, dtype=np.float64)
    n = W.shape[0]
    pos = graph_layout(W)
    off = (W > 0) & ~np.eye(n, dtype=bool)
    ks, ls = np.nonzero(off | off.T)
    keep = ls < ks
    segs = np.stack([pos[ls[keep]], pos[ks[keep]]], axis=1) if keep.any() else np.zeros((0, 2, 2))
    k = len(panels)
    fig = _figure(5.4 * k, 5.6)
    axes = np.atleast_1d(fig.subplots(1, k))
    full = 900 if n <= 16 else 420 if n <= 64 else 120
    for ax, (name, v) in zip(axes, panels.items()):
        v = np.asarray(v, dtype=float)
        top = np.max(np.abs(v)) or 1.0
        ax.set_axis_off()
        ax.set_aspect("equal")
        ax.add_collection(LineCollection(segs, colors="#888888", linewidths=0.6 if n <= 64 else 0.25,
                                         alpha=0.6 if n <= 64 else 0.25, zorder=1))
        sizes = 8 + full * np.abs(v) / top
        ax.scatter(pos[:, 0], pos[:, 1], s=sizes, c=np.where(v >= 0, POSITIVE_COLOR, NEGATIVE_COLOR), alpha=0.85,
                   edgecolors="white", linewidths=0.5, zorder=3)
        bad = sorted(set(int(a) for a in attackers))
        if bad:
            ax.scatter(pos[bad, 0], pos[bad, 1], s=sizes[bad] * 1.8 + 40, facecolors="none", edgecolors=ATTACKER_COLOR,
                       linewidths=1.8, zorder=4)
        if n <= 16:
            for i, (xx, yy) in enumerate(pos):
                ax.text(xx, yy, str(i), ha="center", va="center", fontsize=FONT - 2, color="white", zorder=5)
        pad = 0.15
        ax.set_xlim(pos[:, 0].min() - pad, pos[:, 0].max() + pad)
        ax.set_ylim(pos[:, 1].min() - pad, pos[:, 1].max() + pad)
        ax.set_title(f"{name} (largest |value| {top:.3g})", fontsize=FONT)
        handles = [Line2D([], [], ls="", marker="o", ms=8, mfc=POSITIVE_COLOR, mec="white", label="value > 0"),
                   Line2D([], [], ls="", marker="o", ms=8, mfc=NEGATIVE_COLOR, mec="white", label="value < 0")]
        if bad:
            handles.append(Line2D([], [], ls="", marker="o", ms=10, mfc="none", mec=ATTACKER_COLOR, mew=1.8,
                                  label="recorded attacker"))
        ax.legend(handles=handles, loc="lower left", fontsize=FONT - 2, frameon=False, bbox_to_anchor=(0.0, -0.08))
    if title:
        fig.suptitle(title, fontsize=FONT + 1)
    return _save(fig, path)


def comparison_plot(comp: pd.DataFrame, dice: Dict[str, np.ndarray], refs: Dict[str, np.ndarray],
                    path: Optional[Path], title: str = ""):
    """DICE node values against each reference valuation (one panel each; both standardised, since only the
    ranking is compared; legend: Spearman ρ and Kendall τ), and the cost of every table and valuation
    (seconds, log scale)."""
    def z(a):
        a = np.asarray(a, dtype=float)
        sd = a.std()
        return (a - a.mean()) / (sd if sd > 0 else 1.0)

    k = len(refs)
    fig = _figure(4.6 * (k + 1), 4.6)
    axes = np.atleast_1d(fig.subplots(1, k + 1))
    for ax, (name, v) in zip(axes, refs.items()):
        zv = z(v)
        for i, (label, d) in enumerate(dice.items()):
            row = comp[(comp.dice == label) & (comp.reference == name)]
            rho = row.spearman.iloc[0] if len(row) else float("nan")
            tau = row.kendall.iloc[0] if len(row) else float("nan")
            ax.scatter(zv, z(d), s=18 if len(v) <= 64 else 6, alpha=0.75, color=_valuation_color(label, i),
                       label=f"{label}: ρ {rho:.2f}, τ {tau:.2f}")
        ax.plot([-3, 3], [-3, 3], "k--", lw=0.7)
        ax.set_xlabel(f"{name} value (z-score over nodes)", fontsize=FONT)
        ax.set_ylabel("DICE node value Σ_k V[j, k] (z-score)", fontsize=FONT)
        ax.set_title(f"DICE vs {name}", fontsize=FONT)
        ax.legend(fontsize=FONT - 3, loc="upper left")
    ax = axes[-1]
    names, secs, colors = [], [], []
    for i, label in enumerate(dice):
        row = comp[comp.dice == label]
        s = row.dice_seconds.iloc[0] if len(row) else None
        if s is not None and np.isfinite(s):
            names.append(label)
            secs.append(float(s))
            colors.append(_valuation_color(label, i))
    for name in refs:
        row = comp[comp.reference == name]
        if len(row) and row.reference_seconds.iloc[0]:
            names.append(f"{name} ({int(row.reference_coalitions.iloc[0])} coalitions)")
            secs.append(float(row.reference_seconds.iloc[0]))
            colors.append(_valuation_color(name, 0))
    if secs:
        ax.barh(np.arange(len(secs)), secs, color=colors)
        ax.set_yticks(np.arange(len(secs)), names, fontsize=FONT - 2)
        ax.set_xscale("log")
        ax.invert_yaxis()
    ax.set_xlabel("compute seconds (log)", fontsize=FONT)
    ax.set_title("cost", fontsize=FONT)
    if title:
        fig.suptitle(title, fontsize=FONT + 1)
    return _save(fig, path)


def availability_plot(rec, mixing: Sequence[np.ndarray], base: Sequence[np.ndarray], path: Optional[Path],
                      title: str = ""):
    """The network over time: left, which node is online in which round (churn; all online without it);
    right, per round the share of W's edges the effective graph kept (churn and drops) and, with delays,
    the mean delay of the kept edges. ``rec``: ``network.NetworkRecord``; ``mixing``: M^t, ``base``: W^t,
    for every round."""
    import matplotlib

    T, n = rec.rounds, rec.n
    online = rec.online if rec.online is not None else np.ones((T, n), dtype=bool)
    fig = _figure(12, 3.8)
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.5, 1]})
    cmap = matplotlib.colors.ListedColormap(["#d9d9d9", HONEST_COLOR])
    ax.imshow(online.T.astype(float), aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=1,
              extent=(-0.5, T - 0.5, n - 0.5, -0.5))
    ax.set_yticks(node_ticks(n))
    ax.set_xlabel("round", fontsize=FONT)
    ax.set_ylabel("node", fontsize=FONT)
    ax.set_title(f"availability ({100 * online.mean():.1f}% node-rounds online)", fontsize=FONT + 1, loc="left")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=HONEST_COLOR, label="online"), Patch(color="#d9d9d9", label="offline")],
              fontsize=FONT - 2, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, frameon=False)
    off = ~np.eye(n, dtype=bool)
    kept = np.array([(np.asarray(M)[off] > 0).sum() for M in mixing], dtype=float)
    full = np.array([(np.asarray(W)[off] > 0).sum() for W in base], dtype=float)
    share = kept / np.maximum(full, 1.0)
    bx.plot(np.arange(T), share, color=HONEST_COLOR, lw=1.2, label="edges of W^t kept in M^t")
    bx.set_ylim(-0.02, 1.05)
    bx.set_xlabel("round", fontsize=FONT)
    bx.set_ylabel("share of edges", fontsize=FONT)
    bx.grid(alpha=0.3, lw=0.5)
    title_r = "effective graph per round"
    if rec.delayed:
        cx = bx.twinx()
        md = [float(rec.delay[t][(np.asarray(mixing[t]) > 0) & off].mean()) if ((np.asarray(mixing[t]) > 0) & off).any()
              else np.nan for t in range(T)]
        cx.plot(np.arange(T), md, color="#ff7f0e", lw=1.0, alpha=0.8, label="mean delay of kept edges")
        cx.set_ylim(-0.1, rec.max_delay + 0.1)
        cx.set_ylabel("rounds of delay", fontsize=FONT)
        cx.legend(fontsize=FONT - 2, loc="lower right")
    bx.legend(fontsize=FONT - 2, loc="lower left")
    bx.set_title(title_r, fontsize=FONT + 1)
    if title:
        fig.suptitle(title, fontsize=FONT + 1)
    return _save(fig, path)


if __name__ == "__main__":
    _serve()
    sys.stdout.flush()
    os._exit(0)      # every figure is written and acknowledged: skip tearing down matplotlib (~0.1 s)
