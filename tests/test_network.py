"""Unreliable networks (NETWORKS.md): recorded draws, effective matrices, delays, CHOCO compression; the
engine against its loop twin, neutral knobs against a plain run, exact against finite differences of GT,
resume after a kill, and every analysis command on such runs."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import FAST
from dice_cli.config import ModelConfig, NetworkConfig, OptimConfig, TopologyConfig
from dice_cli.engine import Dynamics, Mixing, State
from dice_cli.graph import build_schedule
from dice_cli.models import init_nodes
from dice_cli.network import NetworkRecord, NetworkRuntime, draw
from dice_cli.reference import LoopEngine
from dice_cli.simulation import effective_schedule, initial_network_state

CPU = torch.device("cpu")
DT = torch.float64
ALL_FOUR = dict(churn="markov", p_on=0.5, p_off=0.2, drop=0.2, delay="uniform", max_delay=2, ratio=0.3)
NET_ARGS = {
    "churn": ["network.churn=bernoulli", "network.churn_p=0.7"],
    "drop": ["network.drop=0.3"],
    "delay": ["network.delay=uniform", "network.max_delay=2"],
    "compression": ["network.compression=top_k", "network.ratio=0.3"],
}


def make(net: NetworkConfig, model: ModelConfig = ModelConfig(name="mlp", hidden=[8]), optim=OptimConfig(),
         n: int = 5, rounds: int = 12, batch: int = 4, topology: str = "exponential"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 1, 4, 4, generator=g).to(DT)
    y = torch.randint(0, 4, (80,), generator=g)
    plan = torch.randint(0, 80, (rounds, n, batch), generator=g)
    sched = build_schedule(TopologyConfig(name=topology), n, seed=3)
    fm, theta, bufs = init_nodes(model, (1, 4, 4), 4, n, 0, DT, CPU)
    rec = draw(net, n, rounds, fm.num_params, 0, sched)
    dyn = Dynamics(fm, x, y, plan, Mixing(effective_schedule(sched, rec), CPU, DT), optim, 0.1, rounds, True,
                   network=None if rec is None else NetworkRuntime(rec, CPU, DT))
    return dyn, fm, State(0, theta, bufs, None, initial_network_state(rec, theta)), rec, sched


# --------------------------------------------------------------------------- records and matrices


def test_effective_matrix_moves_lost_weight_to_the_receiver_and_freezes_offline_rows():
    W = build_schedule(TopologyConfig(name="ring"), 4, seed=0).at(0)
    rec = NetworkRecord(4, 1, online=np.array([[1, 1, 0, 1]], bool), drop=np.zeros((1, 4, 4), bool))
    rec.drop[0, 0, 1] = True                               # edge 1 -> 0 fails
    M = rec.effective(W, 0)
    assert np.allclose(M.sum(1), 1) and (M >= 0).all()
    assert M[0, 1] == 0 and M[0, 0] == pytest.approx(W[0, 0] + W[0, 1])
    assert M[1, 2] == 0 and M[3, 2] == 0                   # offline sender dropped
    assert np.array_equal(M[2], np.eye(4)[2])              # offline receiver keeps its model
    untouched = NetworkRecord(4, 1, online=np.ones((1, 4), bool)).effective(W, 0)
    assert np.array_equal(untouched, W)                    # bit for bit


def test_draws_are_seeded_per_quantity():
    sched = build_schedule(TopologyConfig(name="ring"), 6, seed=0)
    a = draw(NetworkConfig(churn="bernoulli", churn_p=0.5), 6, 50, 10, 0, sched)
    b = draw(NetworkConfig(churn="bernoulli", churn_p=0.5, drop=0.3), 6, 50, 10, 0, sched)
    c = draw(NetworkConfig(churn="bernoulli", churn_p=0.5), 6, 50, 10, 1, sched)
    assert np.array_equal(a.online, b.online) and not np.array_equal(a.online, c.online)
    assert b.drop.shape == (50, 6, 6) and not b.drop[:, np.arange(6), np.arange(6)].any()
    d = draw(NetworkConfig(delay="per_edge", max_delay=3), 6, 50, 10, 0, sched)
    assert (d.delay == d.delay[0]).all() and d.delay.max() <= 3 and (d.delay[:, range(6), range(6)] == 0).all()
    s = draw(NetworkConfig(churn="schedule", join=[0, 0, 5, 0, 0, 0], leave=[50, 50, 50, 20, 50, 50]),
             6, 50, 10, 0, sched)
    assert not s.online[:5, 2].any() and s.online[5:, 2].all() and not s.online[20:, 3].any()
    m = draw(NetworkConfig(compression="random_k", ratio=0.3), 6, 50, 10, 0, sched)
    assert (m.mask.sum(-1) == 3).all()


def test_record_round_trips_through_its_file(tmp_path):
    sched = build_schedule(TopologyConfig(name="ring"), 5, seed=0)
    rec = draw(NetworkConfig(**ALL_FOUR, compression="random_k"), 5, 9, 37, 0, sched)
    (tmp_path / "network.npz").write_bytes(rec.to_bytes())
    back = NetworkRecord.load(tmp_path)
    for k in ("online", "drop", "delay", "mask"):
        assert np.array_equal(getattr(rec, k), getattr(back, k))
    assert (back.max_delay, back.compression, back.ratio, back.num_params) == (2, "random_k", 0.3, 37)


# --------------------------------------------------------------------------- engine vs loop twin


@pytest.mark.parametrize("compression", ["top_k", "random_k", "qsgd"])
@pytest.mark.parametrize("model,optim", [
    (ModelConfig(name="mlp", hidden=[8]), OptimConfig(momentum=0.9, weight_decay=1e-3)),
    (ModelConfig(name="cnn", channels=[2], batchnorm=True), OptimConfig()),
], ids=["mlp_momentum", "cnn_bn"])
def test_vmap_equals_loop_with_all_four_combined(compression, model, optim):
    if model.name == "cnn" and compression != "top_k":
        pytest.skip("one compression is enough for the BatchNorm model")
    dyn, fm, s0, rec, sched = make(NetworkConfig(**ALL_FOUR, compression=compression), model, optim)
    assert rec.online is not None and not rec.online.all() and rec.drop.any() and rec.delay.max() == 2
    loop = LoopEngine(model, fm, (1, 4, 4), 4, dyn, s0.clone(), network=rec, base=sched)
    s = s0.clone()
    for _ in range(dyn.rounds):
        s, delta, losses = dyn.round(s)
        l2, d2 = loop.round()
        assert (losses - l2).abs().max() < 1e-10 and (delta - d2).abs().max() < 1e-10
    r = loop.state()
    assert (s.theta - r.theta).abs().max() < 1e-10
    for k in s.buffers:
        assert (s.buffers[k] - r.buffers[k]).abs().max() < 1e-10
    if optim.momentum:
        assert (s.momentum - r.momentum).abs().max() < 1e-10
    assert set(s.gossip) == set(r.gossip) == {"net.sent", "net.public"}
    for k in s.gossip:
        assert (s.gossip[k] - r.gossip[k]).abs().max() < 1e-10


def test_offline_nodes_do_not_move_and_keep_their_momentum():
    dyn, _, s0, rec, _ = make(NetworkConfig(churn="bernoulli", churn_p=0.5), optim=OptimConfig(momentum=0.9))
    s = s0
    for t in range(dyn.rounds):
        nxt, delta, _ = dyn.round(s)
        off = ~rec.online[t]
        assert torch.equal(nxt.theta[off], s.theta[off]) and (delta[off] == 0).all()
        if s.momentum is not None:
            assert torch.equal(nxt.momentum[off], s.momentum[off])
        s = nxt


def test_first_order_propagation_with_delays_is_the_gossip_map():
    """δ^{(s)} = Σ_d M_(d) δ^{(s−1−d)} (spec §3) equals pushing a perturbation of θ_j^{t+½} through the engine's
    own delayed gossip (a one-parameter system, no local steps)."""
    from dice_cli.influence.estimate import propagation

    dyn, _, _, rec, _ = make(NetworkConfig(churn="bernoulli", churn_p=0.8, drop=0.2, delay="uniform",
                                           max_delay=2), n=6)
    t, j, hops = 3, 2, 5
    a = propagation(dyn, t, [j], hops)[:, :, 0]                                    # [hops+1, n]
    th = torch.zeros(6, 1, dtype=DT)
    st = State(t, th, {}, None, {"net.sent": torch.zeros(2, 6, 1, dtype=DT)})
    pert = torch.zeros(6, 1, dtype=DT)
    pert[j] = 1.0
    st = dyn.gossip(st, pert, {}, None)
    got = [st.theta[:, 0].numpy().copy()]
    for _ in range(hops - 1):
        st = dyn.gossip(st, torch.zeros(6, 1, dtype=DT), {}, None)
        got.append(st.theta[:, 0].numpy().copy())
    assert np.allclose(np.stack(got), a[1:], atol=1e-14)


# --------------------------------------------------------------------------- neutral knobs


def _final(run):
    return torch.load(run / "checkpoints" / "round_000006.pt", weights_only=True)


def test_neutral_network_is_bit_identical_to_a_plain_run(dice, tmp_path):
    assert dice("train", *FAST, "out=plain")[0] == 0
    ref = _final(tmp_path / "plain")
    cases = {"p1": ["network.churn=bernoulli", "network.churn_p=1.0"],          # churn path, all online
             "d0": ["network.delay=fixed", "network.max_delay=0"],              # D = 0
             "drop0": ["network.drop=0.0"]}
    for name, args in cases.items():
        assert dice("train", *FAST, f"out={name}", *args)[0] == 0
        got = _final(tmp_path / name)
        assert torch.equal(got["theta"], ref["theta"]), name
    assert (tmp_path / "p1" / "network.npz").exists() and not (tmp_path / "d0" / "network.npz").exists()
    m = pd.read_csv(tmp_path / "p1" / "metrics.csv")
    assert (m.online == 1).all() and (m.bytes_sent > 0).all()


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("args,words", [
    (["network.churn_p=1.5"], ["network.churn_p", "[0.0, 1.0]"]),
    (["network.churn=sometimes"], ["network.churn", "bernoulli", "markov"]),
    (["network.drop=1.0"], ["network.drop"]),
    (["network.compression=zip"], ["network.compression", "top_k", "qsgd"]),
    (["network.churn=trace"], ["network.trace="]),
    (["network.churn=schedule", "network.join=[0,1]"], ["network.join", "nodes=4"]),
    (["network.drop=0.1", "defense=median"], ["defense=median", "plain gossip"]),
])
def test_bad_network_settings_exit_2(dice, args, words):
    code, _, err = dice("train", *FAST, "out=bad", *args)
    assert code == 2 and "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


def test_trace_files_are_checked(dice, tmp_path):
    good = np.ones((6, 4), dtype=int)
    np.save(tmp_path / "wrong.npy", np.ones((5, 4)))
    code, _, err = dice("train", *FAST, "out=x", "network.churn=trace", "network.trace=wrong.npy")
    assert code == 2 and "[5, 4]" in err and "[6, 4]" in err
    bad = good.copy()
    bad[2, 1] = 2
    np.savetxt(tmp_path / "values.csv", bad, delimiter=",", fmt="%d")
    code, _, err = dice("train", *FAST, "out=x", "network.churn=trace", "network.trace=values.csv")
    assert code == 2 and "round 2, node 1" in err and "0 (offline) or 1" in err
    empty = good.copy()
    empty[4] = 0
    np.save(tmp_path / "empty.npy", empty)
    code, _, err = dice("train", *FAST, "out=x", "network.churn=trace", "network.trace=empty.npy")
    assert code == 2 and "every node is offline in round 4" in err and "empty.npy" in err
    assert not (tmp_path / "x" / "checkpoints").exists()
    empty[4, 3] = 1
    np.save(tmp_path / "ok.npy", empty)
    assert dice("train", *FAST, "out=ok", "network.churn=trace", "network.trace=ok.npy")[0] == 0
    rec = NetworkRecord.load(tmp_path / "ok")
    assert np.array_equal(rec.online, empty.astype(bool))
    (tmp_path / "ok.npy").unlink()                      # the run no longer needs its trace file
    assert dice("gt", "run=ok", "hops=1", "progress=false")[0] == 0


# --------------------------------------------------------------------------- resume after a kill


@pytest.mark.parametrize("kind", ["churn", "drop", "delay", "compression"])
def test_resume_after_a_kill_is_bit_identical(dice, tmp_path, monkeypatch, kind):
    from dice_cli import engine

    args = [*FAST, "optim=momentum", "record.every=2", *NET_ARGS[kind]]
    assert dice("train", *args, "out=ref")[0] == 0
    real = engine.Dynamics.round

    def killed(self, state, *a, **k):
        if state.round == 3:
            raise KeyboardInterrupt
        return real(self, state, *a, **k)

    monkeypatch.setattr(engine.Dynamics, "round", killed)
    assert dice("train", *args, "out=cut")[0] == 130
    monkeypatch.setattr(engine.Dynamics, "round", real)
    code, out, _ = dice("train", *args, "out=cut")
    assert code == 0 and "resuming" in out
    a, b = _final(tmp_path / "ref"), _final(tmp_path / "cut")
    assert torch.equal(a["theta"], b["theta"]) and torch.equal(a["momentum"], b["momentum"])
    assert a.get("gossip", {}).keys() == b.get("gossip", {}).keys()
    for k in a.get("gossip", {}):
        assert torch.equal(a["gossip"][k], b["gossip"][k])
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "ref/metrics.csv"), pd.read_csv(tmp_path / "cut/metrics.csv"))


# --------------------------------------------------------------------------- exact = finite differences of GT


def _fd_gt(dyn, state, mask, hops, xp, yp, eps):
    """Central finite differences of the probe losses in the unit's weight: [hops+1, n] per unit."""
    from dice_cli.influence.gt import _simulate

    U = mask.shape[0]
    w = torch.ones(2 * U, dyn.n, dyn.batch_size, dtype=DT)
    m = mask.to(DT)
    w[:U] += eps * m
    w[U:] -= eps * m
    half, losses = _simulate(dyn, state.copies(2 * U), w, hops, xp, yp, True)
    allv = torch.cat([half[None], losses])                                          # [hops+1, 2U, n]
    return ((allv[:, :U] - allv[:, U:]) / (2 * eps)).permute(1, 0, 2)               # [U, hops+1, n]


@pytest.mark.parametrize("kind", ["churn", "drop", "delay", "compression"])
def test_exact_equals_finite_differences_of_gt(kind):
    from dice_cli.influence.estimate import exact
    from dice_cli.influence.units import Units

    net = {"churn": NetworkConfig(churn="bernoulli", churn_p=0.6),
           "drop": NetworkConfig(drop=0.4),
           "delay": NetworkConfig(delay="uniform", max_delay=2),
           "compression": NetworkConfig(compression="random_k", ratio=0.4, delay="fixed", max_delay=1)}[kind]
    dyn, _, s0, rec, _ = make(net, optim=OptimConfig(momentum=0.5), n=5, rounds=10)
    with torch.no_grad():
        st = s0
        for _ in range(3):
            st, _, _ = dyn.round(st)
    t, hops = 3, 3
    n, B = dyn.n, dyn.batch_size
    mask = torch.zeros(n, n, B, dtype=torch.bool)
    for j in range(n):
        mask[j, j] = True
    units = Units(kind="batch", round=t, source=np.arange(n), sample=np.full(n, -1), mask=mask)
    g = torch.Generator().manual_seed(1)
    xp, yp = torch.randn(7, 1, 4, 4, generator=g).to(DT), torch.randint(0, 4, (7,), generator=g)
    df = exact(dyn, st, units, hops, xp, yp, True, torch.ones(n))
    fd = _fd_gt(dyn, st, mask, hops, xp, yp, 1e-5)
    for u in range(n):
        rows = df[df.source == u]
        h0 = rows[rows.hop == 0].influence.to_numpy()
        assert np.allclose(h0, fd[u, 0, u].item(), rtol=1e-6, atol=1e-11)
        for s in range(1, hops + 1):
            e = rows[rows.hop == s].sort_values("target").influence.to_numpy()
            f = fd[u, s].numpy()
            assert np.allclose(e, f, rtol=1e-6, atol=1e-9 * max(1.0, np.abs(f).max())), (kind, u, s, e, f)
    if kind == "churn":       # an offline source's batch changes nothing
        off = np.flatnonzero(~rec.online[t])
        assert len(off) and np.abs(df[df.source.isin(off)].influence).max() < 1e-12


# --------------------------------------------------------------------------- commands on such runs


@pytest.fixture(scope="module")
def net_run(tmp_path_factory):
    """One small run with all four conditions (qsgd compression), trained once for the command tests."""
    import subprocess
    import sys

    from conftest import ROOT, SUBPROCESS_TIMEOUT

    d = tmp_path_factory.mktemp("net")
    args = [*FAST, "rounds=8", f"out={d / 'run'}", "network.churn=markov", "network.drop=0.2",
            "network.delay=uniform", "network.max_delay=2", "network.compression=qsgd", "network.levels=4",
            "attack=label_flip", "attack.count=1"]
    env = {"PYTHONPATH": str(ROOT), "DICE_LATEST": str(d / "latest"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "dice_cli", "train", *args], cwd=d, env=env, capture_output=True,
                       text=True, timeout=SUBPROCESS_TIMEOUT)
    assert r.returncode == 0, r.stderr
    return d / "run"


def test_train_records_the_network_in_the_manifest(net_run):
    m = json.loads((net_run / "manifest.json").read_text())
    assert "network.npz" in m["files"] and m["files"]["network.npz"]["sha256"]
    assert "availability.png" in m["files"]
    assert m["network"]["churn"] == "markov" and m["network"]["compression"] == "qsgd"
    metrics = pd.read_csv(net_run / "metrics.csv")
    rec = NetworkRecord.load(net_run)
    assert np.array_equal(metrics.pivot(index="round", columns="node", values="online").to_numpy(),
                          rec.online.astype(int))
    assert ((metrics.bytes_sent == 0) | (metrics.online == 1)).all()
    assert (metrics.bytes_sent % rec.message_bytes(8) == 0).all()
    assert rec.message_bytes(8) < rec.num_params * 8


def test_analysis_commands_run_on_a_network_run(dice, net_run, tmp_path, monkeypatch):
    from dice_cli import network

    def no_draws(*a, **k):
        raise AssertionError("a replay redrew the network")

    monkeypatch.setattr(network, "draw", no_draws)
    monkeypatch.setattr("dice_cli.simulation.draw", no_draws)
    run = f"run={net_run}"
    assert dice("gt", run, "hops=2", "rounds=3", f"out={tmp_path}/gt", "progress=false")[0] == 0
    code, _, err = dice("estimate", run, "hops=2", "rounds=3", "method=exact", f"gt={tmp_path}/gt",
                        f"out={tmp_path}/ex", "progress=false")
    assert code == 0, err
    summary = json.loads((tmp_path / "ex" / "summary.json").read_text())
    assert "straight-through" in json.dumps(summary)
    code, _, err = dice("estimate", run, "hops=2", "rounds=3", "method=first_order", f"gt={tmp_path}/gt",
                        f"out={tmp_path}/fo", "progress=false")
    assert code == 0, err
    assert dice("detect", run, f"out={tmp_path}/det", "progress=false")[0] == 0
    code, _, err = dice("value", run, "unit=node", "method=exact", f"out={tmp_path}/val", "progress=false")
    assert code == 0, err


def test_a_changed_network_record_is_refused(dice, net_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(net_run, copy)
    rec = NetworkRecord.load(copy)
    rec.online[0] = True
    (copy / "network.npz").write_bytes(rec.to_bytes())
    code, _, err = dice("gt", f"run={copy}", "hops=1", "progress=false")
    assert code == 2 and "network.npz" in err and "changed" in err
