"""Coalition games over a recorded run and their values (VALUE.md §6): LOO, exact Shapley, TMC Shapley.

The players are the n nodes. A coalition S ⊆ {0 … n−1} is a bool vector s [n] (s_j = 1: j ∈ S) and is
retrained from the state at round a (the run's start) to the horizon T with everything else identical
(batch plan, W^t, attacks, optimizer), many coalitions at once on the copies axis [C, n, P]:

- ``player=data``: only S's data takes part. Every node outside S has all its loss weights at 0 in every
  round (``dice value unit=node`` removal, ``RunUnits.weights_at``): it still applies weight decay and
  momentum to nothing, gossips and forwards. U(∅) is the run where nobody's data counts: only weight decay
  and the averaging of the initial models.
- ``player=participant``: only S takes part. Every node outside S is offline in every round
  (``Dynamics.round(online=s)``, ``dice value unit=participant``): it neither trains, sends nor receives, so
  it keeps its initial model, and its receivers move its weight onto their self-weight. U(∅) is every node
  keeping its initial model.

Utility (loss reduction is value):

    U(S) = −Σ_{k∈K} q_k L_k(θ_k^T(S)),   K = every node (``utility=all``) or the honest ones (``honest``:
                                          the nodes not in the run's attack record)

Every node's loss counts, in or out of S (an offline participant keeps its initial model and its loss).
Values, each with its cost (``CoalitionGame.trained``: distinct coalitions retrained; ``seconds``):

    loo_j        = U(N) − U(N∖{j})
    shapley_j    = Σ_{S ⊆ N∖{j}} |S|! (n−|S|−1)! / n! · [U(S ∪ {j}) − U(S)]           (all 2^n coalitions)
    shapley_mc_j = mean over sampled permutations π of U(S_π,j ∪ {j}) − U(S_π,j)       (S_π,j: j's predecessors)

``shapley_mc`` (Ghorbani & Zou 2019 TMC-Shapley; GTG-Shapley's within-permutation truncation): each batch of
permutations trains its nested prefixes together as copies, in up to 4 stages of positions when truncation
is on, so a permutation that has reached |U(N) − U(S_{i−1})| < truncation·|U(N) − U(∅)| stops training
(its remaining marginals are 0). Coalitions are cached by their bit mask, so a coalition shared by several
permutations is trained once. It stops when every value's standard error (std over permutations / √m,
m ≥ ``MIN_PERMUTATIONS``) is below ``tolerance``·|U(N) − U(∅)|, or when the next batch would pass the
``budget`` of coalition trainings.

    game = CoalitionGame(dyn, rp.state_at(0), T, "data", probe, q, honest=None, plan=plan, parts=parts)
    phi = exact_shapley(game.utility(all_coalitions(n)))
"""
from __future__ import annotations

import math
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .engine import Dynamics, State
from .influence.retrain import Probe, retrain_states
from .influence.run_units import select_run_units

PLAYERS = ["data", "participant"]
UTILITIES = ["all", "honest"]
MAX_EXACT = 12                  # shapley_exact trains 2^n coalitions: 4096 at n = 12
MIN_PERMUTATIONS = 10           # shapley_mc: permutations before the standard-error test may stop it
MAX_PERMUTATIONS = 20_000       # shapley_mc: a hard stop (reached only when coalitions come from the cache)
STAGES = 4                      # shapley_mc with truncation: stages of prefix positions per batch


def mask_key(s: np.ndarray) -> int:
    """The bit mask Σ_j s_j 2^j of a coalition s [n] (a Python int, any n)."""
    return int.from_bytes(np.packbits(np.asarray(s, dtype=bool), bitorder="little").tobytes(), "little")


def all_coalitions(n: int) -> np.ndarray:
    """Every coalition as bool [2^n, n], row m = the bits of m (row 0 = ∅, row 2^n − 1 = N)."""
    m = np.arange(2 ** n, dtype=np.int64)
    return ((m[:, None] >> np.arange(n)) & 1).astype(bool)


def shapley_weights(n: int) -> np.ndarray:
    """w [n]: w_s = s! (n − s − 1)! / n!, the weight of a coalition of size s not holding the player."""
    return np.array([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)])


def exact_shapley(U: np.ndarray) -> np.ndarray:
    """Shapley values [n] from the utilities U [2^n] of ``all_coalitions(n)`` (U[m] = U(bits of m)):
    φ_j = Σ_{S ∌ j} w_|S| (U(S ∪ {j}) − U(S)), vectorised over S."""
    U = np.asarray(U, dtype=np.float64)
    n = int(round(math.log2(len(U))))
    if 2 ** n != len(U):
        raise ValueError(f"need 2^n utilities, got {len(U)}")
    masks = np.arange(2 ** n, dtype=np.int64)
    size = all_coalitions(n).sum(1)
    w = shapley_weights(n) if n else np.zeros(0)
    phi = np.zeros(n)
    for j in range(n):
        without = masks[(masks >> j) & 1 == 0]
        phi[j] = np.sum(w[size[without]] * (U[without | (1 << j)] - U[without]))
    return phi


class CoalitionGame:
    """U(S) of coalitions of a run's nodes, retrained as copies and cached (see the module docstring).

    dyn, start: the run's dynamics and its state at the first round of the coalition window (round 0);
    horizon: T; player: data | participant; probe: (x, y, shared) on which L_k is measured; q [n];
    honest: bool [n] (K of ``utility=honest``) or None (K = every node); plan, parts: the batch plan and the
    node partition (units); chunk: coalitions per pass; extra_probes: {name: probe} on which every trained
    coalition is also evaluated (``losses(..., on=name)``), so one training serves several utilities.
    """

    def __init__(self, dyn: Dynamics, start: State, horizon: int, player: str, probe: Probe, q: torch.Tensor,
                 plan: np.ndarray, parts: Sequence[np.ndarray], honest: Optional[np.ndarray] = None,
                 chunk: int = 32, progress: Optional[str] = None, extra_probes: Optional[Dict[str, Probe]] = None):
        if player not in PLAYERS:
            raise ValueError(f"player={player!r}: choose one of {PLAYERS}")
        self.dyn, self.start, self.horizon, self.player = dyn, start.detached(), int(horizon), player
        self.probes: Dict[str, Probe] = {"eval": probe, **(extra_probes or {})}
        self.n = int(dyn.n)
        kind = "node" if player == "data" else "participant"
        self.units = select_run_units(plan, parts, kind, (int(start.round), int(horizon)))
        self.q = q.detach().to(dtype=torch.float64, device="cpu").numpy()
        self.honest = np.ones(self.n, dtype=bool) if honest is None else np.asarray(honest, dtype=bool)
        self.weights = self.q * self.honest                       # [n]: q_k on K, 0 elsewhere
        self.chunk = int(chunk)
        self.progress = progress
        self._losses: Dict[int, Dict[str, np.ndarray]] = {}       # mask -> {probe name: L_k(θ_k^T(S)) [n]}
        self.trained = 0                                          # distinct coalitions retrained
        self.passes = 0
        self.seconds = 0.0

    # ---- training ------------------------------------------------------------------------------------
    def losses(self, coalitions: np.ndarray, on: str = "eval") -> np.ndarray:
        """L_k(θ_k^T(S)) [C, n] on probe set ``on`` for coalitions bool [C, n]; the ones not yet cached are
        retrained, ``chunk`` per pass (copy c: the units of the nodes outside S_c removed, or those nodes
        offline)."""
        coalitions = np.atleast_2d(np.asarray(coalitions, dtype=bool))
        keys = [mask_key(s) for s in coalitions]
        todo, seen = [], set()
        for key, s in zip(keys, coalitions):
            if key not in self._losses and key not in seen:
                seen.add(key)
                todo.append((key, s))
        if todo:
            self._train(todo)
        return np.stack([self._losses[k][on] for k in keys]) if keys else np.zeros((0, self.n))

    def _train(self, todo: List) -> None:
        t0 = time.perf_counter()
        dt, dev = self.start.theta.dtype, self.start.theta.device
        bar = None
        passes = -(-len(todo) // self.chunk)
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=passes * (self.horizon - self.start.round), unit="round", dynamic_ncols=True,
                       file=sys.stderr, disable=None,
                       desc=f"{self.progress}: {len(todo)} coalitions, {passes} pass(es) of <= {self.chunk}")
        try:
            for lo in range(0, len(todo), self.chunk):
                part = todo[lo:lo + self.chunk]
                S = torch.as_tensor(np.stack([s for _, s in part]), dtype=dt, device=dev)
                state = retrain_states(self.dyn, self.start, self.horizon, self.units, 1.0 - S,
                                       tick=None if bar is None else lambda: bar.update(1))
                L = {name: self.dyn.probe_losses(state.theta, state.buffers, *p)[0].to(
                    dtype=torch.float64, device="cpu").numpy() for name, p in self.probes.items()}
                for c, (key, _) in enumerate(part):
                    self._losses[key] = {name: v[c].copy() for name, v in L.items()}
                self.trained += len(part)
                self.passes += 1
        finally:
            if bar is not None:
                bar.close()
        self.seconds += time.perf_counter() - t0

    def utility(self, coalitions: np.ndarray, weights: Optional[np.ndarray] = None, on: str = "eval") -> np.ndarray:
        """U(S) = −Σ_k weights_k L_k(θ_k^T(S)) [C] on probe set ``on`` (weights: q on K by default). Summed
        row by row, so a coalition's utility is the same number whichever batch of coalitions it is asked in."""
        w = self.weights if weights is None else np.asarray(weights, dtype=np.float64)
        return -(self.losses(coalitions, on) * w).sum(axis=1)

    @property
    def everyone(self) -> np.ndarray:
        return np.ones(self.n, dtype=bool)

    @property
    def nobody(self) -> np.ndarray:
        return np.zeros(self.n, dtype=bool)


# ------------------------------------------------------------------------------------------ valuations
def loo_values(game: CoalitionGame) -> Dict[str, object]:
    """loo_j = U(N) − U(N∖{j}) [n], from n + 2 coalitions (N, ∅ for ``utility_empty``, and each N∖{j})."""
    n = game.n
    S = np.concatenate([[game.everyone, game.nobody], ~np.eye(n, dtype=bool)])
    U = game.utility(S)
    return {"values": U[0] - U[2:], "stderr": np.zeros(n), "utility_all": float(U[0]), "utility_empty": float(U[1])}


def exact_values(game: CoalitionGame) -> Dict[str, object]:
    """Exact Shapley values [n] from all 2^n coalitions, with the LOO values they contain."""
    n = game.n
    S = all_coalitions(n)
    U = game.utility(S)
    full = 2 ** n - 1
    loo = np.array([U[full] - U[full & ~(1 << j)] for j in range(n)])
    return {"values": exact_shapley(U), "stderr": np.zeros(n), "utility_all": float(U[full]),
            "utility_empty": float(U[0]), "loo": loo}


def mc_values(game: CoalitionGame, tolerance: float, budget: int, truncation: float = 0.0, seed: int = 0,
              per_batch: Optional[int] = None) -> Dict[str, object]:
    """Truncated Monte Carlo Shapley (module docstring). Returns values [n], stderr [n], permutations,
    truncated (share of marginals set to 0 by truncation), stopped (tolerance | budget | permutations),
    utility_all, utility_empty; the samples [m, n] of marginal contributions under "marginals".

    A batch of P permutations π: prefixes S_i = {π_1 … π_i} [P, n+1, n]; U[p, i] = U(S_i) (U[:, 0] = U(∅),
    U[:, n] = U(N)) filled stage by stage for the permutations still running; permutation p truncates at the
    first position i with |U(N) − U[p, i−1]| < truncation·|U(N) − U(∅)|, and marginal i of p is
    U[p, i] − U[p, i−1] before that, 0 from there on."""
    n = game.n
    u_all, u_empty = (float(u) for u in game.utility(np.stack([game.everyone, game.nobody])))
    span = u_all - u_empty
    tol_abs, trunc_abs = tolerance * abs(span), truncation * abs(span)
    rng = np.random.default_rng([int(seed), 19])
    stage = max(1, n - 1) if truncation <= 0 else max(1, math.ceil((n - 1) / STAGES))
    per_batch = per_batch or max(1, game.chunk // stage)
    batches: List[np.ndarray] = []
    m, cut = 0, 0
    stopped = "permutations"
    while m < MAX_PERMUTATIONS:
        room = budget - game.trained
        if n > 1 and room < n - 1:
            stopped = "budget"
            break
        P = min(per_batch, room // (n - 1), MAX_PERMUTATIONS - m) if n > 1 else min(per_batch, MAX_PERMUTATIONS - m)
        perms = np.stack([rng.permutation(n) for _ in range(P)])                     # [P, n]
        pre = np.zeros((P, n + 1, n), dtype=bool)                                   # pre[p, i] = S_i
        for i in range(1, n + 1):
            pre[:, i] = pre[:, i - 1]
            pre[np.arange(P), i, perms[:, i - 1]] = True
        U = np.full((P, n + 1), np.nan)
        U[:, 0], U[:, n] = u_empty, u_all
        stop_at = np.full(P, n + 1)                                                 # first truncated position
        for lo in range(1, n + 1, stage):
            hi = min(lo + stage, n + 1)                                             # positions lo … hi−1
            run = np.flatnonzero(stop_at > n)
            sizes = np.arange(lo, min(hi, n))                                       # S_n = N is known
            if len(run) and len(sizes):
                U[np.ix_(run, sizes)] = game.utility(pre[np.ix_(run, sizes)].reshape(-1, n)).reshape(len(run), -1)
            if trunc_abs > 0:
                for i in range(lo, hi):
                    hit = (stop_at > n) & (np.abs(u_all - U[:, i - 1]) < trunc_abs)
                    stop_at[hit] = i
        D = np.diff(U, axis=1)                                                      # D[p, i−1] = marginal i
        D[np.arange(1, n + 1)[None, :] >= stop_at[:, None]] = 0.0
        marg = np.zeros((P, n))
        marg[np.arange(P)[:, None], perms] = D
        cut += int(np.sum(n + 1 - np.minimum(stop_at, n + 1)))
        batches.append(marg)
        m += P
        if m >= max(MIN_PERMUTATIONS, 2):
            X = np.concatenate(batches)
            if np.all(np.std(X, axis=0, ddof=1) / np.sqrt(m) <= tol_abs):
                stopped = "tolerance"
                break
    X = np.concatenate(batches) if batches else np.zeros((0, n))
    se = np.std(X, axis=0, ddof=1) / np.sqrt(m) if m >= 2 else np.full(n, np.nan)
    return {"values": X.mean(0) if m else np.full(n, np.nan), "stderr": se, "permutations": m,
            "truncated": float(cut / max(m * n, 1)), "stopped": stopped, "utility_all": u_all,
            "utility_empty": u_empty, "marginals": X}
