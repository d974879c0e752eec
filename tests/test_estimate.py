"""DICE-E (influence/estimate.py) against oracles written here: finite differences of the re-simulated
loss in the unit's weight, the spec's one-hop closed form, a brute-force path enumeration, and the
re-simulated removal (GT) as the learning rate shrinks. Tiny float64 problems on CPU."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from dice_cli.config import ModelConfig, OptimConfig, TopologyConfig
from dice_cli.engine import Dynamics, Mixing, State
from dice_cli.graph import build_schedule
from dice_cli.influence.estimate import COLUMNS, exact, first_order, first_order_paths, unit_deltas
from dice_cli.models import init_nodes

CPU = torch.device("cpu")
DT = torch.float64


@dataclass
class FakeUnits:
    """Same fields as influence.units.Units (built here so these tests do not depend on that module)."""
    round: int
    kind: str
    source: np.ndarray
    sample: np.ndarray
    mask: torch.Tensor


def batch_units(dyn, t, sources=None):
    sources = list(range(dyn.n)) if sources is None else list(sources)
    mask = torch.zeros(len(sources), dyn.n, dyn.batch_size, dtype=torch.bool)
    for u, j in enumerate(sources):
        mask[u, j] = True
    return FakeUnits(t, "batch", np.array(sources), np.full(len(sources), -1), mask)


def sample_units(dyn, t, sources=None):
    sources = list(range(dyn.n)) if sources is None else list(sources)
    pos = [(j, p) for j in sources for p in range(dyn.batch_size)]
    mask = torch.zeros(len(pos), dyn.n, dyn.batch_size, dtype=torch.bool)
    for u, (j, p) in enumerate(pos):
        mask[u, j, p] = True
    sample = np.array([int(dyn.plan[t, j, p]) for j, p in pos])
    return FakeUnits(t, "sample", np.array([j for j, _ in pos]), sample, mask)


class StubSchedule:
    """Time-varying, directed, row-stochastic W^t with self-loops and some zeros (for the path oracle)."""
    time_varying = True

    def __init__(self, n, seed=0):
        rng = np.random.default_rng(seed)
        self.mats = []
        for _ in range(64):
            a = rng.random((n, n)) * (rng.random((n, n)) < 0.5)
            np.fill_diagonal(a, rng.random(n) + 0.1)
            self.mats.append(a / a.sum(1, keepdims=True))

    def at(self, t):
        return self.mats[t].copy()


def make(optim=OptimConfig(), lr=0.1, n=5, rounds=10, batch=4, model=ModelConfig(name="mlp", hidden=[6]),
         schedule=None, start=2, shared_probe=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(80, 1, 4, 4, generator=g, dtype=DT)
    y = torch.randint(0, 4, (80,), generator=g)
    plan = torch.randint(0, 80, (rounds, n, batch), generator=g)
    sched = schedule or build_schedule(TopologyConfig(name="exponential"), n, seed=0)
    fm, theta, bufs = init_nodes(model, (1, 4, 4), 4, n, 0, DT, CPU)
    dyn = Dynamics(fm, x, y, plan, Mixing(sched, CPU, DT), optim, lr, rounds)
    state = State(0, theta, bufs, None)
    for _ in range(start):                 # a state with history (momentum buffer set)
        state, _, _ = dyn.round(state)
    if shared_probe:
        xp, yp = torch.randn(7, 1, 4, 4, generator=g, dtype=DT), torch.randint(0, 4, (7,), generator=g)
    else:
        xp, yp = torch.randn(n, 3, 1, 4, 4, generator=g, dtype=DT), torch.randint(0, 4, (n, 3), generator=g)
    q = torch.linspace(0.5, 1.5, n, dtype=DT)
    return dyn, state, (xp, yp, shared_probe, q)


# ---------------------------------------------------------------------------- test-only oracles

def resimulate(dyn, state, mask_u, scale, hops, probe):
    """Probe losses with the unit's weights set to ``scale`` at round t: L(θ^{t+½}) [n], L(θ^{t+s}) [hops, n]."""
    xp, yp, shared, _ = probe
    w = torch.ones(dyn.n, dyn.batch_size, dtype=DT).masked_fill(mask_u, scale)
    st, delta, _ = dyn.round(state, w)
    half = dyn.probe_losses(state.theta + delta, state.buffers, xp, yp, shared)[0]
    out = []
    for s in range(1, hops + 1):
        out.append(dyn.probe_losses(st.theta, st.buffers, xp, yp, shared)[0])
        if s < hops:
            st, _, _ = dyn.round(st)
    return half.detach(), (torch.stack(out).detach() if out else torch.zeros(0, dyn.n, dtype=DT))


def rows(units, half_fn, hop_fn, hops, n):
    """Expected influence column in the table's row order from per-unit [n] / [hops, n] arrays."""
    vals = []
    for u, j in enumerate(units.source):
        vals.append(float(half_fn(u)[j]))
        if hops:
            vals.extend(hop_fn(u).reshape(-1).tolist())
    return np.array(vals)


def finite_difference(dyn, state, units, hops, probe, eps=1e-5):
    q = probe[3]
    cache = {}

    def fd(u):
        if u not in cache:
            hp, lp = resimulate(dyn, state, units.mask[u], 1 + eps, hops, probe)
            hm, lm = resimulate(dyn, state, units.mask[u], 1 - eps, hops, probe)
            cache[u] = (q * (hp - hm) / (2 * eps), q * (lp - lm) / (2 * eps))
        return cache[u]
    return rows(units, lambda u: fd(u)[0], lambda u: fd(u)[1], hops, dyn.n)


def removal_gt(dyn, state, units, hops, probe):
    q = probe[3]
    h1, l1 = resimulate(dyn, state, torch.zeros_like(units.mask[0]), 1.0, hops, probe)
    cache = {}

    def gt(u):
        if u not in cache:
            h0, l0 = resimulate(dyn, state, units.mask[u], 0.0, hops, probe)
            cache[u] = (q * (h1 - h0), q * (l1 - l0))
        return cache[u]
    return rows(units, lambda u: gt(u)[0], lambda u: gt(u)[1], hops, dyn.n)


def probe_grad(dyn, st, probe):
    xp, yp, shared, _ = probe
    th = st.theta.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(dyn.probe_losses(th, st.buffers, xp, yp, shared)[0].sum(), th)
    return g


def trajectory(dyn, state, hops):
    out = [state]
    for _ in range(hops):
        out.append(dyn.round(out[-1])[0])
    return out


def hand_delta(dyn, state, mask_u):
    """δ_u = Δ_j − Δ_{j∖u} by definition (two local steps)."""
    d1 = dyn.local_step(state)[0]
    w = torch.ones(dyn.n, dyn.batch_size, dtype=DT).masked_fill(mask_u, 0.0)
    d0 = dyn.local_step(state, w)[0]
    return (d1 - d0).detach()


# ---------------------------------------------------------------------------- tests

def test_table_layout_matches_gt_rows():
    dyn, state, probe = make(n=4)
    units = sample_units(dyn, state.round, sources=[1, 3])
    for f in (first_order, exact):
        df = f(dyn, state, units, 2, *probe)
        assert list(df.columns) == COLUMNS
        assert len(df) == len(units.source) * (1 + 2 * dyn.n)
        first = df.iloc[: 1 + 2 * dyn.n]
        assert first.hop.tolist() == [0] + [1] * 4 + [2] * 4
        assert first.target.tolist() == [1] + [0, 1, 2, 3] * 2
        assert (df.source.values[:9] == 1).all() and (df["round"] == state.round).all()
        assert set(df.unit) == {"sample"} and set(df.method) == {f.__name__}
        assert df["sample"].iloc[0] == int(dyn.plan[state.round, 1, 0])


@pytest.mark.parametrize("optim", [OptimConfig(), OptimConfig(momentum=0.9, weight_decay=1e-2)],
                         ids=["sgd", "momentum_wd"])
@pytest.mark.parametrize("kind", ["batch", "sample"])
def test_exact_equals_finite_differences(optim, kind):
    dyn, state, probe = make(optim=optim)
    units = (batch_units if kind == "batch" else sample_units)(dyn, state.round)
    if kind == "sample":   # keep the oracle cheap: a few samples of three sources
        keep = [0, 5, 10, 11, 19]
        units = FakeUnits(units.round, kind, units.source[keep], units.sample[keep], units.mask[keep])
    for hops in (1, 2, 3):
        est = exact(dyn, state, units, hops, *probe).influence.to_numpy()
        fd = finite_difference(dyn, state, units, hops, probe)
        scale = np.abs(fd).max()
        np.testing.assert_allclose(est, fd, rtol=1e-6, atol=1e-9 * scale)
        big = np.abs(fd) > 1e-6 * scale
        assert np.max(np.abs(est - fd)[big] / np.abs(fd)[big]) < 1e-6


def test_exact_per_node_probe_and_unreachable_zero():
    # ring n=6, one hop: only j-1, j, j+1 are reached; the rest must be exactly 0
    dyn, state, probe = make(n=6, shared_probe=False,
                             schedule=build_schedule(TopologyConfig(name="ring"), 6, seed=0))
    units = batch_units(dyn, state.round, sources=[2])
    df = exact(dyn, state, units, 1, *probe)
    fd = finite_difference(dyn, state, units, 1, probe)
    np.testing.assert_allclose(df.influence.to_numpy(), fd, rtol=1e-6, atol=1e-12)
    h1 = df[df.hop == 1].set_index("target").influence
    assert (h1[[0, 4, 5]] == 0).all() and (h1[[1, 2, 3]] != 0).all()


def test_first_order_one_hop_is_closed_form():
    dyn, state, probe = make(optim=OptimConfig(momentum=0.9, weight_decay=1e-2))
    q = probe[3]
    units = batch_units(dyn, state.round)
    df = first_order(dyn, state, units, 1, *probe)
    W = torch.as_tensor(dyn.mixing.numpy(state.round))
    g0 = probe_grad(dyn, state, probe)
    g1 = probe_grad(dyn, dyn.round(state)[0], probe)
    for u, j in enumerate(units.source):
        d = hand_delta(dyn, state, units.mask[u])[j]
        want = [float(q[j] * g0[j] @ d)] + [float(q[k] * W[k, j] * g1[k] @ d) for k in range(dyn.n)]
        got = df.influence.to_numpy()[u * (1 + dyn.n):(u + 1) * (1 + dyn.n)]
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-15)


def test_first_order_one_hop_equals_exact_one_hop():
    """At hop 1 the derivative of θ^{t+1} in w is W^t[:, j] δ_u: no curvature yet, so the methods agree."""
    dyn, state, probe = make(optim=OptimConfig(momentum=0.9))
    units = sample_units(dyn, state.round)
    fo = first_order(dyn, state, units, 1, *probe)
    ex = exact(dyn, state, units, 1, *probe)
    h = (fo.hop == 1).to_numpy()
    np.testing.assert_allclose(fo.influence[h], ex.influence[h], rtol=1e-9, atol=1e-16)


@pytest.mark.parametrize("topology", ["exponential", "stub_time_varying"])
def test_first_order_dp_equals_path_enumeration(topology):
    n, hops = 5, 3
    sched = StubSchedule(n) if topology != "exponential" else build_schedule(
        TopologyConfig(name="exponential"), n, seed=0)
    dyn, state, probe = make(n=n, schedule=sched)
    q = probe[3]
    units = batch_units(dyn, state.round)
    df = first_order(dyn, state, units, hops, *probe)
    t = state.round
    traj = trajectory(dyn, state, hops)
    grads = [probe_grad(dyn, st, probe) for st in traj]
    Ws = [dyn.mixing.numpy(t + m) for m in range(hops)]
    for u, j in enumerate(units.source):
        d = hand_delta(dyn, state, units.mask[u])[j]
        want = [float(q[j] * grads[0][j] @ d)]
        for s in range(1, hops + 1):
            for k in range(n):
                total = 0.0
                for mid in itertools.product(range(n), repeat=s - 1):
                    path = (j,) + mid + (k,)
                    prod = 1.0
                    for m in range(s):
                        prod *= Ws[m][path[m + 1], path[m]]
                    if prod > 0:
                        total += prod * float(q[k] * grads[s][k] @ d)
                want.append(total)
        got = df.influence.to_numpy()[u * (1 + hops * n):(u + 1) * (1 + hops * n)]
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-15)
        # the per-path breakdown sums to the same table
        paths = first_order_paths(dyn, state, int(j), d, hops, *probe)
        sums = paths.groupby(["hop", "target"]).value.sum()
        assert sums[(0, j)] == pytest.approx(got[0], rel=1e-10)
        for s in range(1, hops + 1):
            for k in range(n):
                assert sums.get((s, k), 0.0) == pytest.approx(got[1 + (s - 1) * n + k], rel=1e-10, abs=1e-15)


def test_unit_deltas_match_definition():
    dyn, state, _ = make(optim=OptimConfig(momentum=0.9, weight_decay=1e-2))
    units = sample_units(dyn, state.round, sources=[0, 3])
    d = unit_deltas(dyn, state, units.mask)
    for u, j in enumerate(units.source):
        np.testing.assert_allclose(d[u], hand_delta(dyn, state, units.mask[u])[j], rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("optim", [OptimConfig(), OptimConfig(momentum=0.9)], ids=["sgd", "momentum"])
def test_sample_units_sum_to_batch_unit(optim):
    dyn, state, probe = make(optim=optim)
    hops = 3
    b = first_order(dyn, state, batch_units(dyn, state.round), hops, *probe)
    s = first_order(dyn, state, sample_units(dyn, state.round), hops, *probe)
    R = 1 + hops * dyn.n
    summed = s.influence.to_numpy().reshape(dyn.n, dyn.batch_size, R).sum(1).reshape(-1)
    np.testing.assert_allclose(summed, b.influence.to_numpy(), rtol=0, atol=1e-12)
    assert np.abs(b.influence).max() > 1e-4


def test_relative_error_shrinks_linearly_with_lr():
    hops = 3
    err = {"first_order": [], "exact": []}
    deep = {"first_order": [], "exact": []}
    for lr in (1e-2, 1e-3, 1e-4):
        dyn, state, probe = make(lr=lr, start=0)
        units = batch_units(dyn, 0)
        gt = removal_gt(dyn, state, units, hops, probe)
        hop = np.tile(np.concatenate([[0], np.repeat(np.arange(1, hops + 1), dyn.n)]), dyn.n)
        for f in (first_order, exact):
            e = f(dyn, state, units, hops, *probe).influence.to_numpy()
            err[f.__name__].append(np.linalg.norm(e - gt) / np.linalg.norm(gt))
            d = hop >= 2
            deep[f.__name__].append(np.linalg.norm(e[d] - gt[d]) / np.linalg.norm(gt[d]))
    for name, e in err.items():
        ratios = [e[0] / e[1], e[1] / e[2]]
        assert all(3 < r < 30 for r in ratios), (name, e, ratios)
    for a, b in zip(deep["exact"], deep["first_order"]):
        assert a < b, (deep)


def test_unbatched_fallback_and_zero_hops(monkeypatch):
    """When vmap cannot run a backward (is_grads_batched fails), a loop gives the same numbers."""
    dyn, state, probe = make(optim=OptimConfig(momentum=0.9))
    units = sample_units(dyn, state.round, sources=[0, 2])
    want = {f: f(dyn, state, units, 2, *probe) for f in (first_order, exact)}
    grad = torch.autograd.grad

    def no_batching(*args, **kw):
        if kw.get("is_grads_batched"):
            raise RuntimeError("batching rule not implemented (simulated)")
        return grad(*args, **kw)
    monkeypatch.setattr(torch.autograd, "grad", no_batching)
    for f, df in want.items():
        np.testing.assert_allclose(f(dyn, state, units, 2, *probe, chunk=3).influence, df.influence,
                                   rtol=1e-12, atol=1e-17)
    monkeypatch.undo()
    for f in (first_order, exact):
        d0 = f(dyn, state, units, 0, *probe)
        assert (d0.hop == 0).all() and (d0.target.to_numpy() == units.source).all()
        np.testing.assert_allclose(d0.influence, want[f][want[f].hop == 0].influence, rtol=1e-12)


def test_mismatched_round_is_refused():
    dyn, state, probe = make()
    with pytest.raises(ValueError, match="round"):
        first_order(dyn, state, batch_units(dyn, state.round + 1), 1, *probe)
    with pytest.raises(ValueError, match="hops"):
        exact(dyn, state, batch_units(dyn, state.round), dyn.rounds, *probe)


@pytest.mark.parametrize("case", ["exponential", "ring_momentum_wd", "ring_per_node_probe", "stub_time_varying",
                                  "update_attack", "cnn_bn"])
def test_exact_shortcuts_equal_the_unrolled_twin(case):
    """exact's hops 0-1 through the first-order machinery and hops >= 2 through per-target backward cones
    against the whole-system unroll (path='unrolled', every hop): same numbers to round-off, same zeros."""
    if case == "update_attack":
        from dice_cli.config import AttackConfig, TrainConfig
        from dice_cli.simulation import build_setup

        cfg = TrainConfig(nodes=8, rounds=8, batch_size=4, dtype="float64", device="cpu", progress=False,
                          attack=AttackConfig(name="gaussian", nodes=[1, 4]), optim=OptimConfig(momentum=0.5))
        s = build_setup(cfg)
        dyn, state = s.dyn, s.dyn.round(s.dyn.round(s.init)[0])[0]
        probe = (s.x_probe, s.y_probe, s.shared_probe, torch.linspace(0.5, 1.5, 8, dtype=DT))
    else:
        ring = build_schedule(TopologyConfig(name="ring"), 9, seed=0)
        kw = {"exponential": {}, "ring_momentum_wd": dict(n=9, schedule=ring, optim=OptimConfig(momentum=0.9,
                                                                                             weight_decay=1e-2)),
              "ring_per_node_probe": dict(n=9, schedule=ring, shared_probe=False),
              "stub_time_varying": dict(schedule=StubSchedule(5)),
              "cnn_bn": dict(model=ModelConfig(name="cnn", channels=[2], batchnorm=True))}[case]
        dyn, state, probe = make(**kw)
    for units in (batch_units(dyn, state.round), sample_units(dyn, state.round, sources=[0, 3])):
        for hops in (1, 3):
            twin = exact(dyn, state, units, hops, *probe, path="unrolled").influence.to_numpy()
            scale = np.abs(twin).max()
            for path in ("auto", "cones"):
                got = exact(dyn, state, units, hops, *probe, path=path).influence.to_numpy()
                assert np.abs(got - twin).max() <= 1e-12 * scale, (path, hops)
                assert ((got == 0) == (twin == 0)).all()


def test_alignment_correlations_equal_scipy():
    """alignment's numpy Pearson / Spearman (average ranks for ties) against scipy.stats."""
    from scipy import stats

    from dice_cli.influence.alignment import average_ranks, pearson

    rng = np.random.default_rng(0)
    for n in (3, 10, 200):
        for ties in (False, True):
            x = rng.standard_normal(n)
            y = 0.3 * x + rng.standard_normal(n)
            if ties:
                x, y = np.round(x, 1), np.round(y, 0)
            np.testing.assert_array_equal(average_ranks(x), stats.rankdata(x))
            assert abs(pearson(x, y) - stats.pearsonr(x, y)[0]) < 1e-14
            assert abs(pearson(average_ranks(x), average_ranks(y)) - stats.spearmanr(x, y)[0]) < 1e-14
