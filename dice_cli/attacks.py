"""Known misbehaviour injected into ``dice train``: the ground truth that ``dice detect`` is scored against.

An attack is part of the run's dynamics. ``training.build_setup`` builds it from ``TrainConfig.attack`` and
hands it to ``engine.Dynamics`` (and through it to the per-node twin ``reference.LoopEngine``), so every
replay of a run (``dice gt``, ``dice estimate``, ``dice detect``) re-applies exactly the same corruption,
and the run's manifest records ``attack: {name, kind, nodes, rounds: [a, b], seed, <parameters>}``
(``attack: null`` for ``attack=none``).

Who attacks (``select_nodes``)
    ``attack.nodes`` when given (ids in 0..n−1, duplicates dropped), else ``attack.count`` nodes, else
    round(fraction·n) nodes (halves round up); counted nodes are drawn without replacement with
    ``np.random.default_rng([seed, 7])``, seed = ``attack.seed`` or the run's seed. ``attack=none`` has no
    attackers (its other keys are ignored). A real attack that selects no node is a usage error, as is
    a count above n.

When (``parse_rounds``)
    ``rounds: all`` (0 … T−1) or ``"a:b"`` (rounds a … b−1; a side left empty means 0 / T), with
    0 ≤ a < b ≤ T. Outside these rounds the attackers behave honestly.

Data attacks change the attacker's mini-batch at attack rounds (``Dynamics.batch(t)``), so the attacker
really trains on it (its gradient, momentum and BatchNorm statistics follow from the corrupted batch):

- ``label_flip``: a fixed, seeded subset of round(flip_fraction·|D_j|) of attacker j's own samples (chosen
  by dataset index, once per run) is relabelled c → (c+1) mod C (``mapping=shift``) or c → π(c) with a
  seeded random permutation π of the classes (``mapping=random``; π may fix some classes).
- ``label_noise``: a fixed, seeded subset of round(flip_fraction·|D_j|) of its samples gets a fixed, seeded
  label drawn uniformly from all C classes (so about 1/C of them keep their true label).
- ``feature_noise``: fresh Gaussian noise of standard deviation ``sigma`` is added to the attacker's batch
  inputs at every attack round. The noise of (round t, node j) is drawn from
  ``default_rng([seed, 7, 4, t, j])`` in float64 on the CPU, then cast and moved, so every replay on every
  device sees the same numbers.

Update attacks change the update Δ_j^t the attacker sends, and it keeps what it sends:
θ_j^{t+½} = θ_j^t + Δ_sent, so gossip, GT and the proximal score all see Δ_sent. The attacker's momentum
buffer stays the honest one (computed from its true gradient).

- ``sign_flip``: Δ_sent = −scale·Δ;  ``scale``: Δ_sent = scale·Δ;  ``free_rider``: Δ_sent = 0 (it passes on
  the model it received);
- ``gaussian``: Δ_sent = ‖Δ‖·z/‖z‖ with z ~ N(0, I_P) drawn from ``default_rng([seed, 7, 5, t, j])`` (a
  random direction with the honest norm);
- ``stealth``: Δ_sent = Δ + strength·(Δ_flip − Δ), Δ_flip the update the attacker would compute from the
  same state and batch with every label mapped c → (c+1) mod C (an extra gradient pass at attack rounds
  only). With momentum / weight decay, Δ_flip − Δ = −η(g_flip − g).

- ``orthogonal`` (adaptive, aimed at DICE): Δ_sent = Δ + strength·(d − (dᵀĝ)ĝ), d = Δ_flip − Δ (stealth's
  label-flip direction), ĝ = g̃/‖g̃‖ with g̃ = ∇L̃_j(θ_j^t) the attacker's gradient on its copy of the probe
  set (the shared probe set, or its own one with ``probe.kind=per_node``): the receivers' first-order proximal
  influence of the added part is ≈ 0 (their probe gradient ≈ ĝ's direction), its harm is not.

``inflate`` (attribution inflation, aimed at valuation) is a data attack: at attack rounds the attacker's
batch is B samples of the probe set (its copy, as for orthogonal) drawn with ``default_rng([seed, 7, 6, t, j])``
(without replacement when the probe set has ≥ B samples), so its update is a step down the receivers' probe
loss and looks maximally helpful to DICE.

Message attacks (ROBUST.md §1-2) send each honest receiver k its own model m_{l→k}; the attacker itself
trains and mixes honestly, and sends θ_l^{t+½} to other attackers. H_k are k's honest in-neighbours at round t
(k included), μ_k, σ_k their coordinate-wise mean and standard deviation (unbiased; 0 when |H_k| = 1) of
θ^{t+½}. The attackers are omniscient and collude (all send k the same message):

- ``alie`` (Baruch et al. 2019): m = μ_k − z σ_k; z = ``attack.z`` or, by the paper's rule with n nodes and
  m attackers, s = ⌊n/2 + 1⌋ − m and z = Φ⁻¹((n − s)/n) (recorded in the manifest);
- ``ipm`` (Xie et al. 2020): m = θ_k^t − ε (μ_k − θ_k^t), ε = ``attack.epsilon`` (default 0.1);
- ``dissensus`` (He et al. 2022): m = θ_k^{t+½} − ε Σ_{j∈H_k} W_kj (θ_j^{t+½} − θ_k^{t+½}) / Σ_{b∈B} W_kb,
  ε default 1.5 (epfml's experiments).

The update a receiver attributes to a message (DICE's Δ_l, sent with the model) is m_{l→k} − θ_l^t: a lying
sender states the update consistent with the model it sends.

All corruptions are out-of-place torch ops on the attacker rows of [.., n, ...] tensors (``index_copy``),
so honest nodes, and every node outside the attack rounds, are bit-identical to a run without the attack;
a leading copies axis (``dice gt``) works; and gradients flow w.r.t. θ and the unit weights w
(``dice estimate`` differentiates through ``Dynamics.local_step`` with ``create_graph=True``).

    dice train attack=label_flip attack.count=2
    dice train attack=sign_flip attack.nodes=[3] attack.rounds=50:100
    dice train attack=feature_noise attack.fraction=0.25 attack.sigma=100
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .config import AttackConfig
from .errors import UserError

DATA_ATTACKS = ("label_flip", "label_noise", "feature_noise", "inflate")
UPDATE_ATTACKS = ("sign_flip", "scale", "gaussian", "free_rider", "stealth", "orthogonal")
MESSAGE_ATTACKS = ("alie", "ipm", "dissensus")
PROBE_ATTACKS = ("orthogonal", "inflate")        # they need the probe set (``Attack.set_probe``)
SELECT_STREAM = 7            # default_rng([seed, 7]) picks the attackers; sub-streams below
_SUBSET, _PERM, _NOISY_LABEL, _FEATURE, _GAUSS, _INFLATE = 1, 2, 3, 4, 5, 6
DEFAULT_EPSILON = {"ipm": 0.1, "dissensus": 1.5}


def alie_z(n: int, m: int) -> float:
    """Baruch et al.'s z for n nodes of which m attack: s = ⌊n/2 + 1⌋ − m, z = Φ⁻¹((n − s)/n)."""
    from statistics import NormalDist

    s = math.floor(n / 2 + 1) - m
    if s <= 0:
        raise UserError(f"attack=alie's rule for z needs fewer attackers than half the nodes (here {m} of {n}: "
                        f"s = floor(n/2 + 1) − m = {s} ≤ 0); give attack.z explicitly")
    return float(NormalDist().inv_cdf((n - s) / n))


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), SELECT_STREAM, *[int(k) for k in keys]])


def select_nodes(cfg: AttackConfig, n: int, seed: int) -> List[int]:
    """The attacker ids (sorted) for ``cfg`` on ``n`` nodes; [] for ``name=none``."""
    if cfg.name == "none":
        return []
    if cfg.nodes is not None:
        try:
            ids = [int(k) for k in cfg.nodes]
        except (TypeError, ValueError):
            raise UserError(f"attack.nodes={cfg.nodes!r} is not valid: give a list of node ids in 0..{n - 1}")
        bad = sorted({k for k in ids if not 0 <= k < n})
        if bad:
            raise UserError(f"attack.nodes={list(cfg.nodes)!r}: node id(s) {bad} lie outside the run's nodes "
                            f"0..{n - 1} (nodes={n}); choose ids in 0..{n - 1}")
        chosen = sorted(set(ids))
    else:
        if cfg.count is not None:
            count, what = int(cfg.count), f"attack.count={cfg.count}"
        else:
            count, what = int(math.floor(cfg.fraction * n + 0.5)), f"attack.fraction={cfg.fraction}"
        if count > n:
            raise UserError(f"{what} asks for {count} attackers but the run has only nodes={n}; "
                            f"choose attack.count in 1..{n}")
        chosen = sorted(int(k) for k in _rng(seed).choice(n, size=count, replace=False)) if count else []
    if not chosen:
        raise UserError(f"attack={cfg.name} selects no node: set attack.nodes=[..], attack.count or "
                        f"attack.fraction (now nodes={cfg.nodes}, count={cfg.count}, fraction={cfg.fraction})")
    return chosen


def parse_rounds(spec, rounds: int) -> Tuple[int, int]:
    """``attack.rounds`` -> (a, b): the attack is active at rounds a ≤ t < b."""
    fix = (f"attack.rounds={spec!r} is not valid: use 'all' or 'a:b' (rounds a … b−1) with "
           f"0 ≤ a < b ≤ {rounds}; the run has rounds 0..{rounds - 1}, so valid bounds lie in 0..{rounds}")
    if isinstance(spec, str):
        s = spec.strip()
        if s == "all":
            return 0, rounds
        if s.count(":") != 1:
            raise UserError(fix)
        try:
            a, b = (int(p) if p.strip() else None for p in s.split(":"))
        except ValueError:
            raise UserError(fix) from None
    elif isinstance(spec, (list, tuple)) and len(spec) == 2 and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in spec):
        a, b = int(spec[0]), int(spec[1])
    else:
        raise UserError(fix)
    a = 0 if a is None else a
    b = rounds if b is None else b
    if not 0 <= a < b <= rounds:
        raise UserError(fix)
    return a, b


@dataclass
class Edges:
    """Per-edge messages of round t that differ from the sender's θ_l^{t+½}: edge e is sender[e] →
    receiver[e] (W^t_kl = weight[e] > 0, sender ≠ receiver), message [.., E, P] (copies axis like Θ)."""
    receiver: Tensor      # [E] long
    sender: Tensor        # [E] long
    weight: Tensor        # [E] W^t_{receiver, sender}
    message: Tensor       # [.., E, P]


class Attack:
    """One configured attack: who, when, how. Built by ``build_attack``; used by ``engine.Dynamics``.

    labels: the training labels [N] (dataset order); parts: each node's training indices.
    """

    def __init__(self, name: str, nodes: Sequence[int], rounds: Tuple[int, int], n: int, num_classes: int,
                 seed: int, labels: Optional[np.ndarray] = None, parts: Optional[Sequence[np.ndarray]] = None,
                 flip_fraction: float = 1.0, mapping: str = "shift", sigma: float = 100.0, scale: float = 1.0,
                 strength: float = 0.1, z: Optional[float] = None, epsilon: Optional[float] = None):
        if name not in DATA_ATTACKS + UPDATE_ATTACKS + MESSAGE_ATTACKS:
            raise ValueError(f"unknown attack {name!r}")
        self.name, self.nodes, self.rounds = name, [int(k) for k in nodes], (int(rounds[0]), int(rounds[1]))
        self.n, self.num_classes, self.seed = int(n), int(num_classes), int(seed)
        self.flip_fraction, self.mapping, self.sigma = float(flip_fraction), mapping, float(sigma)
        self.scale, self.strength = float(scale), float(strength)
        self.kind = "data" if name in DATA_ATTACKS else "update" if name in UPDATE_ATTACKS else "message"
        self.z_rule = "given" if z is not None else "baruch"
        self.z = float(z) if z is not None else (alie_z(self.n, len(self.nodes)) if name == "alie" else None)
        self.epsilon = float(epsilon) if epsilon is not None else DEFAULT_EPSILON.get(name)
        self.probe: Optional[Tuple[Tensor, Tensor, bool]] = None
        self._plans: Dict[int, Optional[dict]] = {}
        self._rows: Dict[torch.device, Tensor] = {}
        self._dev: Dict[tuple, Tensor] = {}
        self._noise: Dict[tuple, Tensor] = {}
        self.label_map: Optional[np.ndarray] = None
        self.hits: Dict[int, np.ndarray] = {}
        self.relabel: Optional[np.ndarray] = None
        if name in ("label_flip", "label_noise"):
            if labels is None or parts is None:
                raise ValueError(f"attack {name} needs the training labels and the node partition")
            self._build_labels(np.asarray(labels, dtype=np.int64), parts)

    # ---- set-up ---------------------------------------------------------------------------------------
    def _build_labels(self, labels: np.ndarray, parts: Sequence[np.ndarray]) -> None:
        """Fix, once per run, which of each attacker's samples are hit and their new labels."""
        C = self.num_classes
        if self.name == "label_flip":
            if self.mapping == "random":
                self.label_map = _rng(self.seed, _PERM).permutation(C).astype(np.int64)
            else:
                self.label_map = (np.arange(C, dtype=np.int64) + 1) % C
        relabel = labels.copy()
        for j in self.nodes:
            part = np.sort(np.asarray(parts[j], dtype=np.int64))
            m = int(math.floor(self.flip_fraction * len(part) + 0.5))
            hit = np.sort(_rng(self.seed, _SUBSET, j).choice(part, size=m, replace=False)) if m else part[:0]
            self.hits[j] = hit
            if self.name == "label_flip":
                relabel[hit] = self.label_map[labels[hit]]
            else:
                relabel[hit] = _rng(self.seed, _NOISY_LABEL, j).integers(0, C, size=m)
        self.relabel = relabel

    # ---- queries --------------------------------------------------------------------------------------
    def active(self, t: int) -> bool:
        return self.rounds[0] <= t < self.rounds[1]

    def data_at(self, t: int) -> bool:
        return self.kind == "data" and self.active(t)

    def update_at(self, t: int) -> bool:
        return self.kind == "update" and self.active(t)

    @property
    def nonlinear(self) -> bool:
        """Δ_sent is not linear in the honest Δ (gaussian: ‖Δ‖·z): then a unit's δ_u = Δ_sent(w = 1) −
        Δ_sent(w without u) differs from the derivative ∂Δ_sent/∂w, and first-order estimates use the
        difference (DICE.md §4's definition). Every other attack sends a linear function of Δ (and of
        Δ_flip for stealth), and Δ is linear in the loss weights w."""
        return self.name == "gaussian"

    def nonlinear_at(self, t: int) -> List[int]:
        """The attackers whose sent update is nonlinear in w at round t ([] if none)."""
        return list(self.nodes) if self.nonlinear and self.update_at(t) else []
    def message_at(self, t: int) -> bool:
        return self.kind == "message" and self.active(t)

    def set_probe(self, x: Tensor, y: Tensor, shared: bool) -> None:
        """The attackers' copy of the probe set: x [m, ...] shared or [n, m, ...] per node (orthogonal, inflate)."""
        self.probe = (x, y, bool(shared))

    def rows(self, device: torch.device) -> Tensor:
        r = self._rows.get(device)
        if r is None:
            r = self._rows[device] = torch.as_tensor(self.nodes, dtype=torch.long, device=device)
        return r

    def manifest(self) -> dict:
        """The detection ground truth recorded in the run's manifest."""
        out = {"name": self.name, "kind": self.kind, "nodes": list(self.nodes), "rounds": list(self.rounds),
               "seed": self.seed}
        if self.name in ("label_flip", "label_noise"):
            out["flip_fraction"] = self.flip_fraction
            out["samples_hit"] = {str(j): int(len(h)) for j, h in self.hits.items()}
        if self.name == "label_flip":
            out["mapping"] = self.mapping
            out["label_map"] = [int(c) for c in self.label_map]
        if self.name == "feature_noise":
            out["sigma"] = self.sigma
        if self.name in ("sign_flip", "scale"):
            out["scale"] = self.scale
        if self.name in ("stealth", "orthogonal"):
            out["strength"] = self.strength
        if self.name == "alie":
            out["z"] = self.z
            out["z_rule"] = self.z_rule
        if self.name in ("ipm", "dissensus"):
            out["epsilon"] = self.epsilon
        if self.name in PROBE_ATTACKS:
            out["probe"] = "shared probe set" if self.probe is None or self.probe[2] else "its own probe set"
        return out

    # ---- data attacks ---------------------------------------------------------------------------------
    def _relabel_on(self, device: torch.device) -> Tensor:
        key = ("relabel", device)
        r = self._dev.get(key)
        if r is None:
            r = self._dev[key] = torch.as_tensor(self.relabel, device=device)
        return r

    def feature_noise(self, t: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """sigma · N(0, 1) noise for round t's attacker rows: [m, *shape] (cached for the latest round)."""
        key = (t, tuple(shape), dtype, device)
        z = self._noise.get(key)
        if z is None:
            size = int(np.prod(shape))
            z = np.stack([_rng(self.seed, _FEATURE, t, j).standard_normal(size) for j in self.nodes])
            z = torch.from_numpy(self.sigma * z).reshape(len(self.nodes), *shape).to(device=device, dtype=dtype)
            self._noise.clear()
            self._noise[key] = z
        return z

    def corrupt_batch(self, t: int, idx: Tensor, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        """Round t's batches with the attackers' rows corrupted: idx [n, B] dataset indices, x [n, B, ...],
        y [n, B]. Returns new tensors (the inputs are not modified); identity outside attack rounds."""
        if not self.data_at(t):
            return x, y
        rows = self.rows(x.device)
        if self.name == "feature_noise":
            noise = self.feature_noise(t, x.shape[1:], x.dtype, x.device)
            x = x.index_copy(0, rows, x.index_select(0, rows) + noise)
        elif self.name == "inflate":
            xi, yi = self.inflate_batch(t, x.shape[1])
            x = x.index_copy(0, rows, xi.reshape(len(self.nodes), *x.shape[1:]).to(x.dtype))
            y = y.index_copy(0, rows, yi.to(y.dtype))
        else:
            new = self._relabel_on(y.device)[idx.index_select(0, rows)].to(y.dtype)
            y = y.index_copy(0, rows, new)
        return x, y

    def inflate_positions(self, t: int, batch: int) -> np.ndarray:
        """Probe-set positions of round t's inflate batches: [m, B] (attackers in ``nodes`` order)."""
        size = int(self.probe[1].shape[-1])
        return np.stack([_rng(self.seed, _INFLATE, t, j).choice(size, size=batch, replace=batch > size)
                         for j in self.nodes])

    def inflate_batch(self, t: int, batch: int) -> Tuple[Tensor, Tensor]:
        """Round t's inflate batches drawn from the attackers' probe copies: x [m, B, ...], y [m, B]."""
        if self.probe is None:
            raise ValueError("attack=inflate needs the probe set (Attack.set_probe)")
        xp, yp, shared = self.probe
        pos = torch.as_tensor(self.inflate_positions(t, batch), device=yp.device)
        if shared:
            return xp[pos], yp[pos]
        owner = torch.as_tensor(self.nodes, device=yp.device)[:, None]
        return xp[owner, pos], yp[owner, pos]

    def stealth_labels(self, y: Tensor) -> Tensor:
        """Every label mapped c → (c+1) mod C (stealth's harmful direction)."""
        return (y + 1) % self.num_classes

    # ---- update attacks -------------------------------------------------------------------------------
    def gaussian_directions(self, t: int, P: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Unit vectors z/‖z‖ for round t's attackers: [m, P] (cached for the latest round)."""
        key = ("gauss", t, P, dtype, device)
        z = self._noise.get(key)
        if z is None:
            z = np.stack([_rng(self.seed, _GAUSS, t, j).standard_normal(P) for j in self.nodes])
            z /= np.linalg.norm(z, axis=1, keepdims=True)
            z = torch.from_numpy(z).to(device=device, dtype=dtype)
            self._noise.clear()
            self._noise[key] = z
        return z

    def transform(self, t: int, d: Tensor, d_flip: Optional[Tensor] = None,
                  which: Optional[Sequence[int]] = None, g: Optional[Tensor] = None) -> Tensor:
        """Δ_sent for the attackers' honest updates d [.., m, P]: rows in ``self.nodes`` order, or the
        attackers at positions ``which`` of ``self.nodes`` (the loop twin passes one node at a time).

        d_flip (stealth, orthogonal): the same rows' label-flipped updates; g (orthogonal): their probe
        gradients ∇L̃_j(θ_j^t).
        """
        if self.name == "sign_flip":
            return d * (-self.scale)
        if self.name == "scale":
            return d * self.scale
        if self.name == "free_rider":
            return torch.zeros_like(d)
        if self.name == "gaussian":
            z = self.gaussian_directions(t, d.shape[-1], d.dtype, d.device)
            if which is not None:
                z = z[list(which)]
            return torch.linalg.vector_norm(d, dim=-1, keepdim=True) * z
        if self.name == "stealth":
            if d_flip is None:
                raise ValueError("stealth needs the label-flipped update d_flip")
            return d + self.strength * (d_flip - d)
        if self.name == "orthogonal":
            if d_flip is None or g is None:
                raise ValueError("orthogonal needs the label-flipped update d_flip and the probe gradient g")
            return d + self.strength * orthogonal_part(d_flip - d, g)
        raise ValueError(f"{self.name} is not an update attack")

    def corrupt_update(self, t: int, delta: Tensor, flipped: Optional[Callable[[], Tensor]] = None,
                       probe_grad: Optional[Callable[[], Tensor]] = None) -> Tensor:
        """Δ^t [.., n, P] with the attackers' rows replaced by what they send (identity outside attack
        rounds). ``flipped()`` returns the label-flipped Δ [.., n, P] (stealth, orthogonal);
        ``probe_grad()`` the attackers' probe gradients [.., m, P] (orthogonal)."""
        if not self.update_at(t):
            return delta
        rows = self.rows(delta.device)
        d = delta.index_select(-2, rows)
        d_flip = flipped().index_select(-2, rows) if self.name in ("stealth", "orthogonal") else None
        g = probe_grad() if self.name == "orthogonal" else None
        return delta.index_copy(delta.dim() - 2, rows, self.transform(t, d, d_flip, g=g))

    # ---- message attacks ------------------------------------------------------------------------------
    def message_plan(self, W: np.ndarray) -> Optional[dict]:
        """Which messages round t's W needs (numpy): the honest receivers R with an attacking in-neighbour,
        their honest in-neighbours H (k first, padded with k: hidx/hmask [R, H]), W_kj on them (hw), the
        attackers' total weight Σ_b W_kb (bsum [R]), and the edges b → k (e_recv, e_send, e_r index into R,
        e_w). None when no attacker sends to an honest node."""
        bad = set(self.nodes)
        n = W.shape[0]
        recv, honest, edges = [], [], []
        for k in range(n):
            if k in bad:
                continue
            byz = [l for l in self.nodes if l != k and W[k, l] > 0]
            if not byz:
                continue
            r = len(recv)
            recv.append(k)
            honest.append([k] + [j for j in np.flatnonzero(W[k] > 0) if j != k and j not in bad])
            edges += [(k, l, r) for l in byz]
        if not recv:
            return None
        H = max(len(h) for h in honest)
        hidx = np.array([h + [h[0]] * (H - len(h)) for h in honest], dtype=np.int64)
        hmask = np.array([[1.0] * len(h) + [0.0] * (H - len(h)) for h in honest])
        rr = np.array(recv, dtype=np.int64)
        e = np.array(edges, dtype=np.int64)
        return {"recv": rr, "hidx": hidx, "hmask": hmask, "hw": W[rr[:, None], hidx] * hmask,
                "bsum": np.array([W[k, self.nodes].sum() for k in recv]), "e_recv": e[:, 0], "e_send": e[:, 1],
                "e_r": e[:, 2], "e_w": W[e[:, 0], e[:, 1]]}

    def _plan_on(self, dyn, t: int, device: torch.device, dtype: torch.dtype) -> Optional[dict]:
        key = 0 if not dyn.mixing.schedule.time_varying else t
        if key not in self._plans:
            if dyn.mixing.schedule.time_varying:
                self._plans.clear()
            plan = self.message_plan(dyn.mixing.numpy(t))
            self._plans[key] = None if plan is None else {
                k: torch.as_tensor(v, device=device, dtype=torch.long if v.dtype == np.int64 else dtype)
                for k, v in plan.items()}
        return self._plans[key]

    def messages(self, dyn, t: int, theta: Tensor, half: Tensor):
        """Round t's Byzantine messages as ``Edges`` (None when no attacker sends to an honest node).

        theta, half: Θ^t and Θ^{t+½} [.., n, P]. Differentiable in both; works on a copies axis.
        """
        plan = self._plan_on(dyn, t, half.device, half.dtype)
        if plan is None:
            return None
        mask = plan["hmask"][:, :, None]                                         # [R, H, 1]
        cnt = plan["hmask"].sum(-1)[:, None]                                     # [R, 1]
        xs = half[..., plan["hidx"], :]                                          # [.., R, H, P]
        recv = plan["recv"]
        if self.name == "dissensus":
            own = half[..., recv, :]
            pull = (plan["hw"][:, :, None] * (xs - own.unsqueeze(-2))).sum(-2)  # Σ_j W_kj (θ_j − θ_k)
            msg = own - self.epsilon * pull / plan["bsum"][:, None]
        else:
            mu = (mask * xs).sum(-2) / cnt                                        # [.., R, P]
            if self.name == "ipm":
                own = theta[..., recv, :]
                msg = own - self.epsilon * (mu - own)
            else:   # alie
                var = (mask * (xs - mu.unsqueeze(-2)) ** 2).sum(-2) / (cnt - 1).clamp(min=1)
                pos = var > 0
                sigma = torch.where(pos, torch.where(pos, var, torch.ones_like(var)).sqrt(), torch.zeros_like(var))
                msg = mu - self.z * sigma
        return Edges(plan["e_recv"], plan["e_send"], plan["e_w"], msg.index_select(msg.dim() - 2, plan["e_r"]))


def orthogonal_part(d: Tensor, g: Tensor) -> Tensor:
    """d − (dᵀĝ)ĝ with ĝ = g/‖g‖ (d itself where g = 0), row-wise over [.., m, P]."""
    norm = torch.linalg.vector_norm(g, dim=-1, keepdim=True)
    ok = norm > 0
    ghat = g / torch.where(ok, norm, torch.ones_like(norm))
    return d - (d * ghat).sum(-1, keepdim=True) * ghat


def build_attack(cfg: AttackConfig, n: int, rounds: int, run_seed: int, num_classes: int,
                 labels: Optional[np.ndarray] = None, parts: Optional[Sequence[np.ndarray]] = None
                 ) -> Optional[Attack]:
    """The run's attack from its config, or None for ``attack=none``. Raises UserError for bad choices."""
    if cfg.name == "none":
        return None
    seed = run_seed if cfg.seed is None else int(cfg.seed)
    if seed < 0:
        raise UserError(f"attack.seed={cfg.seed!r} is not valid: use a non-negative integer (or null = the "
                        f"run's seed)")
    nodes = select_nodes(cfg, n, seed)
    span = parse_rounds(cfg.rounds, rounds)
    return Attack(cfg.name, nodes, span, n, num_classes, seed, labels, parts, flip_fraction=cfg.flip_fraction,
                  mapping=cfg.mapping, sigma=cfg.sigma, scale=cfg.scale, strength=cfg.strength, z=cfg.z,
                  epsilon=cfg.epsilon)
