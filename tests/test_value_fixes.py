"""The two fixes issue 9 asked for first: BatchNorm running statistics inside the differentiated trajectory
(exact = finite differences for BN models, plain paths bit-identical to PyTorch's BatchNorm), and the
spec's δ_u = Δ_sent(w=1) − Δ_sent(w∖u) under every attack (gaussian is nonlinear in w)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dice_cli.attacks import DATA_ATTACKS, UPDATE_ATTACKS, Attack
from dice_cli.config import ModelConfig, OptimConfig, TopologyConfig
from dice_cli.engine import Dynamics, Mixing, State
from dice_cli.graph import build_schedule
from dice_cli.influence.estimate import exact, first_order, unit_deltas
from dice_cli.models import FunctionalModel, TrackedBatchNorm2d, init_nodes
from dice_cli.reference import LoopEngine

CPU, DT = torch.device("cpu"), torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny problems: one intra-op thread (on a shared 2-core machine extra threads only spin-wait)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
CNN_BN = ModelConfig(name="cnn", channels=[3], batchnorm=True)


class Units:
    def __init__(self, t, kind, source, sample, mask):
        self.round, self.kind, self.source, self.sample, self.mask = t, kind, source, sample, mask


def batch_units(dyn, t):
    mask = torch.zeros(dyn.n, dyn.n, dyn.batch_size, dtype=torch.bool)
    for j in range(dyn.n):
        mask[j, j] = True
    return Units(t, "batch", np.arange(dyn.n), np.full(dyn.n, -1), mask)


def sample_units(dyn, t, sources):
    pos = [(j, p) for j in sources for p in range(dyn.batch_size)]
    mask = torch.zeros(len(pos), dyn.n, dyn.batch_size, dtype=torch.bool)
    for u, (j, p) in enumerate(pos):
        mask[u, j, p] = True
    return Units(t, "sample", np.array([j for j, _ in pos]), np.array([int(dyn.plan[t, j, p]) for j, p in pos]),
                 mask)


def make(model=CNN_BN, optim=OptimConfig(), lr=0.1, n=5, rounds=8, batch=4, start=2, attack=None, **atk):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 1, 4, 4, generator=g, dtype=DT)
    y = torch.randint(0, 4, (80,), generator=g)
    plan = torch.stack([torch.stack([k * 16 + torch.randperm(16, generator=g)[:batch] for k in range(n)])
                        for _ in range(rounds)])
    fm, theta, bufs = init_nodes(model, (1, 4, 4), 4, n, 0, DT, CPU)
    mix = Mixing(build_schedule(TopologyConfig(name="exponential"), n, seed=0), CPU, DT)
    att = None
    if attack is not None:
        att = Attack(attack, [1, 3], (0, rounds), n, 4, 0, labels=y.numpy(),
                     parts=[np.arange(k * 16, (k + 1) * 16) for k in range(n)], **atk)
    xp, yp = torch.randn(7, 1, 4, 4, generator=g, dtype=DT), torch.randint(0, 4, (7,), generator=g)
    if att is not None:
        att.set_probe(xp, yp, True)          # orthogonal and inflate use the (public) probe set
    dyn = Dynamics(fm, x, y, plan, mix, optim, lr, rounds, attack=att)
    state = State(0, theta, bufs, None)
    for _ in range(start):
        state, _, _ = dyn.round(state)
    return dyn, state, (xp, yp, True, torch.linspace(0.5, 1.5, n, dtype=DT))


def hops_fd(dyn, state, units, hops, probe, eps=1e-5):
    """Central differences in the unit's weight of q_k L_k(θ_k^{t+s}), s = 1..hops: [U, hops, n]."""
    xp, yp, shared, q = probe

    def losses(u, c):
        w = torch.ones(dyn.n, dyn.batch_size, dtype=DT).masked_fill(units.mask[u], c)
        st, out = dyn.round(state, w)[0], []
        for s in range(hops):
            out.append(dyn.probe_losses(st.theta, st.buffers, xp, yp, shared)[0])
            st = dyn.round(st)[0]
        return torch.stack(out)
    return torch.stack([q * (losses(u, 1 + eps) - losses(u, 1 - eps)) / (2 * eps)
                        for u in range(len(units.source))]).numpy()


# ---------------------------------------------------------------------------------------------- BatchNorm
@pytest.mark.parametrize("optim", [OptimConfig(), OptimConfig(momentum=0.9, weight_decay=1e-2)], ids=["sgd", "mom_wd"])
@pytest.mark.parametrize("lr", [0.01, 0.1])
def test_estimate_exact_is_the_derivative_for_batchnorm(optim, lr):
    """Before the fix the running statistics were constants: 1–120% off at hops 2–3 here."""
    dyn, state, probe = make(optim=optim, lr=lr)
    units, hops = batch_units(dyn, state.round), 3
    df = exact(dyn, state, units, hops, *probe)
    est = df[df.hop > 0].influence.to_numpy().reshape(dyn.n, hops, dyn.n)
    fd = hops_fd(dyn, state, units, hops, probe)
    scale = np.abs(fd).max()
    np.testing.assert_allclose(est, fd, rtol=1e-6, atol=1e-9 * scale)
    big = np.abs(fd) > 1e-4 * scale
    assert np.max(np.abs(est - fd)[big] / np.abs(fd)[big]) < 1e-6


def _plain(fm: FunctionalModel) -> FunctionalModel:
    """The same architecture with PyTorch's own BatchNorm2d (what every model used before the fix)."""
    import copy

    module = copy.deepcopy(fm.module)
    for m in module.modules():
        if type(m) is TrackedBatchNorm2d:
            m.__class__ = nn.BatchNorm2d
    return FunctionalModel(module)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("optim", [OptimConfig(), OptimConfig(momentum=0.9, weight_decay=1e-3)], ids=["sgd", "mom"])
def test_untracked_paths_are_bit_identical_to_pytorch_batchnorm(optim, dtype):
    """Training, replay, gt and engine=loop never track: they must equal plain nn.BatchNorm2d bit for bit."""
    dyn, s0, _ = make(optim=optim, start=0)
    if dtype != DT:
        dyn.x = dyn.x.to(dtype)
        dyn._x_flat = dyn.x.reshape(dyn.x.shape[0], -1)
        dyn.mixing = Mixing(dyn.mixing.schedule, CPU, dtype)
        s0 = State(0, s0.theta.to(dtype), {k: v.to(dtype) if v.is_floating_point() else v
                                            for k, v in s0.buffers.items()}, None)
    assert any(type(m) is TrackedBatchNorm2d for m in dyn.fm.module.modules())
    plain = Dynamics(_plain(dyn.fm), dyn.x, dyn.y, dyn.plan, dyn.mixing, dyn.optim, dyn.base_lr, dyn.rounds)
    a, b = s0.clone(), s0.clone()
    w = torch.ones(dyn.n, dyn.batch_size, dtype=dtype)
    w[1, 2] = 0.0
    for t in range(dyn.rounds):
        a, da, la = dyn.round(a, w if t == 1 else None)
        b, db, lb = plain.round(b, w if t == 1 else None)
        assert torch.equal(da, db) and torch.equal(la, lb) and torch.equal(a.theta, b.theta)
        assert all(torch.equal(a.buffers[k], b.buffers[k]) for k in a.buffers)
    xp = torch.randn(5, 1, 4, 4, dtype=dtype)
    yp = torch.arange(5) % 4
    assert torch.equal(dyn.probe_losses(a.theta, a.buffers, xp, yp, True)[0],
                       plain.probe_losses(b.theta, b.buffers, xp, yp, True)[0])
    # engine=loop builds real modules (tracked class, tracking off) and matches its plain-BN twin bitwise
    loop = LoopEngine(CNN_BN, dyn.fm, (1, 4, 4), 4, dyn, s0.clone())
    loop_plain = LoopEngine(CNN_BN, dyn.fm, (1, 4, 4), 4, plain, s0.clone())
    for m in loop_plain.modules:
        for mm in m.modules():
            if type(mm) is TrackedBatchNorm2d:
                mm.__class__ = nn.BatchNorm2d
    assert any(type(mm) is TrackedBatchNorm2d for mm in loop.modules[0].modules())
    for _ in range(dyn.rounds):
        l1, d1 = loop.round()
        l2, d2 = loop_plain.round()
        assert torch.equal(l1, l2) and torch.equal(d1, d2)
    sa, sb = loop.state(), loop_plain.state()
    assert torch.equal(sa.theta, sb.theta) and all(torch.equal(sa.buffers[k], sb.buffers[k]) for k in sa.buffers)


def test_tracked_batchnorm_matches_pytorch_values_and_carries_the_graph():
    dyn, state, _ = make(start=1)
    t = state.round
    with torch.enable_grad():
        th = state.theta.clone().requires_grad_(True)
        tracked = dyn.local_step(State(t, th, state.buffers, state.momentum), create_graph=True)
    plain = dyn.local_step(state)
    assert torch.allclose(tracked[0], plain[0], rtol=0, atol=1e-14)
    for k, v in plain[2].items():
        if v.is_floating_point():
            assert torch.allclose(tracked[2][k], v, rtol=0, atol=1e-14)
            assert tracked[2][k].requires_grad, k        # the running statistics depend on θ
        else:
            assert torch.equal(tracked[2][k], v)


# ---------------------------------------------------------------------------------------------- attacks
@pytest.mark.parametrize("name", list(DATA_ATTACKS + UPDATE_ATTACKS))
def test_delta_u_is_the_sent_difference_under_every_attack(name):
    """δ_u = Δ_sent,j(w = 1) − Δ_sent,j(w∖u), by definition; first_order's direct term uses it."""
    dyn, state, probe = make(model=ModelConfig(name="mlp", hidden=[6]), optim=OptimConfig(momentum=0.9),
                             attack=name, sigma=1.0, scale=2.0, strength=0.5)
    units = sample_units(dyn, state.round, sources=[1, 2])      # node 1 attacks, node 2 is honest
    full = dyn.local_step(state)[0]

    def by_definition(u):
        w = torch.ones(dyn.n, dyn.batch_size, dtype=DT).masked_fill(units.mask[u], 0.0)
        return (full - dyn.local_step(state, w)[0])[units.source[u]]

    want = torch.stack([by_definition(u) for u in range(len(units.source))])
    got = unit_deltas(dyn, state, units.mask)
    assert (got - want).abs().max() <= 1e-12 * max(want.abs().max(), 1e-300)
    xp, yp, shared, q = probe
    with torch.enable_grad():
        th = state.theta.detach().requires_grad_(True)
        (g0,) = torch.autograd.grad(dyn.probe_losses(th, state.buffers, xp, yp, shared)[0].sum(), th)
    df = first_order(dyn, state, units, 1, *probe)
    direct = df[df.hop == 0].influence.to_numpy()
    expect = np.array([float(q[j] * g0[j] @ want[u]) for u, j in enumerate(units.source)])
    np.testing.assert_allclose(direct, expect, rtol=1e-10, atol=1e-15)
    if name == "gaussian":   # the derivative ∂Δ_sent/∂w would be off by ~100% here
        assert dyn.attack.nonlinear_at(state.round) == [1, 3]
