"""dice contrib's mathematics on tiny float64 problems: exact Shapley (copies axis, closed form) = a naive
enumeration (one coalition per training, the permutation definition), efficiency, symmetry, the null player,
TMC Shapley against exact within its error, LOO by direct retraining and = the gt value table, and the
accounting of a hand-made matrix (given, received, ratio, free riders, Gini, Lorenz)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from conftest import partitioned_problem
from dice_cli.config import ModelConfig, OptimConfig, TopologyConfig
from dice_cli.contrib import accounting, attack_auc, dice_values, gini, lorenz, node_matrix, ranks, threshold
from dice_cli.engine import Dynamics, Mixing, State
from dice_cli.graph import build_schedule
from dice_cli.influence.retrain import gt_values
from dice_cli.influence.run_units import select_run_units
from dice_cli.models import init_nodes
from dice_cli.replay import rollout
from dice_cli.shapley import (CoalitionGame, all_coalitions, exact_shapley, exact_values, loo_values, mask_key,
                              mc_values, shapley_weights)

CPU, DT = torch.device("cpu"), torch.float64
MLP = ModelConfig(name="mlp", hidden=[6])


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class World:
    """n nodes, node k owns samples 12k … 12k+11, batches of 4; optionally node pairs with identical data
    (``twins``: node b gets node a's samples and batches) and a shared initialisation."""

    def __init__(self, n=4, T=6, topology="exponential", optim=OptimConfig(momentum=0.5, weight_decay=1e-2),
                 model=MLP, twins=(), lr=0.2, dyn_class=Dynamics):
        x, y, self.parts, plan, g = partitioned_problem(n, 12, 4, 3, (1, 4, 4), T, DT)
        for a, b in twins:
            plan[:, b] = plan[:, a]
            self.parts[b] = self.parts[a]
        self.fm, theta, bufs = init_nodes(model, (1, 4, 4), 3, n, 0, DT, CPU)
        self.dyn = dyn_class(self.fm, x, y, plan, Mixing(build_schedule(TopologyConfig(name=topology), n, 0), CPU, DT),
                             optim, lr, T, attack=None)
        self.s0 = State(0, theta, bufs, None)
        self.probe = (torch.randn(9, 1, 4, 4, generator=g, dtype=DT), torch.randint(0, 3, (9,), generator=g), True)
        self.q = torch.linspace(0.5, 1.5, n, dtype=DT)
        self.plan = plan.numpy()
        self.T, self.n = T, n

    def game(self, player="data", honest=None, chunk=7, q=None):
        return CoalitionGame(self.dyn, self.s0, self.T, player, self.probe, self.q if q is None else q, self.plan,
                             self.parts, honest=honest, chunk=chunk)

    def naive_utility(self, s, player, q=None):
        """U(S) by one plain training without a copies axis: w rows of nodes outside S at 0 (data), or those
        nodes offline (participant)."""
        s = np.asarray(s, dtype=bool)
        B = self.dyn.batch_size
        if player == "data":
            w = torch.ones(self.n, B, dtype=DT)
            w[~torch.as_tensor(s)] = 0.0
            state = rollout(self.dyn, self.s0, self.T, weights=lambda t: w)
        else:
            a = torch.as_tensor(s, dtype=DT)
            state = rollout(self.dyn, self.s0, self.T, online=lambda t: a)
        L = self.dyn.probe_losses(state.theta, state.buffers, *self.probe)[0]
        return -float(((self.q if q is None else q) * L).sum())


def naive_shapley(n, U):
    """φ_j = (1/n!) Σ_π [U(pred_π(j) ∪ {j}) − U(pred_π(j))] over all n! orderings; U: mask -> utility."""
    phi = np.zeros(n)
    for perm in itertools.permutations(range(n)):
        m = 0
        for j in perm:
            phi[j] += U[m | (1 << j)] - U[m]
            m |= 1 << j
    return phi / math.factorial(n)


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


# ---------------------------------------------------------------------------------------------- formula
def test_closed_form_equals_permutation_definition_on_random_games():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 5, 7):
        U = rng.normal(size=2 ** n)
        phi = exact_shapley(U)
        assert rel(phi, naive_shapley(n, dict(enumerate(U)))) < 1e-12
        assert abs(phi.sum() - (U[-1] - U[0])) < 1e-12
    assert np.isclose(shapley_weights(4) @ [math.comb(3, s) for s in range(4)], 1.0)
    S = all_coalitions(3)
    assert S.shape == (8, 3) and [mask_key(s) for s in S] == list(range(8))
    assert mask_key(np.ones(70, dtype=bool)) == 2 ** 70 - 1


# ---------------------------------------------------------------------------------------------- games
@pytest.mark.parametrize("n, player", [(4, "data"), (5, "participant"), (6, "data")])
def test_exact_shapley_equals_naive_enumeration(n, player):
    w = World(n=n)
    game = w.game(player)
    res = exact_values(game)
    U = {m: w.naive_utility(s, player) for m, s in enumerate(all_coalitions(n))}
    naive = naive_shapley(n, U)
    assert np.abs(naive).max() > 1e-3
    assert rel(res["values"], naive) < 1e-10
    assert game.trained == 2 ** n and game.passes == -(-2 ** n // 7)
    # efficiency: the values share out exactly U(all) − U(∅)
    assert abs(res["values"].sum() - (res["utility_all"] - res["utility_empty"])) < 1e-10 * abs(res["utility_all"])
    assert abs(res["utility_all"] - U[2 ** n - 1]) < 1e-12 * abs(U[2 ** n - 1])
    assert abs(res["utility_empty"] - U[0]) < 1e-12 * abs(U[0])
    # the LOO values exact_values reads off the same utilities
    assert rel(res["loo"], [U[2 ** n - 1] - U[(2 ** n - 1) & ~(1 << j)] for j in range(n)]) < 1e-10


@pytest.mark.parametrize("player", ["data", "participant"])
def test_loo_equals_direct_retraining(player):
    w = World(n=5, topology="ring")
    game = w.game(player, chunk=3)
    res = loo_values(game)
    full = np.ones(5, dtype=bool)
    want = []
    for j in range(5):
        s = full.copy()
        s[j] = False
        want.append(w.naive_utility(full, player) - w.naive_utility(s, player))
    assert rel(res["values"], want) < 1e-10 and np.abs(want).max() > 1e-4
    assert game.trained == 5 + 2
    assert abs(res["utility_empty"] - w.naive_utility(~full, player)) < 1e-12 * abs(res["utility_empty"])


def test_extra_probe_sets_come_from_the_same_trainings():
    w = World(n=4)
    other = (w.probe[0][:5] * 2.0, w.probe[1][:5], True)
    both = CoalitionGame(w.dyn, w.s0, w.T, "data", w.probe, w.q, w.plan, w.parts, extra_probes={"other": other})
    alone = CoalitionGame(w.dyn, w.s0, w.T, "data", other, w.q, w.plan, w.parts)
    S = all_coalitions(4)
    assert np.array_equal(both.utility(S, on="other"), alone.utility(S))
    assert np.array_equal(both.utility(S), w.game().utility(S)) and both.trained == 16


def test_loo_of_data_equals_the_gt_value_table_summed_over_targets():
    """loo_j = U(N) − U(N∖j) = −Σ_k q_k [L_k − L_k∖j] = Σ_k V[j, k] of `dice value method=gt` node units."""
    w = World(n=4)
    loo = loo_values(w.game("data"))["values"]
    units = select_run_units(w.plan, w.parts, "node", (0, w.T))
    gt = gt_values(w.dyn, w.s0, w.T, units, w.probe, w.q)["influence"].numpy()          # [U=n, n]
    import pandas as pd
    table = pd.DataFrame({"source": np.repeat(np.arange(4), 4), "target": np.tile(np.arange(4), 4),
                          "influence": gt.reshape(-1)})
    d = dice_values(table, {"targets": "all"}, 4, np.ones(4, dtype=bool))
    assert rel(d, loo) < 1e-10
    honest = np.array([True, False, True, True])
    loo_h = loo_values(w.game("data", honest=honest))["values"]
    assert rel(dice_values(table, {"targets": "all"}, 4, honest), loo_h) < 1e-10


@pytest.mark.parametrize("player", ["data", "participant"])
def test_identical_data_in_symmetric_positions_get_equal_values(player):
    """Ring 0-1-2-3-0 with shared initial models, node 1 = node 0's data and batches, node 3 = node 2's:
    σ = (0 1)(2 3) maps the graph, the data and the initial models onto themselves, so φ_0 = φ_1, φ_2 = φ_3."""
    w = World(n=4, topology="ring", twins=[(0, 1), (2, 3)], model=ModelConfig(name="mlp", hidden=[6], init="shared"))
    phi = exact_values(w.game(player, q=torch.ones(4, dtype=DT)))["values"]
    scale = np.abs(phi).max()
    assert abs(phi[0] - phi[1]) < 1e-10 * scale and abs(phi[2] - phi[3]) < 1e-10 * scale
    assert abs(phi[0] - phi[2]) > 1e-4 * scale            # the two pairs hold different data


class _NoDataAt2(Dynamics):
    """Node 2 holds no data: its loss weights are 0 in every round, whatever the coalition."""

    def round(self, state, w=None, create_graph=False, online=None):
        if w is None:
            w = torch.ones(state.theta.shape[:-1] + (self.batch_size,), dtype=state.theta.dtype)
        w = w.clone()
        w[..., 2, :] = 0.0
        return super().round(state, w, create_graph, online)


def test_a_node_without_data_gets_zero():
    w = World(n=5, dyn_class=_NoDataAt2)
    res = exact_values(w.game("data"))
    assert res["values"][2] == 0.0 and res["loo"][2] == 0.0
    assert np.abs(np.delete(res["values"], 2)).min() > 1e-4
    mc = mc_values(w.game("data"), tolerance=0.01, budget=200, truncation=0.0)
    assert mc["values"][2] == 0.0 and mc["stderr"][2] == 0.0


def test_mc_converges_to_exact_within_its_reported_error():
    w = World(n=5)
    exact = exact_values(w.game("data"))["values"]
    game = w.game("data")
    mc = mc_values(game, tolerance=0.003, budget=10_000, truncation=0.0, seed=1)
    assert mc["stopped"] == "tolerance" and mc["permutations"] >= 10
    se = mc["stderr"]
    assert np.all(np.abs(mc["values"] - exact) <= 4 * se + 1e-12), (mc["values"], exact, se)
    span = mc["utility_all"] - mc["utility_empty"]
    assert np.all(se <= 0.003 * abs(span))
    # without truncation every permutation's marginals add up to U(all) − U(∅)
    assert np.allclose(mc["marginals"].sum(1), span, rtol=1e-12)
    assert game.trained <= 2 ** 5 and mc["truncated"] == 0.0


def test_mc_truncation_and_budget():
    w = World(n=6)
    exact = exact_values(w.game("data"))["values"]
    game = w.game("data", chunk=16)
    mc = mc_values(game, tolerance=1e-9, budget=40, truncation=0.2, seed=0)
    assert mc["stopped"] == "budget" and game.trained <= 40 and mc["permutations"] >= 1
    assert 0 < mc["truncated"] < 1
    # a truncated permutation stops once U(S) is within 0.2·span of U(all): every marginal after that is 0
    X = mc["marginals"]
    assert np.all(np.abs(X.sum(1) - (mc["utility_all"] - mc["utility_empty"])) <= 0.2 * abs(
        mc["utility_all"] - mc["utility_empty"]) + 1e-12)
    assert np.corrcoef(mc["values"], exact)[0, 1] > 0.5


# ---------------------------------------------------------------------------------------------- accounting
def test_accounting_of_a_hand_made_matrix():
    V = np.array([[0.5, 1.0, 2.0, 0.0],
                  [0.0, 0.2, 1.0, 1.0],
                  [-1.0, -2.0, 0.1, -0.5],
                  [0.0, 0.0, 0.0, 0.0]])
    df = accounting(V, tol=0.05)
    assert list(df.columns) == ["node", "given", "received", "self", "reciprocity", "ratio", "free_rider", "harmful"]
    np.testing.assert_allclose(df.given, [3.0, 2.0, -3.5, 0.0])
    np.testing.assert_allclose(df.received, [-1.0, -1.0, 3.0, 0.5])
    np.testing.assert_allclose(df["self"], [0.5, 0.2, 0.1, 0.0])
    np.testing.assert_allclose(df.reciprocity, [4.0, 3.0, -6.5, -0.5])
    np.testing.assert_allclose(df.ratio, [-3.0, -2.0, -3.5 / 3.0, 0.0])
    tau = 0.05 * np.mean([1.0, 1.0, 3.0, 0.5])
    assert threshold(V, 0.05) == pytest.approx(tau)
    assert df.free_rider.tolist() == [False, False, False, True]       # node 3 receives 0.5, gives 0
    assert df.harmful.tolist() == [False, False, True, False]
    # |received| <= τ: the ratio is left empty
    V2 = V.copy()
    V2[0, 3] = V2[1, 3] = V2[2, 3] = 0.0
    d2 = accounting(V2, tol=0.05)
    assert np.isnan(d2.ratio[3]) and not d2.free_rider[3]
    # a value table's V is minus its influence
    import pandas as pd
    t = pd.DataFrame({"source": [0, 0, 1, 1], "target": [0, 1, 0, 1], "influence": [-1.0, 2.0, 0.5, -0.25]})
    np.testing.assert_array_equal(node_matrix(t, 2), [[1.0, -2.0], [-0.5, 0.25]])


def test_gini_lorenz_ranks_and_auc():
    x = np.array([3.0, 1.0, 0.0, 2.0, -4.0])
    clipped = np.clip(x, 0, None)
    slow = np.abs(clipped[:, None] - clipped[None, :]).sum() / (2 * len(x) ** 2 * clipped.mean())
    assert gini(x) == pytest.approx(slow, abs=1e-15)
    assert gini(np.ones(6)) == pytest.approx(0.0, abs=1e-15)
    assert gini(np.array([0, 0, 0, 5.0])) == pytest.approx(0.75)
    assert gini(np.array([-1.0, 0.0])) is None
    p, L = lorenz(x)
    np.testing.assert_allclose(p, np.linspace(0, 1, 6))
    np.testing.assert_allclose(L, [0, 0, 0, 1 / 6, 3 / 6, 1])
    assert ranks(np.array([0.2, 0.5, 0.5, -1.0])) == [3, 1, 1, 4]
    assert attack_auc(np.array([0.0, 1.0, 2.0, 3.0]), [0]) == 1.0
    assert attack_auc(np.array([0.0, 1.0, 2.0, 3.0]), [3]) == 0.0
    assert attack_auc(np.array([1.0, 1.0]), [0]) == 0.5 and attack_auc(np.ones(3), []) is None
