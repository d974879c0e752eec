"""Seams of the merged branches (issues 11-14): combinations each branch's own tests did not meet.
Tiny float64 problems on CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from robust_setup import BAD, CNN, MOM, make
from test_estimate import batch_units, finite_difference

from dice_cli.influence.estimate import exact


def test_exact_through_an_orthogonal_attacker_with_batchnorm_is_the_derivative():
    """orthogonal (issue 13) reads its probe gradient in eval mode; exact's unrolled rounds hand it BatchNorm
    statistics that carry a graph (issue 9's tracked BN), which PyTorch's native batch_norm refuses (it
    raised 'native_batch_norm is not differentiable with respect to running_mean' at hops >= 2)."""
    dyn, _, state, atk, _ = make("orthogonal", model=CNN, optim=MOM, span=(0, 6))
    with torch.no_grad():
        state = dyn.round(dyn.round(state)[0])[0]
    probe = (*atk.probe, torch.linspace(0.5, 1.5, dyn.n, dtype=torch.float64))
    units = batch_units(dyn, state.round, sources=[0, 1, 2])
    df = exact(dyn, state, units, 2, *probe)
    far = (df.hop > 0).to_numpy()     # the oracle takes hop 0 with the buffers before the step, exact after it
    est, fd = df.influence.to_numpy()[far], finite_difference(dyn, state, units, 2, probe)[far]
    scale = np.abs(fd).max()
    np.testing.assert_allclose(est, fd, rtol=1e-5, atol=1e-7 * scale)


def test_value_reverse_step_through_an_orthogonal_attacker_with_batchnorm():
    """dice value method=exact's reverse sweep (Dynamics.round_vjp) at an orthogonal attack round on a BatchNorm
    model: the running statistics are inputs of the differentiated round (the same crash as above), and the
    loss-weight cotangent equals central finite differences of ⟨λ, State^{t+1}⟩ (Θ and the buffers)."""
    dyn, _, state, _, _ = make("orthogonal", model=CNN, optim=MOM, span=(0, 6))
    with torch.no_grad():
        state = dyn.round(state)[0]
    g = torch.Generator().manual_seed(5)
    lt = torch.randn(1, dyn.n, state.theta.shape[1], generator=g, dtype=torch.float64)
    lb = {k: torch.randn((1,) + tuple(v.shape), generator=g, dtype=torch.float64)
          for k, v in state.buffers.items() if v.is_floating_point()}
    _, _, _, gw = dyn.round_vjp(state, lt, None, lb)

    def inner(w):
        with torch.no_grad():
            nxt = dyn.round(state, w)[0]
        return float((lt[0] * nxt.theta).sum() + sum((lb[k][0] * nxt.buffers[k]).sum() for k in lb))

    eps = 1e-6
    for j in (BAD[0], 0):                    # an attacker's weight and an honest node's
        w = torch.ones(dyn.n, dyn.batch_size, dtype=torch.float64)
        w[j, 2] += eps
        up = inner(w)
        w[j, 2] -= 2 * eps
        fd = (up - inner(w)) / (2 * eps)
        assert float(gw[0, j, 2]) == pytest.approx(fd, rel=1e-6, abs=1e-9)


def _setup(**kw):
    from dice_cli.config import ModelConfig, TrainConfig
    from dice_cli.simulation import build_setup

    cfg = TrainConfig(nodes=12, rounds=8, batch_size=4, dtype="float64", device="cpu", progress=False,
                      model=ModelConfig(name="mlp", hidden=[6]), **kw)
    s = build_setup(cfg)
    st = s.init
    with torch.no_grad():
        for _ in range(3):
            st = s.dyn.round(st)[0]
    return s, st, (s.x_probe, s.y_probe, s.shared_probe, torch.linspace(0.5, 1.5, 12, dtype=torch.float64))


@pytest.mark.parametrize("case", ["stealth_mom_wd", "orthogonal_per_node_probe", "inflate_per_node_probe",
                                  "feature_noise_time_varying"])
def test_row_shortcuts_equal_their_full_twins_under_probe_and_update_attacks(case):
    """gt's reached-rows pass (issue 12) and exact's hop 0-1 / cone shortcuts step rows of given nodes
    (local_step(nodes=)): the attacks of issue 13 that read the probe set (orthogonal's per-attacker probe
    gradient, inflate's probe batches) and stealth's flipped pass must come out as in the full twins."""
    from dice_cli.config import AttackConfig, OptimConfig, ProbeConfig, TopologyConfig
    from dice_cli.influence.gt import ground_truth
    from dice_cli.influence.units import select_units

    per_node = ProbeConfig(kind="per_node", size=5)
    kw = {"stealth_mom_wd": dict(attack=AttackConfig(name="stealth", nodes=[3, 7], strength=0.5),
                                 optim=OptimConfig(momentum=0.9, weight_decay=1e-2)),
          "orthogonal_per_node_probe": dict(attack=AttackConfig(name="orthogonal", nodes=[3, 7], strength=0.5),
                                            probe=per_node, optim=OptimConfig(momentum=0.5)),
          "inflate_per_node_probe": dict(attack=AttackConfig(name="inflate", nodes=[3, 7]), probe=per_node),
          "feature_noise_time_varying": dict(attack=AttackConfig(name="feature_noise", nodes=[3], sigma=2.0),
                                             topology=TopologyConfig(name="one_peer_exponential"))}[case]
    s, st, probe = _setup(**kw)
    assert s.dyn.row_shortcuts
    units = select_units(s.plan[3], "batch", "all", "all", 0, 3)
    full = ground_truth(s.dyn, st, units, 3, *probe, restrict=False)
    part = ground_truth(s.dyn, st, units, 3, *probe, restrict=True, chunk=5)
    assert part.attrs["noise_floor"] == 0.0
    scale = np.abs(full.influence).max()
    assert np.abs(part.influence.to_numpy() - full.influence.to_numpy()).max() <= 1e-12 * scale
    assert ((part.influence == 0) == (full.influence == 0)).all()
    twin = exact(s.dyn, st, units, 3, *probe, path="unrolled").influence.to_numpy()
    for path in ("auto", "cones"):
        got = exact(s.dyn, st, units, 3, *probe, path=path).influence.to_numpy()
        assert np.abs(got - twin).max() <= 1e-12 * np.abs(twin).max(), path
        assert ((got == 0) == (twin == 0)).all()


@pytest.mark.parametrize("case", ["defense", "message_attack", "churn", "delay"])
def test_row_shortcuts_are_off_without_plain_gossip(case, monkeypatch):
    """A defense, a message attack or network conditions: gt keeps the full copies (restrict=True refused)
    and exact never enters its W^t shortcuts."""
    from dice_cli.config import AttackConfig, DefenseConfig, NetworkConfig
    from dice_cli.influence import estimate
    from dice_cli.influence.gt import ground_truth
    from dice_cli.influence.units import select_units

    kw = {"defense": dict(defense=DefenseConfig(name="trimmed_mean")),
          "message_attack": dict(attack=AttackConfig(name="ipm", nodes=[3])),
          "churn": dict(network=NetworkConfig(churn="bernoulli", churn_p=0.7)),
          "delay": dict(network=NetworkConfig(delay="fixed", max_delay=1))}[case]
    s, st, probe = _setup(**kw)
    assert not s.dyn.row_shortcuts
    units = select_units(s.plan[3], "batch", "all", "all", 0, 3)
    assert ground_truth(s.dyn, st, units, 3, *probe).attrs["restricted"] is False
    with pytest.raises(ValueError, match="restrict=True"):
        ground_truth(s.dyn, st, units, 3, *probe, restrict=True)

    def refuse(*a, **k):
        raise AssertionError("a W^t shortcut ran")
    monkeypatch.setattr(estimate, "_exact_near", refuse)
    monkeypatch.setattr(estimate, "_exact_cones", refuse)
    estimate.exact(s.dyn, st, units, 3, *probe, path="cones")
