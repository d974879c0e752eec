"""Receiver-side defenses (dice_cli/defenses.py, ROBUST.md §4): every rule against its formula written out
receiver by receiver, the loop twin to 1e-10 (gossip state included), copies, the tolerance bounds, and the
analyses on defended runs: gt re-simulation, estimate method=exact against finite differences, first_order
refused, resume and replay bit-identical."""
from __future__ import annotations

import dataclasses
import json
import math
import statistics

import numpy as np
import pytest
import torch
from robust_setup import CNN, F64, MLP, MOM, N, Fixed, assert_same_state, make, run_both

from dice_cli.config import AttackConfig, DefenseConfig, OptimConfig, PipelineConfig, TopologyConfig, TrainConfig
from dice_cli.defenses import check_bounds
from dice_cli.engine import Inbox, State
from dice_cli.errors import UserError
from dice_cli.influence.estimate import exact, first_order
from dice_cli.influence.gt import ground_truth
from dice_cli.influence.units import select_units

# non-regular in-neighbourhoods (self + 2..5 others), rows uniform: receivers aggregate 3, 4, 5, 3, 4, 6 values
SETS = [[0, 1, 2], [1, 0, 2, 3], [2, 3, 4, 5, 0], [3, 4, 5], [4, 5, 0, 1], [5, 0, 1, 2, 3, 4]]
WV = np.zeros((N, N))
for _k, _s in enumerate(SETS):
    WV[_k, _s] = 1.0 / len(_s)


def inputs(dyn, seed=4, spread=0.3, common=0.0):
    """Θ^t [N, P] (a shared part of scale ``common`` plus node noise 0.3) and Δ [N, P] of scale ``spread``."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(N, dyn.fm.num_params, generator=g, dtype=F64) * 0.3
    theta = theta + common * torch.randn(dyn.fm.num_params, generator=g, dtype=F64)
    delta = spread * torch.randn(N, dyn.fm.num_params, generator=g, dtype=F64)
    return theta, delta


def inbox_lists(W, half):
    """Receiver k's (sender, W_kl, message) list, itself first (honest messages)."""
    return [[(k, W[k, k], half[k])] + [(l, W[k, l], half[l]) for l in range(len(W)) if l != k and W[k, l] > 0]
            for k in range(len(W))]


# --------------------------------------------------------------------------- each rule by hand


@pytest.mark.parametrize("tau", [None, 0.5])
def test_clipped_gossip_formula(tau):
    dyn, _, _, _, _ = make(defense="clipped_gossip", schedule=Fixed(WV), tau=tau, b=1)
    theta, delta = inputs(dyn)
    half = (theta + delta).numpy()
    got = dyn.gossip(State(0, theta, {}, None), delta, {}, None).theta.numpy()
    clipped_any = False
    for k, box in enumerate(inbox_lists(WV, half)):
        d = [np.linalg.norm(m - half[k]) for _, _, m in box[1:]]
        r = tau if tau is not None else sorted(d, reverse=True)[min(1, len(d) - 1)]
        want = half[k] + sum(w * (m - half[k]) * min(1.0, r / dist) for (_, w, m), dist in zip(box[1:], d))
        clipped_any |= any(dist > r for dist in d)
        np.testing.assert_allclose(got[k], want, rtol=0, atol=1e-13)
    assert clipped_any


@pytest.mark.parametrize("b", [1, 2])
def test_trimmed_mean_formula(b):
    sched = Fixed(WV)
    if b == 2:                        # receivers 0 and 3 aggregate only 3 values: 2b = 4 trims all of them
        with pytest.raises(UserError, match=r"trims 2b = 4 of the 3 values receiver 0"):
            make(defense="trimmed_mean", schedule=sched, b=2)
        W = np.full((N, N), 1.0 / N)
        sched = Fixed(W)
    dyn, _, _, _, _ = make(defense="trimmed_mean", schedule=sched, b=b)
    theta, delta = inputs(dyn)
    half = (theta + delta).numpy()
    got = dyn.gossip(State(0, theta, {}, None), delta, {}, None).theta.numpy()
    for k, box in enumerate(inbox_lists(sched.at(0), half)):
        V = np.sort(np.stack([m for _, _, m in box]), axis=0)
        np.testing.assert_allclose(got[k], V[b:len(box) - b].mean(0), rtol=0, atol=1e-13)


@pytest.mark.parametrize("W", [WV, np.full((N, N), 1.0 / N)], ids=["odd_and_even_counts", "complete"])
def test_median_formula(W):
    dyn, _, _, _, _ = make(defense="median", schedule=Fixed(W))
    theta, delta = inputs(dyn)
    half = (theta + delta).numpy()
    got = dyn.gossip(State(0, theta, {}, None), delta, {}, None).theta.numpy()
    for k, box in enumerate(inbox_lists(W, half)):
        np.testing.assert_allclose(got[k], np.median(np.stack([m for _, _, m in box]), axis=0), rtol=0, atol=1e-13)


def test_balance_formula_accepts_some_and_keeps_own_model_when_none():
    dyn, _, _, _, _ = make(defense="balance", schedule=Fixed(WV), gamma=0.6, kappa=1.0, alpha=0.4, rounds=10)
    theta, delta = inputs(dyn, spread=0.05, common=3.0)
    delta[2] += 3.0                                                   # node 2 far from everyone
    half = (theta + delta).numpy()
    t = 4
    got = dyn.gossip(State(t, theta, {}, None), delta, {}, None).theta.numpy()
    counts = []
    for k, box in enumerate(inbox_lists(WV, half)):
        r = 0.6 * math.exp(-1.0 * t / 10) * np.linalg.norm(half[k])
        acc = [m for _, _, m in box[1:] if np.linalg.norm(m - half[k]) <= r]
        counts.append(len(acc))
        want = 0.4 * half[k] + 0.6 * np.mean(acc, axis=0) if acc else half[k]
        np.testing.assert_allclose(got[k], want, rtol=0, atol=1e-13)
    assert min(counts) == 0 and max(counts) > 0                        # both branches exercised
    assert all(c < len(SETS[k]) - 1 for k, c in enumerate(counts) if 2 in SETS[k][1:])   # 2 is rejected


@pytest.mark.parametrize("action", ["cut", "downweight"])
def test_dice_rule_one_round_by_hand(action):
    dyn, fm, _, _, dfn = make(defense="dice", schedule=Fixed(WV), action=action, threshold=2.0, decay=0.8)
    theta, delta = inputs(dyn, spread=0.01)
    xp, yp, _ = dfn.probe
    half = theta + delta

    def probe_grad(th):
        th = th.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(fm.logits(th, {}, xp), yp), th)
        return g

    G = torch.stack([probe_grad(half[k]) for k in range(N)])
    delta[4] = delta[4] + 5.0 * G.mean(0)                             # node 4's update raises everyone's loss
    half = theta + delta
    G = torch.stack([probe_grad(half[k]) for k in range(N)])
    st = State(0, theta, {}, None, dfn.init_state(N, F64, torch.device("cpu")))
    nxt = dyn.gossip(st, delta, {}, None)
    cut_somewhere = False
    for k, box in enumerate(inbox_lists(WV, half.numpy())):
        ids = [l for l, _, _ in box]
        p = [float(G[k] @ delta[l]) for l in ids]                      # honest: Δ_{l→k} = Δ_l
        scale = statistics.median(abs(v) for v in p)
        s_hat = [v / scale for v in p]                                 # one round: Ŝ = (1−ρ)u / (1−ρ) = u
        med = statistics.median(s_hat)
        spread = max(1.4826 * statistics.median(abs(v - med) for v in s_hat), 1.0)
        w = {l: WV[k, l] for l in ids}
        for l, v in zip(ids[1:], s_hat[1:]):
            z = (v - med) / spread
            if z > 2.0:
                new = 0.0 if action == "cut" else WV[k, l] * 2.0 / z
                w[k] += w[l] - new
                w[l] = new
                cut_somewhere = True
                assert l == 4
        want = sum(w[l] * half[l] for l in ids)
        assert torch.allclose(nxt.theta[k], want, rtol=0, atol=1e-13)
        assert sum(w.values()) == pytest.approx(1.0, abs=1e-15)       # rows stay stochastic
        for l in ids:
            assert float(nxt.gossip["mix"][k, l]) == pytest.approx(w[l], abs=1e-15)
            assert float(nxt.gossip["count"][k, l]) == 1.0
            assert float(nxt.gossip["score"][k, l]) == pytest.approx(0.2 * s_hat[ids.index(l)], abs=1e-12)
    assert cut_somewhere
    assert float(nxt.gossip["count"].sum()) == sum(len(s) for s in SETS)
    assert torch.equal(nxt.gossip["flagged"] > 0, (nxt.gossip["mix"] == 0) & torch.as_tensor(WV > 0)) == (action == "cut")


@pytest.mark.parametrize("sticky", [True, False])
def test_dice_cut_is_sticky(sticky):
    """A neighbour cut once stays cut (sticky, the default): its flag, not this round's score, decides."""
    dyn, _, _, _, dfn = make(defense="dice", schedule=Fixed(WV), sticky=sticky)
    theta, delta = inputs(dyn, spread=0.01)
    st = State(3, theta, {}, None, dfn.init_state(N, F64, torch.device("cpu")))
    st.gossip["flagged"][2, 3] = 1.0                                  # receiver 2 caught sender 3 earlier
    nxt = dyn.gossip(st, delta, {}, None)
    assert float(nxt.gossip["mix"][2, 3]) == (0.0 if sticky else WV[2, 3])
    assert float(nxt.gossip["flagged"][2, 3]) == (1.0 if sticky else 0.0)
    assert float(nxt.gossip["mix"][2, 2]) == pytest.approx(WV[2, 2] + (WV[2, 3] if sticky else 0.0), abs=1e-15)


def test_dice_select_keeps_the_best_scored_candidates():
    dyn, _, s0, _, _ = make("sign_flip", defense="dice_select", topology="complete", every=2, keep=2, rounds=7,
                            span=(0, 7), attack_kw={"scale": 3.0})
    s = s0.clone()
    for t in range(dyn.rounds):
        prev = s
        s, _, _ = dyn.round(s)
        mix = s.gossip["mix"]
        if t < 2:
            assert torch.allclose(mix, torch.full((N, N), 1.0 / N, dtype=F64), rtol=0, atol=1e-15)
            continue
        if t % 2 == 0:                     # re-chosen from the running score after this round's update
            rho = 0.9
            s_hat = s.gossip["score"] / (1 - rho ** s.gossip["count"])
            for k in range(N):
                cands = sorted((float(s_hat[k, l]), l) for l in range(N) if l != k)
                assert [l for l in range(N) if s.gossip["kept"][k, l] == 1] == sorted(l for _, l in cands[:2])
        else:
            assert torch.equal(s.gossip["kept"], prev.gossip["kept"])
        kept = s.gossip["kept"]
        assert torch.allclose(mix, (kept + torch.eye(N, dtype=F64)) / 3, rtol=0, atol=1e-15)
    assert (s.gossip["kept"].sum(1) == 2).all() and (s.gossip["kept"].diagonal() == 0).all()


# --------------------------------------------------------------------------- the loop twin and copies


CASES = [("none", "clipped_gossip", {}), ("alie", "clipped_gossip", {"tau": 0.05}), ("ipm", "trimmed_mean", {"b": 2}),
         ("none", "trimmed_mean", {}),
         ("dissensus", "median", {}), ("orthogonal", "balance", {"gamma": 2.0}), ("sign_flip", "dice", {"threshold": 1.0}),
         ("alie", "dice", {"action": "downweight", "threshold": 1.0}), ("inflate", "dice_select", {"every": 2, "keep": 2}),
         ("label_flip", "dice_select", {"every": 2, "keep": 1, "select_by": "similarity"}),
         ("dissensus", "dice", {"probe_batch": 3, "warmup": 2})]


@pytest.mark.parametrize("attack,defense,kw", CASES, ids=[f"{a}-{d}" for a, d, _ in CASES])
@pytest.mark.parametrize("model,optim", [(MLP, OptimConfig()), (CNN, MOM)], ids=["mlp_sgd", "cnn_bn_mom"])
def test_vmap_equals_loop_under_defenses(attack, defense, kw, model, optim):
    sched = Fixed(np.full((N, N), 1.0 / N)) if defense in ("trimmed_mean", "median") else None
    dyn, fm, s0, _, _ = make(attack, defense, model=model, optim=optim, schedule=sched, rounds=6, span=(0, 6), **kw)
    s, ref, worst, _ = run_both(dyn, fm, s0, model)
    assert worst < 1e-10
    assert_same_state(s, ref)
    plain, _, p0, _, _ = make(attack, "none", model=model, optim=optim, schedule=sched, rounds=6, span=(0, 6))
    for _ in range(plain.rounds):
        p0, _, _ = plain.round(p0)
    assert (p0.theta - s.theta).abs().max() > 1e-8                       # the defense changed something


@pytest.mark.parametrize("defense,kw", [("clipped_gossip", {}), ("trimmed_mean", {"b": 2}), ("median", {}),
                                        ("balance", {"gamma": 1.5}), ("dice", {"threshold": 1.0}),
                                        ("dice_select", {"every": 1, "keep": 2})])
def test_defenses_on_a_copies_axis_equal_separate_systems(defense, kw):
    dyn, _, s0, _, _ = make("alie", defense, schedule=Fixed(np.full((N, N), 1.0 / N)), span=(0, 6), **kw)
    s, _, _ = dyn.round(s0)
    s, _, _ = dyn.round(s)
    C = 3
    w = torch.ones(C, N, 6, dtype=F64)
    w[1, 2, :3] = 0.0
    w[2, 4] = 0.0
    many = State(s.round, s.theta.expand(C, -1, -1).clone(), {}, None,
                 {k: v.expand(C, -1, -1).clone() for k, v in s.gossip.items()})
    both = many
    singles = [s.clone() for _ in range(C)]
    for _ in range(2):
        both, _, _ = dyn.round(both, w)
        singles = [dyn.round(x, w[c])[0] for c, x in enumerate(singles)]
        w = None if w is None else torch.ones_like(w)
    for c in range(C):
        assert torch.allclose(both.theta[c], singles[c].theta, rtol=0, atol=1e-13)
        for k in both.gossip:
            assert torch.allclose(both.gossip[k][c], singles[c].gossip[k], rtol=0, atol=1e-12)


def test_inbox_products_equal_the_materialised_messages():
    dyn, _, _, _, _ = make("ipm", schedule=Fixed(WV), span=(0, 6))
    theta, delta = inputs(dyn)
    half = theta + delta
    edges = dyn.messages(State(1, theta, {}, None), half)
    box = Inbox(WV, torch.device("cpu"), F64)
    M = box.messages(half, edges)
    w = torch.rand(N, box.D, dtype=F64) * box.valid
    assert torch.allclose(box.combine(w, half, edges), (w[..., None] * M).sum(-2), rtol=0, atol=1e-14)
    g = torch.randn(N, half.shape[-1], dtype=F64)
    want = (g[:, None, :] * (M - theta[box.sender])).sum(-1)
    assert torch.allclose(box.dots(g, delta, edges, theta)[box.valid], want[box.valid], rtol=0, atol=1e-13)
    pairs = box.to_pairs(w)
    assert torch.allclose(box.from_pairs(pairs)[box.valid], w[box.valid]) and pairs[0, 4] == 0


# --------------------------------------------------------------------------- bounds and bad input


def test_bounds_explain_what_the_rule_tolerates():
    W = Fixed(np.full((N, N), 1.0 / N))
    check_bounds(DefenseConfig(name="trimmed_mean", b=2), W, 5, [1, 3])
    with pytest.raises(UserError, match=r"tolerates at most b = 1 attacking in-neighbours per receiver, but "
                                        r"receiver 0 has 2 \(attackers \[1, 3\]\); set defense.b ≥ 2"):
        check_bounds(DefenseConfig(name="trimmed_mean", b=1), W, 5, [1, 3])
    with pytest.raises(UserError, match=r"defense=median tolerates fewer attackers than half of the 6 values"):
        check_bounds(DefenseConfig(name="median"), W, 5, [0, 1, 2])
    check_bounds(DefenseConfig(name="median"), W, 5, [0, 1])
    for name in ("clipped_gossip", "balance", "dice", "dice_select"):
        check_bounds(DefenseConfig(name=name), W, 5, [0, 1, 2, 3])           # no bound to check


@pytest.mark.parametrize("args,needle", [
    (["defense=trimmed_mean", "attack=ipm", "attack.count=3", "topology=complete", "nodes=6"], "defense.b ≥ 3"),
    (["defense=median", "attack=alie", "attack.count=2", "topology=ring", "nodes=6", "attack.nodes=[1,3]"],
     "defense=median tolerates"),
    (["defense=dice", "engine=distributed"], "engine=distributed"),
    (["defense.name=krum"], "clipped_gossip, trimmed_mean, median, balance, dice, dice_select"),
    (["defense=dice", "defense.action=drop"], "defense.action"),
])
def test_cli_bad_defense_inputs_exit_2(dice, tmp_path, args, needle):
    code, out, err = dice("train", *args, "rounds=3", "batch_size=8", "progress=false", f"out={tmp_path}/r")
    assert code == 2
    assert needle in out + err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_pipeline_refuses_first_order_with_a_defense():
    with pytest.raises(UserError, match=r"methods=\[exact\]"):
        PipelineConfig(defense=DefenseConfig(name="median"))
    with pytest.raises(UserError, match="attack=dissensus"):
        PipelineConfig(attack=AttackConfig(name="dissensus", count=2))
    PipelineConfig(defense=DefenseConfig(name="median"), methods=["exact"])


# --------------------------------------------------------------------------- analyses on defended runs


DEFENDED = [("alie", "trimmed_mean", {"b": 2}), ("sign_flip", "clipped_gossip", {}),
            ("none", "dice", {"action": "downweight", "threshold": 0.5}), ("dissensus", "balance", {"gamma": 2.0}),
            ("none", "median", {}), ("ipm", "dice_select", {"every": 2, "keep": 2})]


@pytest.mark.parametrize("attack,defense,kw", DEFENDED, ids=[f"{a}-{d}" for a, d, _ in DEFENDED])
def test_exact_equals_finite_differences_on_defended_runs(attack, defense, kw):
    sched = Fixed(np.full((N, N), 1.0 / N)) if defense in ("trimmed_mean", "median") else None
    dyn, _, s0, atk, _ = make(attack, defense, schedule=sched, rounds=6, span=(0, 6), **kw)
    st = s0
    for _ in range(2):
        st, _, _ = dyn.round(st)
    xp, yp, _ = (atk or dyn.defense).probe
    hops, t = 2, st.round
    units = select_units(dyn.plan[t].numpy(), "batch", [0, 2, 4], "all", 0, t)
    q = torch.ones(N, dtype=F64)
    ex = exact(dyn, st, units, hops, xp, yp, True, q)
    eps = 1e-5
    for u in range(len(units)):
        def losses(scale):
            w = units.subset([u]).weights(F64, "cpu", scale)[0]
            s = dyn.round(st, w)[0]
            out = [dyn.probe_losses(s.theta, s.buffers, xp, yp, True)[0]]
            out.append(dyn.probe_losses(dyn.round(s)[0].theta, s.buffers, xp, yp, True)[0])
            return out
        hi, lo = losses(1 + eps), losses(1 - eps)
        for h in (1, 2):
            fd = ((hi[h - 1] - lo[h - 1]) / (2 * eps)).numpy()
            rows = ex[(ex.source == units.source[u]) & (ex.hop == h)].sort_values("target")
            got = rows.influence.to_numpy()
            assert np.abs(got).max() > 1e-8
            np.testing.assert_allclose(got, fd, rtol=1e-5, atol=1e-9 * np.abs(fd).max())
    gt = ground_truth(dyn, st, units, hops, xp, yp, True, q, chunk=2)
    assert gt.attrs["noise_floor"] == 0.0
    assert np.abs(gt.influence.to_numpy()).max() > 1e-8
    with pytest.raises(UserError, match="method=exact"):
        first_order(dyn, st, units, hops, xp, yp, True, q)


def test_first_order_still_runs_on_linear_gossip():
    dyn, _, s0, _, _ = make("sign_flip", "none", span=(0, 6))
    st, _, _ = dyn.round(s0)
    units = select_units(dyn.plan[1].numpy(), "batch", [0], "all", 0, 1)
    xp, yp, _ = (torch.randn(5, 1, 8, 8, dtype=F64), torch.randint(0, 10, (5,)), True)
    assert len(first_order(dyn, st, units, 1, xp, yp, True, torch.ones(N, dtype=F64))) == 1 + N


def small_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(nodes=6, rounds=10, batch_size=8, dtype="float64", device="cpu", progress=False,
                data_dir=str(tmp_path / "data"), topology=TopologyConfig(name="exponential"),
                attack=AttackConfig(name="sign_flip", count=1, scale=4.0), defense=DefenseConfig(name="dice"))
    base.update(kw)
    return TrainConfig(**base)


def test_defended_run_resumes_bit_identical_and_replays_its_scores(tmp_path, monkeypatch):
    from dice_cli import engine
    from dice_cli.replay import open_replay
    from dice_cli.training import train

    cfg = small_cfg(tmp_path, record=dataclasses.replace(TrainConfig().record, every=3))
    full = train(cfg, tmp_path / "full", dataclasses.asdict(cfg))
    real_round = engine.Dynamics.round

    def dying_round(self, state, *a, **k):
        if state.round == 7:
            raise KeyboardInterrupt
        return real_round(self, state, *a, **k)

    monkeypatch.setattr(engine.Dynamics, "round", dying_round)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "killed", dataclasses.asdict(cfg))
    monkeypatch.setattr(engine.Dynamics, "round", real_round)
    killed = train(cfg, tmp_path / "killed", dataclasses.asdict(cfg))
    for name in ["round_000009.pt", "round_000010.pt"]:
        a = torch.load(full / "checkpoints" / name, weights_only=True)
        b = torch.load(killed / "checkpoints" / name, weights_only=True)
        assert torch.equal(a["theta"], b["theta"]) and sorted(a["gossip"]) == ["count", "flagged", "mix", "score"]
        for k in a["gossip"]:
            assert torch.equal(a["gossip"][k], b["gossip"][k])
    # replay: round 4 from checkpoint 3 reproduces checkpoint 6's scores after two more rounds
    rp = open_replay(full, "float64", "cpu")
    s6 = rp.state_at(6)
    rec = torch.load(full / "checkpoints" / "round_000006.pt", weights_only=True)
    for k in rec["gossip"]:
        assert torch.equal(s6.gossip[k], rec["gossip"][k])
    s8 = rp.rollout(rp.state_at(4), 8)
    p9 = torch.load(full / "checkpoints" / "round_000009.pt", weights_only=True)
    assert torch.equal(rp.rollout(s8, 9).theta, p9["theta"])
    m = json.loads((full / "manifest.json").read_text())
    assert m["defense"]["name"] == "dice" and m["defense"]["threshold"] == 3.0
    assert set(m["final"]) >= {"honest", "attackers"}


def test_dice_cuts_a_sign_flipper_and_metrics_show_it(tmp_path):
    import pandas as pd

    from dice_cli.training import train

    cfg = small_cfg(tmp_path, rounds=30, nodes=8, lr=0.1)
    run = train(cfg, tmp_path / "run", dataclasses.asdict(cfg))
    bad = json.loads((run / "manifest.json").read_text())["attack"]["nodes"]
    met = pd.read_csv(run / "metrics.csv")
    assert met.attacker.dtype == bool and met[met.attacker].node.unique().tolist() == bad
    last = met[met["round"] == 29].set_index("node")
    graph_out = 4                                                          # 8-node exponential: offsets 1, 2, 4
    assert last.loc[bad[0], "out_degree"] < graph_out                      # some receivers cut it
    assert (last.drop(bad[0]).in_degree <= 3).all()
    rec = torch.load(run / "checkpoints" / "round_000030.pt", weights_only=True)
    mix = rec["gossip"]["mix"].numpy()
    assert np.allclose(mix.sum(1), 1.0)
    assert (mix[:, bad[0]][[k for k in range(8) if k != bad[0]]] == 0).sum() >= 2


def test_a_cut_non_finite_model_is_not_used_and_the_guard_watches_honest_nodes():
    from dice_cli.training import DivergenceError, Guard, RoundRecord

    box = Inbox(WV, torch.device("cpu"), F64)
    half = torch.randn(N, 5, dtype=F64)
    half[4] = float("nan")                                              # an attacker whose model diverged
    w = box.weight.clone()
    w[2, int(box.slot_of[2, 4])] = 0.0                                  # receiver 2 cut it ...
    out = box.combine(w, half, None)
    assert torch.isfinite(out[[0, 1, 2]]).all()                         # ... receivers 0, 1 never heard it
    assert torch.isnan(out[[3, 4, 5]]).all()                            # 3, 5 still mix it: NaN, as plain gossip
    want2 = sum(float(w[2, s]) * half[int(box.sender[2, s])] for s in range(box.D) if box.valid[2, s] and w[2, s] > 0)
    assert torch.allclose(out[2], want2, rtol=0, atol=1e-15)
    rec = RoundRecord(3, 0.1, np.array([1.0, np.nan, 1.0]), np.array([1.0, np.inf, 1.0]))
    Guard(attackers=[1]).check(rec)
    with pytest.raises(DivergenceError, match="node 1"):
        Guard().check(rec)


def test_engines_agree_on_a_defended_run_through_the_cli(dice, tmp_path):
    from conftest import FAST

    args = [*FAST, "topology=complete", "attack=dissensus", "attack.count=1", "defense=dice", "defense.threshold=1.0"]
    assert dice("train", *args, "out=a", "engine=vmap")[0] == 0
    assert dice("train", *args, "out=b", "engine=loop")[0] == 0
    a = torch.load(tmp_path / "a/checkpoints/round_000006.pt", weights_only=True)
    b = torch.load(tmp_path / "b/checkpoints/round_000006.pt", weights_only=True)
    assert (a["theta"] - b["theta"]).abs().max() < 1e-10
    for k in a["gossip"]:
        assert (a["gossip"][k] - b["gossip"][k]).abs().max() < 1e-10


def test_pipeline_on_a_defended_run_with_exact(dice, tmp_path):
    code, out, err = dice("pipeline", "nodes=6", "rounds=8", "batch_size=8", "progress=false", "dtype=float64",
                          "topology=complete", "attack=alie", "attack.count=1", "defense=median", "methods=[exact]",
                          "influence.rounds=every:4", "influence.hops=1", "detect.window=8", "out=p")
    assert code == 0, err
    align = json.loads((tmp_path / "p/estimate_exact/alignment.json").read_text())
    assert align["overall"]["spearman"] > 0.9
    summary = json.loads((tmp_path / "p/detect/summary.json").read_text())
    assert summary["attack"]["name"] == "alie" and "krum" in summary["scores"]
    code, out, err = dice("estimate", "run=p", "method=first_order", "rounds=0", "progress=false")
    assert code == 2 and "method=exact" in err and "defense=median" in err
