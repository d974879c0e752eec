"""Unreliable networks (NETWORKS.md): churn, link drops, stale messages, CHOCO-compressed gossip.

Everything random is drawn ONCE, at train start, from ``network.seed`` (None = the run's seed) and kept in
a ``NetworkRecord`` that ``dice train`` writes to <run>/network.npz (listed in the manifest with its sha256);
every replay (gt, estimate, value, detect, resume) reads that file and never redraws.

Record (row k = receiver, column l = sender, as W^t):

    online [T, n] bool        a_k^t: node k takes part in round t
    drop   [T, n, n] bool     f^t_kl: edge l → k failed in round t (diagonal False)
    delay  [T, n, n] uint8    d^t_kl ∈ {0..D}: the message l → k of round t carries l's value of round t − d
    mask   [T, n, P] bool     random_k: the coordinates node k sends in round t
    noise  [T, n, P] uint8    qsgd: u = (noise + ½) / 256, the uniform of the stochastic rounding

Effective mixing (§1, §2): an online receiver keeps the weight of every sender that is online and whose
edge did not fail; the rest goes to its self-weight; an offline node keeps its model:

    M^t_kl = W^t_kl a_k a_l (1 − f^t_kl)  (l ≠ k),   M^t_kk = W^t_kk + Σ_{l≠k} (W^t_kl − M^t_kl)   (a_k = 1)
    M^t_k· = e_k                                                                                    (a_k = 0)

Delays (§3): M^t splits by delay, M^t = Σ_d M^t_(d) (M_(d) = M ⊙ [d^t = d], self-weights at d = 0), and

    θ^{t+1} = Σ_d M^t_(d) X^{t−d}      (X^r = the value sent in round r: θ^{r+½}, or θ̂^{r+1} with compression)

so the state carries X^{t−1} … X^{t−D} (``State.gossip["net.sent"]`` [.., D, n, P]; before round 0 every
node "sent" its round-0 value). CHOCO (§4): q_k = a_k Q(θ_k^{t+½} − θ̂_k), θ̂_k += q_k,
θ_k^{t+1} = θ_k^{t+½} + γ (Σ_d M_(d) X^{t−d} − θ̂_k)_k, θ̂ in ``State.gossip["net.public"]`` [.., n, P]
(θ̂^0 = 0, Koloskova et al.).

Q: top_k (the k = max(1, round(ratio·P)) largest |v_i|), random_k (the recorded coordinates; no rescaling, so
Q is a contraction as CHOCO needs), qsgd (Alistarh et al. with s levels, rescaled by 1/τ, τ = 1 + min(P/s²,
√P/s), CHOCO's contractive variant). Derivatives: top_k / random_k are linear for fixed masks (autograd
through the chosen coordinates); qsgd's rounding is straight-through (Q treated as identity) when a graph is
kept, and exact (no graph) otherwise.

    rec = draw(cfg.network, n=16, rounds=200, num_params=P, seed=0, schedule=W)
    M = rec.effective(W.at(t), t)
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import Tensor

from .config import NetworkConfig
from .errors import UserError

FILE = "network.npz"
RECORD_LIMIT_MB = 1024.0            # random_k / qsgd records beyond this are refused (exit 2)


@dataclass
class NetworkRecord:
    """Everything random about the network of one run (see the module docstring for shapes)."""
    n: int
    rounds: int
    online: Optional[np.ndarray] = None
    drop: Optional[np.ndarray] = None
    delay: Optional[np.ndarray] = None
    max_delay: int = 0
    compression: str = "none"
    ratio: float = 1.0
    levels: int = 16
    gamma: float = 1.0
    num_params: int = 0
    mask: Optional[np.ndarray] = None
    noise: Optional[np.ndarray] = None
    churn: str = "none"

    # ---- what is active ------------------------------------------------------------------------------
    @property
    def reshapes_mixing(self) -> bool:
        """Churn or drops: W^t is replaced by the effective M^t."""
        return self.online is not None or self.drop is not None

    @property
    def delayed(self) -> bool:
        return self.delay is not None and self.max_delay > 0

    @property
    def compressed(self) -> bool:
        return self.compression != "none"

    @property
    def stateful(self) -> bool:
        """The gossip step needs the network state (history and/or public copies)."""
        return self.delayed or self.compressed

    # ---- effective matrices --------------------------------------------------------------------------
    def effective(self, W: np.ndarray, t: int) -> np.ndarray:
        """M^t [n, n] from W^t (module docstring); W^t itself, bit for bit, where nothing failed."""
        n = self.n
        keep = np.ones((n, n))
        if self.online is not None:
            a = self.online[t].astype(np.float64)
            keep = keep * a[:, None] * a[None, :]
        if self.drop is not None:
            keep = keep * (~self.drop[t])
        np.fill_diagonal(keep, 1.0)
        M = W * keep
        lost = (W - M).sum(1)                       # exact 0.0 where every sender was kept
        M[np.arange(n), np.arange(n)] = np.diagonal(W) + lost
        if self.online is not None:
            off = ~self.online[t].astype(bool)
            M[off] = 0.0
            M[off, np.flatnonzero(off)] = 1.0
        return M

    def split(self, M: np.ndarray, t: int) -> List[np.ndarray]:
        """[M_(0), …, M_(D)]: M split by the delay of each edge in round t (self-weights at d = 0)."""
        if not self.delayed:
            return [M]
        d = self.delay[t].astype(np.int64)
        np.fill_diagonal(d, 0)
        return [np.where(d == k, M, 0.0) for k in range(self.max_delay + 1)]

    def propagators(self, M: np.ndarray, t: int) -> List[np.ndarray]:
        """The linear maps of the first-order DP (hessian: none, Q straight-through): θ^{t+1} perturbation
        = Σ_d A_(d) (perturbation of X^{t−d}); A = M_(d), or (1 − γ) I + γ M_(0), γ M_(d) with compression."""
        parts = self.split(M, t)
        if self.compressed:
            parts = [self.gamma * p for p in parts]
            parts[0] = parts[0] + (1 - self.gamma) * np.eye(self.n)
        return parts

    def effective_all(self, base) -> np.ndarray:
        """M^t for every round at once: [T, n, n] (vectorised ``effective``, the same numbers)."""
        n, T = self.n, self.rounds
        W = (np.broadcast_to(base.at(0), (T, n, n)) if not base.time_varying
             else np.stack([base.at(t) for t in range(T)]))
        keep = np.ones((T, n, n))
        if self.online is not None:
            a = self.online.astype(np.float64)
            keep = keep * a[:, :, None] * a[:, None, :]
        if self.drop is not None:
            keep = keep * (~self.drop)
        idx = np.arange(n)
        keep[:, idx, idx] = 1.0
        M = W * keep
        lost = (W - M).sum(2)
        M[:, idx, idx] = W[:, idx, idx] + lost
        if self.online is not None:
            tt, kk = np.nonzero(~self.online.astype(bool))
            M[tt, kk, :] = 0.0
            M[tt, kk, kk] = 1.0
        return M

    def online_at(self, t: int) -> Optional[np.ndarray]:
        return None if self.online is None else self.online[t].astype(bool)

    # ---- bytes on the wire ---------------------------------------------------------------------------
    def message_bytes(self, elem: int) -> int:
        """Bytes of one message (one model) on an edge: P·elem plain; top_k k·(elem + 4) (values and int32
        indices); random_k k·elem (the mask is shared through the seed); qsgd ⌈P (1 + ⌈log2(s + 1)⌉) / 8⌉
        + elem (sign and level per coordinate, plus the norm)."""
        P = self.num_params
        if self.compression == "top_k":
            return topk_count(P, self.ratio) * (elem + 4)
        if self.compression == "random_k":
            return topk_count(P, self.ratio) * elem
        if self.compression == "qsgd":
            return math.ceil(P * (1 + math.ceil(math.log2(self.levels + 1))) / 8) + elem
        return P * elem

    def bytes_sent(self, M: np.ndarray, elem: int) -> np.ndarray:
        """Bytes each node sends in a round with effective matrix M: [n] (message size × receivers l ≠ k
        with M_kl > 0; an offline node sends nothing)."""
        on = (M > 0) & ~np.eye(self.n, dtype=bool)
        return on.sum(0).astype(np.int64) * self.message_bytes(elem)

    # ---- summary / files -----------------------------------------------------------------------------
    def summary(self) -> Dict[str, object]:
        out: Dict[str, object] = {"churn": self.churn, "compression": self.compression,
                                  "max_delay": int(self.max_delay) if self.delayed else 0}
        if self.online is not None:
            out["offline_fraction"] = round(float(1 - self.online.mean()), 6)
            out["empty_rounds"] = int((~self.online.any(1)).sum())
        if self.drop is not None:
            off = ~np.eye(self.n, dtype=bool)
            out["drop_fraction"] = round(float(self.drop[:, off].mean()), 6)
        if self.delayed:
            off = ~np.eye(self.n, dtype=bool)
            out["mean_delay"] = round(float(self.delay[:, off].mean()), 6)
        if self.compressed:
            out.update(ratio=self.ratio, levels=self.levels, gamma=self.gamma)
        return out

    def to_bytes(self) -> bytes:
        arrays = {"meta": np.array([self.n, self.rounds, self.max_delay, self.levels, self.num_params]),
                  "floats": np.array([self.ratio, self.gamma]),
                  "compression": np.array(self.compression), "churn": np.array(self.churn)}
        for k in ("online", "drop", "delay", "noise"):
            v = getattr(self, k)
            if v is not None:
                arrays[k] = v
        if self.mask is not None:
            arrays["mask_bits"] = np.packbits(self.mask, axis=-1)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        return buf.getvalue()

    @staticmethod
    def load(path: Path) -> "NetworkRecord":
        """The record of <run>/network.npz (``path``: the file or the run directory)."""
        p = Path(path)
        if p.is_dir():
            p = p / FILE
        try:
            z = np.load(p, allow_pickle=False)
            n, T, D, s, P = (int(v) for v in z["meta"])
            ratio, gamma = (float(v) for v in z["floats"])
            rec = NetworkRecord(n, T, max_delay=D, levels=s, num_params=P, ratio=ratio, gamma=gamma,
                                compression=str(z["compression"]), churn=str(z["churn"]))
            for k in ("online", "drop", "delay", "noise"):
                if k in z.files:
                    setattr(rec, k, z[k])
            if "mask_bits" in z.files:
                rec.mask = np.unpackbits(z["mask_bits"], axis=-1, count=P).astype(bool)
        except (OSError, ValueError, KeyError, EOFError) as e:
            raise UserError(f"{p} cannot be read as a dice network record ({type(e).__name__}: {e}); restore it, "
                            f"or train the run again") from None
        return rec


def topk_count(P: int, ratio: float) -> int:
    return max(1, min(P, int(round(ratio * P))))


def qsgd_tau(P: int, s: int) -> float:
    return 1.0 + min(P / s ** 2, math.sqrt(P) / s)


# --------------------------------------------------------------------------------------------- drawing


def _rng(seed: int, stream: int) -> np.random.Generator:
    """One independent stream per quantity, so turning one knob never changes another's draws."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), 14, stream]))


def read_trace(path: str, n: int, T: int) -> np.ndarray:
    """A [T, n] 0/1 availability file (.npy, or .csv/.txt with one row per round): exit 2 naming the file
    and what is wrong (shape, values outside {0, 1})."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"network.trace={path!r} does not exist; give a [T, n] = [{T}, {n}] 0/1 file (.npy or .csv)")
    try:
        a = np.load(p, allow_pickle=False) if p.suffix == ".npy" else np.loadtxt(p, delimiter=",", ndmin=2)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"network.trace={path!r} cannot be read ({type(e).__name__}: {e}); write a [T, n] 0/1 matrix "
                        f"as .npy or comma-separated text") from None
    a = np.asarray(a)
    if a.shape != (T, n):
        raise UserError(f"network.trace={path!r} has shape {list(a.shape)}, but the run needs [rounds, nodes] = "
                        f"[{T}, {n}] (row t = round t, column k = node k); fix the file or rounds=/nodes=")
    bad = ~np.isin(a, (0, 1))
    if bad.any():
        t, k = (int(v) for v in np.argwhere(bad)[0])
        raise UserError(f"network.trace={path!r}: round {t}, node {k} holds {a[t, k]!r}; availability values must "
                        f"be 0 (offline) or 1 (online)")
    return a.astype(bool)


def draw_online(cfg: NetworkConfig, n: int, T: int, seed: int) -> Optional[np.ndarray]:
    """a [T, n] bool for ``cfg.churn`` (None for churn=none)."""
    if cfg.churn == "none":
        return None
    if cfg.churn == "bernoulli":
        a = _rng(seed, 1).random((T, n)) < cfg.churn_p
    elif cfg.churn == "markov":
        r = _rng(seed, 1)
        total = cfg.p_on + cfg.p_off
        start = cfg.p_on / total if total > 0 else 1.0          # stationary probability of being online
        u = r.random((T, n))
        a = np.empty((T, n), dtype=bool)
        a[0] = u[0] < start
        for t in range(1, T):
            a[t] = np.where(a[t - 1], u[t] >= cfg.p_off, u[t] < cfg.p_on)
    elif cfg.churn == "trace":
        a = read_trace(cfg.trace, n, T)
    else:   # schedule
        join = np.asarray(cfg.join if cfg.join is not None else [0] * n)
        leave = np.asarray(cfg.leave if cfg.leave is not None else [T] * n)
        t = np.arange(T)[:, None]
        a = (t >= join[None, :]) & (t < leave[None, :])
    empty = np.flatnonzero(~a.any(1))
    # a user-given availability (trace, schedule) with an empty round is a mistake; a random draw may leave a
    # round empty by chance (nothing happens in it: M^t = I, Δ = 0), which the manifest counts (empty_rounds)
    if len(empty) and cfg.churn in ("trace", "schedule"):
        t = int(empty[0])
        src = f" of network.trace={cfg.trace!r}" if cfg.churn == "trace" else ""
        fix = {"trace": "mark at least one node online in every row",
               "schedule": "make the join/leave rounds overlap"}[cfg.churn]
        raise UserError(f"network.churn={cfg.churn}: every node is offline in round {t}{src} "
                        f"({len(empty)} such round(s)); no one could train or gossip. Fix: {fix}")
    return a


def draw(cfg: NetworkConfig, n: int, rounds: int, num_params: int, seed: int, schedule) -> Optional[NetworkRecord]:
    """Draw the run's network once (None for a plain network). ``schedule``: the base W^t (its support
    decides nothing here; drop and delay are drawn for every ordered pair, diagonal cleared)."""
    if cfg.plain:
        return None
    seed = cfg.seed if cfg.seed is not None else seed
    T, P = int(rounds), int(num_params)
    rec = NetworkRecord(n, T, churn=cfg.churn, num_params=P)
    rec.online = draw_online(cfg, n, T, seed)
    eye = np.eye(n, dtype=bool)
    if cfg.drop > 0:
        rec.drop = (_rng(seed, 2).random((T, n, n)) < cfg.drop) & ~eye
    if cfg.delay != "none" and cfg.max_delay > 0:
        D = int(cfg.max_delay)
        if D > 255:
            raise UserError(f"network.max_delay={D} is more than 255 rounds; use a smaller D")
        r = _rng(seed, 3)
        if cfg.delay == "fixed":
            d = np.full((T, n, n), D, dtype=np.uint8)
        elif cfg.delay == "uniform":
            d = r.integers(0, D + 1, size=(T, n, n), dtype=np.uint8)
        else:   # per_edge: one delay per directed edge, the same every round
            d = np.broadcast_to(r.integers(0, D + 1, size=(n, n), dtype=np.uint8), (T, n, n)).copy()
        d[:, eye] = 0
        rec.delay, rec.max_delay = d, D
    if cfg.compression != "none":
        rec.compression, rec.ratio, rec.levels, rec.gamma = cfg.compression, float(cfg.ratio), int(cfg.levels), \
            float(cfg.gamma)
        if cfg.compression in ("random_k", "qsgd"):
            mb = T * n * P * (1 / 8 if cfg.compression == "random_k" else 1) / 2**20
            if mb > RECORD_LIMIT_MB:
                raise UserError(f"network.compression={cfg.compression} would record {mb:.0f} MB of random draws "
                                f"(rounds × nodes × params); use compression=top_k (deterministic), or fewer "
                                f"rounds / a smaller model")
        r = _rng(seed, 4)
        if cfg.compression == "random_k":
            k = topk_count(P, cfg.ratio)
            keys = r.random((T, n, P), dtype=np.float32)
            idx = np.argpartition(keys, k - 1, axis=-1)[..., :k]
            mask = np.zeros((T, n, P), dtype=bool)
            np.put_along_axis(mask, idx, True, axis=-1)
            rec.mask = mask
        elif cfg.compression == "qsgd":
            rec.noise = r.integers(0, 256, size=(T, n, P), dtype=np.uint8)
    return rec


# --------------------------------------------------------------------------------------------- runtime


class NetworkRuntime:
    """The record on the device, with the pieces a round needs: the availability a^t [n] (``online``),
    the delay-split effective matrices (``split``), and Q (``compress``)."""

    def __init__(self, rec: NetworkRecord, device: torch.device, dtype: torch.dtype):
        self.rec, self.device, self.dtype = rec, device, dtype
        self.D = rec.max_delay if rec.delayed else 0
        self._online = None if rec.online is None else torch.as_tensor(rec.online, device=device).to(dtype)
        self._all_on = None if rec.online is None else rec.online.all(1)
        self._split: Dict[int, Tensor] = {}
        self.stack_all: Optional[Tensor] = None
        self._mask = self._noise = None
        if rec.compressed:
            self.k = topk_count(rec.num_params, rec.ratio)
            self.tau = qsgd_tau(rec.num_params, rec.levels)
            if rec.mask is not None:          # on the device once: no per-round host → device copies
                self._mask = torch.as_tensor(rec.mask, device=device)
            if rec.noise is not None:
                self._noise = torch.as_tensor(rec.noise, device=device)

    def online(self, t: int) -> Optional[Tensor]:
        """a^t [n] in the run's dtype, or None when every node is online in round t."""
        if self._online is None or self._all_on[t]:
            return None
        return self._online[t]

    def split(self, t: int, mixing) -> Tensor:
        """[M_(0) | M_(1) | … | M_(D)]: [n, (D+1)·n] on the device, so that Σ_d M_(d) X^{t−d} is one product
        with the stacked [(D+1)·n, P] values. ``mixing``: the engine's ``Mixing`` (M^t = mixing.numpy(t))."""
        if self.stack_all is not None:
            return self.stack_all[t]
        if t not in self._split:
            parts = self.rec.split(mixing.numpy(t), t)
            self._split = {t: torch.as_tensor(np.concatenate(parts, axis=1), device=self.device, dtype=self.dtype)}
        return self._split[t]

    def precompute(self, schedule) -> None:
        """Every round's stacked split matrices on the device at once (``stack_all`` [T, n, (D+1)·n]) when they
        fit in 256 MB: no per-round host work in the gossip step."""
        T, n = self.rec.rounds, self.rec.n
        if T * n * n * (self.D + 1) * 8 > 256 * 2**20:
            return
        eff = getattr(schedule, "_all", None)
        Ms = eff if eff is not None else [schedule.at(t) for t in range(T)]
        self.stack_all = torch.as_tensor(np.stack([np.concatenate(self.rec.split(np.asarray(Ms[t]), t), axis=1)
                                                   for t in range(T)]), device=self.device, dtype=self.dtype)

    def compress(self, t: int, v: Tensor) -> Tensor:
        """Q(v) for v [.., n, P] (every copy with round t's recorded randomness)."""
        kind = self.rec.compression
        if kind == "top_k":
            idx = v.abs().topk(self.k, dim=-1, sorted=False).indices
            return torch.zeros_like(v).scatter(-1, idx, v.gather(-1, idx))
        if kind == "random_k":
            return torch.where(self._mask[t], v, torch.zeros((), dtype=v.dtype, device=v.device))
        u = (self._noise[t].to(v.dtype) + 0.5) / 256
        s = self.rec.levels
        with torch.no_grad():
            norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
            x = v.abs() * s / torch.where(norm > 0, norm, torch.ones_like(norm))
            low = x.floor()
            xi = low + (u < x - low).to(v.dtype)
            q = norm * v.sign() * xi / (s * self.tau)
        if v.requires_grad:                      # straight-through: ∂Q/∂v = I
            return v + (q - v.detach())
        return q


def derivative_note(cfg: NetworkConfig, kind: str, method: str) -> dict:
    """What an influence result on a run with an unreliable network measured (summary.json ``network``)."""
    out: Dict[str, object] = {"churn": cfg.churn, "drop": cfg.drop,
                              "delay": cfg.delay if cfg.max_delay else "none", "max_delay": cfg.max_delay,
                              "compression": cfg.compression}
    parts = ["every round uses the recorded network (network.npz): effective matrices M^t (offline senders and "
             "failed edges moved to the receiver's self-weight, offline nodes frozen)"]
    if kind == "gt":
        parts.append("GT re-simulates with the same draws (the same masks, delays and rounding noise); exact "
                     "whatever Q is")
    elif method == "exact":
        parts.append("exact differentiates through the state history (sent models of the last D rounds, public "
                     "copies θ̂)")
        if cfg.compression in ("top_k", "random_k"):
            parts.append(f"{cfg.compression}: Q is linear for fixed masks; the derivative keeps the factual "
                         f"run's masks")
        if cfg.compression == "qsgd":
            parts.append("qsgd: stochastic rounding has zero derivative almost everywhere, so the derivative is "
                         "straight-through (Q treated as identity, ∂Q/∂v = I)")
    else:
        parts.append("first_order's DP runs on the effective matrices split by delay: δ^(s) = Σ_d M^(t+s−1)_(d) "
                     "δ^(s−1−d), δ^(0) = e_j δ_u")
        if cfg.compression != "none":
            parts.append("with compression Q is straight-through (identity): the propagators are (1 − γ) I + "
                         "γ M_(0) and γ M_(d)")
    out["note"] = "; ".join(parts)
    if cfg.compression != "none":
        out["straight_through"] = cfg.compression == "qsgd" or (kind != "gt" and method == "first_order")
    return out
