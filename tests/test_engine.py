"""The vectorised engine against its slow twin (reference.LoopEngine), and the round's pieces."""
from __future__ import annotations


import pytest
import torch

from dice_cli.config import ModelConfig, OptimConfig, TopologyConfig
from dice_cli.engine import Dynamics, Mixing, State, lr_at
from dice_cli.graph import build_schedule
from dice_cli.models import init_nodes
from dice_cli.reference import LoopEngine

CPU = torch.device("cpu")


def make(model: ModelConfig, optim: OptimConfig, topology: str = "exponential", n: int = 5, rounds: int = 40,
         dtype=torch.float64, gossip_buffers: bool = True, batch: int = 6):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 1, 8, 8, generator=g).to(dtype)
    y = torch.randint(0, 10, (120,), generator=g)
    plan = torch.randint(0, 120, (rounds, n, batch), generator=g)
    sched = build_schedule(TopologyConfig(name=topology), n, seed=3)
    fm, theta, bufs = init_nodes(model, (1, 8, 8), 10, n, 0, dtype, CPU)
    dyn = Dynamics(fm, x, y, plan, Mixing(sched, CPU, dtype), optim, 0.1, rounds, gossip_buffers)
    return dyn, fm, State(0, theta, bufs, None)


def run_both(model, optim, **kw):
    dyn, fm, s0 = make(model, optim, **kw)
    loop = LoopEngine(model, fm, (1, 8, 8), 10, dyn, s0.clone())
    s = s0.clone()
    for _ in range(dyn.rounds):
        s, delta, losses = dyn.round(s)
        l2, d2 = loop.round()
        tol = 1e-12 if losses.dtype == torch.float64 else 1e-5
        assert torch.allclose(losses.detach(), l2, rtol=0, atol=tol)
    return s, loop.state(), delta, d2


@pytest.mark.parametrize("model", [ModelConfig(name="mlp", hidden=[16]),
                                   ModelConfig(name="cnn", channels=[4], batchnorm=True)], ids=["mlp", "cnn_bn"])
@pytest.mark.parametrize("optim", [OptimConfig(), OptimConfig(momentum=0.9, weight_decay=1e-3, schedule="cosine")],
                         ids=["sgd", "momentum_wd_cosine"])
def test_vmap_equals_loop_float64(model, optim):
    s, ref, delta, ref_delta = run_both(model, optim)
    assert s.round == ref.round == 40
    assert (s.theta - ref.theta).abs().max() < 1e-10
    assert (delta - ref_delta).abs().max() < 1e-10
    for k in s.buffers:
        assert (s.buffers[k].double() - ref.buffers[k].double()).abs().max() < 1e-10
    if optim.momentum:
        assert (s.momentum - ref.momentum).abs().max() < 1e-10


def test_vmap_equals_loop_float32_time_varying_no_buffer_gossip():
    model = ModelConfig(name="cnn", channels=[4], batchnorm=True)
    s, ref, _, _ = run_both(model, OptimConfig(momentum=0.5), topology="random_matching",
                            dtype=torch.float32, gossip_buffers=False, rounds=25)
    assert (s.theta - ref.theta).abs().max() < 1e-5
    # running statistics stay local without buffer gossip: nodes differ
    rm = [k for k in s.buffers if k.endswith("running_mean")][0]
    assert (s.buffers[rm][0] - s.buffers[rm][1]).abs().max() > 1e-4


def test_gossip_is_row_receiver_convention():
    dyn, fm, s0 = make(ModelConfig(name="logreg"), OptimConfig(), topology="exponential", n=4, rounds=1)
    z = torch.arange(4, dtype=torch.float64)[:, None].repeat(1, 3)
    w = torch.as_tensor(dyn.mixing.numpy(0))
    mixed = dyn.mixing.apply(0, z)
    # node k receives from k, k-1, k-2 with 1/3 each
    for k in range(4):
        assert mixed[k, 0].item() == pytest.approx(sum(((k - o) % 4) for o in (0, 1, 2)) / 3)
    assert torch.allclose(mixed, w @ z)


def test_copies_axis_equals_independent_runs():
    dyn, fm, s0 = make(ModelConfig(name="mlp", hidden=[8]), OptimConfig(momentum=0.9), rounds=3)
    C = 3
    w = torch.ones(C, dyn.n, dyn.batch_size, dtype=torch.float64)
    w[1, 2, 0] = 0.0
    w[2, 0, :] = 0.0
    sc = State(0, s0.theta.expand(C, -1, -1).clone(), {}, None)
    singles = [s0.clone() for _ in range(C)]
    for _ in range(3):
        sc, _, _ = dyn.round(sc, w)
        singles = [dyn.round(s, w[c])[0] for c, s in enumerate(singles)]
    for c in range(C):
        assert (sc.theta[c] - singles[c].theta).abs().max() < 1e-14
    assert (sc.theta[0] - sc.theta[1]).abs().max() > 1e-6


def test_sparse_gossip_equals_dense():
    n = 80
    sched = build_schedule(TopologyConfig(name="ring"), n, seed=0)
    mix = Mixing(sched, CPU, torch.float64)
    dense, sparse = mix.dense_sparse(0)
    assert sparse is not None
    z = torch.randn(n, 7, dtype=torch.float64)
    assert torch.allclose(mix.apply(0, z), dense @ z, atol=1e-14)
    zc = torch.randn(3, n, 7, dtype=torch.float64)
    assert torch.allclose(mix.apply(0, zc, copies=True), torch.matmul(dense, zc), atol=1e-14)


def test_lr_schedules():
    o = OptimConfig(schedule="step", step_size=10, gamma=0.5)
    assert [lr_at(o, 0.1, t, 100) for t in (0, 9, 10, 25)] == pytest.approx([0.1, 0.1, 0.05, 0.025])
    c = OptimConfig(schedule="cosine", min_lr=0.01)
    assert lr_at(c, 0.1, 0, 100) == pytest.approx(0.1)
    assert lr_at(c, 0.1, 50, 100) == pytest.approx(0.055)
    assert lr_at(c, 0.1, 100, 100) == pytest.approx(0.01)
    assert lr_at(OptimConfig(), 0.1, 77, 100) == 0.1


def test_weighted_loss_keeps_divisor():
    """Removing a sample zeroes its weight; the batch divisor |B| stays (spec §2)."""
    dyn, fm, s0 = make(ModelConfig(name="logreg"), OptimConfig(), n=2, rounds=1, batch=4)
    w = torch.ones(2, 4, dtype=torch.float64)
    w[0, 1] = 0
    _, losses_w, _ = dyn.grads(s0.theta, s0.buffers, 0, w)
    x, y = dyn.batch(0)
    ce = torch.nn.functional.cross_entropy(fm.logits(s0.theta[0], {}, x[0]), y[0], reduction="none")
    assert losses_w[0].item() == pytest.approx((ce.sum() - ce[1]).item() / 4, abs=1e-14)


def test_thread_rule():
    from dice_cli.simulation import SMALL_PROBLEM_PARAMS, _TORCH_DEFAULT_THREADS, configure_threads

    before = torch.get_num_threads()
    try:
        assert configure_threads(0, CPU, 1000) == 1                                  # small: one thread
        assert configure_threads(2, CPU, 1000) == 2                                  # explicit wins
        assert configure_threads(0, CPU, SMALL_PROBLEM_PARAMS + 1) == _TORCH_DEFAULT_THREADS
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------- probe fast path
@pytest.mark.parametrize("model", [ModelConfig(name="mlp", hidden=[16, 8]), ModelConfig(name="logreg")],
                         ids=["mlp", "logreg"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_node"])
def test_dense_probe_path_equals_vmap_twin(model, shared):
    """probe_losses / probe_grads on the MLP/logreg fast path (batched matmuls, hand-written backward)
    against the general vmap(functional_call) + autograd path: float64, with and without a copies axis."""
    dyn, fm, s = make(model, OptimConfig(momentum=0.9), n=5, rounds=4)
    assert dyn._dense is not None
    for _ in range(3):
        s, _, _ = dyn.round(s)
    g = torch.Generator().manual_seed(1)
    if shared:
        xp, yp = torch.randn(30, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (30,), generator=g)
    else:
        xp, yp = (torch.randn(5, 7, 1, 8, 8, generator=g, dtype=torch.float64),
                  torch.randint(0, 10, (5, 7), generator=g))
    copies = s.theta + 0.05 * torch.randn(3, *s.theta.shape, generator=g, dtype=torch.float64)
    for theta in (s.theta, copies):
        fast, slow = dyn.probe_losses(theta, s.buffers, xp, yp, shared), dyn.probe_losses_vmap(theta, s.buffers,
                                                                                                xp, yp, shared)
        assert fast[0].shape == slow[0].shape == theta.shape[:-1]
        assert (fast[0] - slow[0]).abs().max() < 1e-12
        assert torch.equal(fast[1], slow[1])
    fast, slow = dyn.probe_grads(s, xp, yp, shared), dyn.probe_grads_autograd(s, xp, yp, shared)
    assert (fast - slow).abs().max() < 1e-12 and slow.abs().max() > 1e-3
    # with a graph to keep, probe_losses takes the differentiable path
    th = s.theta.clone().requires_grad_(True)
    assert dyn.probe_losses(th, s.buffers, xp, yp, shared)[0].requires_grad
    # node chunks give the same numbers on the fast path, bit for bit
    dyn.chunk_nodes = 2
    assert torch.equal(dyn.probe_losses(copies, s.buffers, xp, yp, shared)[0],
                       make(model, OptimConfig(momentum=0.9), n=5, rounds=4)[0].probe_losses(
                           copies, s.buffers, xp, yp, shared)[0])
    assert torch.equal(dyn.probe_grads(s, xp, yp, shared), fast)


@pytest.mark.parametrize("case", ["mlp", "cnn_bn_momentum", "update_attack", "data_attack"])
def test_local_step_on_node_rows_equals_rows_of_the_full_step(case):
    """local_step(nodes=) / probe_losses(nodes=) (rows that are copies of given nodes, as dice gt and exact's
    cones step them) against the rows of the full step: Δ, momentum, buffers, losses and probe losses."""
    from dice_cli.config import AttackConfig, ProbeConfig, TrainConfig
    from dice_cli.simulation import build_setup

    kw = {"mlp": dict(probe=ProbeConfig(kind="per_node", size=4)),
          "cnn_bn_momentum": dict(model=ModelConfig(name="cnn", channels=[3], batchnorm=True),
                                  optim=OptimConfig(momentum=0.9, weight_decay=1e-3)),
          "update_attack": dict(attack=AttackConfig(name="stealth", nodes=[1, 4])),
          "data_attack": dict(attack=AttackConfig(name="label_flip", nodes=[2]))}[case]
    s = build_setup(TrainConfig(nodes=6, rounds=4, batch_size=4, dtype="float64", device="cpu", progress=False,
                                **kw))
    state = s.dyn.round(s.dyn.round(s.init)[0])[0]
    nodes = torch.tensor([4, 1, 1, 0, 5, 2, 4])
    full = s.dyn.local_step(state)
    rows = State(state.round, state.theta[nodes], {k: v[nodes] for k, v in state.buffers.items()},
                 None if state.momentum is None else state.momentum[nodes])
    part = s.dyn.local_step(rows, nodes=nodes)
    for a, b in [(part[0], full[0][nodes]), (part[3], full[3][nodes])] + (
            [(part[1], full[1][nodes])] if full[1] is not None else []) + [
            (part[2][k], full[2][k][nodes]) for k in full[2]]:
        assert (a.double() - b.double()).abs().max() <= 1e-12
    fl, fa = s.dyn.probe_losses(state.theta, state.buffers, s.x_probe, s.y_probe, s.shared_probe)
    pl, pa = s.dyn.probe_losses(rows.theta, rows.buffers, s.x_probe, s.y_probe, s.shared_probe, nodes=nodes)
    assert (pl - fl[nodes]).abs().max() <= 1e-12 and torch.equal(pa, fa[nodes])


def test_thread_rule_limits_numpy_blas_too():
    """A small CPU problem gets one numpy BLAS thread with its one torch thread (spin-waiting BLAS threads
    made a 1,024-node eigvalsh take 9.9 s instead of 0.15 s on a busy 2-core machine); a large one gets the
    defaults back, torch's thread count included."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from dice_cli.simulation import SMALL_PROBLEM_PARAMS, _TORCH_DEFAULT_THREADS, configure_threads

    def blas():
        return {i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"}

    before = torch.get_num_threads()
    try:
        configure_threads(0, CPU, SMALL_PROBLEM_PARAMS + 1)          # defaults (an earlier test may have
        blas_default = blas()                                          # left the small-problem limit on)
        assert configure_threads(0, CPU, 1000) == 1 and blas() <= {1}
        assert configure_threads(0, CPU, SMALL_PROBLEM_PARAMS + 1) == _TORCH_DEFAULT_THREADS
        assert blas() == blas_default
    finally:
        torch.set_num_threads(before)
