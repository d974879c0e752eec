"""The literature's detector scores in ``dice detect`` (ROBUST.md §3): every score against a hand loop over
edges on runs with per-edge messages and defenses, the cumulative scores behind the detection delay against
``aggregate`` on every prefix, TPR at fixed FPR, and the command's outputs and bad inputs."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from robust_setup import F64, N, make

from dice_cli.config import AttackConfig, DefenseConfig, DetectConfig, TopologyConfig, TrainConfig
from dice_cli.detect import (SCORES, aggregate, cumulative_sender_scores, detection_delay, proximal_scores,
                             score_metrics, tpr_at)


def _hand_scores(dyn, fm, state, rounds, xp, yp, shared, q, f):
    """Every score of every edge, one receiver and one in-neighbour at a time."""
    rows = []
    st = state

    def loss_and_grad(th, k):
        th = th.detach().clone().requires_grad_(True)
        fm.module.eval()
        loss = torch.nn.functional.cross_entropy(fm.logits(th, {}, xp if shared else xp[k]), yp if shared else yp[k])
        fm.module.train()
        (g,) = torch.autograd.grad(loss, th)
        return float(loss.detach()), g

    for _ in range(rounds):
        t = st.round
        delta, mom, bufs, _ = dyn.local_step(st)
        half = st.theta + delta
        edges = dyn.messages(st, half)
        msgs = {} if edges is None else {(int(l), int(k)): m for l, k, m in
                                         zip(edges.sender, edges.receiver, edges.message)}
        nxt = dyn.gossip(st, delta, bufs, mom)
        W = dyn.mixing.numpy(t)
        for k in range(N):
            nbrs = [l for l in range(N) if l != k and W[k, l] > 0]
            recv = {l: msgs.get((l, k), half[l]) for l in nbrs}
            _, g_post = loss_and_grad(nxt.theta[k], k)
            _, g_pre = loss_and_grad(st.theta[k], k)
            own_loss, _ = loss_and_grad(half[k], k)
            for l in nbrs:
                m = recv[l]
                upd = m - st.theta[l]
                a, b = m - st.theta[k], delta[k]
                others = sorted(float(((m - recv[j]) ** 2).sum()) for j in nbrs if j != l)
                row = {"round": t, "receiver": k, "sender": l,
                       "proximal_influence": float(q[k]) * W[k, l] * float(g_post @ upd),
                       "dot": float(g_pre @ (-upd / dyn.lr(t))),
                       "cosine": -float(a @ b) / float(a.norm() * b.norm()),
                       "distance": float((m - half[k]).norm()),
                       "loss": loss_and_grad(m, k)[0] - own_loss,
                       "krum": sum(others[:len(nbrs) - f - 2]) if len(nbrs) - f - 2 >= 1 else np.nan,
                       "norm": float((m - st.theta[k]).norm())}
                rows.append(row)
        st = nxt
    return pd.DataFrame(rows)


@pytest.mark.parametrize("attack,defense,topology,shared", [
    ("alie", "none", "complete", True), ("ipm", "dice", "complete", False), ("dissensus", "median", "complete", True),
    ("sign_flip", "none", "exponential", True),
])
def test_every_score_equals_a_hand_loop(attack, defense, topology, shared):
    dyn, fm, s0, atk, dfn = make(attack, defense, topology=topology, shared_probe=shared, rounds=5, span=(0, 5))
    st, _, _ = dyn.round(s0)
    xp, yp, _ = (atk or dfn).probe
    q = torch.tensor([1.0, 0.5, 2.0, 1.5, 0.25, 1.0], dtype=F64)
    f = 1 if topology == "complete" else 0
    got = proximal_scores(dyn, st, 3, xp, yp, shared, q, scores=SCORES, krum_f=f)
    assert list(got.columns) == ["round", "receiver", "sender", "weight", *SCORES]
    want = _hand_scores(dyn, fm, st, 3, xp, yp, shared, q, f)
    key = ["round", "receiver", "sender"]
    assert got[key].values.tolist() == want[key].values.tolist()
    for sc in SCORES:
        a, b = got[sc].to_numpy(), want[sc].to_numpy()
        assert np.abs(a).max() > 1e-6, sc
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=sc)
    # the default call still returns today's two scores
    base = proximal_scores(dyn, st, 3, xp, yp, shared, q)
    assert list(base.columns) == ["round", "receiver", "sender", "weight", "proximal_influence", "dot"]
    np.testing.assert_array_equal(base["proximal_influence"], got["proximal_influence"])


def _table(rng, rounds, graph):
    rows = []
    for t in range(rounds):
        for k, nbrs in graph.items():
            for l in nbrs:
                rows.append({"round": t, "receiver": k, "sender": l, "weight": 0.2,
                             "proximal_influence": rng.normal() + (2.0 if l == 3 else 0.0),
                             "dot": rng.normal() - (1.0 if l == 3 else 0.0)})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("normalize", ["receiver", "none"])
@pytest.mark.parametrize("aggregation", ["mean", "median"])
@pytest.mark.parametrize("graph", ["ring", "dense"])
def test_cumulative_scores_equal_aggregate_on_every_prefix(normalize, aggregation, graph):
    n = 8
    g = ({k: [(k - 1) % n, (k + 1) % n] for k in range(n)} if graph == "ring" else
         {k: [l for l in range(n) if l != k and (l - k) % n in (1, 2, 3, 5)] for k in range(n)})
    pairs = _table(np.random.default_rng(1), 12, g)
    rounds, senders, sc = cumulative_sender_scores(pairs, normalize, aggregation, "dot")
    assert rounds.tolist() == list(range(12)) and senders.tolist() == list(range(n))
    for e in (0, 3, 11):
        _, st = aggregate(pairs[pairs["round"] <= e], normalize, aggregation, "dot")
        np.testing.assert_allclose(sc[e], st["score"].to_numpy(), rtol=1e-12, atol=1e-12)


def test_detection_delay_and_tpr_at_fpr():
    n = 10
    g = {k: [l for l in range(n) if l != k] for k in range(n)}
    rng = np.random.default_rng(0)
    rows = []
    for t in range(20):                          # sender 3 looks honest for 5 rounds, then clearly bad
        for k, nbrs in g.items():
            for l in nbrs:
                v = rng.normal() + (6.0 if (l == 3 and t >= 5) else 0.0)
                rows.append({"round": t + 100, "receiver": k, "sender": l, "proximal_influence": v, "dot": 0.0})
    pairs = pd.DataFrame(rows)
    delay, at, auc = detection_delay(pairs, [3])
    assert auc[-1] == 1.0 and 5 < delay <= 12 and at == 100 + delay - 1
    assert (auc[delay - 1:] >= 0.95).all() and not auc[delay - 2] >= 0.95
    # an AUC that ends below the level has no delay
    assert detection_delay(pairs.assign(proximal_influence=-pairs.proximal_influence), [3])[0] is None
    fpr = np.array([0.0, 0.0, 0.02, 0.04, 0.5, 1.0])
    tpr = np.array([0.0, 0.3, 0.5, 0.8, 0.9, 1.0])
    assert tpr_at(fpr, tpr, 0.01) == 0.3 and tpr_at(fpr, tpr, 0.05) == 0.8
    table, curves = score_metrics(pairs, [3], ["proximal_influence"])
    r = table["proximal_influence"]
    assert r["roc_auc"] == 1.0 and r["tpr_at_1fpr"] == 1.0 and r["delay"] == delay and r["delay_round"] == at


def small_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(nodes=8, rounds=12, batch_size=8, dtype="float64", device="cpu", progress=False,
                data_dir=str(tmp_path / "data"), topology=TopologyConfig(name="complete"),
                attack=AttackConfig(name="alie", count=2))
    base.update(kw)
    return TrainConfig(**base)


def test_run_detect_writes_every_score(tmp_path):
    from dice_cli.detect import run_detect
    from dice_cli.training import train

    cfg = small_cfg(tmp_path, defense=DefenseConfig(name="clipped_gossip"))
    run = train(cfg, tmp_path / "run", dataclasses.asdict(cfg))
    dcfg = DetectConfig(run=str(run), device="cpu", progress=False)
    out = run_detect(dcfg, None, dataclasses.asdict(dcfg))
    summary = json.loads((out / "summary.json").read_text())
    for key in ["roc_auc", "average_precision", "precision", "recall", "anomalous", "flagged", "n_senders",
                "window", "score", "normalize", "aggregation", "k"]:
        assert key in summary                                                # today's fields, primary score
    assert summary["score"] == "proximal_influence" and summary["krum_f"] == 2
    assert list(summary["scores"]) == SCORES
    for sc, v in summary["scores"].items():
        assert set(v) == {"roc_auc", "average_precision", "tpr_at_1fpr", "tpr_at_5fpr", "delay", "delay_round"}
        assert 0.0 <= v["roc_auc"] <= 1.0
    assert summary["scores"]["proximal_influence"]["roc_auc"] == summary["roc_auc"]
    table = pd.read_csv(out / "scores.csv")
    assert table.score.tolist() == SCORES
    assert (out / "roc.png").exists()
    rounds = pd.read_csv(out / "rounds.csv")
    assert set(SCORES) <= set(rounds.columns) and len(rounds) == 12 * 8 * 7


def test_krum_is_left_out_where_undefined_and_refused_when_asked_for(tmp_path, dice):
    from dice_cli.training import train

    cfg = small_cfg(tmp_path, topology=TopologyConfig(name="ring"), attack=AttackConfig(name="ipm", count=1))
    run = train(cfg, tmp_path / "ring", dataclasses.asdict(cfg))
    code, out, err = dice("detect", f"run={run}", "progress=false")
    assert code == 0, err
    s = json.loads((run / "detect/summary.json").read_text())
    assert "krum" not in s["scores"] and "krum left out" in s["note"] and "f + 3 = 4" in s["note"]
    code, out, err = dice("detect", f"run={run}", "scores=[krum,dot]", "progress=false", "overwrite=true")
    assert code == 2 and "at least f + 3" in err
    cfg = small_cfg(tmp_path, attack=AttackConfig(name="alie", count=3))
    run = train(cfg, tmp_path / "dense", dataclasses.asdict(cfg))
    code, out, err = dice("detect", f"run={run}", "krum_f=1", "progress=false")
    assert code == 2 and "krum_f=1 assumes at most 1" in err and "set krum_f ≥ 3" in err
    code, out, err = dice("detect", f"run={run}", "scores=[dot,magic]", "progress=false")
    assert code == 2 and "magic" in err and "proximal_influence, dot, cosine" in err
    code, out, err = dice("detect", f"run={run}", "scores=[cosine,norm]", "score=dot", "progress=false")
    assert code == 0, err
    s = json.loads((run / "detect/summary.json").read_text())
    assert list(s["scores"]) == ["dot", "cosine", "norm"]


def test_detect_on_runs_without_attack_has_no_roc(tmp_path):
    from dice_cli.detect import run_detect
    from dice_cli.training import train

    cfg = small_cfg(tmp_path, attack=AttackConfig(), defense=DefenseConfig(name="dice"))
    run = train(cfg, tmp_path / "run", dataclasses.asdict(cfg))
    dcfg = DetectConfig(run=str(run), device="cpu", progress=False, scores=["loss", "krum"])
    out = run_detect(dcfg, None, dataclasses.asdict(dcfg))
    s = json.loads((out / "summary.json").read_text())
    assert s["roc_auc"] is None and s["scores"]["loss"]["roc_auc"] is None and s["krum_f"] == 0
