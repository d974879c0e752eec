"""DICE ground truth (spec §3): signs, the one-hop closed form, reachability, the slow twin, noise floor,
chunking, unit selection and replay from checkpoints."""
from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest
import torch

from dice_cli.config import ModelConfig, OptimConfig, RecordConfig, TopologyConfig, TrainConfig
from dice_cli.engine import Dynamics, Mixing, State
from dice_cli.errors import UserError
from dice_cli.graph import MixingSchedule, build_schedule
from dice_cli.influence.gt import COLUMNS, ground_truth
from dice_cli.influence.units import Units, select_units
from dice_cli.models import init_nodes
from dice_cli.run import RunDir

CPU = torch.device("cpu")
F64 = torch.float64
SHAPE, CLASSES = (1, 8, 8), 5
MLP = ModelConfig(name="mlp", hidden=[8])


def make(model=MLP, optim=OptimConfig(), n=4, rounds=12, batch=6, W=None, lr=0.1, corrupt=None, N=200):
    """A tiny learnable problem: labels = argmax of a fixed linear map; batches never repeat a sample.

    corrupt=(t, j): node j's batch at round t is replaced by copies of its samples with wrong labels."""
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(64, CLASSES, generator=g, dtype=F64)
    x = torch.randn(N, *SHAPE, generator=g, dtype=F64)
    y = (x.flatten(1) @ proj).argmax(1)
    plan = torch.stack([torch.randperm(N, generator=g)[:n * batch].reshape(n, batch) for _ in range(rounds)])
    if corrupt is not None:
        t, j = corrupt
        idx = plan[t, j]
        x = torch.cat([x, x[idx]])
        y = torch.cat([y, (y[idx] + 1 + torch.randint(0, CLASSES - 1, (batch,), generator=g)) % CLASSES])
        plan[t, j] = torch.arange(N, N + batch)
    xp = torch.randn(40, *SHAPE, generator=g, dtype=F64)
    yp = (xp.flatten(1) @ proj).argmax(1)
    sched = MixingSchedule.static(W) if W is not None else build_schedule(TopologyConfig(name="exponential"), n, 3)
    fm, theta, bufs = init_nodes(model, SHAPE, CLASSES, n, 0, F64, CPU)
    dyn = Dynamics(fm, x, y, plan, Mixing(sched, CPU, F64), optim, lr, rounds)
    return dyn, State(0, theta, bufs, None), xp, yp


def advance(dyn, state, rounds):
    with torch.no_grad():
        for _ in range(rounds):
            state, _, _ = dyn.round(state)
    return state


def gt(dyn, state, units, hops, xp, yp, q=None, **kw):
    q = torch.ones(dyn.n, dtype=F64) if q is None else q
    return ground_truth(dyn, state, units, hops, xp, yp, True, q, **kw)


def slow_gt(dyn, state, units, hops, xp, yp, q):
    """The slow twin: re-simulate each unit alone (no copies axis), factual run separately."""
    def run(w):
        with torch.no_grad():
            s, delta, _ = dyn.round(state.clone(), w)
            half = dyn.probe_losses(state.theta + delta, state.buffers, xp, yp, True)[0]
            losses = [dyn.probe_losses(s.theta, s.buffers, xp, yp, True)[0]]
            for _ in range(hops - 1):
                s, _, _ = dyn.round(s)
                losses.append(dyn.probe_losses(s.theta, s.buffers, xp, yp, True)[0])
        return half, torch.stack(losses)

    f_half, f = run(None)
    rows = []
    w_all = units.weights(F64, CPU)
    for u in range(len(units)):
        j = int(units.source[u])
        u_half, lu = run(w_all[u])
        rows.append((j, int(units.sample[u]), j, 0, float(q[j] * (f_half[j] - u_half[j]))))
        for s in range(hops):
            for k in range(dyn.n):
                rows.append((j, int(units.sample[u]), k, s + 1, float(q[k] * (f[s, k] - lu[s, k]))))
    return pd.DataFrame(rows, columns=["source", "sample", "target", "hop", "influence"])


# ------------------------------------------------------------------------------------------- signs, layout
def test_table_layout_and_sign_convention():
    dyn, s0, xp, yp = make()
    st = advance(dyn, s0, 3)
    units = select_units(dyn.plan[3].numpy(), "sample", [1, 2], 2, seed=0, round=3)
    q = torch.tensor([1.0, 0.5, 2.0, 0.25], dtype=F64)
    df = gt(dyn, st, units, 2, xp, yp, q=q)
    assert list(df.columns) == COLUMNS
    assert len(df) == len(units) * (1 + 2 * dyn.n)
    assert (df["round"] == 3).all() and (df["unit"] == "sample").all()
    h0 = df[df.hop == 0]
    assert len(h0) == len(units) and (h0.target == h0.source).all()
    for s in (1, 2):
        assert sorted(df[df.hop == s].groupby(["source", "sample"]).target.apply(list).iloc[0]) == [0, 1, 2, 3]
    # influence = q_k (loss WITH − loss WITHOUT)
    qk = q.numpy()[df.target.to_numpy()]
    assert np.array_equal(df.influence.to_numpy(), qk * (df.loss_with - df.loss_without).to_numpy())
    assert set(df["sample"]) <= set(dyn.plan[3, 1].tolist()) | set(dyn.plan[3, 2].tolist())
    assert (df.influence != 0).any()


def test_removing_a_harmful_batch_helps_its_neighbours():
    t, j = 60, 0
    dyn, s0, xp, yp = make(model=ModelConfig(name="logreg"), lr=0.5, rounds=62, corrupt=(t, j))
    st = advance(dyn, s0, t)
    units = select_units(dyn.plan[t].numpy(), "batch", "all", "all", seed=0, round=t)
    df = gt(dyn, st, units, 1, xp, yp)
    W = dyn.mixing.numpy(t)
    hop1 = df[(df.hop == 1)]
    bad = hop1[(hop1.source == j) & (hop1.target != j) & (W[hop1.target, j] > 0)]
    assert len(bad) >= 2 and bad.influence.mean() > 0          # positive: the wrong labels hurt
    clean = hop1[(hop1.source != j) & (hop1.target != hop1.source)]
    clean = clean[W[clean.target, clean.source] > 0]
    assert bad.influence.mean() > clean.influence.mean()
    assert df[(df.hop == 0) & (df.source == j)].influence.item() > 0


# ------------------------------------------------------------------------------------------- closed form
def test_one_hop_equals_closed_form():
    dyn, s0, xp, yp = make(lr=0.2)
    t, j = 5, 1
    st = advance(dyn, s0, t)
    units = select_units(dyn.plan[t].numpy(), "sample", [j], "all", seed=0, round=t)
    batch_units = select_units(dyn.plan[t].numpy(), "batch", [j], "all", seed=0, round=t)
    df = gt(dyn, st, units, 1, xp, yp)
    dfb = gt(dyn, st, batch_units, 1, xp, yp)
    with torch.no_grad():
        nxt, _, _ = dyn.round(st)
    W = torch.as_tensor(dyn.mixing.numpy(t))
    x, y = dyn.batch(t)
    probe = lambda th: dyn.probe_losses(th, {}, xp, yp, True)[0]

    def delta_j(w):
        th = st.theta[j].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(dyn.fm.loss(th, {}, x[j], y[j], w), th)
        return -dyn.lr(t) * g

    full = delta_j(torch.ones(dyn.batch_size, dtype=F64))
    L_next = probe(nxt.theta)
    for u, w in enumerate(list(units.weights(F64, CPU)) + list(batch_units.weights(F64, CPU))):
        without = delta_j(w[j])
        theta_wo = nxt.theta - W[:, j:j + 1] * (full - without)[None]
        expect1 = (L_next - probe(theta_wo)).numpy()
        expect0 = (probe((st.theta[j] + full)[None].expand(dyn.n, -1))[j]
                   - probe((st.theta[j] + without)[None].expand(dyn.n, -1))[j]).item()
        if u < len(units):
            rows = df[df["sample"] == units.sample[u]]
        else:
            rows = dfb
            # batch unit: θ_{j∖u}^{t+½} = θ_j^t, the paper's L(θ_j^{t+½}) − L(θ_j^t)
            assert (without == 0).all()
        got1 = rows[rows.hop == 1].sort_values("target").influence.to_numpy()
        assert np.abs(got1 - expect1).max() < 1e-12
        assert abs(rows[rows.hop == 0].influence.item() - expect0) < 1e-12
    assert (df[df.hop == 1].influence != 0).sum() > 0


# ------------------------------------------------------------------------------------------- reachability
def test_unreachable_target_is_exactly_zero_until_reached():
    W = np.array([[1.0, 0.0, 0.0],      # node 0 hears only itself
                  [0.5, 0.5, 0.0],      # node 1 hears 0
                  [0.0, 0.5, 0.5]])     # node 2 hears 1: 0 -> 1 -> 2
    dyn, s0, xp, yp = make(n=3, W=W, optim=OptimConfig(momentum=0.9))
    st = advance(dyn, s0, 2)
    units = select_units(dyn.plan[2].numpy(), "batch", [0, 2], "all", seed=0, round=2)
    df = gt(dyn, st, units, 3, xp, yp).set_index(["source", "target", "hop"]).influence
    assert df[(0, 0, 1)] != 0 and df[(0, 1, 1)] != 0
    assert df[(0, 2, 1)] == 0.0                       # W_20 = 0: not reached in one round
    assert df[(0, 2, 2)] != 0 and df[(0, 2, 3)] != 0  # reached through node 1
    for s in (1, 2, 3):                               # node 2 is a sink: nobody hears it
        assert df[(2, 0, s)] == 0.0 and df[(2, 1, s)] == 0.0
        assert df[(2, 2, s)] != 0


# ------------------------------------------------------------------------------------------- slow twin
RING8 = np.roll(np.eye(8), 1, 1) / 3 + np.eye(8) / 3 + np.roll(np.eye(8), -1, 1) / 3


@pytest.mark.parametrize("restrict", [True, False], ids=["reached_rows", "full_copies"])
@pytest.mark.parametrize("t", [0, 4])
def test_vectorised_equals_one_unit_loop_with_momentum(t, restrict):
    dyn, s0, xp, yp = make(optim=OptimConfig(momentum=0.9, weight_decay=1e-3), n=8, W=RING8)
    st = advance(dyn, s0, t)
    assert (st.momentum is None) == (t == 0)
    q = torch.linspace(0.5, 2.0, 8, dtype=F64)
    for units in (select_units(dyn.plan[t].numpy(), "sample", [0, 2], 3, seed=1, round=t),
                  select_units(dyn.plan[t].numpy(), "batch", "all", "all", seed=1, round=t)):
        fast = gt(dyn, st, units, 3, xp, yp, q=q, chunk=4, restrict=restrict)
        assert fast.attrs["restricted"] is restrict and fast.attrs["noise_floor"] == 0.0
        slow = slow_gt(dyn, st, units, 3, xp, yp, q)
        assert len(fast) == len(slow)
        assert (fast[["source", "sample", "target", "hop"]].to_numpy()
                == slow[["source", "sample", "target", "hop"]].to_numpy()).all()
        assert np.abs(fast.influence.to_numpy() - slow.influence.to_numpy()).max() < 1e-12
        assert np.abs(fast.influence.to_numpy()).max() > 1e-6


# ------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("model", [MLP, ModelConfig(name="cnn", channels=[3], batchnorm=True)], ids=["mlp", "cnn_bn"])
def test_null_copy_noise_floor_is_exactly_zero(model):
    dyn, s0, xp, yp = make(model=model, optim=OptimConfig(momentum=0.5))
    st = advance(dyn, s0, 3)
    units = select_units(dyn.plan[3].numpy(), "sample", "all", 2, seed=0, round=3)
    df = gt(dyn, st, units, 3, xp, yp)
    assert df.attrs["noise_floor"] == 0.0
    assert 0 < df.attrs["roundoff"] < 1e-12
    assert np.abs(df.influence).max() > 1e3 * df.attrs["roundoff"]


def test_chunking_gives_identical_results():
    dyn, s0, xp, yp = make(optim=OptimConfig(momentum=0.9))
    st = advance(dyn, s0, 2)
    units = select_units(dyn.plan[2].numpy(), "sample", "all", 2, seed=0, round=2)
    a = gt(dyn, st, units, 2, xp, yp, chunk=2)
    b = gt(dyn, st, units, 2, xp, yp, chunk=100)
    pd.testing.assert_frame_equal(a, b, check_exact=True)      # bit-identical, not just close
    assert a.attrs["noise_floor"] == b.attrs["noise_floor"] == 0.0


def test_hops_past_the_last_round_is_a_user_error():
    dyn, s0, xp, yp = make(rounds=6)
    st = advance(dyn, s0, 4)
    units = select_units(dyn.plan[4].numpy(), "batch", [0], "all", seed=0, round=4)
    gt(dyn, st, units, 2, xp, yp)                     # rounds 4, 5: fine
    with pytest.raises(UserError, match=r"hops=3.*rounds 0\.\.3"):
        gt(dyn, st, units, 3, xp, yp)
    wrong = select_units(dyn.plan[3].numpy(), "batch", [0], "all", seed=0, round=3)
    with pytest.raises(UserError, match="round 3"):
        gt(dyn, st, wrong, 1, xp, yp)


# ------------------------------------------------------------------------------------------- units
def test_select_units():
    plan_t = np.arange(12).reshape(3, 4) + 100           # node k holds 100+4k .. 100+4k+3
    b = select_units(plan_t, "batch", "all", "all", seed=0, round=7)
    assert len(b) == 3 and b.round == 7 and (b.sample == -1).all() and list(b.source) == [0, 1, 2]
    assert b.mask.shape == (3, 3, 4) and b.mask[1, 1].all() and b.mask[1].sum() == 4
    s = select_units(plan_t, "sample", [2, 0], "all", seed=0, round=7)
    assert list(s.source) == [2] * 4 + [0] * 4 and list(s.sample[:4]) == [108, 109, 110, 111]
    assert (s.mask.sum((1, 2)) == 1).all() and s.mask[0, 2, 0]
    w = s.weights(F64, CPU, scale=1.5)
    assert w.shape == (8, 3, 4) and w[0, 2, 0] == 1.5 and w.sum() == 8 * 12 - 8 + 8 * 1.5
    m1 = select_units(plan_t, "sample", "all", 2, seed=5, round=7)
    m2 = select_units(plan_t, "sample", "all", 2, seed=5, round=7)
    assert len(m1) == 6 and np.array_equal(m1.sample, m2.sample)
    assert all(set(m1.sample[m1.source == k]) <= set(plan_t[k]) for k in range(3))
    assert len(select_units(plan_t, "sample", [1], 10, seed=0, round=7)) == 4
    lst = select_units(plan_t, "sample", "all", [109, 101], seed=0, round=7)
    assert list(lst.source) == [0, 2] and list(lst.sample) == [101, 109]

    with pytest.raises(UserError, match="kind='grad'.*batch, sample"):
        select_units(plan_t, "grad", "all", "all", 0, 7)
    with pytest.raises(UserError, match=r"node 3 does not exist.*0\.\.2"):
        select_units(plan_t, "batch", [3], "all", 0, 7)
    with pytest.raises(UserError, match=r"sample 105 is not in round 7's batch of node 0.*\[100, 101, 102, 103\]"):
        select_units(plan_t, "sample", [0], [101, 105], 0, 7)
    with pytest.raises(UserError, match="only applies to kind=sample"):
        select_units(plan_t, "batch", "all", 2, 0, 7)
    with pytest.raises(UserError, match=">= 1"):
        select_units(plan_t, "sample", "all", 0, 0, 7)
    sub = s.subset([1, 5])
    assert isinstance(sub, Units) and list(sub.sample) == [109, 101]


# ------------------------------------------------------------------------------------------- replay
def test_state_at_replays_from_an_earlier_checkpoint(tmp_path, monkeypatch):
    from dice_cli.replay import open_replay
    from dice_cli.simulation import build_setup
    from dice_cli.training import train

    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(nodes=4, rounds=6, batch_size=8, dtype="float64", device="cpu", progress=False,
                      record=RecordConfig(every=3), optim=OptimConfig(momentum=0.9))
    out = train(cfg, tmp_path / "run", asdict(cfg))
    run = RunDir(out)
    assert run.checkpoint_rounds() == [0, 3, 6]
    rp = open_replay(out, "float64", "cpu")
    setup = build_setup(cfg, CPU, F64)
    direct = [setup.init]
    with torch.no_grad():
        for _ in range(6):
            direct.append(setup.dyn.round(direct[-1])[0])
    for t in range(7):
        s = rp.state_at(t)
        assert s.round == t and s.theta.dtype == F64
        assert torch.equal(s.theta, direct[t].theta)
        assert (s.momentum is None) == (t == 0)
        if t:
            assert torch.equal(s.momentum, direct[t].momentum)
    with pytest.raises(UserError, match=r"0\.\.6"):
        rp.state_at(7)
    run.checkpoint_path(0).unlink()
    with pytest.raises(UserError, match=r"no checkpoint at or before round 2.*\[3, 6\]"):
        rp.state_at(2)
    assert torch.equal(rp.state_at(4).theta, direct[4].theta)


# ------------------------------------------------------------------------------------------- reached rows only
@pytest.mark.parametrize("case", ["sgd", "momentum_bn", "per_node_probe", "update_attack", "data_attack",
                                  "time_varying"])
def test_reached_rows_pass_equals_full_copies(case):
    """The pass that steps only the nodes each unit has reached (restrict=True) against the full copies:
    the same table to round-off, the same exact zeros (unreached targets), a zero noise floor, bit-identical
    under chunking, and "auto" choosing it on a sparse graph."""
    from dice_cli.config import AttackConfig, ProbeConfig, TrainConfig
    from dice_cli.simulation import build_setup

    kw = {"sgd": {}, "momentum_bn": dict(model=ModelConfig(name="cnn", channels=[3], batchnorm=True),
                                         optim=OptimConfig(momentum=0.9), batch_size=4),
          "per_node_probe": dict(probe=ProbeConfig(kind="per_node", size=5)),
          "update_attack": dict(attack=AttackConfig(name="gaussian", nodes=[2, 5])),
          "data_attack": dict(attack=AttackConfig(name="label_flip", nodes=[3])),
          "time_varying": dict(topology=TopologyConfig(name="one_peer_exponential"))}[case]
    batch = kw.pop("batch_size", 6)
    cfg = TrainConfig(nodes=12, rounds=8, batch_size=batch, dtype="float64", device="cpu", progress=False, **kw)
    s = build_setup(cfg)
    st = advance(s.dyn, s.init, 3)
    q = torch.linspace(0.5, 1.5, 12, dtype=F64)
    probe = (s.x_probe, s.y_probe, s.shared_probe, q)
    for units in (select_units(s.plan[3], "batch", "all", "all", 0, 3),
                  select_units(s.plan[3], "sample", [1, 2, 7], 2, 0, 3)):
        full = ground_truth(s.dyn, st, units, 3, *probe, restrict=False)
        part = ground_truth(s.dyn, st, units, 3, *probe, restrict=True, chunk=5)
        assert part.attrs["noise_floor"] == full.attrs["noise_floor"] == 0.0
        assert np.abs(part.influence.to_numpy() - full.influence.to_numpy()).max() < 1e-12
        assert ((part.influence == 0) == (full.influence == 0)).all()
        assert np.abs(full.influence).max() > 1e-6
        one_pass = ground_truth(s.dyn, st, units, 3, *probe, restrict=True, chunk=1000)
        pd.testing.assert_frame_equal(part, one_pass, check_exact=True)
        if case != "time_varying":       # a 12-ring is half reached after 3 hops
            assert ground_truth(s.dyn, st, units, 3, *probe).attrs["restricted"] is (case != "time_varying")
