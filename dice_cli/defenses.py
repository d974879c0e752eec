"""Receiver-side aggregation rules AGG_k for ``dice train defense=...`` (ROBUST.md §4).

In round t receiver k holds its own θ_k^{t+½} and one message m_{l→k} per in-neighbour l (W^t_kl > 0, l ≠ k;
θ_l^{t+½} for honest senders). The engine hands every rule the same padded view of it (``engine.Inbox``):
M [.., n, D, P] with slot 0 = k's own model, then its in-neighbours in increasing id, ``valid`` [n, D],
``weight`` [n, D] = W^t_{k, sender}. Every rule is receiver-local (row k of the result uses only row k of M,
k's own state and k's probe set) and online (round t's messages and earlier rounds' scores only). Every rule
works on a leading copies axis (``dice gt``) and is piecewise differentiable (``dice estimate method=exact``
differentiates through the sorts, norms and weights; the choices themselves — which value is trimmed, which
neighbour is cut — are constants of the factual run).

- ``clipped_gossip`` (He, Karimireddy & Jaggi 2022, self-centred clipping):
      θ_k^{t+1} = θ_k^{t+½} + Σ_l W_kl clip(m_{l→k} − θ_k^{t+½}, τ_k),   clip(x, τ) = x · min(1, τ/‖x‖);
  τ_k = ``defense.tau``, or (adaptive, epfml's rule generalised to b) the (b+1)-th largest ‖m_{l→k} − θ_k^{t+½}‖
  among k's in-neighbours (the smallest when k has ≤ b of them): the b farthest are clipped to it.
- ``trimmed_mean``: coordinate-wise over {m_{l→k}} ∪ {θ_k^{t+½}} (c_k values), the b largest and b smallest
  dropped, the mean of the c_k − 2b others. Needs c_k > 2b and at most b attacking in-neighbours.
- ``median``: coordinate-wise median of the same c_k values (the mean of the two middle ones when c_k is even).
- ``balance`` (Fang et al. 2024): m_{l→k} accepted if ‖m_{l→k} − θ_k^{t+½}‖ ≤ γ e^{−κ t/T} ‖θ_k^{t+½}‖;
      θ_k^{t+1} = α θ_k^{t+½} + (1 − α) mean(accepted),   θ_k^{t+½} when nothing is accepted.
- ``dice`` (proximal influence acted on): with g_k = ∇L_k(θ_k^{t+½}) (k's own probe gradient; on the rows
  (t·b + i) mod m of its probe set with ``probe_batch`` = b > 0) and the update
  the sender attributes to its message, Δ_{l→k} = m_{l→k} − θ_l^t (DICE's Δ_l for an honest sender):
      p_kl = g_kᵀ Δ_{l→k}          (> 0: to first order, l's update raises k's probe loss; self slot: Δ_k)
      u_kl = p_kl / median_{j ∈ N_k ∪ {k}} |p_kj|                          (per-round scale; 0 if it is 0)
      S_kl ← ρ S_kl + (1 − ρ) u_kl,  c_kl ← c_kl + 1,  Ŝ_kl = S_kl / (1 − ρ^{c_kl})   (debiased running mean)
      z_kl = (Ŝ_kl − med_k) / max(1.4826 · MAD_k, min_spread)        (median / MAD over N_k ∪ {k})
  An in-neighbour with z_kl > threshold (from round ``warmup`` on) is cut (W'_kl = 0) or down-weighted
  (W'_kl = W_kl · threshold / z_kl); what it loses goes to k's self-weight, so rows stay stochastic, and
  θ_k^{t+1} = Σ_l W'_kl m_{l→k}. State: score S, count c, and mix W' of the last round, [.., n, n].
- ``dice_select`` (collaborator choice, SONAR's question): the same running score Ŝ of every candidate (W^t's
  in-neighbours: they all keep sending), from proximal influence (``select_by=influence``) or from the model
  distance u_kl = ‖m_{l→k} − θ_k^{t+½}‖ / median (``select_by=similarity``, the baseline). Before round R
  everyone mixes with W^t; at every round t ≥ R with t mod R = 0 each k keeps the ``keep`` candidates with the
  smallest Ŝ (ties: lower id) and then mixes uniformly over them and itself, 1/(|kept present| + 1). State:
  score, count, kept [.., n, n] (0/1) and mix.

The rules that need more honest values than a receiver has (trimmed_mean, median) are checked against the
run's attackers before training (``check_bounds``): more attackers than the rule tolerates is a usage error.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .config import DefenseConfig
from .errors import UserError

MAD_SCALE = 1.4826
RULES = ["clipped_gossip", "trimmed_mean", "median", "balance", "dice", "dice_select"]
Gossip = Dict[str, Tensor]


NETWORK_SLOTS = 16          # up to this many slots the coordinate-wise sort is a compare-exchange network


def sorted_slots(M: Tensor, box) -> List[Tensor]:
    """The D slot values of every coordinate in ascending order, invalid slots as +inf at the end:
    M [.., n, D, P] -> D tensors [.., n, P]. Up to NETWORK_SLOTS slots by odd-even transposition (D rounds
    of elementwise min/max, much faster on CPU than sorting along a short middle axis), else torch.sort."""
    x = M if box.regular else M + box.inf_pad[..., None]
    D = M.shape[-2]
    if D > NETWORK_SLOTS:
        return list(x.sort(dim=-2).values.unbind(-2))
    rows = list(x.unbind(-2))
    for phase in range(D):
        for i in range(phase % 2, D - 1, 2):
            a, b = rows[i], rows[i + 1]
            rows[i], rows[i + 1] = torch.minimum(a, b), torch.maximum(a, b)
    return rows


def _trimmed(M: Tensor, box, lo: Tensor, hi: Tensor) -> Tensor:
    """Coordinate-wise mean of the sorted values at ranks lo ≤ r < hi: M [.., n, D, P], lo/hi [n] -> [.., n, P]."""
    rows = sorted_slots(M, box)
    if bool((lo == lo[0]).all()) and bool((hi == hi[0]).all()):       # the same ranks at every receiver
        a, b = int(lo[0]), int(hi[0])
        return sum(rows[a + 1:b], rows[a]) / (b - a)
    out = None
    for r, v in enumerate(rows):
        keep = ((lo <= r) & (r < hi))[:, None]                                        # [n, 1]
        if bool(keep.any()):
            term = torch.where(keep, v, torch.zeros_like(v))
            out = term if out is None else out + term
    return out / (hi - lo).to(M.dtype)[:, None]


def _norm(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, dim=-1)


class Defense(ABC):
    """One configured rule. ``aggregate`` returns (Θ^{t+1} [.., n, P], the new gossip state)."""

    stateful = False

    def __init__(self, cfg: DefenseConfig, rounds: int):
        self.cfg, self.name, self.rounds = cfg, cfg.name, int(rounds)
        self.probe: Optional[Tuple[Tensor, Tensor, bool]] = None

    def set_probe(self, x: Tensor, y: Tensor, shared: bool) -> None:
        """The receivers' probe sets (dice, dice_select): x [m, ...] shared or [n, m, ...] per node."""
        self.probe = (x, y, bool(shared))

    def init_state(self, n: int, dtype: torch.dtype, device: torch.device) -> Gossip:
        return {}

    def probe_for(self, t: int) -> Tuple[Tensor, Tensor, bool]:
        """The probe samples round t's gradient uses: all of them, or with ``probe_batch`` = b > 0 the rows
        (t·b + i) mod m, i < b, of every node's probe set (cached: the windows repeat with period m)."""
        xp, yp, shared = self.probe
        b, m = int(self.cfg.probe_batch), int(yp.shape[-1])
        if b <= 0 or b >= m:
            return xp, yp, shared
        key = (t * b) % m
        cache = self.__dict__.setdefault("_windows", {})
        if key not in cache:
            idx = torch.remainder(torch.arange(key, key + b, device=yp.device), m)
            cache[key] = (xp[idx], yp[idx], shared) if shared else (xp[:, idx], yp[:, idx], shared)
        return cache[key]

    def manifest(self) -> dict:
        keys = {"clipped_gossip": ["b", "tau"], "trimmed_mean": ["b"], "median": [],
                "balance": ["gamma", "kappa", "alpha"],
                "dice": ["score", "decay", "threshold", "action", "min_spread", "warmup", "probe_batch"],
                "dice_select": ["score", "decay", "every", "keep", "select_by", "probe_batch"]}[self.name]
        out = {"name": self.name, **{k: getattr(self.cfg, k) for k in keys}}
        if self.name == "clipped_gossip":
            out["tau_rule"] = "fixed" if self.cfg.tau is not None else "adaptive: the (b+1)-th largest distance"
        return out

    @abstractmethod
    def aggregate(self, dyn, t: int, state, half: Tensor, buffers, box, edges, create_graph: bool
                  ) -> Tuple[Tensor, Gossip]:
        """Round t at every receiver: state = State^t (Θ^t, gossip state), half = Θ^{t+½} [.., n, P],
        box = the round's ``engine.Inbox``, edges = its Byzantine messages (``attacks.Edges`` or None).
        Each rule (ClippedGossip, TrimmedMean, Median, Balance, DiceDefense, ...) implements it."""


class ClippedGossip(Defense):
    def aggregate(self, dyn, t, state, half, buffers, box, edges, create_graph):
        diff = box.messages(half, edges) - half.unsqueeze(-2)                                                  # [.., n, D, P]
        dist = _norm(diff)                                                            # [.., n, D]
        if self.cfg.tau is not None:
            tau = torch.full_like(dist[..., :1], float(self.cfg.tau))
        else:
            nb = box.neighbour
            desc = torch.where(nb, dist, torch.full_like(dist, -float("inf"))).sort(dim=-1, descending=True).values
            deg = nb.sum(-1)
            pos = torch.minimum(torch.full_like(deg, int(self.cfg.b)), (deg - 1).clamp(min=0))
            tau = desc.gather(-1, pos.reshape(-1, 1).expand(dist.shape[:-1] + (1,))).clamp(min=0)   # −inf: no nbr
        over = dist > tau
        scale = torch.where(over, tau / torch.where(over, dist, torch.ones_like(dist)), torch.ones_like(dist))
        return half + ((box.weight * scale)[..., None] * diff).sum(-2), state.gossip


class TrimmedMean(Defense):
    def aggregate(self, dyn, t, state, half, buffers, box, edges, create_graph):
        b = int(self.cfg.b)
        M = box.messages(half, edges)
        if b == 1:      # Σ − max − min: three reductions instead of a sort
            if box.regular:
                kept = M.sum(-2) - M.amax(-2) - M.amin(-2)
            else:
                pad = box.inf_pad[..., None]
                kept = (M * box.valid[..., None]).sum(-2) - (M - pad).amax(-2) - (M + pad).amin(-2)
            return kept / (box.count - 2).to(M.dtype)[:, None], state.gossip
        return _trimmed(M, box, torch.full_like(box.count, b), box.count - b), state.gossip


class Median(Defense):
    def aggregate(self, dyn, t, state, half, buffers, box, edges, create_graph):
        c = box.count
        return _trimmed(box.messages(half, edges), box, (c - 1) // 2, c // 2 + 1), state.gossip


class Balance(Defense):
    def aggregate(self, dyn, t, state, half, buffers, box, edges, create_graph):
        cfg = self.cfg
        M = box.messages(half, edges)
        dist = _norm(M - half.unsqueeze(-2))                                          # [.., n, D]
        radius = cfg.gamma * float(np.exp(-cfg.kappa * t / max(self.rounds, 1))) * _norm(half)
        acc = box.neighbour & (dist <= radius.unsqueeze(-1))
        cnt = acc.sum(-1, keepdim=True)
        mean = (acc[..., None] * M).sum(-2) / cnt.clamp(min=1).to(M.dtype)
        mixed = cfg.alpha * half + (1 - cfg.alpha) * mean
        return torch.where(cnt > 0, mixed, half), state.gossip


class _TorchOps:
    """The array operations of the dice rules' per-slot bookkeeping, on torch tensors [.., n, D] (any
    leading copies axis, differentiable). ``_NumpyOps`` is the same on numpy arrays [n, D]: the fast path of
    a plain training round, where some 40 operations on 16 × 5 numbers cost more in torch's dispatch than
    the round's arithmetic (the two are compared in tests/test_defenses.py)."""
    lib = torch

    @staticmethod
    def const(box, name: str):
        return getattr(box, name)

    @staticmethod
    def arr(x: Tensor):
        return x

    @staticmethod
    def tensor(x, like: Tensor) -> Tensor:
        return x

    @staticmethod
    def median(box, x):
        s = (x if box.regular else x + box.inf_pad).sort(dim=-1).values
        shape = x.shape[:-1] + (1,)
        return 0.5 * (s.gather(-1, box.median_lo.expand(shape)) + s.gather(-1, box.median_hi.expand(shape)))

    @staticmethod
    def from_pairs(box, x):
        return box.from_pairs(x)

    @staticmethod
    def to_pairs(box, x, into=None):
        return box.to_pairs(x, into)

    @staticmethod
    def clamp_min(x, v):
        return torch.clamp(x, min=v)

    @staticmethod
    def rowsum(x):
        return x.sum(-1, keepdim=True)

    @staticmethod
    def floats(mask, like):
        return mask.to(like.dtype)

    @staticmethod
    def tiny(x) -> float:
        return torch.finfo(x.dtype).tiny

    @staticmethod
    def rank(key):
        order = key.argsort(dim=-1, stable=True)
        return torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                                .expand_as(order))


class _NumpyOps:
    lib = np
    _CONST = ("valid", "neighbour", "weight", "self_slot", "inf_pad", "median_lo", "median_hi", "sender",
              "sender_pad")

    @staticmethod
    def const(box, name: str):
        cache = box.__dict__.setdefault("_np", {})
        if name not in cache:
            cache[name] = getattr(box, name).cpu().numpy()
        return cache[name]

    @staticmethod
    def arr(x: Tensor):
        return x.detach().numpy()

    @staticmethod
    def tensor(x, like: Tensor) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=like.detach().numpy().dtype))

    @classmethod
    def median(cls, box, x):
        if box.regular:                                # every receiver has D slots: the middle columns
            s = np.sort(x, axis=-1)
            lo, hi = (box.D - 1) // 2, box.D // 2
            return 0.5 * (s[:, lo:lo + 1] + s[:, hi:hi + 1])
        s = np.sort(x + cls.const(box, "inf_pad"), axis=-1)
        return 0.5 * (np.take_along_axis(s, cls.const(box, "median_lo"), -1)
                      + np.take_along_axis(s, cls.const(box, "median_hi"), -1))

    @classmethod
    def from_pairs(cls, box, x):
        return x[np.arange(box.n)[:, None], cls.const(box, "sender")]

    @classmethod
    def to_pairs(cls, box, x, into=None):
        base = np.zeros((box.n, box.n + 1), dtype=x.dtype)
        if into is not None:
            base[:, :box.n] = into
        base[np.arange(box.n)[:, None], cls.const(box, "sender_pad")] = x
        return base[:, :box.n]

    @staticmethod
    def clamp_min(x, v):
        return np.maximum(x, v)

    @staticmethod
    def rowsum(x):
        return x.sum(-1, keepdims=True)

    @staticmethod
    def floats(mask, like):
        return mask.astype(like.dtype)

    @staticmethod
    def tiny(x) -> float:
        return float(np.finfo(x.dtype).tiny)

    @staticmethod
    def rank(key):
        order = np.argsort(key, axis=-1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(order.shape[-1])[None, :], -1)
        return rank


class _Scored(Defense):
    """The running per-in-neighbour score shared by ``dice`` and ``dice_select``."""

    stateful = True
    by_similarity = False

    def init_state(self, n, dtype, device):
        z = torch.zeros(n, n, dtype=dtype, device=device)
        return {"score": z, "count": z.clone(), "mix": z.clone()}

    @staticmethod
    def ops(state, half: Tensor, create_graph: bool):
        """numpy for a plain CPU round (one system, no graph), torch otherwise."""
        plain = (half.device.type == "cpu" and half.dim() == 2 and not create_graph and not half.requires_grad
                 and not any(v.requires_grad for v in state.gossip.values()))
        return _NumpyOps if plain else _TorchOps

    def round_p(self, dyn, state, half, buffers, box, edges, create_graph) -> Tensor:
        """p_kl of round t on the slots (torch [.., n, D]; padding arbitrary)."""
        if self.by_similarity:
            return _norm(box.messages(half, edges) - half.unsqueeze(-2))
        xp, yp, shared = self.probe_for(state.round)
        if shared and dyn._dense is not None:          # per-node copies, once: the explicit path reads them in place
            xp, yp, shared = self._per_node(xp, yp, dyn.n)
        g = dyn.probe_grad(half, buffers, xp, yp, shared, create_graph)              # [.., n, P]
        if self.cfg.score == "update":
            return box.dots(g, half - state.theta, edges, state.theta)                # g_kᵀ Δ_{l→k}
        own = (g * half).sum(-1, keepdim=True)                                        # g_kᵀ (m_{l→k} − θ_k^{t+½})
        return box.dots(g, half, edges, torch.zeros_like(half)) - own

    def _per_node(self, xp: Tensor, yp: Tensor, n: int) -> Tuple[Tensor, Tensor, bool]:
        """A shared probe window as n contiguous per-node copies [n, m, ...] (cached per window)."""
        cache = self.__dict__.setdefault("_copies", {})
        key = (xp.data_ptr(), tuple(xp.shape), n)
        if key not in cache:
            cache[key] = (xp.expand(n, *xp.shape).contiguous(), yp.expand(n, *yp.shape).contiguous(), False)
        return cache[key]

    def running(self, O, box, p, score, count):
        """u = p / median |p| (0 where that is 0; a non-finite p counts as +inf), the new score and count
        [.., n, n] and the debiased running score Ŝ on the slots [.., n, D]."""
        p = O.lib.where(O.lib.isnan(p), float("inf"), p)             # a non-finite update counts as most suspect
        scale = O.median(box, O.lib.abs(p))
        u = p / O.clamp_min(scale, O.tiny(p)) * (scale > 0)
        rho = float(self.cfg.decay)
        s_new = rho * O.from_pairs(box, score) + (1 - rho) * u
        c_new = O.from_pairs(box, count) + 1
        return O.to_pairs(box, s_new, score), O.to_pairs(box, c_new, count), s_new / (1 - rho ** c_new)


class Dice(_Scored):
    def init_state(self, n, dtype, device):
        return {**super().init_state(n, dtype, device), "flagged": torch.zeros(n, n, dtype=dtype, device=device)}

    def aggregate(self, dyn, t, state, half, buffers, box, edges, create_graph):
        O = self.ops(state, half, create_graph)
        p = O.arr(self.round_p(dyn, state, half, buffers, box, edges, create_graph))
        g = {k: O.arr(v) for k, v in state.gossip.items()}
        new = self.decide(O, box, t, p, g)
        new = {k: O.tensor(v, half) for k, v in new.items()}
        w_new = new.pop("w")
        return box.combine(w_new, half, edges, new["mix"]), new

    def decide(self, O, box, t, p, g) -> dict:
        """Round t's weights W' on the slots ("w") and the new state, from the round's p and the old state."""
        cfg = self.cfg
        score, count, s_hat = self.running(O, box, p, g["score"], g["count"])
        med = O.median(box, s_hat)
        spread = O.clamp_min(MAD_SCALE * O.median(box, O.lib.abs(s_hat - med)), float(cfg.min_spread))
        z = (s_hat - med) / spread
        w = O.const(box, "weight")
        nb = O.const(box, "neighbour")
        flagged = g["flagged"]
        if t < cfg.warmup:
            w_new = w + 0 * z
        else:
            act = nb & (z > cfg.threshold)
            if cfg.action == "cut":
                if cfg.sticky:                      # a neighbour caught once stays cut
                    act = act | (nb & (O.from_pairs(box, flagged) > 0))
                kept = O.lib.where(act, 0 * z, w)
            else:
                kept = O.lib.where(act, w * (cfg.threshold / O.lib.where(act, z, 1 + 0 * z)), w)
            w_new = kept + O.const(box, "self_slot") * (O.rowsum(w) - O.rowsum(kept))
            flagged = O.to_pairs(box, O.floats(act, z) + 0 * z, flagged)
        return {"w": w_new, "score": score, "count": count, "mix": O.to_pairs(box, w_new), "flagged": flagged}


class DiceSelect(_Scored):
    def __init__(self, cfg, rounds):
        super().__init__(cfg, rounds)
        self.by_similarity = cfg.select_by == "similarity"

    def init_state(self, n, dtype, device):
        return {**super().init_state(n, dtype, device), "kept": torch.zeros(n, n, dtype=dtype, device=device)}

    def aggregate(self, dyn, t, state, half, buffers, box, edges, create_graph):
        O = self.ops(state, half, create_graph)
        p = O.arr(self.round_p(dyn, state, half, buffers, box, edges, create_graph))
        g = {k: O.arr(v) for k, v in state.gossip.items()}
        new = {k: O.tensor(v, half) for k, v in self.decide(O, box, t, p, g).items()}
        w = new.pop("w")
        return box.combine(w, half, edges, new["mix"]), new

    def decide(self, O, box, t, p, g) -> dict:
        cfg = self.cfg
        score, count, s_hat = self.running(O, box, p, g["score"], g["count"])
        nb = O.const(box, "neighbour")
        R = int(cfg.every)
        kept_pairs = g["kept"]
        if t >= R and t % R == 0:
            key = O.lib.where(nb, s_hat, float("inf"))
            key = key.detach() if O is _TorchOps else key
            chosen = nb & (O.rank(key) < cfg.keep)
            kept_pairs = O.to_pairs(box, O.floats(chosen, s_hat))
        if t < R:
            w = O.const(box, "weight") + 0 * s_hat
        else:
            on = O.from_pairs(box, kept_pairs) * nb + O.const(box, "self_slot")
            w = on / O.rowsum(on)
        return {"w": w, "score": score, "count": count, "kept": kept_pairs, "mix": O.to_pairs(box, w)}


_CLASSES = {"clipped_gossip": ClippedGossip, "trimmed_mean": TrimmedMean, "median": Median, "balance": Balance,
            "dice": Dice, "dice_select": DiceSelect}


def check_bounds(cfg: DefenseConfig, schedule, rounds: int, attackers: Sequence[int]) -> None:
    """Exit 2 (UserError) when the rule cannot tolerate the run's attackers at some honest receiver (or,
    for trimmed_mean, would trim every value), naming the receiver, the round and the bound."""
    if cfg.name not in ("trimmed_mean", "median"):
        return
    bad = set(int(a) for a in attackers)
    T = rounds if getattr(schedule, "time_varying", False) else 1
    for t in range(T):
        W = schedule.at(t)
        for k in range(W.shape[0]):
            nbrs = [l for l in np.flatnonzero(W[k] > 0) if l != k]
            c = len(nbrs) + 1
            byz = sum(1 for l in nbrs if l in bad)
            when = f" at round {t}" if T > 1 else ""
            if cfg.name == "trimmed_mean":
                if c <= 2 * cfg.b:
                    raise UserError(f"defense=trimmed_mean with defense.b={cfg.b} trims 2b = {2 * cfg.b} of the "
                                    f"{c} values receiver {k} aggregates{when} (itself and {c - 1} in-neighbours), "
                                    f"leaving none; use defense.b ≤ {(c - 1) // 2} or a denser topology")
                if k not in bad and byz > cfg.b:
                    raise UserError(f"defense=trimmed_mean with defense.b={cfg.b} tolerates at most b = {cfg.b} "
                                    f"attacking in-neighbours per receiver, but receiver {k} has {byz} "
                                    f"(attackers {sorted(int(l) for l in nbrs if l in bad)}){when}; set defense.b ≥ "
                                    f"{byz} (the graph must then give every receiver more than 2b in-neighbours "
                                    f"and itself), or use fewer attackers")
            elif k not in bad and 2 * byz >= c:
                raise UserError(f"defense=median tolerates fewer attackers than half of the {c} values receiver {k} "
                                f"aggregates (itself and {c - 1} in-neighbours), but {byz} of its in-neighbours "
                                f"attack{when} (attackers {sorted(int(l) for l in nbrs if l in bad)}); use fewer "
                                f"attackers or a denser topology")


def build_defense(cfg: DefenseConfig, schedule, rounds: int, attackers: Sequence[int] = ()) -> Optional[Defense]:
    """The run's rule from its config (None for ``none``), checked against the attackers it must tolerate."""
    if cfg.name == "none":
        return None
    check_bounds(cfg, schedule, rounds, attackers)
    return _CLASSES[cfg.name](cfg, rounds)
