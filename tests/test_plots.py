"""Figures and the tables behind them: integer node ticks, masked heatmap cells, the n in alignment titles,
decay over reachable targets, metrics legends and y range, topology at 4 and 256 nodes, the distance column,
reachable_only and compare.csv."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from dice_cli import plots
from dice_cli.config import TopologyConfig
from dice_cli.graph import MixingSchedule, build_schedule
from dice_cli.influence.reach import reach_from

RUN = ["train", "nodes=16", "rounds=8", "batch_size=8", "progress=false", "dtype=float64", "lr=0.05",
       "topology=exponential", "out=run"]
SEL = ["run=run", "hops=2", "rounds=[2,5]", "progress=false"]


def texts(fig):
    return [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]


def capture(monkeypatch, name):
    """Record the Figures that plots.<name> returns while a command runs."""
    figs = []
    real = getattr(plots, name)

    def wrapped(*args, **kwargs):
        fig = real(*args, **kwargs)
        figs.append(fig)
        return fig

    monkeypatch.setattr(plots, name, wrapped)
    return figs


# ----------------------------------------------------------------------------------- distance / reach


def W_of(name, n, **kw):
    return build_schedule(TopologyConfig(name=name, **kw), n, 0)


def test_distance_on_a_ring_is_the_shortest_path():
    reach, dist = reach_from(W_of("ring", 8), 0, 2, 10)
    for j in range(8):
        for k in range(8):
            assert dist[k, j] == min(abs(k - j), 8 - abs(k - j))
    assert reach[1][:, 0].sum() == 3 and reach[2][:, 0].sum() == 5     # self-loops: distance <= hop


def test_distance_on_the_exponential_graph_is_the_popcount_of_the_offset():
    _, dist = reach_from(W_of("exponential", 16), 0, 1, 10)            # j sends to j+1, j+2, j+4, j+8
    for j in range(16):
        for k in range(16):
            assert dist[k, j] == bin((k - j) % 16).count("1")


def test_distance_on_a_time_varying_graph_is_the_first_reachable_hop():
    s = W_of("one_peer_exponential", 8)                                # round t: i receives from i - 2^(t mod 3)
    _, d0 = reach_from(s, 0, 1, 20)                                    # offsets +1, +2, +4 from round 0
    assert [d0[o, 0] for o in range(8)] == [0, 1, 2, 2, 3, 3, 3, 3]
    _, d1 = reach_from(s, 1, 1, 20)                                    # +2, +4, +1 from round 1
    assert [d1[o, 0] for o in range(8)] == [0, 3, 1, 3, 2, 3, 2, 3]
    _, d_end = reach_from(s, 18, 1, 20)                                # only 2 rounds left in the run
    assert d_end[1, 0] == 1 and d_end[3, 0] == 2 and d_end[4, 0] == -1   # rounds 18, 19: +1, +2


def test_reachable_follows_the_product_pattern_without_self_loops():
    W = np.roll(np.eye(4), 1, axis=1)                                  # k receives only from k+1: no self-loops
    s = MixingSchedule.static(W)
    reach, dist = reach_from(s, 0, 2, 10)
    assert dist[3, 0] == 1 and dist[2, 0] == 2                         # 0 -> 3 -> 2
    assert reach[1][3, 0] and not reach[2][3, 0] and reach[2][2, 0]    # reached at hop 1, not at hop 2
    _, dist2 = reach_from(MixingSchedule.static(np.eye(3)), 0, 1, 10)
    assert dist2[1, 0] == -1                                           # disconnected: never reached


# ----------------------------------------------------------------------------------- heatmap


def toy_table(n=4, sources=(0, 2), hops=2):
    rows = []
    for t in (0, 3):
        for j in sources:
            rows.append((t, j, "batch", -1, j, 0, -0.5))
            for s in range(1, hops + 1):
                for k in range(n):
                    rows.append((t, j, "batch", -1, k, s, 0.1 * (k + 1) * (1 if j == 0 else -1)))
    return pd.DataFrame(rows, columns=["round", "source", "unit", "sample", "target", "hop", "influence"])


def test_heatmap_has_integer_node_ticks_masked_sources_and_a_labelled_colorbar():
    df = toy_table()
    fig = plots.node_heatmap(df, 4, None)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2", "3"]
    assert list(ax.get_xticks()) == [0, 1, 2, 3]
    data = ax.images[0].get_array()
    assert data.mask[1].all() and data.mask[3].all() and not data.mask[0].any()   # sources 1, 3 unmeasured
    assert data[0, 2] == pytest.approx(2 * 0.3)          # mean over 2 rounds of the sum over hops 1..2
    assert data[2, 1] == pytest.approx(-2 * 0.2)
    label = fig.axes[1].get_ylabel()
    assert "mean over the source's units" in label and "sum over hops 1..2" in label
    assert "2 sources not measured" in ax.get_title()


def test_heatmap_ticks_stay_integers_at_256_nodes():
    ticks = plots.node_ticks(256)
    assert ticks[0] == 0 and all(isinstance(t, int) for t in ticks) and len(ticks) <= 17 and max(ticks) < 256
    df = toy_table(n=256, sources=(0, 100), hops=1)
    ax = plots.node_heatmap(df, 256, None).axes[0]
    assert all(float(t).is_integer() and 0 <= t < 256 for t in ax.get_xticks())


# ----------------------------------------------------------------------------------- gt/estimate CLI


@pytest.fixture
def run16(dice, tmp_path):
    code, _, err = dice(*RUN)
    assert code == 0, err
    return tmp_path / "run"


def test_alignment_titles_carry_the_n_of_alignment_json(dice, run16, monkeypatch):
    assert dice("gt", *SEL)[0] == 0
    figs = capture(monkeypatch, "alignment_scatter")
    assert dice("estimate", *SEL, "method=exact")[0] == 0
    rep = json.loads((run16 / "estimate/alignment.json").read_text())
    fig = figs[-1]
    assert f"n={rep['overall']['n']})" in fig.get_suptitle() or f"(n={rep['overall']['n']};" in fig.get_suptitle()
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 3                                             # one panel per hop 0, 1, 2
    for h, title in zip(["0", "1", "2"], titles):
        assert title.startswith(f"hop {h}:") and title.endswith(f"n={rep['per_hop'][h]['n']}")
        ax = next(a for a in fig.axes if a.get_title() == title)
        assert len(ax.collections[0].get_offsets()) == rep["per_hop"][h]["n"]   # the points the metric uses


def test_distance_column_and_summary_over_reachable_targets(dice, run16):
    assert dice("gt", *SEL)[0] == 0
    gt = pd.read_csv(run16 / "gt/influence.csv")
    assert list(gt.columns[5:8]) == ["hop", "distance", "influence"]
    offset = (gt.target - gt.source) % 16
    assert (gt.distance == offset.map(lambda o: bin(o).count("1"))).all()
    reachable = gt.distance <= gt.hop                                  # the exponential graph has self-loops
    assert (gt.loc[~reachable, "influence"] == 0).all()
    summary = json.loads((run16 / "gt/summary.json").read_text())
    assert summary["structural_zero_rows"] == int((~reachable).sum())
    for h, g in gt[reachable].groupby("hop"):
        assert summary["mean_abs_influence_per_hop_reachable"][str(h)] == pytest.approx(g.influence.abs().mean())
        assert summary["reachable_rows_per_hop"][str(h)] == len(g)
    last = gt[reachable & (gt.hop == 2)]
    for d, g in last.groupby("distance"):
        assert summary["mean_abs_influence_per_distance"][str(d)] == pytest.approx(g.influence.abs().mean())


def test_reachable_only_skips_structural_zeros_and_still_aligns(dice, run16, monkeypatch):
    figs = capture(monkeypatch, "hop_decay")
    assert dice("gt", *SEL, "reachable_only=true")[0] == 0
    gt = pd.read_csv(run16 / "gt/influence.csv")
    # exponential n=16: a unit reaches itself at hop 0, 5 nodes at hop 1, 11 at hop 2
    assert len(gt) == 2 * 16 * (1 + 5 + 11)
    assert (gt.distance <= gt.hop).all()
    assert json.loads((run16 / "gt/summary.json").read_text())["structural_zero_rows"] == 2 * 16 * (11 + 5)
    code, out, err = dice("estimate", *SEL, "method=first_order")      # full table, aligned with the short gt
    assert code == 0, err
    est = pd.read_csv(run16 / "estimate/influence.csv")
    assert len(est) == 2 * 16 * (1 + 2 * 16)
    rep = json.loads((run16 / "estimate/alignment.json").read_text())
    assert rep["per_hop"]["1"]["n"] == 2 * 16 * 5 and rep["per_hop"]["1"]["n_both_zero"] == 0
    # decay.png of the estimate: gt and first_order, both over reachable targets only
    fig = figs[-1]
    left = fig.axes[0]
    assert [l.get_label() for l in left.get_lines()] == ["gt", "first_order"]
    assert "reachable" in left.get_ylabel()
    s = json.loads((run16 / "gt/summary.json").read_text())["mean_abs_influence_per_hop_reachable"]
    assert list(left.get_lines()[0].get_ydata()) == pytest.approx([s["0"], s["1"], s["2"]])


def test_compare_csv_puts_gt_and_every_method_side_by_side(dice, run16):
    assert dice("gt", *SEL)[0] == 0
    assert dice("estimate", *SEL, "method=exact", "out=run/estimate_exact")[0] == 0
    code, out, err = dice("estimate", *SEL, "method=first_order", "out=run/estimate_first_order")
    assert code == 0, err
    assert "compare.csv" in out
    cmp_ = pd.read_csv(run16 / "estimate_first_order/compare.csv")
    assert list(cmp_.columns) == ["round", "source", "unit", "sample", "target", "hop", "distance", "gt",
                                  "exact", "first_order"]
    gt = pd.read_csv(run16 / "gt/influence.csv")
    assert len(cmp_) == len(gt)
    keys = ["round", "source", "unit", "sample", "target", "hop"]
    for name, d in [("gt", "gt"), ("exact", "estimate_exact"), ("first_order", "estimate_first_order")]:
        t = pd.read_csv(run16 / d / "influence.csv").set_index(keys)["influence"]
        assert np.array_equal(cmp_.set_index(keys)[name].loc[t.index].values, t.values)
    assert (cmp_["distance"].values == gt["distance"].values).all()
    assert (run16 / "estimate_first_order/compare.png").exists()
    first = pd.read_csv(run16 / "estimate_exact/compare.csv")           # written before first_order existed
    assert list(first.columns[-2:]) == ["gt", "exact"]
    rep = json.loads((run16 / "estimate_first_order/alignment.json").read_text())
    assert set(rep["compare"]) == {"exact", "first_order"}


def test_pipeline_writes_compare_with_every_method(dice, tmp_path):
    code, _, err = dice("pipeline", "nodes=6", "rounds=12", "batch_size=8", "progress=false",
                        "influence.rounds=every:6", "influence.hops=1", "stages=[train,gt,estimate]", "out=p")
    assert code == 0, err
    cmp_ = pd.read_csv(tmp_path / "p/estimate_first_order/compare.csv")
    assert {"gt", "exact", "first_order", "distance"} <= set(cmp_.columns)
    assert cmp_[["gt", "exact", "first_order"]].notna().all().all()


# ----------------------------------------------------------------------------------- metrics, topology


def metrics_frame(rounds=50, nodes=6, spike=True):
    rng = np.random.default_rng(0)
    rows = []
    for t in range(rounds):
        for k in range(nodes):
            loss = 2.0 * np.exp(-t / 20) + 0.1 + 0.01 * rng.standard_normal() + (1.0 if k == 5 else 0.0)
            if spike and t == 30 and k == 0:
                loss = 1000.0
            rows.append((t, k, 0.1, loss, loss, min(1.0, 0.1 + t / 60), 1.0 / (t + 1)))
    return pd.DataFrame(rows, columns=["round", "node", "lr", "train_loss", "probe_loss", "probe_acc",
                                       "consensus_distance"])


def test_metrics_panels_have_y_labels_matching_legends_attackers_apart_and_a_robust_range():
    fig = plots.metrics_plot(metrics_frame(), None, attackers=[5])
    axes = fig.axes
    assert len(axes) == 3 and all(ax.get_ylabel() for ax in axes)
    for ax in axes:
        drawn = {a.get_label() for a in ax.get_lines() + ax.collections if not a.get_label().startswith("_")}
        legend = {t.get_text() for t in ax.get_legend().get_texts()}
        assert legend == drawn
        assert "attacker 5" in legend and "mean over honest nodes" in legend
    loss = axes[0]
    attacker = next(l for l in loss.get_lines() if l.get_label() == "attacker 5")
    assert list(attacker.get_xdata()) == list(range(50))
    assert loss.get_ylim()[1] < 50                                     # the 1000 spike does not flatten the curve
    assert any("clipped" in t for t in texts(fig))
    assert axes[2].get_yscale() == "log"


def test_metrics_without_attackers_say_all_nodes():
    fig = plots.metrics_plot(metrics_frame(spike=False), None)
    legend = {t.get_text() for t in fig.axes[1].get_legend().get_texts()}
    assert legend == {"mean over all nodes", "min–max over all nodes"}
    assert not any("clipped" in t for t in texts(fig))


def test_topology_small_has_arrows_and_labels_large_has_thin_lines_scores_and_a_legend(tmp_path):
    from matplotlib.collections import LineCollection
    from matplotlib.patches import FancyArrowPatch

    W4 = W_of("exponential", 4).at(0)
    fig = plots.topology_plot(W4, tmp_path / "t4.png", title="exp 4")
    assert fig.axes[0].findobj(FancyArrowPatch)                         # directed: arrows
    assert {"0", "1", "2", "3"} <= set(texts(fig))
    W = W_of("exponential", 256).at(0)
    scores = {i: float(i % 7) for i in range(256)}
    fig = plots.topology_plot(W, tmp_path / "t256.png", scores=scores, flagged=[3, 9], anomalous=[3, 100],
                              score_label="sender score")
    graph = fig.axes[0]
    assert not graph.findobj(FancyArrowPatch)                           # no hairball of arrows
    assert any(isinstance(c, LineCollection) for c in graph.collections)
    legend = [t.get_text() for t in graph.get_legend().get_texts()]
    assert legend == ["attacker (2)", "flagged (2)"]
    assert any(ax.get_ylabel() == "sender score" for ax in fig.axes)    # colour bar of the scores
    nodes = graph.collections[1]
    assert len(nodes.get_array()) == 256                                # coloured by score
    assert {"3", "9", "100"} <= set(texts(fig))                          # the marked nodes are named
    assert (tmp_path / "t256.png").stat().st_size > 10_000


def test_ring_layout_is_a_circle_in_index_order():
    pos = plots.graph_layout(W_of("ring", 32).at(0))
    assert np.allclose(np.linalg.norm(pos, axis=1), 1.0)
    angles = np.unwrap(np.arctan2(pos[:, 1], pos[:, 0]))
    assert np.all(np.diff(angles) < 0)                                  # clockwise, node after node


def test_decay_uses_a_linear_axis_from_zero_over_a_small_range():
    ph = pd.DataFrame({"hop": [0, 1, 2], "mean_abs": [1.0, 0.8, 0.7], "rows": [4, 8, 8]})
    pdist = pd.DataFrame({"distance": [0, 1, 2], "mean_abs": [0.72, 0.66, 0.72], "rows": [1, 2, 1]})
    fig = plots.hop_decay({"gt": {"per_hop": ph, "per_distance": pdist, "horizon": 2}}, None)
    for ax in fig.axes:
        assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0
        assert all(float(t).is_integer() for t in ax.get_xticks())
    ph2 = ph.assign(mean_abs=[1.0, 1e-2, 1e-4])
    fig = plots.hop_decay({"gt": {"per_hop": ph2, "per_distance": pdist, "horizon": 2}}, None)
    assert fig.axes[0].get_yscale() == "log" and fig.axes[1].get_yscale() == "linear"
