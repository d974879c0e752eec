"""Tiny float64 problems for the robustness tests (attacks with per-edge messages, defenses, detector scores):
a partitioned data set, a mixing schedule, an optional attack and defense wired into ``engine.Dynamics``,
and the per-node loop twin run side by side."""
from __future__ import annotations

import numpy as np
import torch
from conftest import partitioned_problem

from dice_cli.attacks import Attack
from dice_cli.config import DefenseConfig, ModelConfig, OptimConfig, TopologyConfig
from dice_cli.defenses import build_defense
from dice_cli.engine import Dynamics, Mixing, State
from dice_cli.graph import build_schedule
from dice_cli.models import init_nodes
from dice_cli.reference import LoopEngine

CPU = torch.device("cpu")
F64 = torch.float64
N, PER, B, C, SHAPE = 6, 24, 6, 10, (1, 8, 8)
BAD = [1, 3]
MLP = ModelConfig(name="mlp", hidden=[8])
CNN = ModelConfig(name="cnn", channels=[3], batchnorm=True)
MOM = OptimConfig(momentum=0.9, weight_decay=1e-3)


class Fixed:
    """A fixed mixing matrix as a schedule (``time_varying`` False)."""
    time_varying = False

    def __init__(self, W):
        self.W = np.asarray(W, dtype=np.float64)

    def at(self, t):
        return self.W.copy()


def make(attack="none", defense="none", model=MLP, optim=OptimConfig(), topology="exponential", rounds=6,
         span=(1, 5), bad=BAD, schedule=None, shared_probe=True, attack_kw=None, n=N, **defense_kw):
    """(dyn, fm, state, attack, defense): n nodes owning disjoint data, a probe set, everything float64."""
    x, y, parts, plan, g = partitioned_problem(n, PER, B, C, SHAPE, rounds, F64)
    sched = schedule or build_schedule(TopologyConfig(name=topology), n, seed=3)
    fm, theta, bufs = init_nodes(model, SHAPE, C, n, 0, F64, CPU)
    atk = None if attack == "none" else Attack(attack, bad, span, n, C, 11, y.numpy(), parts,
                                               **{"strength": 0.5, **(attack_kw or {})})
    dfn = build_defense(DefenseConfig(name=defense, **defense_kw), sched, rounds, atk.nodes if atk else [])
    if shared_probe:
        xp, yp = torch.randn(7, *SHAPE, generator=g, dtype=F64), torch.randint(0, C, (7,), generator=g)
    else:
        xp, yp = torch.randn(n, 7, *SHAPE, generator=g, dtype=F64), torch.randint(0, C, (n, 7), generator=g)
    for part in (atk, dfn):
        if part is not None:
            part.set_probe(xp, yp, shared_probe)
    dyn = Dynamics(fm, x, y, plan, Mixing(sched, CPU, F64), optim, 0.1, rounds, attack=atk, defense=dfn)
    state = State(0, theta, bufs, None, dfn.init_state(n, F64, CPU) if dfn is not None else {})
    return dyn, fm, state, atk, dfn


def run_both(dyn, fm, state, model=MLP):
    """Advance the engine and its loop twin over every round; returns (engine state, loop state, max
    |Δ difference|, the engine's states along the way)."""
    loop = LoopEngine(model, fm, SHAPE, C, dyn, state.clone())
    s, worst, states = state.clone(), 0.0, [state.clone()]
    for _ in range(dyn.rounds):
        s, delta, losses = dyn.round(s)
        l2, d2 = loop.round()
        assert (losses - l2).abs().max() < 1e-12
        worst = max(worst, float((delta - d2).abs().max()))
        states.append(s.clone())
    return s, loop.state(), worst, states


def assert_same_state(a: State, b: State, tol: float = 1e-10) -> None:
    assert a.round == b.round
    assert (a.theta - b.theta).abs().max() < tol
    for k in a.buffers:
        assert (a.buffers[k] - b.buffers[k]).abs().max() < tol
    if a.momentum is not None:
        assert (a.momentum - b.momentum).abs().max() < tol
    assert sorted(a.gossip) == sorted(b.gossip)
    for k in a.gossip:
        assert (a.gossip[k] - b.gossip[k]).abs().max() < tol, k


def honest(bad=BAD, n=N):
    return [k for k in range(n) if k not in bad]
