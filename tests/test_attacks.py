"""Attacks (dice_cli/attacks.py): each one changes exactly the configured nodes and rounds, as specified; the
vmap engine equals its loop twin under attack; the manifest records the ground truth; bad inputs exit 2;
and proximal influence ranks a label-flipping node first."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from conftest import partitioned_problem
import torch

from dice_cli.attacks import Attack, build_attack, parse_rounds, select_nodes
from dice_cli.config import AttackConfig, DetectConfig, ModelConfig, OptimConfig, TopologyConfig, TrainConfig
from dice_cli.engine import Dynamics, Mixing, State
from dice_cli.errors import UserError
from dice_cli.graph import build_schedule
from dice_cli.models import init_nodes
from dice_cli.reference import LoopEngine

CPU = torch.device("cpu")
F64 = torch.float64
N, PER, B, C, SHAPE = 5, 24, 6, 10, (1, 8, 8)
BAD = [1, 3]
MLP = ModelConfig(name="mlp", hidden=[8])
CNN = ModelConfig(name="cnn", channels=[3], batchnorm=True)
MOM = OptimConfig(momentum=0.9, weight_decay=1e-3)


def problem(rounds: int = 6):
    """Disjoint node partitions (node k owns k*PER … (k+1)*PER−1) and a plan drawn from them."""
    x, y, parts, plan, _ = partitioned_problem(N, PER, B, C, SHAPE, rounds, F64)
    return x, y, parts, plan


def make(name="none", model=MLP, optim=OptimConfig(), rounds=6, span=(1, 3), y_override=None, **kw):
    x, y, parts, plan = problem(rounds)
    sched = build_schedule(TopologyConfig(name="exponential"), N, seed=3)
    fm, theta, bufs = init_nodes(model, SHAPE, C, N, 0, F64, CPU)
    attack = None if name == "none" else Attack(name, BAD, span, N, C, 11, y.numpy(), parts, **kw)
    dyn = Dynamics(fm, x, y if y_override is None else y_override, plan, Mixing(sched, CPU, F64), optim, 0.1,
                   rounds, attack=attack)
    return dyn, fm, State(0, theta, bufs, None), attack


def honest_rows():
    return [k for k in range(N) if k not in BAD]


def states_along(optim, model=MLP, rounds=4):
    """Honest trajectory's states at rounds 0..rounds-1 (momentum populated after round 0)."""
    dyn, _, s, _ = make("none", model, optim, rounds=rounds)
    out = []
    for _ in range(rounds):
        out.append(s.clone())
        s, _, _ = dyn.round(s)
    return out


# --------------------------------------------------------------------------- selection and rounds


def test_select_nodes_rules():
    assert select_nodes(AttackConfig(name="none", count=3), 8, 0) == []
    assert select_nodes(AttackConfig(name="sign_flip", nodes=[5, 2, 5]), 8, 0) == [2, 5]
    picked = select_nodes(AttackConfig(name="sign_flip", count=3), 8, 4)
    assert len(picked) == 3 and picked == sorted(picked) and all(0 <= k < 8 for k in picked)
    rng = np.random.default_rng([4, 7])
    assert picked == sorted(int(k) for k in rng.choice(8, size=3, replace=False))
    assert picked == select_nodes(AttackConfig(name="scale", count=3), 8, 4)       # seeded, repeatable
    assert len(select_nodes(AttackConfig(name="scale", fraction=0.25), 8, 0)) == 2
    assert len(select_nodes(AttackConfig(name="scale", fraction=0.25), 6, 0)) == 2   # 1.5 rounds up
    # attack.seed overrides the run seed
    a = build_attack(AttackConfig(name="scale", count=3, seed=9), 8, 10, 0, C)
    b = build_attack(AttackConfig(name="scale", count=3), 8, 10, 9, C)
    assert a.nodes == b.nodes and a.seed == b.seed == 9
    assert build_attack(AttackConfig(), 8, 10, 0, C) is None
    with pytest.raises(UserError, match=r"\[99\].*0\.\.7"):
        select_nodes(AttackConfig(name="scale", nodes=[1, 99]), 8, 0)
    with pytest.raises(UserError, match="attack.count=9"):
        select_nodes(AttackConfig(name="scale", count=9), 8, 0)
    with pytest.raises(UserError, match=r"attack=label_flip selects no node: set attack.nodes=\[..\], "
                                        r"attack.count or attack.fraction"):
        select_nodes(AttackConfig(name="label_flip", count=0), 8, 0)
    with pytest.raises(UserError, match="selects no node"):
        select_nodes(AttackConfig(name="label_flip"), 8, 0)                          # fraction 0


def test_parse_rounds():
    assert parse_rounds("all", 10) == (0, 10)
    assert parse_rounds("2:5", 10) == (2, 5)
    assert parse_rounds(":4", 10) == (0, 4)
    assert parse_rounds("7:", 10) == (7, 10)
    assert parse_rounds([3, 10], 10) == (3, 10)
    for bad in ["5:2", "3:3", "0:11", "-1:4", "x", "1:2:3", "", 4, None, [1]]:
        with pytest.raises(UserError, match=r"attack.rounds.*0\.\.10"):
            parse_rounds(bad, 10)


# --------------------------------------------------------------------------- update attacks


@pytest.mark.parametrize("model,optim", [(MLP, OptimConfig()), (CNN, MOM)], ids=["mlp_sgd_fast", "cnn_mom"])
@pytest.mark.parametrize("name", ["sign_flip", "scale", "free_rider", "gaussian", "stealth"])
def test_update_attack_changes_only_attackers_at_attack_rounds(name, model, optim):
    lam, s_ = 2.5, 0.3
    dyn, _, _, atk = make(name, model, optim, scale=lam, strength=s_)
    ref, _, _, _ = make("none", model, optim)
    x, y, _, _ = problem()
    flip, _, _, _ = make("none", model, optim, y_override=(y + 1) % C)       # Δ_flip from flipped labels
    for t, st in enumerate(states_along(optim, model)):
        d, mom, bufs, losses = dyn.local_step(st.clone())
        d0, mom0, bufs0, losses0 = ref.local_step(st.clone())
        assert torch.equal(losses, losses0)
        if mom0 is not None:
            assert torch.equal(mom, mom0)                                      # momentum stays honest
        for k in bufs0:
            assert torch.equal(bufs[k], bufs0[k])
        if not 1 <= t < 3:
            assert torch.equal(d, d0)                                          # non-attack round: identical
            continue
        h = honest_rows()
        assert torch.equal(d[h], d0[h])                                        # honest nodes: identical
        a = d[BAD]
        a0 = d0[BAD]
        assert not torch.equal(a, a0)
        if name == "sign_flip":
            assert torch.allclose(a, -lam * a0, rtol=0, atol=1e-15)
        elif name == "scale":
            assert torch.allclose(a, lam * a0, rtol=0, atol=1e-15)
        elif name == "free_rider":
            assert (a == 0).all()
        elif name == "gaussian":
            assert torch.allclose(a.norm(dim=-1), a0.norm(dim=-1), rtol=1e-12, atol=0)
            cos = (a * a0).sum(-1) / (a.norm(dim=-1) * a0.norm(dim=-1))
            assert cos.abs().max() < 0.5                                       # a random direction
            assert torch.equal(dyn.local_step(st.clone())[0], d)               # replays exactly
        elif name == "stealth":
            df = flip.local_step(st.clone())[0][BAD]
            assert torch.allclose(a, a0 + s_ * (df - a0), rtol=0, atol=1e-14)
        # the attacker keeps what it sends: θ^{t+1} = W (θ^t + Δ_sent)
        nxt, dr, _ = dyn.round(st.clone())
        assert torch.equal(dr, d)
        assert torch.allclose(nxt.theta, dyn.mixing.apply(t, st.theta + d), rtol=0, atol=1e-14)


def test_gaussian_directions_differ_by_node_and_round():
    dyn, _, _, atk = make("gaussian", span=(0, 6))
    z1 = atk.gaussian_directions(1, 50, F64, CPU)
    z2 = atk.gaussian_directions(2, 50, F64, CPU)
    assert torch.allclose(z1.norm(dim=-1), torch.ones(2, dtype=F64))
    assert not torch.equal(z1[0], z1[1]) and not torch.equal(z1, z2)
    assert torch.equal(Attack("gaussian", BAD, (0, 6), N, C, 11).gaussian_directions(1, 50, F64, CPU), z1)


def test_update_attacks_are_differentiable_and_work_on_copies():
    """dice estimate differentiates Δ(w) with create_graph; dice gt advances [C, n, P] copies."""
    for optim in (OptimConfig(), MOM):
        st = states_along(optim)[1]
        for name in ["sign_flip", "stealth", "gaussian", "free_rider"]:
            dyn, _, _, _ = make(name, optim=optim)
            ref, _, _, _ = make("none", optim=optim)
            d_fast = dyn.local_step(st.clone())[0]
            w = torch.ones(N, B, dtype=F64, requires_grad=True)
            d, _, _, _ = dyn.local_step(st.clone(), w, create_graph=True)
            assert torch.allclose(d, d_fast, rtol=0, atol=1e-14)              # graph path = fast path
            d0, _, _, _ = ref.local_step(st.clone(), w, create_graph=True)
            v = torch.randn(N, d.shape[-1], dtype=F64, generator=torch.Generator().manual_seed(1))
            (g,) = torch.autograd.grad((d * v).sum(), w, retain_graph=True)
            (g0,) = torch.autograd.grad((d0 * v).sum(), w)
            h = honest_rows()
            assert torch.allclose(g[h], g0[h], rtol=0, atol=1e-14)
            if name == "sign_flip":
                assert torch.allclose(g[BAD], -g0[BAD], rtol=0, atol=1e-14)
            elif name == "free_rider":
                assert (g[BAD] == 0).all()
            else:
                assert g[BAD].abs().max() > 0 and not torch.allclose(g[BAD], g0[BAD])
            # copies axis: 3 copies with different unit weights equal 3 separate systems
            wc = torch.ones(3, N, B, dtype=F64)
            wc[1, 1, 0] = 0.0
            wc[2, 3, :] = 0.0
            cop = State(st.round, st.theta.expand(3, -1, -1).clone(),
                        {k: v.expand(3, *v.shape).clone() for k, v in st.buffers.items()},
                        None if st.momentum is None else st.momentum.expand(3, -1, -1).clone())
            dc = dyn.local_step(cop, wc)[0]
            for c in range(3):
                assert torch.allclose(dc[c], dyn.local_step(st.clone(), wc[c])[0], rtol=0, atol=1e-14)


# --------------------------------------------------------------------------- data attacks


@pytest.mark.parametrize("mapping", ["shift", "random"])
@pytest.mark.parametrize("ff", [1.0, 0.5, 0.25])
def test_label_flip_changes_exactly_flip_fraction_of_attacker_samples(ff, mapping):
    x, y, parts, _ = problem()
    atk = Attack("label_flip", BAD, (1, 3), N, C, 11, y.numpy(), parts, flip_fraction=ff, mapping=mapping)
    yn = y.numpy()
    changed = np.flatnonzero(atk.relabel != yn)
    perm = atk.label_map
    assert sorted(perm.tolist()) == list(range(C))
    if mapping == "shift":
        assert perm.tolist() == [(c + 1) % C for c in range(C)]
    else:
        assert perm.tolist() == np.random.default_rng([11, 7, 2]).permutation(C).tolist()
    for j in range(N):
        hit = atk.hits.get(j, np.array([], dtype=np.int64))
        if j not in BAD:
            assert len(hit) == 0 and not np.isin(changed, parts[j]).any()       # honest labels untouched
            continue
        assert len(hit) == math.floor(ff * PER + 0.5) and np.isin(hit, parts[j]).all()
        assert len(np.unique(hit)) == len(hit)
        assert (atk.relabel[hit] == perm[yn[hit]]).all()
        rest = np.setdiff1d(parts[j], hit)
        assert (atk.relabel[rest] == yn[rest]).all()
        if mapping == "shift":                                                 # every hit label changes
            assert np.isin(changed, parts[j]).sum() == len(hit)
    # fixed per run: rebuilding gives the same subset
    again = Attack("label_flip", BAD, (1, 3), N, C, 11, yn, parts, flip_fraction=ff, mapping=mapping)
    assert all(np.array_equal(atk.hits[j], again.hits[j]) for j in BAD)


def test_label_flip_batches_only_at_attack_rounds():
    dyn, _, _, atk = make("label_flip", flip_fraction=0.5)
    ref, _, _, _ = make("none")
    for t in range(dyn.rounds):
        (x, y), (x0, y0) = dyn.batch(t), ref.batch(t)
        assert torch.equal(x, x0)
        if not 1 <= t < 3:
            assert torch.equal(y, y0)
            continue
        h = honest_rows()
        assert torch.equal(y[h], y0[h])
        idx = dyn.plan[t]
        for r, j in enumerate(BAD):
            hit = torch.as_tensor(np.isin(idx[j].numpy(), atk.hits[j]))
            assert torch.equal(y[j][hit], (y0[j][hit] + 1) % C)
            assert torch.equal(y[j][~hit], y0[j][~hit])
    # the fast path sees the same batches
    xf, yf = dyn._fast_batch(1)
    assert torch.equal(yf, dyn.batch(1)[1])


def test_label_noise_fixed_seeded_random_labels():
    x, y, parts, _ = problem()
    atk = Attack("label_noise", BAD, (0, 6), N, C, 11, y.numpy(), parts, flip_fraction=0.5)
    yn = y.numpy()
    for j in BAD:
        hit = atk.hits[j]
        assert len(hit) == PER // 2 and np.isin(hit, parts[j]).all()
        rest = np.setdiff1d(parts[j], hit)
        assert (atk.relabel[rest] == yn[rest]).all()
        expect = np.random.default_rng([11, 7, 3, j]).integers(0, C, size=len(hit))
        assert (atk.relabel[hit] == expect).all()
    for j in honest_rows():
        assert (atk.relabel[parts[j]] == yn[parts[j]]).all()
    assert (atk.relabel != yn).sum() >= 0.6 * len(BAD) * PER // 2          # most drawn labels differ


def test_feature_noise_std_rows_rounds_and_replay():
    sigma = 3.0
    dyn, _, _, _ = make("feature_noise", sigma=sigma, span=(2, 5))
    ref, _, _, _ = make("none")
    again, _, _, _ = make("feature_noise", sigma=sigma, span=(2, 5))          # a replay: a fresh object
    noise = []
    for t in range(dyn.rounds):
        (x, y), (x0, y0) = dyn.batch(t), ref.batch(t)
        assert torch.equal(y, y0)
        if not 2 <= t < 5:
            assert torch.equal(x, x0)
            continue
        assert torch.equal(x[honest_rows()], x0[honest_rows()])
        assert torch.equal(x, again.batch(t)[0])                               # replay-exact
        assert torch.equal(dyn._fast_batch(t)[0], x.reshape(N, B, -1))         # fast path: same batch
        noise.append((x - x0)[BAD])
    assert not torch.equal(noise[0], noise[1])                                 # fresh every round
    allz = torch.cat([z.reshape(-1) for z in noise])
    assert allz.numel() == 3 * 2 * B * 64
    assert abs(float(allz.std()) / sigma - 1) < 0.06 and abs(float(allz.mean())) < 0.1 * sigma


@pytest.mark.parametrize("name", ["label_flip", "label_noise", "feature_noise"])
def test_data_attack_changes_only_attackers_updates(name):
    dyn, _, _, _ = make(name, sigma=1.0)
    ref, _, _, _ = make("none")
    for t, st in enumerate(states_along(OptimConfig())):
        d = dyn.local_step(st.clone())[0]
        d0 = ref.local_step(st.clone())[0]
        if not 1 <= t < 3:
            assert torch.equal(d, d0)
            continue
        assert torch.equal(d[honest_rows()], d0[honest_rows()])
        assert all(not torch.equal(d[j], d0[j]) for j in BAD)


# --------------------------------------------------------------------------- the loop twin


@pytest.mark.parametrize("name,model,optim", [
    ("label_flip", MLP, OptimConfig()), ("sign_flip", MLP, OptimConfig()), ("label_flip", CNN, MOM),
    ("sign_flip", CNN, MOM), ("feature_noise", MLP, MOM), ("label_noise", MLP, OptimConfig()),
    ("scale", MLP, MOM), ("gaussian", MLP, OptimConfig()), ("free_rider", CNN, MOM), ("stealth", MLP, MOM),
    ("stealth", CNN, OptimConfig()),
])
def test_vmap_equals_loop_under_attack(name, model, optim):
    dyn, fm, s0, _ = make(name, model, optim, rounds=5, span=(1, 4), sigma=2.0, scale=3.0, strength=0.5,
                          flip_fraction=0.75)
    loop = LoopEngine(model, fm, SHAPE, C, dyn, s0.clone())
    s = s0.clone()
    for _ in range(dyn.rounds):
        s, delta, losses = dyn.round(s)
        l2, d2 = loop.round()
        assert (losses - l2).abs().max() < 1e-12
        assert (delta - d2).abs().max() < 1e-10
    ref = loop.state()
    assert (s.theta - ref.theta).abs().max() < 1e-10
    for k in s.buffers:
        assert (s.buffers[k].double() - ref.buffers[k].double()).abs().max() < 1e-10
    if optim.momentum:
        assert (s.momentum - ref.momentum).abs().max() < 1e-10
    # and the attack made a difference
    plain, _, p0, _ = make("none", model, optim, rounds=5)
    for _ in range(plain.rounds):
        p0, _, _ = plain.round(p0)
    assert (p0.theta - s.theta).abs().max() > 1e-6


# --------------------------------------------------------------------------- runs, manifest, CLI


def small_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(nodes=6, rounds=4, batch_size=8, dtype="float64", device="cpu", progress=False,
                data_dir=str(tmp_path / "data"), out=str(tmp_path / "run"))
    base.update(kw)
    return TrainConfig(**base)


def test_train_records_attack_and_replays_it(tmp_path):
    from dice_cli.run import RunDir
    from dice_cli.simulation import build_setup
    from dice_cli.training import train

    cfg = small_cfg(tmp_path, attack=AttackConfig(name="label_flip", count=2))
    out = train(cfg, tmp_path / "run", dataclasses.asdict(cfg))
    m = json.loads((out / "manifest.json").read_text())
    a = m["attack"]
    assert a["name"] == "label_flip" and a["rounds"] == [0, 4] and a["flip_fraction"] == 1.0
    assert a["mapping"] == "shift" and a["seed"] == 0
    assert a["nodes"] == select_nodes(cfg.attack, 6, 0) and len(a["nodes"]) == 2
    # every replay (gt / estimate / detect call build_setup) re-applies the attack: round 2 from the
    # checkpoint reproduces the recorded round-3 state and round-2 update exactly
    setup = build_setup(cfg)
    assert setup.attack is not None and setup.dyn.attack is setup.attack
    rd = RunDir(out, "train")
    p2, p3 = rd.load_checkpoint(2), rd.load_checkpoint(3)
    st = State.from_payload(p2, CPU, F64)
    nxt, delta, _ = setup.dyn.round(st)
    assert torch.equal(nxt.theta, p3["theta"]) and torch.equal(delta, p2["delta"])
    # without the attack the replay would differ
    clean = build_setup(dataclasses.replace(cfg, attack=AttackConfig()))
    assert clean.attack is None and clean.dyn.attack is None
    assert not torch.equal(clean.dyn.round(st)[0].theta, p3["theta"])


def test_train_without_attack_records_null(tmp_path):
    from dice_cli.training import train

    cfg = small_cfg(tmp_path, rounds=2)
    out = train(cfg, tmp_path / "run", dataclasses.asdict(cfg))
    m = json.loads((out / "manifest.json").read_text())
    assert "attack" in m and m["attack"] is None


def test_cli_records_sign_flip(dice, tmp_path):
    code, out, err = dice("train", "attack=sign_flip", "nodes=6", "rounds=4", "batch_size=8", "progress=false",
                          f"out={tmp_path}/r")
    assert code == 0, err
    a = json.loads((tmp_path / "r" / "manifest.json").read_text())["attack"]
    assert a["name"] == "sign_flip" and a["scale"] == 1.0 and a["rounds"] == [0, 4]
    assert len(a["nodes"]) == 3 and all(0 <= k < 6 for k in a["nodes"])


@pytest.mark.parametrize("args,key", [
    (["attack=sign_flip", "attack.nodes=[1,99]"], "attack.nodes"),
    (["attack=label_flip", "attack.fraction=1.5"], "attack.fraction"),
    (["attack=sign_flip", "attack.rounds='5:2'"], "attack.rounds"),
    (["attack=label_flip", "attack.count=0"], "attack.count"),
    (["attack=scale", "attack.count=7"], "attack.count"),
])
def test_cli_bad_attack_inputs_exit_2(dice, tmp_path, args, key):
    code, out, err = dice("train", *args, "nodes=6", "rounds=4", "batch_size=8", "progress=false",
                          f"out={tmp_path}/r")
    assert code == 2
    assert key in out + err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_detect_ranks_label_flipper_first(tmp_path):
    from dice_cli.detect import run_detect
    from dice_cli.training import train

    cfg = small_cfg(tmp_path, nodes=8, rounds=60, lr=0.1, topology=TopologyConfig(name="exponential"),
                    attack=AttackConfig(name="label_flip", count=1))
    run = train(cfg, tmp_path / "run", dataclasses.asdict(cfg))
    bad = json.loads((run / "manifest.json").read_text())["attack"]["nodes"]
    assert len(bad) == 1
    dcfg = DetectConfig(run=str(run), window=20, device="cpu", progress=False)
    out = run_detect(dcfg, None, dataclasses.asdict(dcfg))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["anomalous"] == bad
    assert summary["roc_auc"] == 1.0
    assert bad[0] in summary["flagged"]
