"""The robustness literature's attacks (ROBUST.md §1-2): per-edge messages (alie, ipm, dissensus) against
their formulas written out receiver by receiver, the adaptive orthogonal attack and attribution inflation,
the Byzantine correction of the gossip step (fast path bit-identical without it), the loop twin to 1e-10,
copies and gradients, and the manifest / CLI."""
from __future__ import annotations

import json
from statistics import NormalDist

import numpy as np
import pytest
import torch
from robust_setup import BAD, CNN, F64, MLP, MOM, N, Fixed, assert_same_state, honest, make, run_both

from dice_cli.attacks import Attack, alie_z, orthogonal_part
from dice_cli.config import OptimConfig
from dice_cli.engine import State
from dice_cli.errors import UserError

# 6 nodes, directed, unequal weights; node 4 hears both attackers 1 and 3, node 0 hears attacker 1 only,
# node 2 hears attacker 3, node 5 hears no attacker; attacker 3 hears attacker 1 (honest messages to it)
W6 = np.array([[.5, .3, 0, 0, 0, .2],
               [.2, .6, .2, 0, 0, 0],
               [0, 0, .4, .3, 0, .3],
               [0, .5, 0, .5, 0, 0],
               [.1, .2, .1, .3, .3, 0],
               [0, 0, .5, 0, .1, .4]])


def test_alie_z_is_baruchs_rule():
    # n = 16, m = 3: s = floor(9) - 3 = 6, z = Φ⁻¹(10/16)
    assert alie_z(16, 3) == pytest.approx(NormalDist().inv_cdf(10 / 16), abs=1e-15)
    assert alie_z(32, 4) == pytest.approx(NormalDist().inv_cdf((32 - 13) / 32), abs=1e-15)
    assert Attack("alie", [1], (0, 2), 16, 10, 0).z == 0.0           # s = 8: Φ⁻¹(1/2), the mean itself
    assert Attack("alie", [1], (0, 2), 16, 10, 0, z=10.0).z == 10.0
    with pytest.raises(UserError, match="attack.z"):
        alie_z(6, 4)


def _hand_messages(name, theta, half, W, bad, z=None, eps=None):
    """{(l, k): m_{l→k}} by the ROBUST.md formulas, one honest receiver at a time (numpy float64)."""
    out = {}
    for k in range(len(W)):
        byz = [l for l in bad if l != k and W[k, l] > 0]
        if k in bad or not byz:
            continue
        H = [k] + [j for j in range(len(W)) if j != k and j not in bad and W[k, j] > 0]
        X = half[H]
        mu = X.mean(0)
        if name == "alie":
            m = mu - z * (X.std(0, ddof=1) if len(H) > 1 else 0.0)
        elif name == "ipm":
            m = theta[k] - eps * (mu - theta[k])
        else:
            m = half[k] - eps * sum(W[k, j] * (half[j] - half[k]) for j in H) / sum(W[k, b] for b in byz)
        for l in byz:
            out[(l, k)] = m
    return out


@pytest.mark.parametrize("name,kw", [("alie", {}), ("alie", {"z": 1.7}), ("ipm", {}), ("ipm", {"epsilon": 2.0}),
                                     ("dissensus", {}), ("dissensus", {"epsilon": 0.3})])
def test_messages_follow_their_formulas_and_enter_gossip_as_a_correction(name, kw):
    dyn, _, state, atk, _ = make(name, schedule=Fixed(W6), attack_kw=kw)
    g = torch.Generator().manual_seed(5)
    theta = torch.randn(N, dyn.fm.num_params, generator=g, dtype=F64)
    delta = 0.1 * torch.randn(N, dyn.fm.num_params, generator=g, dtype=F64)
    half = theta + delta
    st = State(1, theta, {}, None)
    edges = dyn.messages(st, half)
    want = _hand_messages(name, theta.numpy(), half.numpy(), W6, BAD, atk.z, atk.epsilon)
    got = {(int(l), int(k)): m for l, k, m in zip(edges.sender, edges.receiver, edges.message)}
    assert sorted(got) == sorted(want) == [(1, 0), (1, 4), (3, 2), (3, 4)]  # attacker → honest edges only
    assert np.array_equal(edges.weight.numpy(), W6[edges.receiver.numpy(), edges.sender.numpy()])
    for key in want:
        np.testing.assert_allclose(got[key].numpy(), want[key], rtol=0, atol=1e-13)
    if name == "ipm" and not kw:
        assert atk.epsilon == 0.1
    if name == "dissensus" and not kw:
        assert atk.epsilon == 1.5
    # θ_k^{t+1} = Σ_l W_kl m_{l→k}; receivers without an attacking in-neighbour keep the plain product
    nxt = dyn.gossip(st, delta, {}, None)
    plain = torch.as_tensor(W6) @ half
    for k in range(N):
        m = sum(W6[k, l] * (want[(l, k)] if (l, k) in want else half[l].numpy()) for l in range(N))
        np.testing.assert_allclose(nxt.theta[k].numpy(), m, rtol=0, atol=1e-13)
    for k in (5, 1, 3):                                                      # no Byzantine message received
        assert torch.equal(nxt.theta[k], plain[k] + 0.0)


def test_fast_path_unchanged_without_messages():
    dyn, _, s0, _, _ = make("alie", span=(3, 5))
    ref, _, r0, _, _ = make("none")
    s, r = s0.clone(), r0.clone()
    for t in range(3):                                                        # outside the attack rounds
        s, _, _ = dyn.round(s)
        r, _, _ = ref.round(r)
        assert torch.equal(s.theta, r.theta) and s.gossip == {} and r.gossip == {}
    s, _, _ = dyn.round(s)
    r, _, _ = ref.round(r)
    assert not torch.equal(s.theta, r.theta)
    assert dyn.linear_gossip is False and ref.linear_gossip is True
    assert "attack=alie" in dyn.nonlinear_reason() and ref.nonlinear_reason() == ""


def test_alie_with_identical_honest_models_has_finite_gradient():
    """σ = 0 where the honest models agree: the message is μ there and its gradient is finite (no 0/0)."""
    dyn, _, _, atk, _ = make("alie", schedule=Fixed(W6))
    P = dyn.fm.num_params
    base = torch.randn(P, dtype=F64)
    half = base.expand(N, P).clone()
    half[:, : P // 2] += torch.randn(N, P // 2, dtype=F64)                   # half the coordinates differ
    half.requires_grad_(True)
    edges = dyn.messages(State(1, half.detach(), {}, None), half)
    (g,) = torch.autograd.grad(edges.message.sum(), half)
    assert torch.isfinite(g).all()
    same = edges.message[:, P // 2:]
    assert torch.allclose(same, base[P // 2:].expand_as(same), rtol=0, atol=1e-15)   # μ: σ = 0 there


def test_messages_on_a_copies_axis_equal_separate_systems():
    dyn, _, _, _, _ = make("dissensus", schedule=Fixed(W6))
    g = torch.Generator().manual_seed(2)
    theta = torch.randn(3, N, dyn.fm.num_params, generator=g, dtype=F64)
    half = theta + 0.1 * torch.randn(theta.shape, generator=g, dtype=F64)
    many = dyn.messages(State(1, theta, {}, None), half)
    for c in range(3):
        one = dyn.messages(State(1, theta[c], {}, None), half[c])
        assert torch.allclose(many.message[c], one.message, rtol=0, atol=1e-15)
        nxt = dyn.gossip(State(1, theta[c], {}, None), half[c] - theta[c], {}, None)
        both = dyn.gossip(State(1, theta, {}, None), half - theta, {}, None)
        assert torch.allclose(both.theta[c], nxt.theta, rtol=0, atol=1e-14)


# --------------------------------------------------------------------------- orthogonal and inflate


def test_orthogonal_adds_a_flip_direction_orthogonal_to_the_probe_gradient():
    s_ = 0.7
    dyn, fm, state, atk, _ = make("orthogonal", attack_kw={"strength": s_})
    stealth, _, _, _, _ = make("stealth", attack_kw={"strength": 1.0})
    ref, _, _, _, _ = make("none")
    st = state.clone()
    st, _, _ = ref.round(st)                                                 # round 1: attack active
    d = dyn.local_step(st.clone())[0]
    d0 = ref.local_step(st.clone())[0]
    flip = stealth.local_step(st.clone())[0]                                 # Δ + 1·(Δ_flip − Δ) = Δ_flip
    assert torch.equal(d[honest()], d0[honest()])
    xp, yp, _ = atk.probe
    for j in BAD:
        th = st.theta[j].clone().requires_grad_(True)
        fm.module.eval()
        (gj,) = torch.autograd.grad(torch.nn.functional.cross_entropy(fm.logits(th, {}, xp), yp), th)
        fm.module.train()
        dj = flip[j] - d0[j]
        ghat = gj / gj.norm()
        want = d0[j] + s_ * (dj - (dj @ ghat) * ghat)
        assert torch.allclose(d[j], want, rtol=0, atol=1e-14)
        added = d[j] - d0[j]
        assert abs(float(added @ gj)) < 1e-12 * float(added.norm() * gj.norm())   # first-order invisible
        assert float(added.norm()) > 0.1 * s_ * float(dj.norm())               # but not empty
    z = torch.zeros(2, 5, dtype=F64)
    assert torch.equal(orthogonal_part(torch.ones(2, 5, dtype=F64), z), torch.ones(2, 5, dtype=F64))


@pytest.mark.parametrize("shared", [True, False])
def test_inflate_trains_on_the_probe_set(shared):
    dyn, _, _, atk, _ = make("inflate", shared_probe=shared, span=(2, 4))
    ref, _, _, _, _ = make("none")
    xp, yp, _ = atk.probe
    for t in range(dyn.rounds):
        (x, y), (x0, y0) = dyn.batch(t), ref.batch(t)
        if not 2 <= t < 4:
            assert torch.equal(x, x0) and torch.equal(y, y0)
            continue
        assert torch.equal(x[honest()], x0[honest()]) and torch.equal(y[honest()], y0[honest()])
        for r, j in enumerate(BAD):
            pos = np.random.default_rng([11, 7, 6, t, j]).choice(7, size=6, replace=False)
            assert np.array_equal(atk.inflate_positions(t, 6)[r], pos)
            src_x, src_y = (xp, yp) if shared else (xp[j], yp[j])
            assert torch.equal(x[j], src_x[pos]) and torch.equal(y[j], src_y[pos])
        assert torch.equal(dyn._fast_batch(t)[0], x.reshape(N, 6, -1))        # the fast path sees the same


# --------------------------------------------------------------------------- the loop twin


@pytest.mark.parametrize("name,model,optim", [
    ("alie", MLP, OptimConfig()), ("alie", CNN, MOM), ("ipm", MLP, MOM), ("ipm", CNN, OptimConfig()),
    ("dissensus", MLP, OptimConfig()), ("dissensus", CNN, MOM), ("orthogonal", MLP, OptimConfig()),
    ("orthogonal", CNN, MOM), ("inflate", MLP, MOM), ("inflate", CNN, OptimConfig()),
])
def test_vmap_equals_loop_under_the_new_attacks(name, model, optim):
    dyn, fm, s0, _, _ = make(name, model=model, optim=optim, rounds=5, span=(1, 4))
    s, ref, worst, _ = run_both(dyn, fm, s0, model)
    assert worst < 1e-10
    assert_same_state(s, ref)
    plain, _, p0, _, _ = make("none", model=model, optim=optim, rounds=5)
    for _ in range(plain.rounds):
        p0, _, _ = plain.round(p0)
    assert (p0.theta - s.theta).abs().max() > 1e-6                            # the attack made a difference


def test_message_attack_rounds_are_differentiable_for_estimate():
    dyn, _, s0, _, _ = make("ipm", model=MLP, optim=MOM)
    s, _, _ = dyn.round(s0)
    w = torch.ones(N, 6, dtype=F64, requires_grad=True)
    nxt, _, _ = dyn.round(s, w, create_graph=True)
    fast, _, _ = dyn.round(s.clone())
    assert torch.allclose(nxt.theta, fast.theta, rtol=0, atol=1e-14)
    (g,) = torch.autograd.grad(nxt.theta[0].sum(), w)
    # receiver 0 gets an ipm message built from its own θ^t and its honest in-neighbours' half-steps
    assert g[0].abs().max() > 0 and torch.isfinite(g).all()


# --------------------------------------------------------------------------- manifest and CLI


def test_cli_records_message_attacks(dice, tmp_path):
    code, _, err = dice("train", "attack=alie", "nodes=8", "rounds=3", "batch_size=8", "progress=false",
                        "topology=exponential", f"out={tmp_path}/a")
    assert code == 0, err
    a = json.loads((tmp_path / "a/manifest.json").read_text())["attack"]
    assert a["name"] == "alie" and a["kind"] == "message" and a["z_rule"] == "baruch" and len(a["nodes"]) == 3
    assert a["z"] == pytest.approx(alie_z(8, 3))
    code, _, err = dice("train", "attack=dissensus", "nodes=8", "rounds=3", "batch_size=8", "progress=false",
                        f"out={tmp_path}/d")
    assert code == 0, err
    assert json.loads((tmp_path / "d/manifest.json").read_text())["attack"]["epsilon"] == 1.5
    code, _, err = dice("train", "attack=orthogonal", "nodes=8", "rounds=3", "batch_size=8", "progress=false",
                        f"out={tmp_path}/o")
    assert code == 0, err
    o = json.loads((tmp_path / "o/manifest.json").read_text())["attack"]
    assert o["kind"] == "update" and o["strength"] == 0.5 and o["probe"] == "shared probe set"


@pytest.mark.parametrize("args,needle", [
    (["attack=alie", "attack.count=5"], "attack.z"),
    (["attack=ipm", "engine=distributed"], "engine=distributed"),
    (["attack=ipm", "attack.epsilon=-1"], "attack.epsilon"),
])
def test_cli_bad_attack_inputs_exit_2(dice, tmp_path, args, needle):
    code, out, err = dice("train", *args, "nodes=8", "rounds=3", "batch_size=8", "progress=false",
                          f"out={tmp_path}/r")
    assert code == 2
    assert needle in out + err
    assert not (tmp_path / "r" / "checkpoints").exists()
