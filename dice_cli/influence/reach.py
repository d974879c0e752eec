"""Which targets a unit can reach, and how far they are: the ``distance`` column of the influence tables.

A unit of source j at round t travels with gossip: after s rounds it can have changed node k only if the
product W^{t+s−1} ⋯ W^t has a non-zero entry [k, j] (non-negative matrices: no cancellation, so the
sparsity pattern of the product is the boolean product of the patterns). Every other (k, s) row of a gt
or estimate table is a *structural zero*: exactly 0 by construction.

- ``reachable`` (row k, hop s): s = 0 → k = j (the direct term); s ≥ 1 → (W^{t+s−1} ⋯ W^t)[k, j] > 0.
- ``distance`` (k from j, from round t): the first hop s ≥ 0 at which k is reachable. For a static graph
  that is the shortest path length from j to k in the graph of W (edge j → k where W[k, j] > 0); for a
  time-varying graph it is the hop at which k is first reached by the rounds t, t+1, … of the run.
  −1: never reached (a disconnected static graph; or, time-varying, not within the rounds the run has).

Every built-in topology gives every node a self weight, so there a row is reachable exactly when
distance ≤ hop; a ``topology=file`` matrix without self-loops can reach k at hop s and not at s+1, and
``reachable`` (not the distance) is what filters structural zeros.

    t = add_distance(table, schedule, total_rounds, hops)     # inserts `distance` after `hop`
    table[reachable_mask(t, schedule, hops)]                 # what reachable_only=true keeps
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import pandas as pd


def _pattern(W: np.ndarray) -> np.ndarray:
    return (np.asarray(W) > 0).astype(np.float64)


def reach_from(schedule, t: int, hops: int, total_rounds: int) -> Tuple[np.ndarray, np.ndarray]:
    """(reach [hops+1, n, n] bool with reach[s][k, j], distance [n, n] int with distance[k, j]) from round t."""
    n = schedule.n
    R = np.eye(n)
    reach = [R > 0]
    dist = np.where(np.eye(n, dtype=bool), 0, -1)
    if not schedule.time_varying:
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import shortest_path

        P = _pattern(schedule.at(0))
        edges = P.copy()
        np.fill_diagonal(edges, 0.0)
        D = shortest_path(csr_matrix(edges.T), method="D", unweighted=True, directed=True)  # D[j, k]: j -> k if W[k, j] > 0
        dist = np.where(np.isfinite(D.T), D.T, -1).astype(np.int64)
        for _ in range(hops):
            R = (P @ R > 0).astype(np.float64)
            reach.append(R > 0)
        return np.stack(reach), dist
    s = 0
    while t + s < total_rounds and (s < hops or (dist < 0).any()):
        R = (_pattern(schedule.at(t + s)) @ R > 0).astype(np.float64)
        s += 1
        if s <= hops:
            reach.append(R > 0)
        dist[(dist < 0) & (R > 0)] = s
    return np.stack(reach), dist


class Reach:
    """reach_from per round, cached (a static graph is computed once)."""

    def __init__(self, schedule, hops: int, total_rounds: int):
        self.schedule, self.hops, self.total = schedule, int(hops), int(total_rounds)
        self._cache: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}

    def at(self, t: int) -> Tuple[np.ndarray, np.ndarray]:
        key = int(t) if self.schedule.time_varying else 0
        if key not in self._cache:
            self._cache[key] = reach_from(self.schedule, int(t), self.hops, self.total)
        return self._cache[key]

    def distance(self, table: pd.DataFrame) -> np.ndarray:
        """The distance of every row's target from its source (from the row's round)."""
        out = np.empty(len(table), dtype=np.int64)
        rounds = table["round"].to_numpy()
        src, tgt = table["source"].to_numpy(int), table["target"].to_numpy(int)
        for t in np.unique(rounds):
            i = np.nonzero(rounds == t)[0]
            out[i] = self.at(t)[1][tgt[i], src[i]]
        return out

    def reachable(self, table: pd.DataFrame) -> np.ndarray:
        """True where the row's (target, hop) can be non-zero (see the module docstring)."""
        out = np.zeros(len(table), dtype=bool)
        rounds = table["round"].to_numpy()
        src, tgt = table["source"].to_numpy(int), table["target"].to_numpy(int)
        hop = table["hop"].to_numpy(int)
        for t in np.unique(rounds):
            i = np.nonzero(rounds == t)[0]
            reach = self.at(t)[0]
            ok = hop[i] <= self.hops
            j = i[ok]
            out[j] = reach[hop[j], tgt[j], src[j]]
        return out


def add_distance(table: pd.DataFrame, reach: Reach) -> pd.DataFrame:
    """``table`` with an int column ``distance`` right after ``hop`` (replaced if present)."""
    table = table.drop(columns=["distance"], errors="ignore")
    table.insert(table.columns.get_loc("hop") + 1, "distance", reach.distance(table))
    return table


def decay_stats(table: pd.DataFrame, reachable: np.ndarray) -> dict:
    """Mean |influence| per reachable (unit, target) row: per hop, and per distance at the last hop H.

    Returns {"per_hop": DataFrame[hop, mean_abs, rows], "per_distance": DataFrame[distance, mean_abs, rows],
    "horizon": H}; the distance curve is the cascade after H rounds (targets at distance d ≤ H).
    """
    d = table.loc[reachable, ["hop", "influence"] + (["distance"] if "distance" in table else [])].copy()
    d["abs"] = d["influence"].abs()
    per_hop = d.groupby("hop")["abs"].agg(["mean", "size"]).rename(columns={"mean": "mean_abs", "size": "rows"})
    horizon = int(table["hop"].max()) if len(table) else 0
    if "distance" in d:
        last = d[d["hop"] == horizon]
        per_dist = last.groupby("distance")["abs"].agg(["mean", "size"]).rename(
            columns={"mean": "mean_abs", "size": "rows"})
    else:
        per_dist = pd.DataFrame(columns=["mean_abs", "rows"])
    return {"per_hop": per_hop.reset_index(), "per_distance": per_dist.reset_index(), "horizon": horizon}
