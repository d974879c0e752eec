"""Communication graphs and the mixing matrices W^t of decentralized SGD.

    dice train topology=exponential nodes=16

Convention (used everywhere in dice-cli, never transposed): W is [n, n] and **row k holds the weights
that receiver k puts on its senders**:

    θ_k ← Σ_l W[k, l] θ_l

W must be non-negative and row-stochastic (every row sums to 1); column-stochastic or symmetric is not
required. The in-neighbours (senders) of k are {l ≠ k : W[k, l] > 0}; the out-neighbours (receivers)
of j are {k ≠ j : W[k, j] > 0}. A self weight W[k, k] > 0 is a self-loop.

``build_schedule(cfg, n, seed)`` turns a ``TopologyConfig`` into a ``MixingSchedule`` that yields W^t
for every round t: one matrix for static graphs, or a deterministic function of (seed, t) for
time-varying ones (one_peer_exponential, random_matching, a [T, n, n] .npy file). A run directory keeps
it as ``mixing.npy`` (static, [n, n]) or ``mixing_schedule.npz`` (time-varying; int64 arrays
round/row/col and float64 weight, one entry per nonzero W^t[row, col]).

Choices this module makes where the method page is silent:

- ring with n=2: both neighbours are the same node, so the graph has one edge and the rule gives 1/2 on
  self and 1/2 on the other node (the 1/3 rule would count the neighbour twice); n=1 gives [[1]].
- exponential offsets are deduplicated mod n, so every sender gets the same weight 1/|offsets|.
- torus/grid: node index = r * cols + c; without ``rows`` the most square factorisation (rows <= cols)
  is used, so a prime n becomes a 1 x n ring (torus) or path (grid).
- erdos_renyi and random_regular are re-drawn (seeded) until connected, at most 100 draws.
- random_matching and one_peer_exponential apply the weight rule to each round's graph; every rule gives
  1/2 on self and 1/2 on the peer (directed one_peer_exponential accepts auto and uniform only).
- topology=file uses the file's weights as they are, so it accepts only weights=auto; a [1, n, n] .npy
  is a static matrix.
"""
from __future__ import annotations

import operator
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .atomic import atomic_path, save_npy
from .config import TOPOLOGIES, WEIGHT_RULES, TopologyConfig
from .errors import UserError, bad_value, check_choice, check_range

MIXING_FILE = "mixing.npy"
SCHEDULE_FILE = "mixing_schedule.npz"
ATOL = 1e-9                      # row sums must equal 1 within this
MAX_DRAWS = 100                  # re-draws of a random graph until it is connected
MAX_LISTED = 10                  # offending rows named in an error message
DIRECTED_RULES = ["auto", "uniform"]
TIME_VARYING = ("one_peer_exponential", "random_matching")


# --------------------------------------------------------------------------- the schedule


class MixingSchedule:
    """W^t for every round t: static (one matrix) or time-varying (deterministic from seed and t).

    ``at(t)`` returns a fresh [n, n] float64 array, validated row-stochastic. ``rounds`` is the number of
    rounds available (a loaded time-varying schedule holds only what was saved), None when unbounded.
    """

    def __init__(self, n: int, make: Callable[[int], np.ndarray], time_varying: bool, name: str = "W",
                 rounds: Optional[int] = None, source: str = ""):
        self.n = int(n)
        self.time_varying = bool(time_varying)
        self.name = name
        self.rounds = rounds
        self._make = make
        self._source = source or name
        self._static: Optional[np.ndarray] = None
        if not self.time_varying:
            W = np.array(make(0), dtype=np.float64)
            validate_mixing(W, name)
            self._static = W

    @classmethod
    def static(cls, W: np.ndarray, name: str = "W") -> "MixingSchedule":
        """A schedule with W^t = W for every t (W is validated)."""
        W = np.array(W, dtype=np.float64)
        validate_mixing(W, name)
        return cls(W.shape[0], lambda t: W, time_varying=False, name=name)

    def __repr__(self) -> str:
        kind = "time-varying" if self.time_varying else "static"
        return f"MixingSchedule({self.name!r}, n={self.n}, {kind})"

    def at(self, t: int) -> np.ndarray:
        """W^t: [n, n] float64, non-negative, rows summing to 1."""
        t = self._check_round(t)
        if self._static is not None:
            return self._static.copy()
        W = self._matrix(t)
        validate_mixing(W, f"{self.name} at round {t}")
        return W

    def _matrix(self, t: int) -> np.ndarray:
        """W^t without validation (describe_schedule inspects it)."""
        if self._static is not None:
            return self._static.copy()
        return np.array(self._make(t), dtype=np.float64)

    def _check_round(self, t: int) -> int:
        try:
            t = operator.index(t)
        except TypeError:
            raise UserError(f"round t={t!r} must be an integer") from None
        if t < 0 or (self.rounds is not None and t >= self.rounds):
            span = f"[0, {self.rounds})" if self.rounds is not None else "[0, inf)"
            raise UserError(f"{self._source} has no W^t for round t={t}; valid rounds are t in {span}")
        return t

    def save(self, run_dir: Path, rounds: int) -> None:
        """Static: run_dir/mixing.npy [n, n]. Time-varying: run_dir/mixing_schedule.npz with the
        nonzeros of W^t for t in [0, rounds): int64 round, row, col and float64 weight (plus int64
        scalars n and rounds). The other file, if a previous save left one, is removed."""
        run_dir = Path(run_dir)
        static_path, schedule_path = run_dir / MIXING_FILE, run_dir / SCHEDULE_FILE
        if not self.time_varying:
            save_npy(static_path, self._static)
            schedule_path.unlink(missing_ok=True)
            return
        check_range("rounds", rounds, 1)
        if self.rounds is not None and rounds > self.rounds:
            raise UserError(f"cannot save {rounds} rounds of {self._source}: it holds only {self.rounds}")
        parts: List[Tuple[np.ndarray, ...]] = []
        for t in range(rounds):
            W = self.at(t)
            row, col = np.nonzero(W)
            parts.append((np.full(row.size, t, dtype=np.int64), row.astype(np.int64),
                          col.astype(np.int64), W[row, col]))
        arrays = {
            "round": np.concatenate([p[0] for p in parts]),
            "row": np.concatenate([p[1] for p in parts]),
            "col": np.concatenate([p[2] for p in parts]),
            "weight": np.concatenate([p[3] for p in parts]).astype(np.float64),
            "n": np.int64(self.n),
            "rounds": np.int64(rounds),
        }
        with atomic_path(schedule_path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)
        static_path.unlink(missing_ok=True)

    @classmethod
    def load(cls, run_dir: Path) -> "MixingSchedule":
        """Read what ``save`` wrote in run_dir (mixing.npy or mixing_schedule.npz)."""
        run_dir = Path(run_dir)
        static_path, schedule_path = run_dir / MIXING_FILE, run_dir / SCHEDULE_FILE
        if static_path.exists() and schedule_path.exists():
            raise UserError(f"{run_dir} holds both {MIXING_FILE} and {SCHEDULE_FILE}; "
                            f"delete the stale one (the run's topology says which)")
        if schedule_path.exists():
            return _load_sparse(schedule_path)
        if static_path.exists():
            W = _read_npy(static_path)
            return cls.static(W, name=str(static_path))
        raise UserError(f"no mixing matrix in {run_dir}: neither {static_path} nor {schedule_path} exists; "
                        f"is this a run directory written by `dice train`?")


def _load_sparse(path: Path) -> MixingSchedule:
    """mixing_schedule.npz -> a time-varying schedule limited to the saved rounds."""
    try:
        with np.load(path, allow_pickle=False) as z:
            rnd, row, col = (np.asarray(z[k], dtype=np.int64) for k in ("round", "row", "col"))
            weight = np.asarray(z["weight"], dtype=np.float64)
            n = int(z["n"]) if "n" in z.files else int(row.max()) + 1
            rounds = int(z["rounds"]) if "rounds" in z.files else int(rnd.max()) + 1
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read {path}: {e}; it should hold arrays round, row, col, weight "
                        f"(re-run `dice train` to rewrite it)") from None
    if not (rnd.size == row.size == col.size == weight.size):
        raise UserError(f"{path} is corrupt: round, row, col and weight have different lengths")
    if rnd.size and (rnd.min() < 0 or rnd.max() >= rounds or min(row.min(), col.min()) < 0
                     or max(row.max(), col.max()) >= n):
        raise UserError(f"{path} is corrupt: an index lies outside rounds={rounds} or n={n}")
    order = np.argsort(rnd, kind="stable")
    rnd, row, col, weight = rnd[order], row[order], col[order], weight[order]
    starts = np.searchsorted(rnd, np.arange(rounds + 1))

    def make(t: int) -> np.ndarray:
        W = np.zeros((n, n))
        s, e = starts[t], starts[t + 1]
        W[row[s:e], col[s:e]] = weight[s:e]
        return W

    return MixingSchedule(n, make, time_varying=True, name=str(path), rounds=rounds, source=str(path))


def _read_npy(path: Path) -> np.ndarray:
    try:
        M = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} as a .npy array: {e}") from None
    if not isinstance(M, np.ndarray) or not np.issubdtype(M.dtype, np.number):
        raise UserError(f"{path} must hold a numeric array; it holds {getattr(M, 'dtype', type(M))}")
    return M.astype(np.float64)


# --------------------------------------------------------------------------- validation


def validate_mixing(W: np.ndarray, name: str = "W") -> None:
    """UserError unless W is a square, finite, non-negative, row-stochastic [n, n] matrix (atol 1e-9)."""
    try:
        W = np.asarray(W, dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a numeric [n, n] matrix") from None
    if W.ndim != 2 or W.shape[0] != W.shape[1] or W.shape[0] == 0:
        raise UserError(f"{name} must be a square [n, n] matrix with n >= 1; it has shape {W.shape}")
    bad = np.flatnonzero(~np.isfinite(W).all(axis=1))
    if bad.size:
        raise UserError(f"{name} has NaN or infinite entries in {_rows(bad)}; every weight must be a "
                        f"finite number >= 0")
    bad = np.flatnonzero((W < 0).any(axis=1))
    if bad.size:
        detail = ", ".join(f"row {k} (min {W[k].min():.6g})" for k in bad[:MAX_LISTED])
        raise UserError(f"{name} has negative weights in {len(bad)} row(s): {detail}{_more(bad)}; "
                        f"mixing weights must be >= 0")
    sums = W.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > ATOL)
    if bad.size:
        detail = ", ".join(f"row {k} sums to {sums[k]:.12g}" for k in bad[:MAX_LISTED])
        hint = ""
        if np.allclose(W.sum(axis=0), 1.0, rtol=0, atol=ATOL):
            hint = " Its columns sum to 1: it looks transposed, use W.T."
        raise UserError(f"{name} is not row-stochastic: {len(bad)} row(s) do not sum to 1: {detail}"
                        f"{_more(bad)}. Row k holds the weights receiver k puts on its senders; divide "
                        f"each row by its sum (W / W.sum(axis=1, keepdims=True)).{hint}")


def _rows(idx: np.ndarray) -> str:
    return f"{len(idx)} row(s): " + ", ".join(str(k) for k in idx[:MAX_LISTED]) + _more(idx)


def _more(idx: np.ndarray) -> str:
    return f" (and {len(idx) - MAX_LISTED} more)" if len(idx) > MAX_LISTED else ""


def _is_row_stochastic(W: np.ndarray) -> bool:
    return bool(np.isfinite(W).all() and (W >= 0).all()
                and np.allclose(W.sum(axis=1), 1.0, rtol=0, atol=ATOL))


# --------------------------------------------------------------------------- graphs
# A graph is a bool adjacency A [n, n] with A[k, l] = True when receiver k hears sender l (k != l).


def _ring(n: int) -> np.ndarray:
    A = np.zeros((n, n), dtype=bool)
    idx = np.arange(n)
    A[idx, (idx + 1) % n] = True
    A[idx, (idx - 1) % n] = True
    np.fill_diagonal(A, False)
    return A


def exponential_offsets(n: int) -> List[int]:
    """Offsets o such that node i receives from i − o (mod n): {0, 1, 2, 4, …, 2^⌊log2(n−1)⌋} mod n."""
    if n == 1:
        return [0]
    top = (n - 1).bit_length() - 1                 # ⌊log2(n−1)⌋, exact for integers
    return sorted({0} | {(2 ** m) % n for m in range(top + 1)})


def _exponential(n: int) -> np.ndarray:
    A = np.zeros((n, n), dtype=bool)
    idx = np.arange(n)
    for o in exponential_offsets(n):
        if o:
            A[idx, (idx - o) % n] = True
    return A


def _grid_shape(n: int, rows: Optional[int]) -> Tuple[int, int]:
    """rows x cols = n: cfg.rows, or the most square factorisation (rows <= cols)."""
    if rows is None:
        rows = max(d for d in range(1, int(np.sqrt(n)) + 1) if n % d == 0)
    elif n % rows:
        divisors = ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
        raise UserError(f"topology.rows={rows} does not divide nodes={n}; choose one of: {divisors}")
    return rows, n // rows


def _grid(n: int, rows: Optional[int], wrap: bool) -> np.ndarray:
    """2D grid, node r * cols + c; wrap=True adds the torus's wraparound edges."""
    R, C = _grid_shape(n, rows)
    A = np.zeros((n, n), dtype=bool)
    for r in range(R):
        for c in range(C):
            for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                rr, cc = r + dr, c + dc
                if wrap:
                    rr, cc = rr % R, cc % C
                elif not (0 <= rr < R and 0 <= cc < C):
                    continue
                A[r * C + c, rr * C + cc] = True
    np.fill_diagonal(A, False)
    return A


def _star(n: int) -> np.ndarray:
    A = np.zeros((n, n), dtype=bool)
    A[0, 1:] = True
    A[1:, 0] = True
    return A


def _hypercube(n: int) -> np.ndarray:
    """Nodes i and i XOR 2^b are neighbours; n must be a power of two."""
    if n & (n - 1):
        lo = 1 << (n.bit_length() - 1)
        raise UserError(f"topology=hypercube needs nodes to be a power of two; nodes={n}. "
                        f"Use nodes={lo} or nodes={2 * lo}.")
    A = np.zeros((n, n), dtype=bool)
    idx = np.arange(n)
    for b in range(n.bit_length() - 1):
        A[idx, idx ^ (1 << b)] = True
    return A


def _draw_connected(draw: Callable[[int], "object"], seed: int, what: str, fix: str) -> np.ndarray:
    """Call draw(sub_seed) until the networkx graph is connected (MAX_DRAWS tries)."""
    import networkx as nx

    for attempt in range(MAX_DRAWS):
        sub_seed = int(np.random.default_rng([seed, attempt]).integers(2 ** 32))
        g = draw(sub_seed)
        if nx.is_connected(g):
            n = g.number_of_nodes()
            return nx.to_numpy_array(g, nodelist=range(n), weight=None, dtype=float) > 0
    raise UserError(f"{what} was disconnected in all {MAX_DRAWS} seeded draws; {fix}")


def _erdos_renyi(n: int, p: float, seed: int) -> np.ndarray:
    import networkx as nx

    return _draw_connected(lambda s: nx.gnp_random_graph(n, p, seed=s), seed,
                           f"topology=erdos_renyi with nodes={n}, topology.p={p}",
                           f"use a larger topology.p (about 2*ln(n)/n = {2 * np.log(max(n, 2)) / n:.3g} "
                           f"or more)")


def _random_regular(n: int, d: int, seed: int) -> np.ndarray:
    import networkx as nx

    if d >= n:
        raise UserError(f"topology.degree={d} must be smaller than nodes={n}; choose degree <= {n - 1}")
    if (n * d) % 2:
        raise UserError(f"topology=random_regular needs nodes*degree to be even; nodes={n}, degree={d}. "
                        f"Change topology.degree or nodes.")
    return _draw_connected(lambda s: nx.random_regular_graph(d, n, seed=s), seed,
                           f"topology=random_regular with nodes={n}, topology.degree={d}",
                           "use a larger topology.degree")


def _static_graph(cfg: TopologyConfig, n: int, seed: int) -> Tuple[np.ndarray, bool]:
    """(A, directed) for a static topology name."""
    name = cfg.name
    if name == "ring":
        return _ring(n), False
    if name == "exponential":
        return _exponential(n), True          # directed by definition, whatever n
    if name in ("torus", "grid"):
        return _grid(n, cfg.rows, wrap=name == "torus"), False
    if name == "complete":
        return ~np.eye(n, dtype=bool), False
    if name == "star":
        return _star(n), False
    if name == "erdos_renyi":
        return _erdos_renyi(n, cfg.p, seed), False
    if name == "random_regular":
        return _random_regular(n, cfg.degree, seed), False
    if name == "hypercube":
        return _hypercube(n), False
    raise bad_value("topology.name", name, TOPOLOGIES)


# --------------------------------------------------------------------------- weights


def _weights(A: np.ndarray, rule: str, directed: bool, topology: str) -> np.ndarray:
    """Adjacency A [n, n] (A[k, l]: k hears l) -> row-stochastic W [n, n].

    uniform:     W_kl = 1/(d_k + 1) on self and each in-neighbour (d_k = in-degree)
    metropolis:  W_kl = 1/(1 + max(d_k, d_l)) on edges, W_kk = 1 − Σ_{l≠k} W_kl  (symmetric A only)
    max_degree:  W_kl = 1/(d_max + 1) on edges, W_kk = 1 − Σ_{l≠k} W_kl          (symmetric A only)
    auto:        uniform for directed graphs, ring and complete; metropolis for other undirected ones.
    """
    check_choice("topology.weights", rule, WEIGHT_RULES)
    if directed or topology in ("exponential", "one_peer_exponential"):
        if rule not in DIRECTED_RULES:
            raise bad_value("topology.weights", rule, DIRECTED_RULES,
                            f"topology={topology} is directed; metropolis and max_degree need an "
                            f"undirected graph")
        rule = "uniform"
    elif rule == "auto":
        rule = "uniform" if topology in ("ring", "complete") else "metropolis"
    n = A.shape[0]
    Af = A.astype(np.float64)
    deg = Af.sum(axis=1)
    if rule == "uniform":
        return (Af + np.eye(n)) / (deg + 1.0)[:, None]
    if rule == "metropolis":
        W = Af / (1.0 + np.maximum.outer(deg, deg))
    else:  # max_degree
        W = Af / (deg.max(initial=0.0) + 1.0)
    W[np.diag_indices(n)] = 1.0 - W.sum(axis=1)
    return W


def _lazy(W: np.ndarray) -> np.ndarray:
    """(I + W) / 2: every node keeps at least half of its own model."""
    return 0.5 * (np.eye(W.shape[0]) + W)


# --------------------------------------------------------------------------- time-varying and files


def _one_peer_make(n: int, rule: str) -> Callable[[int], np.ndarray]:
    """Round t: node i receives from i − 2^(t mod τ) (mod n), weight 1/2, keeps 1/2; τ = ⌊log2(n−1)⌋+1."""
    tau = max((n - 1).bit_length(), 1)
    idx = np.arange(n)

    def make(t: int) -> np.ndarray:
        A = np.zeros((n, n), dtype=bool)
        if n > 1:
            A[idx, (idx - 2 ** (t % tau)) % n] = True
        return _weights(A, rule, directed=True, topology="one_peer_exponential")

    return make


def _matching_make(n: int, rule: str, seed: int) -> Callable[[int], np.ndarray]:
    """Round t: perfect matching from default_rng([seed, t]).permutation(n), pairs (perm[0], perm[1]), …;
    matched pairs average (1/2, 1/2), the unmatched node of an odd n keeps weight 1."""

    def make(t: int) -> np.ndarray:
        perm = np.random.default_rng([seed, t]).permutation(n)
        a, b = perm[0:n - 1:2], perm[1:n:2]
        A = np.zeros((n, n), dtype=bool)
        A[a, b] = True
        A[b, a] = True
        return _weights(A, rule, directed=False, topology="random_matching")

    return make


def _read_matrix_file(path: Path) -> np.ndarray:
    """CSV (comma separated numbers, no header) or .npy -> float64 array."""
    if not path.is_file():
        raise UserError(f"topology.path={str(path)!r}: file not found ({path.resolve()}); give a CSV or "
                        f".npy mixing matrix")
    if path.suffix.lower() == ".npy":
        return _read_npy(path)
    try:
        return np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64)
    except ValueError as e:
        raise UserError(f"cannot read {path} as CSV ({e}); it must hold plain comma-separated numbers, "
                        f"one matrix row per line, no header") from None


def _file_schedule(cfg: TopologyConfig, n: int) -> MixingSchedule:
    """topology=file: [n, n] static, or .npy [T, n, n] with W^t = M[t mod T]."""
    if cfg.weights != "auto":
        raise bad_value("topology.weights", cfg.weights, ["auto"],
                        "topology=file uses the weights in the file as they are")
    path = Path(cfg.path).expanduser()
    M = _read_matrix_file(path)
    shape = tuple(M.shape)
    if M.ndim == 2:
        M = M[None]
    if M.ndim != 3 or M.shape[1:] != (n, n) or M.shape[0] == 0:
        raise UserError(f"{path} has shape {shape} but nodes={n}; it must be [{n}, {n}] "
                        f"(or a .npy [T, {n}, {n}] for a time-varying schedule). Set nodes to match "
                        f"the file or fix the file.")
    for t in range(M.shape[0]):
        validate_mixing(M[t], f"{path}" + (f" matrix [{t}]" if M.shape[0] > 1 else ""))
    if cfg.lazy:
        M = np.stack([_lazy(W) for W in M])
    name = f"W (topology=file, {path})"
    if M.shape[0] == 1:
        return MixingSchedule.static(M[0], name)
    T = M.shape[0]
    return MixingSchedule(n, lambda t: M[t % T].copy(), time_varying=True, name=name)


# --------------------------------------------------------------------------- entry point


def build_schedule(cfg: TopologyConfig, n: int, seed: int) -> MixingSchedule:
    """The run's mixing schedule for ``nodes=n``; cfg.seed overrides ``seed`` when not None."""
    check_choice("topology.name", cfg.name, TOPOLOGIES, "Pick a file from configs/topology/.")
    check_choice("topology.weights", cfg.weights, WEIGHT_RULES)
    check_range("nodes", n, 1)
    n = int(n)
    seed = int(cfg.seed if cfg.seed is not None else seed)
    if seed < 0:
        raise UserError(f"seed={seed} is out of range; the graph seed must be >= 0 "
                        f"(set seed or topology.seed)")
    name = f"W (topology={cfg.name}, nodes={n})"
    if cfg.name == "file":
        return _file_schedule(cfg, n)
    if cfg.name in TIME_VARYING:
        make = (_one_peer_make(n, cfg.weights) if cfg.name == "one_peer_exponential"
                else _matching_make(n, cfg.weights, seed))
        make(0)                                    # surface a bad weight rule now, not at round 0
        if cfg.lazy:
            inner = make
            make = lambda t: _lazy(inner(t))       # noqa: E731
        return MixingSchedule(n, make, time_varying=True, name=name)
    A, directed = _static_graph(cfg, n, seed)
    W = _weights(A, cfg.weights, directed, cfg.name)
    if cfg.lazy:
        W = _lazy(W)
    return MixingSchedule.static(W, name)


# --------------------------------------------------------------------------- connectivity


def strong_components(A: np.ndarray) -> List[List[int]]:
    """Strongly connected components of the directed graph with an edge l -> k where A[k, l] is nonzero,
    as sorted node lists, ordered by their smallest node."""
    from scipy.sparse.csgraph import connected_components

    A = np.asarray(A) != 0
    n = A.shape[0]
    count, labels = connected_components(A.astype(np.int8), directed=True, connection="strong")
    comps: Dict[int, List[int]] = {}
    for node, lab in enumerate(labels):
        comps.setdefault(int(lab), []).append(node)
    return sorted(comps.values(), key=lambda c: c[0]) if n else []


def _show_components(comps: List[List[int]]) -> str:
    def one(c: List[int]) -> str:
        return "{" + ", ".join(map(str, c[:MAX_LISTED])) + (", ..." if len(c) > MAX_LISTED else "") + "}"

    shown = [one(c) for c in comps[:5]]
    return ", ".join(shown) + (f" and {len(comps) - 5} more" if len(comps) > 5 else "")


def check_connected(schedule: MixingSchedule, rounds: int, allow: bool = False) -> None:
    """UserError (exit 2) unless the communication graph is strongly connected: every node's influence can
    reach every other node. Static W: W itself. Time-varying W^t: the union of W^0 ... W^{rounds-1} (an edge
    that appears in any round counts), since nodes that are only linked over several rounds — one peer per
    round, random matchings — still mix over the run. ``allow`` (topology.allow_disconnected) skips it."""
    if allow or schedule.n <= 1:
        return
    if schedule.time_varying:
        T = int(rounds) if schedule.rounds is None else min(int(rounds), schedule.rounds)
        union = np.zeros((schedule.n, schedule.n), dtype=bool)
        for t in range(max(T, 1)):
            union |= schedule._matrix(t) != 0
        A, over = union, f"over the run's {T} round(s) (the union of W^0 ... W^{max(T, 1) - 1})"
    else:
        A, over = schedule._matrix(0), ""
    if _strongly_connected(np.asarray(A) != 0):     # numpy only; scipy names the components when it is not
        return
    comps = strong_components(A)
    if len(comps) > 1:
        sizes = sorted({len(c) for c in comps})
        B = np.asarray(A) != 0
        kind = "disconnected" if len(strong_components(B | B.T)) > 1 else \
            "not strongly connected (some nodes reach others but cannot be reached back)"
        raise UserError(f"{schedule.name} is {kind}{' ' + over if over else ''}: {len(comps)} strongly connected "
                        f"components {_show_components(comps)} (sizes {', '.join(map(str, sizes))}); influence "
                        f"cannot flow (both ways) between them and the nodes never reach consensus. Fix the "
                        f"topology, or set topology.allow_disconnected=true to train anyway")


def build_checked_schedule(cfg) -> MixingSchedule:
    """``build_schedule`` for a TrainConfig, refusing a graph that is not strongly connected over the run
    unless ``topology.allow_disconnected`` (see ``check_connected``)."""
    schedule = build_schedule(cfg.topology, cfg.nodes, cfg.seed)
    check_connected(schedule, cfg.rounds, getattr(cfg.topology, "allow_disconnected", False))
    return schedule


# --------------------------------------------------------------------------- description


def _spectral_gap(W: np.ndarray) -> float:
    """1 − |λ_2|, λ_2 the eigenvalue of second largest modulus (1.0 for n = 1)."""
    n = W.shape[0]
    if n == 1:
        return 1.0
    if np.allclose(W, W.T, rtol=0, atol=1e-12):
        mods = np.abs(np.linalg.eigvalsh(0.5 * (W + W.T)))
    else:
        mods = np.abs(np.linalg.eigvals(W))
    gap = 1.0 - float(np.sort(mods)[-2])
    return 0.0 if abs(gap) < 1e-12 else gap


def _strongly_connected(adj: np.ndarray) -> bool:
    """Every node reaches every other along the edges of the boolean [n, n] adjacency: node 0 reaches all
    nodes, and all reach node 0 (breadth-first in numpy; scipy's csgraph would cost its import)."""
    n = adj.shape[0]
    for a in (adj, adj.T):
        seen = np.zeros(n, dtype=bool)
        seen[0] = True
        frontier = seen.copy()
        while frontier.any():
            frontier = a[:, frontier].any(axis=1) & ~seen
            seen |= frontier
        if not seen.all():
            return False
    return True


def describe(W: np.ndarray) -> dict:
    """Plain JSON-able summary of one mixing matrix W [n, n] (row k = receiver k's weights).

    edges = off-diagonal nonzeros (directed count: an undirected ring of 16 has 32); in-degree of k =
    #{l ≠ k : W[k, l] > 0}, out-degree of j = #{k ≠ j : W[k, j] > 0}.
    """
    W = np.asarray(W, dtype=np.float64)
    n = W.shape[0]
    off = (W > 0) & ~np.eye(n, dtype=bool)
    nonneg = bool((W >= 0).all())
    return {
        "nodes": int(n),
        "edges": int(off.sum()),
        "self_loops": int((np.diag(W) > 0).sum()),
        "directed": not bool(np.array_equal(off, off.T)),
        "row_stochastic": nonneg and bool(np.allclose(W.sum(axis=1), 1.0, rtol=0, atol=ATOL)),
        "column_stochastic": nonneg and bool(np.allclose(W.sum(axis=0), 1.0, rtol=0, atol=ATOL)),
        "symmetric": bool(np.allclose(W, W.T, rtol=0, atol=1e-12)),
        "spectral_gap": _spectral_gap(W),
        "max_in_degree": int(off.sum(axis=1).max()),
        "max_out_degree": int(off.sum(axis=0).max()),
        "strongly_connected": _strongly_connected(off),
    }


def describe_schedule(s: MixingSchedule, rounds: int) -> dict:
    """Static: describe(W) (+ time_varying False). Time-varying: describe(W^0) plus
    mean_spectral_gap (of the mean of W^0 … W^{m−1}, m = min(rounds, 100)) and
    every_round_row_stochastic over t in [0, rounds)."""
    d = describe(s._matrix(0))
    d["time_varying"] = s.time_varying
    if not s.time_varying:
        return d
    rounds = int(rounds) if s.rounds is None else min(int(rounds), s.rounds)
    m = max(min(rounds, 100), 1)
    mean = sum(s._matrix(t) for t in range(m)) / m
    d["mean_rounds"] = m
    d["mean_spectral_gap"] = _spectral_gap(mean)
    d["rounds_checked"] = rounds
    d["every_round_row_stochastic"] = all(_is_row_stochastic(s._matrix(t)) for t in range(rounds))
    return d
