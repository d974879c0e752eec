"""Engine pieces dice value added: the per-copy ``online`` mask of ``Dynamics.round`` (participants leaving)
against a slow per-node loop, and ``Dynamics.round_vjp`` (hand-written R-operator) against autograd."""
from __future__ import annotations

import pytest
import torch

from conftest import partitioned_problem
from dice_cli.attacks import Attack
from dice_cli.config import ModelConfig, OptimConfig, TopologyConfig
from dice_cli.engine import Dynamics, Mixing, State
from dice_cli.graph import build_schedule
from dice_cli.models import init_nodes

CPU, DT = torch.device("cpu"), torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny problems: one intra-op thread (on a shared 2-core machine extra threads only spin-wait)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
MLP = ModelConfig(name="mlp", hidden=[5])
CNN_BN = ModelConfig(name="cnn", channels=[2], batchnorm=True)


def make(model=MLP, optim=OptimConfig(momentum=0.9, weight_decay=1e-2), n=5, T=6, topology="exponential",
         chunk_nodes=0, attack=None, gossip_buffers=True):
    x, y, parts, plan, g = partitioned_problem(n, 10, 4, 3, (1, 4, 4), T, DT)
    fm, theta, bufs = init_nodes(model, (1, 4, 4), 3, n, 0, DT, CPU)
    att = Attack(attack, [1], (0, T), n, 3, 0, labels=y.numpy(), parts=parts) if attack else None
    dyn = Dynamics(fm, x, y, plan, Mixing(build_schedule(TopologyConfig(name=topology), n, 0), CPU, DT), optim,
                   0.1, T, gossip_buffers, attack=att, chunk_nodes=chunk_nodes)
    return dyn, State(0, theta, bufs, None), g


# ---------------------------------------------------------------------------------------------- online
def slow_round(dyn, state, online):
    """Node by node, copy by copy: offline nodes keep everything; online ones train, then receive from
    online senders only, with the offline senders' weight added to their self-weight."""
    t = state.round
    x, y = dyn.batch(t)
    W = dyn.mixing.numpy(t)
    C, n, P = state.theta.shape
    o = dyn.optim
    half = state.theta.clone()
    mom = torch.zeros_like(state.theta) if state.momentum is None else state.momentum.clone()
    bufs = {k: v.clone() for k, v in state.buffers.items()}
    dyn.fm.module.train()
    for c in range(C):
        for k in range(n):
            if online[c, k] == 0:
                continue
            th = state.theta[c, k].clone().requires_grad_(True)
            b = {name: v[c, k].clone() for name, v in state.buffers.items()}
            loss = dyn.fm.loss(th, b, x[k], y[k], torch.ones(dyn.batch_size, dtype=DT))
            (g,) = torch.autograd.grad(loss, th)
            g = g + o.weight_decay * state.theta[c, k]
            if o.momentum:
                m = g if state.momentum is None else o.momentum * state.momentum[c, k] + g
                mom[c, k] = m
                g = m
            half[c, k] = state.theta[c, k] - dyn.lr(t) * g
            for name in b:
                bufs[name][c, k] = b[name]
    theta = half.clone()
    new_bufs = {k: v.clone() for k, v in bufs.items()}
    for c in range(C):
        for k in range(n):
            if online[c, k] == 0:
                continue
            self_w = W[k, k] + sum(W[k, l] for l in range(n) if l != k and online[c, l] == 0)
            theta[c, k] = self_w * half[c, k] + sum(W[k, l] * half[c, l] for l in range(n)
                                                    if l != k and online[c, l] == 1)
            for name, v in bufs.items():
                if v.is_floating_point() and dyn.gossip_buffers:
                    new_bufs[name][c, k] = self_w * v[c, k] + sum(W[k, l] * v[c, l] for l in range(n)
                                                                  if l != k and online[c, l] == 1)
    return State(t + 1, theta, new_bufs, mom if o.momentum else None)


@pytest.mark.parametrize("model", [MLP, CNN_BN], ids=["mlp", "cnn_bn"])
def test_online_mask_matches_a_slow_per_node_loop(model):
    dyn, s0, _ = make(model=model, topology="random_matching" if model is MLP else "exponential",
                      n=5 if model is MLP else 4)
    C, n = 3, dyn.n
    rounds = 4 if model is MLP else 3
    state = s0.copies(C)
    slow = s0.copies(C)
    for t in range(rounds):
        a = torch.ones(C, n, dtype=DT)
        a[1, (1 + t) % n] = 0.0                               # copy 1: one node away, a different one each round
        a[2, [0, 2]] = 0.0 if t < 2 else 1.0                  # copy 2: nodes 0 and 2 leave, then come back
        state, delta, _ = dyn.round(state, online=a)
        slow = slow_round(dyn, slow, a)
        assert (delta[a == 0] == 0).all()
        assert (state.theta - slow.theta).abs().max() < 1e-12
        assert (state.momentum - slow.momentum).abs().max() < 1e-12
        for k in state.buffers:
            assert (state.buffers[k].double() - slow.buffers[k].double()).abs().max() < 1e-12, k
        if t < 2:   # offline this round and the one before: frozen at the start state (momentum: zero)
            assert torch.equal(state.theta[2, 0], s0.theta[0]) and (state.momentum[2, 0] == 0).all()
    # copy 0 (everyone online) is the plain run
    plain = s0
    for t in range(rounds):
        plain, _, _ = dyn.round(plain)
    assert (state.theta[0] - plain.theta).abs().max() < 1e-13


def test_online_none_is_the_plain_round_and_all_ones_is_the_same_numbers():
    dyn, s0, _ = make()
    a, b, c = s0, s0, s0
    for _ in range(3):
        a, da, _ = dyn.round(a)
        b, db, _ = dyn.round(b, online=None)
        c, dc, _ = dyn.round(c, online=torch.ones(dyn.n, dtype=DT))
        assert torch.equal(a.theta, b.theta) and torch.equal(da, db) and torch.equal(a.momentum, b.momentum)
        assert torch.equal(da, dc) and (a.theta - c.theta).abs().max() < 1e-15


def test_effective_mixing_rows_stay_stochastic():
    dyn, _, g = make(n=6, topology="erdos_renyi")
    for a in [torch.tensor([1, 0, 1, 1, 0, 1], dtype=DT), torch.rand(4, 6, generator=g, dtype=DT)]:
        M = dyn.mixing.effective(0, a)
        assert (M >= 0).all() and torch.allclose(M.sum(-1), torch.ones_like(M.sum(-1)), rtol=0, atol=1e-15)
    W = torch.as_tensor(dyn.mixing.numpy(0))
    a = torch.tensor([1, 0, 1, 1, 0, 1], dtype=DT)
    M = dyn.mixing.effective(0, a)
    assert torch.equal(M[1], torch.eye(6, dtype=DT)[1]) and torch.equal(M[4], torch.eye(6, dtype=DT)[4])
    for k in [0, 2, 3, 5]:
        for l in range(6):
            if l != k:
                assert M[k, l] == (W[k, l] if a[l] else 0.0)
        assert M[k, k] == pytest.approx(float(W[k, k] + W[k, [1, 4]].sum() - (W[k, k] if k in (1, 4) else 0)))


def test_online_mask_is_differentiable():
    """d/da_j of the probe losses by autograd = central finite differences (a partial presence a_j)."""
    dyn, s0, g = make()
    xp, yp = torch.randn(6, 1, 4, 4, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g)

    def f(a1):
        s = s0
        for t in range(3):
            a = torch.ones(dyn.n, dtype=DT)
            a = torch.cat([a[:1], a1.reshape(1), a[2:]])
            s, _, _ = dyn.round(s, create_graph=True, online=a)
        return dyn.probe_losses(s.theta, s.buffers, xp, yp, True)[0].sum()

    a1 = torch.tensor(0.7, dtype=DT, requires_grad=True)
    (grad,) = torch.autograd.grad(f(a1), a1)
    eps = 1e-6
    with torch.no_grad():
        fd = (f(torch.tensor(0.7 + eps, dtype=DT)) - f(torch.tensor(0.7 - eps, dtype=DT))) / (2 * eps)
    assert abs(float(grad) - float(fd)) < 1e-7 * max(1.0, abs(float(fd)))


# ---------------------------------------------------------------------------------------------- round_vjp
@pytest.mark.parametrize("model", [MLP, ModelConfig(name="mlp", hidden=[5, 4]), ModelConfig(name="logreg")],
                         ids=["mlp", "mlp2", "logreg"])
@pytest.mark.parametrize("optim", [OptimConfig(), OptimConfig(momentum=0.9, weight_decay=1e-2)], ids=["sgd", "mom_wd"])
@pytest.mark.parametrize("variant", ["plain", "chunk_nodes", "label_flip"])
def test_round_vjp_fast_path_equals_autograd(model, optim, variant):
    dyn, s0, g = make(model=model, optim=optim, chunk_nodes=2 if variant == "chunk_nodes" else 0,
                      attack="label_flip" if variant == "label_flip" else None)
    state = dyn.round(dyn.round(s0)[0])[0]            # momentum buffer set
    for D in (1, 3):
        lt = torch.randn(D, dyn.n, state.theta.shape[1], generator=g, dtype=DT)
        lm = torch.randn_like(lt) if optim.momentum else None
        fast = dyn.round_vjp(state, lt, lm)
        ref = dyn._round_vjp_autograd(state, lt, lm, {}, True)
        for x, y in [(fast[0], ref[0]), (fast[3], ref[3])] + ([(fast[1], ref[1])] if lm is not None else []):
            assert (x - y).abs().max() <= 1e-12 * y.abs().max()
    # the first round (no momentum buffer yet): λ_m of the start state is None
    lt = torch.randn(2, dyn.n, s0.theta.shape[1], generator=g, dtype=DT)
    fast, ref = dyn.round_vjp(s0, lt, None), dyn._round_vjp_autograd(s0, lt, None, {}, True)
    assert fast[1] is None and ref[1] is None and (fast[0] - ref[0]).abs().max() <= 1e-12 * ref[0].abs().max()


def test_round_vjp_takes_autograd_at_update_attack_rounds_and_matches_finite_differences():
    dyn, s0, g = make(attack=None)
    dyn.attack = Attack("gaussian", [1], (1, 3), dyn.n, 3, 0)
    state = dyn.round(s0)[0]
    lt = torch.randn(1, dyn.n, state.theta.shape[1], generator=g, dtype=DT)
    lam, _, _, gw = dyn.round_vjp(state, lt, None)
    w = torch.ones(dyn.n, dyn.batch_size, dtype=DT)
    eps = 1e-6
    w[1, 2] += eps
    up = (lt[0] * dyn.round(state, w)[0].theta).sum()
    w[1, 2] -= 2 * eps
    down = (lt[0] * dyn.round(state, w)[0].theta).sum()
    assert float(gw[0, 1, 2]) == pytest.approx(float(up - down) / (2 * eps), rel=1e-6)
