"""chunk_nodes: the local step and the probe losses over node chunks give the numbers of the unchunked engine
(both the MLP fast path and the vmap + autograd path, copies axis and create_graph included), and
``dice gt`` / ``dice estimate`` tables do not change with it."""
from __future__ import annotations

import pandas as pd
import pytest
from conftest import partitioned_problem
import torch

from conftest import FAST
from dice_cli.attacks import Attack
from dice_cli.config import ModelConfig, OptimConfig, TopologyConfig, TrainConfig
from dice_cli.engine import Dynamics, Mixing, State
from dice_cli.errors import UserError
from dice_cli.graph import build_schedule
from dice_cli.influence import estimate, gt
from dice_cli.influence.units import select_units
from dice_cli.models import init_nodes

CPU = torch.device("cpu")
F64 = torch.float64
N, PER, B, C, SHAPE = 7, 20, 5, 10, (1, 8, 8)
MLP = ModelConfig(name="mlp", hidden=[12])
CNN = ModelConfig(name="cnn", channels=[3], batchnorm=True)
MOM = OptimConfig(momentum=0.9, weight_decay=1e-3)
CHUNKS = [1, 3, N]


def make(model, optim, chunk_nodes=0, attack=None, rounds=6):
    x, y, parts, plan, g = partitioned_problem(N, PER, B, C, SHAPE, rounds, F64)
    sched = build_schedule(TopologyConfig(name="exponential"), N, seed=3)
    fm, theta, bufs = init_nodes(model, SHAPE, C, N, 0, F64, CPU)
    att = None if attack is None else Attack(attack, [1, 4], (1, 4), N, C, 11, y.numpy(), parts)
    dyn = Dynamics(fm, x, y, plan, Mixing(sched, CPU, F64), optim, 0.1, rounds, attack=att,
                   chunk_nodes=chunk_nodes)
    probe = torch.randn(N, 6, *SHAPE, generator=g).to(F64), torch.randint(0, C, (N, 6), generator=g)
    return dyn, State(0, theta, bufs, None), probe


def close(a, b, exact):
    if exact:
        assert torch.equal(a, b), (a - b).abs().max()
    else:
        assert a.dtype == b.dtype and a.shape == b.shape
        assert (a.double() - b.double()).abs().max() <= 1e-12


def same_state(s, r, exact):
    assert s.round == r.round
    close(s.theta, r.theta, exact)
    assert s.buffers.keys() == r.buffers.keys()
    for k in s.buffers:
        close(s.buffers[k], r.buffers[k], exact)
    assert (s.momentum is None) == (r.momentum is None)
    if s.momentum is not None:
        close(s.momentum, r.momentum, exact)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("model, optim, attack", [
    (MLP, OptimConfig(), None), (MLP, MOM, "sign_flip"), (MLP, OptimConfig(), "label_flip"),
    (CNN, MOM, "sign_flip"), (CNN, OptimConfig(), "stealth")],
    ids=["mlp_sgd", "mlp_momentum_signflip", "mlp_labelflip", "cnn_bn_momentum_signflip", "cnn_bn_stealth"])
def test_rounds_equal_unchunked(model, optim, attack, chunk):
    ref_dyn, s0, (xp, yp) = make(model, optim, 0, attack)
    dyn, _, _ = make(model, optim, chunk, attack)
    exact = model is MLP            # the fast path is bit-identical; vmap(conv) may regroup round-off
    s, r = s0.clone(), s0.clone()
    for _ in range(5):
        s, delta, losses = dyn.round(s)
        r, ref_delta, ref_losses = ref_dyn.round(r)
        same_state(s, r, exact)
        close(delta, ref_delta, exact)
        close(losses, ref_losses, exact)
        for shared, (xx, yy) in [(True, (xp[0], yp[0])), (False, (xp, yp))]:
            for a, b in zip(dyn.probe_losses(s.theta, s.buffers, xx, yy, shared),
                            ref_dyn.probe_losses(r.theta, r.buffers, xx, yy, shared)):
                close(a, b, False)      # vmap may fold a shared probe into one GEMM of another size


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("model", [MLP, CNN], ids=["mlp", "cnn_bn"])
def test_copies_axis_and_create_graph_equal_unchunked(model, chunk):
    ref_dyn, s0, (xp, yp) = make(model, MOM, 0, "sign_flip")
    dyn, _, _ = make(model, MOM, chunk, "sign_flip")
    with torch.no_grad():
        for _ in range(2):                       # momentum populated, attack round active
            s0, _, _ = ref_dyn.round(s0)
    # copies axis [C, n, P] with per-copy unit weights (what dice gt runs)
    w = torch.ones(3, N, B, dtype=F64)
    w[1, 2, :] = 0
    w[2, 5, 1] = 0
    rep = lambda v: v.unsqueeze(0).expand(3, *v.shape).clone()
    sc = State(s0.round, rep(s0.theta), {k: rep(v) for k, v in s0.buffers.items()}, rep(s0.momentum))
    a = dyn.round(sc.clone(), w)
    b = ref_dyn.round(sc.clone(), w)
    same_state(a[0], b[0], model is MLP)
    close(a[1], b[1], model is MLP)
    for x, y in zip(dyn.probe_losses(a[0].theta, a[0].buffers, xp[0], yp[0], True),
                    ref_dyn.probe_losses(b[0].theta, b[0].buffers, xp[0], yp[0], True)):
        close(x, y, False)

    # create_graph through two rounds: d(probe losses)/d(w) (what dice estimate method=exact runs)
    def jac(d):
        ww = torch.ones(N, B, dtype=F64, requires_grad=True)
        st, _, _ = d.round(s0, ww, create_graph=True)
        st, _, _ = d.round(st, create_graph=True)
        loss = d.probe_losses(st.theta, st.buffers, xp[0], yp[0], True)[0]
        return torch.stack([torch.autograd.grad(loss[k], ww, retain_graph=True)[0] for k in range(N)])

    close(jac(dyn), jac(ref_dyn), False)


def test_gt_and_estimates_equal_unchunked():
    tables = {}
    for chunk in [0, 1, 3]:
        dyn, s0, (xp, yp) = make(MLP, MOM, chunk, "sign_flip")
        with torch.no_grad():
            s0, _, _ = dyn.round(s0)
        units = select_units(dyn.plan[1].numpy(), "sample", [0, 3], 2, 0, 1)
        q = torch.ones(N, dtype=F64)
        args = (dyn, s0, units, 2, xp, yp, False, q)
        tables[chunk] = [gt.ground_truth(*args), estimate.exact(*args), estimate.first_order(*args)]
    for chunk in [1, 3]:
        for a, b in zip(tables[chunk], tables[0]):
            pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=0, atol=1e-12)


def test_cli_gt_and_exact_estimate_tables_do_not_change(dice, tmp_path):
    common = [*FAST, "nodes=5", "optim.momentum=0.5", "attack=sign_flip", "attack.count=1"]
    for chunk in [0, 2]:
        code, _, err = dice("train", *common, f"chunk_nodes={chunk}", f"out=run{chunk}")
        assert code == 0, err
        sel = [f"run=run{chunk}", "hops=2", "rounds=[1,3]", "progress=false"]
        assert dice("gt", *sel)[0] == 0
        code, _, err = dice("estimate", *sel, "method=exact")
        assert code == 0, err
    for sub in ["gt", "estimate"]:
        a = pd.read_csv(tmp_path / "run0" / sub / "influence.csv")
        b = pd.read_csv(tmp_path / "run2" / sub / "influence.csv")
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=0, atol=1e-12)
    for t in [3, 6]:                            # training on the MLP fast path: bit-identical checkpoints
        a = torch.load(tmp_path / f"run0/checkpoints/round_{t:06d}.pt")
        b = torch.load(tmp_path / f"run2/checkpoints/round_{t:06d}.pt")
        assert torch.equal(a["theta"], b["theta"]) and torch.equal(a["momentum"], b["momentum"])


def test_bad_chunk_nodes():
    with pytest.raises(UserError, match="chunk_nodes"):
        TrainConfig(chunk_nodes=-1)
    fm, theta, bufs = init_nodes(MLP, SHAPE, C, 2, 0, F64, CPU)
    with pytest.raises(ValueError, match="chunk_nodes"):
        Dynamics(fm, torch.zeros(4, *SHAPE, dtype=F64), torch.zeros(4, dtype=torch.long),
                 torch.zeros(1, 2, 2, dtype=torch.long), None, OptimConfig(), 0.1, 1, chunk_nodes=-2)


def test_cli_rejects_negative_chunk_nodes(dice):
    code, out, err = dice("train", *FAST, "chunk_nodes=-1", "out=bad")
    assert code == 2 and "chunk_nodes" in out + err
