"""Anomaly detection by proximal influence (spec §5): the per-edge math against a hand loop, the sign on
a label-flipped node, and aggregate / flag / evaluate on hand-made tables."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from dice_cli.config import ModelConfig, OptimConfig
from dice_cli.detect import (_robust_z, _robust_z_by, aggregate, evaluate, flag, proximal_scores,
                             roc_points)
from dice_cli.engine import Dynamics, Mixing, State
from dice_cli.errors import UserError
from dice_cli.models import init_nodes

CPU = torch.device("cpu")
C = MAD_SCALE = 1.4826


class Schedule:
    """Stub mixing schedule: a list of W's cycled over rounds (time-varying when more than one)."""

    def __init__(self, mats):
        self.mats = [np.asarray(m, dtype=np.float64) for m in mats]
        self.time_varying = len(self.mats) > 1

    def at(self, t):
        return self.mats[t % len(self.mats)].copy()


def ring_like(n, offsets, weights):
    W = np.zeros((n, n))
    for o, w in zip(offsets, weights):
        for k in range(n):
            W[k, (k - o) % n] += w
    return W


# --------------------------------------------------------------------------- 1. math vs a hand loop


def _hand_loop(dyn, fm, state, rounds, xp, yp, shared, q):
    rows = []
    st = state
    fm.module.eval()

    def grad_k(theta_k, bufs, k):
        th = theta_k.detach().clone().requires_grad_(True)
        x = xp if shared else xp[k]
        y = yp if shared else yp[k]
        b = {name: v[k] for name, v in bufs.items()}
        loss = torch.nn.functional.cross_entropy(fm.logits(th, b, x), y)
        (g,) = torch.autograd.grad(loss, th)
        return g

    for _ in range(rounds):
        t = st.round
        nxt, delta, _ = dyn.round(st)
        fm.module.eval()
        W = dyn.mixing.numpy(t)
        for k in range(dyn.n):
            g_post = grad_k(nxt.theta[k], nxt.buffers, k)
            g_pre = grad_k(st.theta[k], st.buffers, k)
            for l in range(dyn.n):
                if l != k and W[k, l] > 0:
                    rows.append((t, k, l, W[k, l], float(q[k]) * W[k, l] * torch.dot(g_post, delta[l]).item(),
                                 torch.dot(g_pre, -delta[l] / dyn.lr(t)).item()))
        st = nxt
    fm.module.train()
    return pd.DataFrame(rows, columns=["round", "receiver", "sender", "weight", "proximal_influence", "dot"])


@pytest.mark.parametrize("model,shared", [(ModelConfig(name="mlp", hidden=[8]), True),
                                          (ModelConfig(name="cnn", channels=[3], batchnorm=True), False)],
                         ids=["mlp_shared_probe", "cnn_bn_node_probe"])
def test_proximal_scores_equal_hand_loop(model, shared):
    n, rounds, start = 5, 4, 2
    g = torch.Generator().manual_seed(1)
    x = torch.randn(80, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (80,), generator=g)
    plan = torch.randint(0, 80, (start + rounds + 1, n, 4), generator=g)
    # time-varying and sparse: a directed ring with unequal weights, then an exponential-like graph
    sched = Schedule([ring_like(n, [0, 1], [0.6, 0.4]), ring_like(n, [0, 1, 2], [0.5, 0.3, 0.2])])
    fm, theta, bufs = init_nodes(model, (1, 6, 6), 4, n, 0, torch.float64, CPU)
    optim = OptimConfig(momentum=0.5, weight_decay=1e-3, schedule="cosine")
    dyn = Dynamics(fm, x, y, plan, Mixing(sched, CPU, torch.float64), optim, 0.2, start + rounds + 1)
    st = State(0, theta, bufs, None)
    for _ in range(start):
        st, _, _ = dyn.round(st)
    if shared:
        xp, yp = torch.randn(7, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (7,), generator=g)
    else:
        xp = torch.randn(n, 7, 1, 6, 6, generator=g, dtype=torch.float64)
        yp = torch.randint(0, 4, (n, 7), generator=g)
    q = torch.tensor([1.0, 0.5, 2.0, 1.5, 0.25], dtype=torch.float64)

    got = proximal_scores(dyn, st, rounds, xp, yp, shared, q)
    want = _hand_loop(dyn, fm, st, rounds, xp, yp, shared, q)

    assert list(got.columns) == ["round", "receiver", "sender", "weight", "proximal_influence", "dot"]
    key = ["round", "receiver", "sender"]
    got_s = got.sort_values(key).reset_index(drop=True)
    want_s = want.sort_values(key).reset_index(drop=True)
    # exactly the edges with W^t_kl > 0, k != l, per round
    assert got_s[key].values.tolist() == want_s[key].values.tolist()
    assert (got["receiver"] != got["sender"]).all()
    assert len(got) == n + 2 * n + n + 2 * n        # rounds 2..5 alternate W: 1 then 2 in-neighbours each
    assert set(got["round"]) == {2, 3, 4, 5}
    for t, d in got.groupby("round"):
        W = sched.at(t)
        assert np.array_equal(d["weight"].to_numpy(), W[d["receiver"], d["sender"]])
    pi, pi_hand = got_s["proximal_influence"].to_numpy(), want_s["proximal_influence"].to_numpy()
    dot, dot_hand = got_s["dot"].to_numpy(), want_s["dot"].to_numpy()
    assert np.abs(pi).max() > 1e-4 and np.abs(dot).max() > 1e-3          # not vacuous
    np.testing.assert_allclose(pi, pi_hand, rtol=0, atol=1e-12)
    np.testing.assert_allclose(dot, dot_hand, rtol=1e-12, atol=1e-12)
    # the input state is not modified
    assert st.round == start


def test_proximal_scores_window_checked():
    n = 3
    x = torch.randn(20, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (20,))
    plan = torch.randint(0, 20, (3, n, 2))
    fm, theta, bufs = init_nodes(ModelConfig(name="logreg"), (4,), 2, n, 0, torch.float64, CPU)
    dyn = Dynamics(fm, x, y, plan, Mixing(Schedule([np.full((n, n), 1 / n)]), CPU, torch.float64),
                   OptimConfig(), 0.1, 3)
    st = State(1, theta, bufs, None)
    for bad in (0, 3, 1.5):
        with pytest.raises(UserError, match=r"1\.\.2"):
            proximal_scores(dyn, st, bad, x[:4], y[:4], True, torch.ones(n))
    assert len(proximal_scores(dyn, st, 2, x[:4], y[:4], True, torch.ones(n))) == 2 * n * (n - 1)


# --------------------------------------------------------------------------- 2. the sign on a flipped node


def test_label_flipped_sender_has_positive_top_score():
    torch.manual_seed(0)
    n, per, D, K, B = 5, 60, 6, 3, 10
    g = torch.Generator().manual_seed(3)
    centres = 4.0 * torch.eye(K, D, dtype=torch.float64)

    def blobs(m):
        y = torch.randint(0, K, (m,), generator=g)
        return centres[y] + torch.randn(m, D, generator=g, dtype=torch.float64), y

    x, y = blobs(n * per)
    bad = 2
    y_run = y.clone()
    idx = torch.arange(bad * per, (bad + 1) * per)            # node `bad` owns these dataset indices
    y_run[idx] = (y[idx] + 1) % K
    warm, window = 30, 20
    plan = torch.stack([torch.stack([k * per + torch.randint(0, per, (B,), generator=g) for k in range(n)])
                        for _ in range(warm + window)])
    W = ring_like(n, [0, 1, 2, 4], [0.25] * 4)                # exponential-like, directed
    fm, theta, bufs = init_nodes(ModelConfig(name="logreg"), (D,), K, n, 0, torch.float64, CPU)
    dyn = Dynamics(fm, x, y_run, plan, Mixing(Schedule([W]), CPU, torch.float64), OptimConfig(), 0.2,
                   warm + window)
    st = State(0, theta, bufs, None)
    for _ in range(warm):
        st, _, _ = dyn.round(st)
    xp, yp = blobs(40)                                        # clean probe, shared
    pairs = proximal_scores(dyn, st, window, xp, yp, True, torch.ones(n, dtype=torch.float64))

    honest_rx = pairs[pairs["receiver"] != bad]
    per_sender = honest_rx.groupby("sender")["proximal_influence"].mean()
    assert per_sender[bad] > 0
    assert per_sender[bad] > per_sender.drop(bad).max()
    assert (per_sender.drop(bad) < 0).all()                   # honest updates help honest receivers

    pair_table, senders = aggregate(pairs)
    assert senders.sort_values("score", ascending=False)["sender"].iloc[0] == bad
    assert senders.set_index("sender").loc[bad, "rank"] == 1
    # every honest receiver ranks the flipped sender first among its in-neighbours
    ranks = pair_table[(pair_table["sender"] == bad)]
    assert (ranks["rank"] == 1).all()
    m = evaluate(flag(senders), [bad])
    assert m["roc_auc"] == 1.0 and m["average_precision"] == 1.0
    # the paper's raw dot score has the opposite sign (the flipped node's gradient opposes the honest
    # receivers'), and aggregate counts it negated, so it finds the same node
    assert honest_rx[honest_rx["sender"] == bad]["dot"].mean() < 0
    assert (honest_rx[honest_rx["sender"] != bad].groupby("sender")["dot"].mean() > 0).all()
    _, senders_dot = aggregate(pairs, score="dot", normalize="none")
    assert senders_dot.sort_values("score", ascending=False)["sender"].iloc[0] == bad


# --------------------------------------------------------------------------- 3. aggregate / flag / evaluate


def hand_pairs():
    rows = []
    pi = {(0, 0): {1: 1.0, 2: 2.0, 3: 6.0}, (0, 1): {0: 0.5, 2: -0.5, 3: 3.0},
          (1, 0): {1: 0.0, 2: 1.0, 3: 2.0}, (1, 1): {0: 1.5, 2: 0.5, 3: 0.0}}
    for (t, k), d in pi.items():
        for l, v in d.items():
            rows.append({"round": t, "receiver": k, "sender": l, "weight": 0.25,
                         "proximal_influence": v, "dot": -2.0 * v + l})
    return pd.DataFrame(rows)


def test_aggregate_sums_ranks_and_receiver_z():
    pair_table, senders = aggregate(hand_pairs())
    pt = pair_table.set_index(["receiver", "sender"])
    sums = {(0, 1): 1.0, (0, 2): 3.0, (0, 3): 8.0, (1, 0): 2.0, (1, 2): 0.0, (1, 3): 3.0}
    for key, v in sums.items():
        assert pt.loc[key, "proximal_influence"] == pytest.approx(v, abs=1e-15)
        assert pt.loc[key, "dot"] == pytest.approx(-2.0 * v + 2 * key[1], abs=1e-15)
        assert pt.loc[key, "rounds"] == 2
    ranks = {(0, 3): 1, (0, 2): 2, (0, 1): 3, (1, 3): 1, (1, 0): 2, (1, 2): 3}
    for key, r in ranks.items():
        assert pt.loc[key, "rank"] == r
    # per-round robust z (median, MAD·1.4826), averaged over the two rounds
    z = {(0, 1): -1 / C, (0, 2): 0.0, (0, 3): 2.5 / C, (1, 0): 1 / C, (1, 2): -0.5 / C, (1, 3): 0.75 / C}
    for key, v in z.items():
        assert pt.loc[key, "normalized"] == pytest.approx(v, abs=1e-14)
    s = senders.set_index("sender")
    assert list(senders["sender"]) == [0, 1, 2, 3]
    assert s["score"].to_numpy() == pytest.approx([1 / C, -1 / C, -0.25 / C, 1.625 / C], abs=1e-14)
    assert s["n_receivers"].tolist() == [1, 1, 2, 2]
    assert s["rank"].tolist() == [2, 4, 3, 1]


def test_aggregate_none_median_and_dot():
    df = hand_pairs()
    extra = pd.DataFrame([{"round": 0, "receiver": 2, "sender": 3, "weight": 0.5,
                           "proximal_influence": 100.0, "dot": 0.0}])
    df = pd.concat([df, extra], ignore_index=True)
    _, mean_t = aggregate(df, normalize="none")
    _, med_t = aggregate(df, normalize="none", aggregation="median")
    # raw window sums; sender 3 has receivers 0, 1, 2 with sums 8, 3, 100
    assert mean_t.set_index("sender")["score"].to_dict() == pytest.approx({0: 2.0, 1: 1.0, 2: 1.5, 3: 37.0})
    assert med_t.set_index("sender")["score"].to_dict() == pytest.approx({0: 2.0, 1: 1.0, 2: 1.5, 3: 8.0})
    assert med_t.set_index("sender").loc[3, "n_receivers"] == 3
    pt, dot_t = aggregate(df, normalize="none", score="dot")
    # dot sums at receiver 0: sender 1: -2+2 = 0, sender 2: -6+4 = -2, sender 3: -16+6 = -10. A negative dot
    # (gradient against the receiver's) is suspicious: the suspicion is -dot, so sender 3 ranks first
    p = pt.set_index(["receiver", "sender"])
    assert [p.loc[(0, l), "dot"] for l in (1, 2, 3)] == pytest.approx([0.0, -2.0, -10.0])
    assert [p.loc[(0, l), "rank"] for l in (1, 2, 3)] == [3, 2, 1]
    assert p.loc[(0, 3), "normalized"] == pytest.approx(10.0)
    # sender 3's dot sums: 10 (receiver 0 -> suspicion 10), receiver 1: -6+6 = 0, receiver 2: 0
    assert dot_t.set_index("sender").loc[3, "score"] == pytest.approx(10.0 / 3)


def test_robust_z_guards_zero_spread():
    assert _robust_z(np.array([1.0, 2.0, 6.0])) == pytest.approx([-1 / C, 0.0, 4 / C])
    # MAD = 0 -> population standard deviation
    assert _robust_z(np.array([1.0, 1.0, 4.0])) == pytest.approx([0.0, 0.0, 3 / np.sqrt(2)])
    # all equal or a single value -> 0
    assert _robust_z(np.array([0.1, 0.1, 0.1])).tolist() == [0.0, 0.0, 0.0]
    assert _robust_z(np.array([5.0])).tolist() == [0.0]
    # the vectorised per-group version agrees
    df = pd.DataFrame({"a": [0, 0, 0, 1, 1, 1, 2, 3, 3, 3], "b": 0,
                       "v": [1.0, 2.0, 6.0, 1.0, 1.0, 4.0, 5.0, 0.1, 0.1, 0.1]})
    want = np.concatenate([_robust_z(df.v[df.a == a].to_numpy()) for a in (0, 1, 2, 3)])
    assert _robust_z_by(df, ["a", "b"], "v") == pytest.approx(want, abs=1e-15)


def test_unknown_choices_raise_user_error():
    df = hand_pairs()
    with pytest.raises(UserError, match="normalize='zscore'.*receiver, none"):
        aggregate(df, normalize="zscore")
    with pytest.raises(UserError, match="aggregation='max'.*mean, median"):
        aggregate(df, aggregation="max")
    with pytest.raises(UserError, match="score='gt'.*proximal_influence, dot"):
        aggregate(df, score="gt")
    with pytest.raises(UserError, match="lacks column"):
        aggregate(df.drop(columns=["proximal_influence"]))


def test_flag_mad_rule():
    t = pd.DataFrame({"sender": range(5), "score": [0.0, 0.1, -0.1, 0.05, 5.0]})
    f = flag(t)
    assert f["flagged"].tolist() == [False, False, False, False, True]
    assert "flagged" not in t.columns                           # a copy
    # threshold = 0.05 + k · 1.4826 · 0.05: k = 2 still flags only the outlier, k = 0 flags above median
    assert flag(t, k=0)["flagged"].tolist() == [False, True, False, False, True]
    # MAD = 0: only scores strictly above the median flag
    z = pd.DataFrame({"sender": range(5), "score": [1.0, 1.0, 1.0, 1.0, 1.0 + 1e-6]})
    assert flag(z)["flagged"].tolist() == [False] * 4 + [True]
    assert not flag(z.assign(score=1.0))["flagged"].any()
    with pytest.raises(UserError):
        flag(t, k=-1)


def test_evaluate_roc_ap_precision_recall():
    t = pd.DataFrame({"sender": [0, 1, 2, 3], "score": [0.1, 0.5, 0.2, 0.9]})
    m = evaluate(t, [3])
    assert m["roc_auc"] == 1.0 and m["average_precision"] == 1.0
    assert t["anomalous"].tolist() == [False, False, False, True]
    m0 = evaluate(t, [0])
    assert m0["roc_auc"] == 0.0
    assert m0["average_precision"] == pytest.approx(0.25)      # the only positive comes last: 1/4
    m12 = evaluate(t, [2, 1, 2])
    assert m12["anomalous"] == [1, 2]
    assert m12["roc_auc"] == pytest.approx(0.5)                # 2 of the 4 (pos, neg) pairs ordered right
    assert m12["average_precision"] == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert m12["n_senders"] == 4
    assert m12["flagged"] == [] and m12["precision"] is None and m12["recall"] == 0.0
    assert m12["note"] == "no sender was flagged, so precision is undefined"
    # flags: with an explicit flagged column, precision/recall of the flags
    tf = t.assign(flagged=[False, True, False, True])
    mf = evaluate(tf, [1, 2])
    assert mf["flagged"] == [1, 3]
    assert mf["precision"] == pytest.approx(0.5) and mf["recall"] == pytest.approx(0.5)
    fpr, tpr = roc_points(t, [3])
    assert fpr[0] == 0 and tpr[-1] == 1 and np.trapezoid(tpr, fpr) == pytest.approx(1.0)
    fpr, tpr = roc_points(t, [1, 2])
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.5)


def test_evaluate_without_both_classes_explains():
    t = pd.DataFrame({"sender": [0, 1, 2], "score": [0.0, 0.0, 0.0]})
    m = evaluate(t, [])
    assert m["roc_auc"] is None and m["average_precision"] is None
    assert "no sender is anomalous" in m["note"]
    assert m["recall"] is None and m["precision"] is None and m["flagged"] == []
    m_all = evaluate(t, [0, 1, 2])
    assert m_all["roc_auc"] is None and "every sender is anomalous" in m_all["note"]
    with pytest.raises(UserError, match=r"\[7\]"):
        evaluate(t, [7])
    with pytest.raises(UserError, match="both anomalous and normal"):
        roc_points(t, [])


def test_receivers_with_two_in_neighbours_keep_magnitudes():
    """Two in-neighbours: a per-round z-score would be ±0.6745 whatever the gap; the scale-only
    fallback keeps how much larger the suspicious sender's influence is, so flags can fire."""
    rng = np.random.default_rng(0)
    rows = []
    for t in range(6):
        for k in range(12):                      # ring: receiver k hears k-1 and k+1
            for l in ((k - 1) % 12, (k + 1) % 12):
                honest = -1.0 + rng.uniform(-0.8, 0.8)
                rows.append({"round": t, "receiver": k, "sender": l, "weight": 1 / 3,
                             "proximal_influence": 5.0 if l == 3 else honest, "dot": 0.0})
    pairs = pd.DataFrame(rows)
    _, senders = aggregate(pairs, normalize="receiver")
    s = senders.set_index("sender")["score"]
    assert s[3] > 1.5 and (s.drop(3) < 0).all()      # ≈ 5 / median|s| of its receivers; honest < 0
    flagged = flag(senders, k=3.0)
    assert flagged.loc[flagged.flagged, "sender"].tolist() == [3]
