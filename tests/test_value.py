"""dice value's mathematics on tiny float64 problems: exact = finite differences of GT_run, the identities
between units and with ``dice estimate``, first_order's closed form, cascade_sum = summed estimate tables,
vectorised GT = one unit at a time, the null unit, LDS, unit selection and the state tape."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import partitioned_problem
from dice_cli.attacks import Attack
from dice_cli.config import ModelConfig, OptimConfig, TopologyConfig
from dice_cli.engine import Dynamics, Mixing, State
from dice_cli.errors import UserError
from dice_cli.graph import build_schedule
from dice_cli.influence import estimate
from dice_cli.influence.lds import draw_subsets, lds_score, spearman_columns
from dice_cli.influence.retrain import gt_values
from dice_cli.influence.run_units import select_run_units
from dice_cli.influence.sweep import exact_values
from dice_cli.influence.value import cascade_values, first_order_values
from dice_cli.models import init_nodes
from dice_cli.replay import StateTape, rollout

CPU, DT = torch.device("cpu"), torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny problems: one intra-op thread (on a shared 2-core machine extra threads only spin-wait)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
MLP = ModelConfig(name="mlp", hidden=[6])
CNN_BN = ModelConfig(name="cnn", channels=[2], batchnorm=True)
MOM_WD = OptimConfig(momentum=0.9, weight_decay=1e-2)


class World:
    """A tiny partitioned problem: node k owns samples 12k … 12k+11, batches of 4 drawn from them."""

    def __init__(self, model=MLP, optim=MOM_WD, topology="random_matching", n=4, T=8, lr=0.1, attack=None):
        x, y, self.parts, plan, g = partitioned_problem(n, 12, 4, 3, (1, 4, 4), T, DT)
        self.fm, theta, bufs = init_nodes(model, (1, 4, 4), 3, n, 0, DT, CPU)
        att = None
        if attack:
            att = Attack(attack, [1], (0, T), n, 3, 0)
        self.dyn = Dynamics(self.fm, x, y, plan, Mixing(build_schedule(TopologyConfig(name=topology), n, 0), CPU, DT),
                            optim, lr, T, attack=att)
        self.s0 = State(0, theta, bufs, None)
        self.probe = (torch.randn(9, 1, 4, 4, generator=g, dtype=DT), torch.randint(0, 3, (9,), generator=g), True)
        self.q = torch.linspace(0.5, 1.5, n, dtype=DT)
        self.plan = plan.numpy()

    def state(self, t):
        return rollout(self.dyn, self.s0, t)

    def units(self, kind, window, **kw):
        return select_run_units(self.plan, self.parts, kind, window, **kw)


def rel_close(got, want, rtol, floor=1e-9):
    """|got − want| <= rtol |want| + floor · max|want| elementwise, and relative error < rtol where |want| is
    not tiny."""
    got, want = np.asarray(got), np.asarray(want)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=rtol, atol=floor * scale)
    big = np.abs(want) > 1e-4 * scale
    assert np.max(np.abs(got - want)[big] / np.abs(want)[big]) < rtol


# ---------------------------------------------------------------------------------------------- exact
@pytest.mark.parametrize("kind", ["node", "batch", "sample"])
@pytest.mark.parametrize("setting", ["mlp_momentum_wd_time_varying", "cnn_bn_momentum_exponential"])
def test_exact_equals_finite_differences_of_gt_run(kind, setting):
    w = World() if setting.startswith("mlp") else World(model=CNN_BN, optim=OptimConfig(momentum=0.5),
                                                         topology="exponential")
    a, b, e = (2, 6, 8) if setting.startswith("mlp") else (2, 4, 6)
    units = w.units(kind, (a, b), samples=2 if kind == "sample" else "all")
    start = w.state(a)
    ex = exact_values(w.dyn, StateTape(w.dyn, start, e), units, w.probe, w.q, "all", chunk=3).T.numpy()
    c = 1e-5
    fd = (gt_values(w.dyn, start, e, units, w.probe, w.q, scale=c)["influence"]
          - gt_values(w.dyn, start, e, units, w.probe, w.q, scale=-c)["influence"]).numpy() / (2 * c)
    assert ex.shape == (len(units), w.dyn.n) and np.abs(fd).max() > 1e-4
    rel_close(ex, fd, 1e-6)
    if kind == "node":        # the network target: one cotangent, the q-weighted sum of the columns
        net = exact_values(w.dyn, StateTape(w.dyn, start, e), units, w.probe, w.q, "network")
        np.testing.assert_allclose(net[0].numpy(), ex.sum(1), rtol=1e-12, atol=1e-16)


def test_exact_of_a_node_is_the_sum_of_its_samples():
    w = World()
    a, e = 1, 8
    tape = StateTape(w.dyn, w.state(a), e)
    node = exact_values(w.dyn, tape, w.units("node", (a, 7)), w.probe, w.q).numpy()       # [n, U=n]
    su = w.units("sample", (a, 7))
    samples = exact_values(w.dyn, tape, su, w.probe, w.q).numpy()
    summed = np.stack([samples[:, su.source == j].sum(1) for j in range(w.dyn.n)], axis=1)
    assert np.abs(summed - node).max() <= 1e-10 * np.abs(node).max()
    # every sample drawn in the window is a unit, once; samples outside the window are not
    assert sorted(su.sample.tolist()) == sorted(np.unique(w.plan[a:7]).tolist())


@pytest.mark.parametrize("s", [1, 2, 3])
def test_batch_units_equal_estimate_exact_at_hop_s(s):
    w = World(optim=OptimConfig(momentum=0.9))
    t = 3
    state = w.state(t)
    units = w.units("batch", (t, t + 1))
    ex = exact_values(w.dyn, StateTape(w.dyn, state, t + s), units, w.probe, w.q).T.numpy()     # [n sources, n]
    mask = torch.zeros(w.dyn.n, w.dyn.n, w.dyn.batch_size, dtype=torch.bool)
    for j in range(w.dyn.n):
        mask[j, j] = True
    est = estimate.exact(w.dyn, state, _Units(t, "batch", np.arange(w.dyn.n), np.full(w.dyn.n, -1), mask), s,
                         *w.probe, w.q)
    hop = est[est.hop == s].influence.to_numpy().reshape(w.dyn.n, w.dyn.n)
    assert np.abs(ex - hop).max() <= 1e-10 * np.abs(hop).max()


class _Units:
    def __init__(self, t, kind, source, sample, mask):
        self.round, self.kind, self.source, self.sample, self.mask = t, kind, source, sample, mask


def _round_units(w, t, kind, runits):
    """The per-round units of ``dice estimate`` matching whole-run units at round t (batch units per
    source for node units; one per position of a selected sample for sample units)."""
    n, B = w.dyn.n, w.dyn.batch_size
    if kind == "node":
        mask = torch.zeros(n, n, B, dtype=torch.bool)
        for j in range(n):
            mask[j, j] = True
        return _Units(t, "batch", np.arange(n), np.full(n, -1), mask), np.arange(n)
    pos = [(j, p) for j in range(n) for p in range(B) if w.plan[t, j, p] in set(runits.sample[runits.source == j])]
    mask = torch.zeros(len(pos), n, B, dtype=torch.bool)
    for u, (j, p) in enumerate(pos):
        mask[u, j, p] = True
    uid = np.array([int(np.flatnonzero(runits.sample == w.plan[t, j, p])[0]) for j, p in pos], dtype=np.int64)
    return _Units(t, "sample", np.array([j for j, _ in pos]), w.plan[t][tuple(np.array(pos).T)] if pos else
                  np.zeros(0, np.int64), mask), uid


# ---------------------------------------------------------------------------------------------- first order
@pytest.mark.parametrize("attack", [None, "gaussian"])
@pytest.mark.parametrize("kind", ["node", "sample"])
def test_first_order_equals_its_closed_form_computed_naively(kind, attack):
    """E(u, k) = q_k ∇L_k(θ_k^{T_e})ᵀ Σ_t (W^{T_e−1}⋯W^t)_{kj} δ_{u,t}, δ by two local steps per unit and round."""
    w = World(attack=attack)
    a, b, e = 1, 6, 8
    units = w.units(kind, (a, b), samples=2 if kind == "sample" else "all")
    got = first_order_values(w.dyn, StateTape(w.dyn, w.state(a), e), units, w.probe, w.q, chunk=3).T.numpy()
    final = w.state(e)
    G = w.dyn.probe_grads(final, *w.probe).numpy()
    want = np.zeros((len(units), w.dyn.n))
    for t in range(a, b):
        A = np.eye(w.dyn.n)
        for r in range(t, e):
            A = w.dyn.mixing.numpy(r) @ A                       # A = W^{e−1} ⋯ W^t
        st = w.state(t)
        full = w.dyn.local_step(st)[0]
        for u in range(len(units)):
            j = units.source[u]
            wt = torch.ones(w.dyn.n, w.dyn.batch_size, dtype=DT)
            wt[j] = 0.0 if kind == "node" else torch.where(torch.as_tensor(w.plan[t, j] == units.sample[u]), 0.0, 1.0)
            delta = (full - w.dyn.local_step(st, wt)[0])[j].numpy()
            want[u] += w.q.numpy() * A[:, j] * (G @ delta)
    assert np.abs(want).max() > 1e-5
    assert np.abs(got - want).max() <= 1e-10 * np.abs(want).max()


@pytest.mark.parametrize("kind", ["node", "sample"])
def test_cascade_sum_is_the_sum_of_estimate_tables(kind):
    """cascade_sum = Σ over window rounds t of the hop 1 … min(r, T_e − t) rows of
    ``estimate.first_order(hops=min(r, T_e − t))`` per (source[, sample], target)."""
    w = World(optim=OptimConfig(momentum=0.9, weight_decay=1e-3))
    a, b, e, r = 2, 7, 8, 3
    units = w.units(kind, (a, b), samples=3 if kind == "sample" else "all")
    got = cascade_values(w.dyn, StateTape(w.dyn, w.state(a), e), units, w.probe, w.q, hops=r).T.numpy()
    want = np.zeros_like(got)
    for t in range(a, b):
        ru, uid = _round_units(w, t, kind, units)
        if not len(ru.source):
            continue
        hops = min(r, e - t)
        df = estimate.first_order(w.dyn, w.state(t), ru, hops, *w.probe, w.q)
        per = 1 + hops * w.dyn.n
        vals = df.influence.to_numpy().reshape(len(ru.source), per)[:, 1:]                 # hop >= 1 rows
        for i, u in enumerate(uid):
            want[u] += vals[i].reshape(hops, w.dyn.n).sum(0)
    assert np.abs(want).max() > 1e-5
    assert np.abs(got - want).max() <= 1e-10 * np.abs(want).max()


def test_cascade_sum_with_one_hop_is_accumulated_proximal_influence():
    w = World(optim=OptimConfig())
    a, b = 0, 5
    units = w.units("node", (a, b))
    got = cascade_values(w.dyn, StateTape(w.dyn, w.s0, b), units, w.probe, w.q, hops=1).T.numpy()
    want = np.zeros_like(got)
    for t in range(a, b):
        st = w.state(t)
        delta = w.dyn.local_step(st)[0].numpy()                          # Δ_l^t (batch units: δ = Δ)
        g1 = w.dyn.probe_grads(w.state(t + 1), *w.probe).numpy()
        W = w.dyn.mixing.numpy(t)
        want += (w.q.numpy()[None, :] * W.T) * (delta @ g1.T)           # P_t(l→k) = q_k W_kl ∇L_kᵀ Δ_l
    assert np.abs(got - want).max() <= 1e-10 * np.abs(want).max()


# ---------------------------------------------------------------------------------------------- gt
@pytest.mark.parametrize("kind", ["node", "batch", "sample", "participant"])
def test_vectorised_gt_equals_one_unit_at_a_time(kind):
    w = World()
    a, b, e = 2, 6, 8
    units = w.units(kind, (a, b), samples=2 if kind == "sample" else "all")
    start = w.state(a)
    res = gt_values(w.dyn, start, e, units, w.probe, w.q, chunk=3)
    assert res["noise_floor"] == 0.0
    factual = w.dyn.probe_losses(rollout(w.dyn, start, e).theta, {}, *w.probe)[0]
    xp, yp, shared = w.probe
    for u in range(len(units)):
        member = torch.zeros(1, len(units), dtype=DT)
        member[0, u] = 1.0
        if kind == "participant":
            st = rollout(w.dyn, start, e, online=lambda t: None if units.online_at(t, member) is None
                         else units.online_at(t, member)[0])
        else:
            st = rollout(w.dyn, start, e, lambda t: None if units.weights_at(t, member) is None
                         else units.weights_at(t, member)[0])
        alone = w.q * (factual - w.dyn.probe_losses(st.theta, {}, xp, yp, shared)[0])
        assert (res["influence"][u] - alone).abs().max() <= 1e-12 * alone.abs().max()
    assert res["influence"].abs().max() > 1e-4


@pytest.mark.parametrize("model", [MLP, CNN_BN], ids=["mlp", "cnn_bn"])
@pytest.mark.parametrize("kind", ["node", "sample", "participant"])
def test_null_unit_is_exactly_zero(model, kind):
    w = World(model=model, T=6)
    units = w.units(kind, (1, 4) if model is MLP else (1, 3), samples=1 if kind == "sample" else "all")
    res = gt_values(w.dyn, w.state(1), 5, units, w.probe, w.q, chunk=2)
    assert res["noise_floor"] == 0.0 and res["roundoff"] > 0
    # a unit that removes nothing (a sample never drawn in the window) is exactly 0 too
    if kind == "sample":
        never = sorted(set(w.parts[0].tolist()) - set(np.unique(w.plan[1:3, 0]).tolist()))
        u0 = w.units("sample", (1, 3), sources=[0], samples=[never[0]])
        assert (gt_values(w.dyn, w.state(1), 5, u0, w.probe, w.q)["influence"] == 0).all()


def test_gt_network_target_and_scale():
    w = World()
    units = w.units("node", (0, 4))
    full = gt_values(w.dyn, w.s0, 6, units, w.probe, w.q)
    net = gt_values(w.dyn, w.s0, 6, units, w.probe, w.q, targets="network")
    np.testing.assert_allclose(net["influence"][:, 0], full["influence"].sum(1), rtol=1e-12)
    np.testing.assert_allclose(net["loss_with"][:, 0], (w.q * full["loss_with"]).sum(1), rtol=1e-14)
    half = gt_values(w.dyn, w.s0, 6, units, w.probe, w.q, scale=0.5)["influence"]
    assert ((half.abs() > 0) & (half.abs() < full["influence"].abs())).all()   # removing half of the weight


# ---------------------------------------------------------------------------------------------- LDS
def test_lds_of_gt_on_singleton_subsets_is_exactly_one():
    w = World()
    units = w.units("node", (0, 6))
    start = w.s0
    V = gt_values(w.dyn, start, 8, units, w.probe, w.q)["influence"].numpy()          # [U, n]
    subsets = np.eye(len(units), dtype=bool)[[0, 1, 2, 3, 1, 2]]                        # one unit each
    actual = gt_values(w.dyn, start, 8, units, w.probe, w.q,
                       member=torch.as_tensor(subsets, dtype=DT))["influence"].numpy()
    rep = lds_score(subsets @ V, actual)
    assert rep["lds"] == 1.0 and all(v == 1.0 for v in rep["per_target"]) and rep["ci"] == [1.0, 1.0]


def test_lds_score_and_subsets():
    g = np.random.default_rng(0)
    x, y = g.normal(size=(40, 5)), g.normal(size=(40, 5))
    y[:, 0] = x[:, 0] * 3 + 1                                  # perfect rank agreement
    y[:, 4] = 2.0                                             # constant: no correlation defined
    r = spearman_columns(x, y)
    for d in range(4):
        assert r[d] == pytest.approx(stats.spearmanr(x[:, d], y[:, d])[0], abs=1e-12)
    assert np.isnan(r[4])
    rep = lds_score(x, y, boot=200)
    assert rep["targets_scored"] == 4 and rep["targets_constant"] == 1
    assert rep["lds"] == pytest.approx(np.mean(r[:4]))
    assert rep["ci"][0] <= rep["lds"] <= rep["ci"][1]
    s1, s2 = draw_subsets(30, 50, 0.1, 3), draw_subsets(30, 50, 0.1, 3)
    assert s1.shape == (50, 30) and np.array_equal(s1, s2) and 0.05 < s1.mean() < 0.15


# ---------------------------------------------------------------------------------------------- units, tape
def test_select_run_units():
    w = World(n=3, T=6)
    node = w.units("node", (1, 4), sources=[2, 0])
    assert list(node.source) == [2, 0] and (node.round == -1).all() and (node.sample == -1).all()
    idx = node.index_at(2)
    assert (idx[2] == 0).all() and (idx[0] == 1).all() and (idx[1] == -1).all()
    assert (node.index_at(4) == -1).all() and (node.index_at(0) == -1).all()
    batch = w.units("batch", (1, 3))
    assert list(batch.round) == [1, 1, 1, 2, 2, 2] and list(batch.source) == [0, 1, 2] * 2
    assert (batch.index_at(2)[1] == 4).all() and (batch.index_at(1)[1] == 1).all()
    smp = w.units("sample", (0, 6), sources=[1], samples=3, seed=5)
    assert len(smp) == 3 and np.array_equal(smp.sample, w.units("sample", (0, 6), sources=[1], samples=3, seed=5).sample)
    assert all(s in w.parts[1] for s in smp.sample) and list(smp.sample) == sorted(smp.sample)
    for t in range(6):
        idx = smp.index_at(t)
        hits = np.argwhere(idx >= 0)
        assert all(r == 1 and w.plan[t, r, p] == smp.sample[idx[r, p]] for r, p in hits)
    lst = w.units("sample", (0, 6), samples=[int(w.parts[2][0]), int(w.parts[0][3])])
    assert list(lst.source) == [0, 2]
    part = w.units("participant", (0, 6))
    assert (part.index_at(1) == -1).all()
    a = part.online_at(1, torch.tensor([[0.0, 1.0, 0.0]], dtype=DT))
    assert a.tolist() == [[1.0, 0.0, 1.0]] and part.online_at(6, torch.zeros(1, 3, dtype=DT)) is None
    with pytest.raises(UserError, match="unit='token'"):
        w.units("token", (0, 6))
    with pytest.raises(UserError, match="only applies to unit=sample"):
        w.units("node", (0, 6), samples=2)
    with pytest.raises(UserError, match="dataset index 999 is not held by"):
        w.units("sample", (0, 6), samples=[999])
    with pytest.raises(UserError, match=r"window=3:3.*0 <= a < b <= 6"):
        w.units("node", (3, 3))


def test_state_tape_with_sqrt_checkpointing_is_bit_identical():
    w = World(T=10)
    full = StateTape(w.dyn, w.s0, 10)
    small = StateTape(w.dyn, w.s0, 10, budget_mb=1e-6)
    assert full.stride == 1 and small.stride == 4
    for t in range(9, -1, -1):
        assert torch.equal(full.get(t).theta, small.get(t).theta)
        assert torch.equal(full.get(t).momentum, small.get(t).momentum) if t else small.get(t).momentum is None
    assert small.replayed_rounds > 0 and torch.equal(full.final.theta, small.final.theta)
    units = w.units("sample", (0, 10), samples=2)
    assert torch.equal(exact_values(w.dyn, full, units, w.probe, w.q), exact_values(w.dyn, small, units, w.probe, w.q))
