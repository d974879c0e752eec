"""Tests for dice_cli.graph: the paper's matrices, weight rules, schedules, files, describe and plots.

Convention under test: row k of W holds the weights receiver k puts on its senders (θ_k ← Σ_l W[k,l] θ_l).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from dice_cli.config import TOPOLOGIES, TopologyConfig
from dice_cli.errors import UserError
from dice_cli.graph import (MixingSchedule, build_schedule, describe, describe_schedule,
                            exponential_offsets, validate_mixing)
from dice_cli.plots import topology_plot

STATIC = ["ring", "exponential", "torus", "grid", "complete", "star", "erdos_renyi", "random_regular",
          "hypercube"]
UNDIRECTED = ["ring", "torus", "grid", "complete", "star", "erdos_renyi", "random_regular", "hypercube"]
RULES = ["auto", "metropolis", "uniform", "max_degree"]


def W_of(name, n=16, seed=0, **kw):
    return build_schedule(TopologyConfig(name=name, **kw), n, seed).at(0)


def assert_row_stochastic(W):
    assert W.dtype == np.float64
    assert (W >= 0).all()
    np.testing.assert_allclose(W.sum(axis=1), 1.0, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- the paper's matrices


def test_ring_is_one_third_on_self_and_neighbours():
    n = 16
    W = W_of("ring", n)
    expected = np.zeros((n, n))
    for i in range(n):
        for j in (i - 1, i, i + 1):
            expected[i, j % n] = 1 / 3
    np.testing.assert_array_equal(W, expected)


def test_ring_small_n():
    np.testing.assert_array_equal(W_of("ring", 1), [[1.0]])
    np.testing.assert_array_equal(W_of("ring", 2), np.full((2, 2), 0.5))
    np.testing.assert_allclose(W_of("ring", 3), np.full((3, 3), 1 / 3), rtol=0, atol=1e-15)


@pytest.mark.parametrize("n,offsets,w", [(16, [0, 1, 2, 4, 8], 0.2), (4, [0, 1, 2], 1 / 3)])
def test_exponential_is_the_papers_matrix(n, offsets, w):
    assert exponential_offsets(n) == offsets
    W = W_of("exponential", n)
    expected = np.zeros((n, n))
    for i in range(n):
        for o in offsets:
            expected[i, (i - o) % n] = w
    np.testing.assert_array_equal(W, expected)


def test_exponential_rows_are_receivers():
    n = 16
    W = W_of("exponential", n)
    for i in range(n):
        assert W[i, (i - 1) % n] > 0          # i receives from i-1 ...
        assert W[i, (i + 1) % n] == 0         # ... but not from i+1
    assert not np.allclose(W, W.T)
    d = describe(W)
    assert d["directed"] and not d["symmetric"]
    assert d["row_stochastic"] and d["column_stochastic"]   # circulant: doubly stochastic
    assert d["max_in_degree"] == d["max_out_degree"] == 4


def test_exponential_dedupes_offsets_mod_n():
    assert exponential_offsets(1) == [0]
    assert exponential_offsets(2) == [0, 1]
    assert exponential_offsets(3) == [0, 1, 2]
    assert exponential_offsets(5) == [0, 1, 2, 4]
    W = W_of("exponential", 3)
    np.testing.assert_allclose(W, np.full((3, 3), 1 / 3), rtol=0, atol=1e-15)


@pytest.mark.parametrize("rule", ["metropolis", "max_degree"])
def test_directed_rejects_undirected_rules(rule):
    for name in ("exponential", "one_peer_exponential"):
        with pytest.raises(UserError, match="auto, uniform"):
            build_schedule(TopologyConfig(name=name, weights=rule), 16, 0)


def test_complete_is_one_over_n():
    np.testing.assert_allclose(W_of("complete", 7), np.full((7, 7), 1 / 7), rtol=0, atol=1e-15)
    np.testing.assert_allclose(W_of("complete", 7, weights="metropolis"), np.full((7, 7), 1 / 7),
                               rtol=0, atol=1e-15)


# --------------------------------------------------------------------------- weight rules


@pytest.mark.parametrize("name,kw", [("star", {}), ("erdos_renyi", {"p": 0.2}), ("grid", {}),
                                     ("grid", {"rows": 3})])
def test_metropolis_is_doubly_stochastic_and_symmetric_on_irregular_graphs(name, kw):
    n = 12
    W = W_of(name, n, weights="metropolis", **kw)
    degrees = ((W > 0) & ~np.eye(n, dtype=bool)).sum(axis=1)
    assert len(set(degrees)) > 1                       # the graph really is irregular
    assert_row_stochastic(W)
    np.testing.assert_allclose(W.sum(axis=0), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(W, W.T, rtol=0, atol=0)
    np.testing.assert_array_equal(W_of(name, n, **kw), W)   # auto = metropolis here


def test_star_weight_values():
    n = 5
    W = W_of("star", n)                                  # MH: edges 1/(1+max(4,1)) = 1/5
    assert W[0, 0] == pytest.approx(1 / 5) and W[0, 3] == pytest.approx(1 / 5)
    assert W[3, 0] == pytest.approx(1 / 5) and W[3, 3] == pytest.approx(4 / 5) and W[3, 2] == 0
    U = W_of("star", n, weights="uniform")               # leaves: 1/2 self, 1/2 hub; hub 1/5 each
    np.testing.assert_allclose(U[0], np.full(n, 1 / 5))
    np.testing.assert_allclose(U[2], [0.5, 0, 0.5, 0, 0])
    assert not np.allclose(U, U.T)
    M = W_of("star", n, weights="max_degree")            # 1/(d_max+1) = 1/5 on edges
    np.testing.assert_allclose(M, W)


def test_max_degree_on_grid():
    W = W_of("grid", 9, weights="max_degree")            # 3x3, d_max = 4
    off = W[~np.eye(9, dtype=bool)]
    assert set(np.round(off[off > 0], 12)) == {0.2}
    assert W[0, 0] == pytest.approx(1 - 2 * 0.2)         # corner has 2 neighbours
    assert W[4, 4] == pytest.approx(0.2)                 # centre has 4


@pytest.mark.parametrize("name", STATIC)
@pytest.mark.parametrize("rule", RULES)
def test_every_static_topology_and_rule_is_row_stochastic(name, rule):
    cfg = TopologyConfig(name=name, weights=rule)
    if name == "exponential" and rule in ("metropolis", "max_degree"):
        with pytest.raises(UserError, match="directed"):
            build_schedule(cfg, 16, 3)
        return
    W = build_schedule(cfg, 16, 3).at(0)
    assert W.shape == (16, 16)
    assert_row_stochastic(W)
    assert describe(W)["strongly_connected"]
    if name in UNDIRECTED and rule != "uniform":
        np.testing.assert_allclose(W, W.T, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", ["one_peer_exponential", "random_matching"])
@pytest.mark.parametrize("rule", RULES)
def test_every_time_varying_topology_and_rule_is_row_stochastic(name, rule):
    if name == "one_peer_exponential" and rule in ("metropolis", "max_degree"):
        with pytest.raises(UserError, match="directed"):
            build_schedule(TopologyConfig(name=name, weights=rule), 16, 0)
        return
    for n in (1, 2, 7, 16):
        s = build_schedule(TopologyConfig(name=name, weights=rule), n, 0)
        assert s.time_varying and s.n == n
        for t in range(6):
            W = s.at(t)
            assert W.shape == (n, n)
            assert_row_stochastic(W)


def test_grid_and_torus_shapes():
    T = W_of("torus", 16)                                # 4x4 torus: every node has 4 neighbours
    assert describe(T)["max_in_degree"] == 4
    assert ((T > 0).sum(axis=1) == 5).all()
    G = W_of("grid", 16, weights="uniform")              # 4x4 grid: corner 0 hears 1 and 4
    assert set(np.flatnonzero(G[0])) == {0, 1, 4}
    G2 = W_of("grid", 12, rows=2)                        # 2x6: node 7 = (1, 1) hears 1, 6, 8
    assert set(np.flatnonzero(G2[7])) == {1, 6, 7, 8}
    R = W_of("torus", 7)                                 # prime: 1x7 torus = ring
    np.testing.assert_allclose(R, W_of("ring", 7), atol=1e-15)
    with pytest.raises(UserError, match="topology.rows=5 does not divide nodes=16"):
        W_of("grid", 16, rows=5)


def test_hypercube():
    W = W_of("hypercube", 8)
    for i in range(8):
        assert set(np.flatnonzero(W[i])) == {i, i ^ 1, i ^ 2, i ^ 4}
    np.testing.assert_array_equal(W_of("hypercube", 1), [[1.0]])
    with pytest.raises(UserError, match="power of two.*nodes=6.*nodes=4 or nodes=8"):
        W_of("hypercube", 6)


def test_random_graphs_are_seeded_and_connected():
    a = W_of("erdos_renyi", 20, seed=1, p=0.2)
    np.testing.assert_array_equal(a, W_of("erdos_renyi", 20, seed=1, p=0.2))
    assert not np.array_equal(a, W_of("erdos_renyi", 20, seed=2, p=0.2))
    # cfg.seed overrides the run seed
    cfg_seeded = TopologyConfig(name="erdos_renyi", p=0.2, seed=1)
    np.testing.assert_array_equal(build_schedule(cfg_seeded, 20, 99).at(0), a)
    r = W_of("random_regular", 10, seed=0, degree=3)
    assert (((r > 0) & ~np.eye(10, dtype=bool)).sum(axis=1) == 3).all()
    assert describe(r)["strongly_connected"]


def test_random_graph_errors():
    with pytest.raises(UserError, match="larger topology.p"):
        W_of("erdos_renyi", 60, p=0.001)
    with pytest.raises(UserError, match="even"):
        W_of("random_regular", 7, degree=3)
    with pytest.raises(UserError, match="degree=16 must be smaller than nodes=16"):
        W_of("random_regular", 16, degree=16)
    with pytest.raises(UserError, match="larger topology.degree"):
        W_of("random_regular", 10, degree=1)             # a perfect matching is never connected
    with pytest.raises(UserError, match="seed"):
        W_of("erdos_renyi", 10, seed=-1)


def test_unknown_name_and_bad_nodes():
    cfg = TopologyConfig()
    cfg.name = "moebius"                                 # bypass __post_init__
    with pytest.raises(UserError, match="moebius.*ring, exponential"):
        build_schedule(cfg, 8, 0)
    cfg = TopologyConfig()
    cfg.weights = "magic"
    with pytest.raises(UserError, match="magic.*metropolis"):
        build_schedule(cfg, 8, 0)
    with pytest.raises(UserError, match="nodes"):
        build_schedule(TopologyConfig(), 0, 0)
    assert set(TOPOLOGIES) == set(STATIC) | {"file", "one_peer_exponential", "random_matching"}


# --------------------------------------------------------------------------- time-varying and lazy


def test_one_peer_exponential_peers():
    n = 16
    s = build_schedule(TopologyConfig(name="one_peer_exponential"), n, 0)
    for t in range(10):
        W = s.at(t)
        peer_offset = 2 ** (t % 4)                       # τ = ⌊log2 15⌋ + 1 = 4
        for i in range(n):
            expected = np.zeros(n)
            expected[i] += 0.5
            expected[(i - peer_offset) % n] += 0.5
            np.testing.assert_array_equal(W[i], expected)
    np.testing.assert_array_equal(s.at(1), s.at(5))
    assert not np.array_equal(s.at(0), s.at(1))
    # n = 4: τ = 2, offsets 1, 2
    s4 = build_schedule(TopologyConfig(name="one_peer_exponential"), 4, 0)
    assert s4.at(0)[0, 3] == 0.5 and s4.at(1)[0, 2] == 0.5 and s4.at(2)[0, 3] == 0.5


def test_random_matching_is_reproducible_and_varies():
    n = 9
    s = build_schedule(TopologyConfig(name="random_matching"), n, 5)
    s2 = build_schedule(TopologyConfig(name="random_matching"), n, 5)
    other = build_schedule(TopologyConfig(name="random_matching"), n, 6)
    mats = [s.at(t) for t in range(8)]
    for t, W in enumerate(mats):
        np.testing.assert_array_equal(W, s2.at(t))
        np.testing.assert_array_equal(W, W.T)
        diag = np.diag(W)
        assert (diag == 1.0).sum() == 1 and (diag == 0.5).sum() == n - 1   # one unmatched node
        perm = np.random.default_rng([5, t]).permutation(n)
        assert W[perm[0], perm[1]] == 0.5 and W[perm[-1], perm[-1]] == 1.0
    assert len({W.tobytes() for W in mats}) > 1
    assert any(not np.array_equal(s.at(t), other.at(t)) for t in range(8))
    # cfg.seed overrides the run seed
    fixed = build_schedule(TopologyConfig(name="random_matching", seed=5), n, 123)
    np.testing.assert_array_equal(fixed.at(3), s.at(3))


def test_lazy_static_and_time_varying():
    n = 8
    for name in ("ring", "exponential", "star"):
        W = W_of(name, n)
        L = W_of(name, n, lazy=True)
        np.testing.assert_allclose(L, (np.eye(n) + W) / 2, rtol=0, atol=1e-15)
    s = build_schedule(TopologyConfig(name="random_matching"), n, 0)
    sl = build_schedule(TopologyConfig(name="random_matching", lazy=True), n, 0)
    for t in range(4):
        np.testing.assert_allclose(sl.at(t), (np.eye(n) + s.at(t)) / 2, rtol=0, atol=1e-15)
        assert_row_stochastic(sl.at(t))


def test_at_returns_a_copy_and_checks_t():
    s = build_schedule(TopologyConfig(name="ring"), 5, 0)
    W = s.at(0)
    W[:] = 0
    assert s.at(0)[0, 0] == pytest.approx(1 / 3)
    assert not s.time_varying and s.n == 5
    with pytest.raises(UserError, match="t=-1"):
        s.at(-1)


# --------------------------------------------------------------------------- save / load


def test_save_load_static(tmp_path):
    s = build_schedule(TopologyConfig(name="exponential"), 16, 0)
    s.save(tmp_path, rounds=10)
    assert (tmp_path / "mixing.npy").exists() and not (tmp_path / "mixing_schedule.npz").exists()
    np.testing.assert_array_equal(np.load(tmp_path / "mixing.npy"), s.at(0))
    loaded = MixingSchedule.load(tmp_path)
    assert not loaded.time_varying and loaded.n == 16
    np.testing.assert_array_equal(loaded.at(0), s.at(0))
    np.testing.assert_array_equal(loaded.at(1000), s.at(0))


@pytest.mark.parametrize("name", ["random_matching", "one_peer_exponential"])
def test_save_load_time_varying(tmp_path, name):
    n, rounds = 7, 12
    s = build_schedule(TopologyConfig(name=name, lazy=True), n, 3)
    s.save(tmp_path, rounds=rounds)
    with np.load(tmp_path / "mixing_schedule.npz") as z:
        for k in ("round", "row", "col"):
            assert z[k].dtype == np.int64
        assert z["weight"].dtype == np.float64
        assert set(z["round"]) == set(range(rounds))
    loaded = MixingSchedule.load(tmp_path)
    assert loaded.time_varying and loaded.n == n and loaded.rounds == rounds
    for t in range(rounds):
        np.testing.assert_array_equal(loaded.at(t), s.at(t))
    with pytest.raises(UserError, match=r"t=12.*\[0, 12\)"):
        loaded.at(rounds)
    # saving a static schedule afterwards replaces the time-varying file
    build_schedule(TopologyConfig(name="ring"), n, 0).save(tmp_path, rounds=rounds)
    assert not (tmp_path / "mixing_schedule.npz").exists()
    assert not MixingSchedule.load(tmp_path).time_varying


def test_load_missing_names_the_path(tmp_path):
    with pytest.raises(UserError, match="mixing.npy") as e:
        MixingSchedule.load(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)


def test_load_rejects_bad_saved_matrix(tmp_path):
    np.save(tmp_path / "mixing.npy", np.ones((3, 3)))
    with pytest.raises(UserError, match="not row-stochastic"):
        MixingSchedule.load(tmp_path)


# --------------------------------------------------------------------------- validation


def test_validate_mixing_names_bad_rows():
    W = np.full((4, 4), 0.25)
    W[1, 1] = 0.5
    W[3, 0] = 0.0
    with pytest.raises(UserError, match=r"row 1 sums to 1\.25.*row 3 sums to 0\.75") as e:
        validate_mixing(W, "mine")
    assert "mine" in str(e.value) and "row 0" not in str(e.value)
    assert "divide each row by its sum" in str(e.value)


def test_validate_mixing_negative_nan_shape_transposed():
    W = np.eye(3)
    W[2] = [1.5, -0.5, 0.0]
    with pytest.raises(UserError, match=r"negative.*row 2"):
        validate_mixing(W)
    W = np.eye(3)
    W[0, 0] = np.nan
    with pytest.raises(UserError, match=r"NaN.*1 row\(s\): 0"):
        validate_mixing(W)
    with pytest.raises(UserError, match=r"square.*\(2, 3\)"):
        validate_mixing(np.ones((2, 3)) / 3)
    C = np.array([[0.5, 1.0], [0.5, 0.0]])                   # column-stochastic
    with pytest.raises(UserError, match="transposed"):
        validate_mixing(C)
    validate_mixing(C.T)
    many = np.ones((30, 30))
    with pytest.raises(UserError, match=r"30 row\(s\).*and 20 more"):
        validate_mixing(many)


# --------------------------------------------------------------------------- file topology


def test_file_csv(tmp_path):
    W = W_of("exponential", 4)
    path = tmp_path / "w.csv"
    path.write_text("\n".join(",".join(repr(float(x)) for x in row) for row in W) + "\n")
    s = build_schedule(TopologyConfig(name="file", path=str(path)), 4, 0)
    assert not s.time_varying
    np.testing.assert_array_equal(s.at(0), W)
    sl = build_schedule(TopologyConfig(name="file", path=str(path), lazy=True), 4, 0)
    np.testing.assert_allclose(sl.at(0), (np.eye(4) + W) / 2)


def test_file_npy_static_and_time_varying(tmp_path):
    n = 6
    ring = W_of("ring", n)
    np.save(tmp_path / "w.npy", ring)
    s = build_schedule(TopologyConfig(name="file", path=str(tmp_path / "w.npy")), n, 0)
    np.testing.assert_array_equal(s.at(3), ring)
    stack = np.stack([ring, W_of("complete", n), np.eye(n)])
    np.save(tmp_path / "ws.npy", stack)
    tv = build_schedule(TopologyConfig(name="file", path=str(tmp_path / "ws.npy")), n, 0)
    assert tv.time_varying
    for t in range(7):
        np.testing.assert_array_equal(tv.at(t), stack[t % 3])


def test_file_errors(tmp_path):
    np.save(tmp_path / "w.npy", W_of("ring", 5))
    with pytest.raises(UserError, match=r"w\.npy has shape \(5, 5\) but nodes=8"):
        build_schedule(TopologyConfig(name="file", path=str(tmp_path / "w.npy")), 8, 0)
    with pytest.raises(UserError, match="missing.csv"):
        build_schedule(TopologyConfig(name="file", path=str(tmp_path / "missing.csv")), 5, 0)
    (tmp_path / "bad.csv").write_text("0.5,0.5\n0.3,0.3\n")
    with pytest.raises(UserError, match=r"bad\.csv.*row 1 sums to 0\.6"):
        build_schedule(TopologyConfig(name="file", path=str(tmp_path / "bad.csv")), 2, 0)
    (tmp_path / "text.csv").write_text("a,b\n1,0\n")
    with pytest.raises(UserError, match="comma-separated"):
        build_schedule(TopologyConfig(name="file", path=str(tmp_path / "text.csv")), 2, 0)
    stack = np.stack([np.eye(3), np.ones((3, 3))])
    np.save(tmp_path / "ws.npy", stack)
    with pytest.raises(UserError, match=r"matrix \[1\]"):
        build_schedule(TopologyConfig(name="file", path=str(tmp_path / "ws.npy")), 3, 0)
    with pytest.raises(UserError, match="weights in the file"):
        build_schedule(TopologyConfig(name="file", path=str(tmp_path / "w.npy"), weights="uniform"), 5, 0)


# --------------------------------------------------------------------------- describe / plot


def test_describe_ring_spectral_gap():
    d = describe(W_of("ring", 16))
    assert d["spectral_gap"] == pytest.approx(1 - (1 + 2 * np.cos(2 * np.pi / 16)) / 3, abs=1e-12)
    assert d == {**d, "nodes": 16, "edges": 32, "self_loops": 16, "directed": False,
                 "row_stochastic": True, "column_stochastic": True, "symmetric": True,
                 "max_in_degree": 2, "max_out_degree": 2}
    json.dumps(d)


def test_describe_degrees_and_disconnected():
    W = W_of("star", 6, weights="uniform")
    d = describe(W)
    assert d["max_in_degree"] == 5 and d["max_out_degree"] == 5
    assert d["row_stochastic"] and not d["column_stochastic"] and not d["symmetric"]
    assert not d["directed"]
    d = describe(np.eye(4))
    assert d["spectral_gap"] == 0.0 and d["edges"] == 0 and not d["strongly_connected"]
    assert describe(W_of("complete", 5))["spectral_gap"] == pytest.approx(1.0)
    assert describe(np.array([[1.0]]))["spectral_gap"] == 1.0


def test_describe_schedule():
    s = build_schedule(TopologyConfig(name="ring"), 16, 0)
    d = describe_schedule(s, 50)
    assert d["spectral_gap"] == pytest.approx(describe(s.at(0))["spectral_gap"]) and not d["time_varying"]
    tv = build_schedule(TopologyConfig(name="one_peer_exponential"), 16, 0)
    d = describe_schedule(tv, 8)
    assert d["time_varying"] and d["every_round_row_stochastic"] and d["mean_rounds"] == 8
    mean = sum(tv.at(t) for t in range(8)) / 8                     # 1/2 self + 1/8 on offsets 1,2,4,8
    assert d["mean_spectral_gap"] == pytest.approx(describe(mean)["spectral_gap"])
    assert d["spectral_gap"] == pytest.approx(describe(tv.at(0))["spectral_gap"])
    assert describe_schedule(tv, 500)["mean_rounds"] == 100
    json.dumps(d)


def test_plot_topology_writes_png(tmp_path):
    for name, n in (("exponential", 16), ("ring", 6), ("complete", 1), ("erdos_renyi", 80)):
        path = tmp_path / f"{name}.png"
        topology_plot(W_of(name, n), path, title=name, node_colors={0: "red"})
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_strong_connectivity_twin_of_scipy():
    """describe()'s numpy breadth-first check against scipy's strongly connected components."""
    from scipy.sparse.csgraph import connected_components

    from dice_cli.graph import _strongly_connected

    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 5, 8, 20):
        for p in (0.05, 0.2, 0.5):
            for _ in range(20):
                a = (rng.random((n, n)) < p) & ~np.eye(n, dtype=bool)
                want = connected_components(a.astype(np.int8), directed=True, connection="strong")[0] == 1
                assert _strongly_connected(a) == want
