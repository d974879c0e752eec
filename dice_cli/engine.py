"""Decentralized SGD (adapt-then-combine) on stacked parameters, vectorised over nodes.

One round t (spec §1), for all nodes at once:

    g_k     = ∇_θ (1/|B|) Σ_i w_i ℓ(θ_k^t; x_i, y_i)  + λ θ_k^t          (vmap forward, one autograd pass)
    m_k     = μ m_k + g_k                                                   (PyTorch SGD momentum, local state)
    Δ_k^t   = −η^t (m_k if μ > 0 else g_k)
    Θ^{t+1} = W^t (Θ^t + Δ^t)                                               (one product, sparse for large n)

``Dynamics`` holds everything a round needs (data on the device, batch plan, W^t, lr schedule) and is a
pure function of the state, so ``dice gt`` re-simulates with it and ``dice estimate`` differentiates
through it. Θ may carry a leading "copies" axis [C, n, P]: C counterfactual systems sharing batches and
W^t but with their own unit weights w [C, n, B].

An optional ``attacks.Attack`` (``Dynamics(..., attack=...)``) corrupts the attackers' batches in
``batch(t)`` (data attacks), the update they send in ``local_step`` (update attacks) or the model each of
their receivers gets (message attacks, below) at its rounds; with ``attack=None`` nothing changes (the
explicit MLP/logreg fast path included).

The gossip step (``gossip``) works on per-edge messages m_{l→k} (ROBUST.md §1). Honest senders send
θ_l^{t+½} to everyone, so plain gossip stays the one product W^t Θ^{t+½}; the edges whose message differs
(``Edges``: Byzantine l → honest k) enter as a correction

    θ_k^{t+1} = Σ_l W^t_kl θ_l^{t+½} + Σ_{e=(l→k)} W^t_kl (m_e − θ_l^{t+½}).

A receiver-side rule (``defenses.Defense``, ``Dynamics(..., defense=...)``) instead sees every message
of its in-neighbourhood at once (``Inbox``: slot 0 = itself, then its in-neighbours, [.., n, D, P]) and
returns Θ^{t+1} and its own state (``State.gossip``, e.g. DICE's running scores; checkpointed with Θ).
Later network conditions plug in at the same place: a stale or compressed message is another ``Edges``
entry, a dropped edge or offline node another effective W^t.

``chunk_nodes=c`` (``dice train chunk_nodes=c``; 0 = all nodes at once) bounds memory when n × model does
not fit: the local step (forward/backward on both paths, ``create_graph`` included) and ``probe_losses``
run over node chunks of at most c nodes and are concatenated. Nodes never interact inside these pieces, so
the numbers are those of the unchunked call (the MLP fast path bit-identically); gossip stays one product.

    dice train engine=vmap nodes=256      # this module;  engine=loop is reference.py
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import vmap

from .config import OptimConfig
from .models import FunctionalModel

if TYPE_CHECKING:
    from .attacks import Attack, Edges
    from .defenses import Defense
    from .network import NetworkRuntime

Buffers = Dict[str, Tensor]


def configure_numerics() -> None:
    """TF32 off: influence differences are tiny and TF32 matmuls would swamp them (~1e-4 on GPU)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def lr_at(optim: OptimConfig, lr: float, t: int, rounds: int) -> float:
    """η^t for round t: constant, step (×gamma every step_size rounds) or cosine (lr → min_lr)."""
    if optim.schedule == "step":
        return lr * optim.gamma ** (t // optim.step_size)
    if optim.schedule == "cosine":
        return optim.min_lr + 0.5 * (lr - optim.min_lr) * (1 + math.cos(math.pi * t / max(rounds, 1)))
    return lr


@dataclass
class State:
    """System state at the start of round ``round``: Θ [.., n, P], buffers {name: [.., n, ...]}, momentum,
    and ``gossip``: state the gossip step carries from round to round ({} without a stateful defense;
    dice: running scores [.., n, n]). Every tensor may carry the same leading copies axis."""
    round: int
    theta: Tensor
    buffers: Buffers
    momentum: Optional[Tensor]
    gossip: Buffers = field(default_factory=dict)

    def detached(self) -> "State":
        """The same state cut from any autograd graph (no copy)."""
        return State(self.round, self.theta.detach(), {k: v.detach() for k, v in self.buffers.items()},
                     None if self.momentum is None else self.momentum.detach(),
                     {k: v.detach() for k, v in self.gossip.items()})

    def copies(self, C: int) -> "State":
        """C independent copies of a single system: Θ [C, n, P], buffers [C, n, ...], momentum and the gossip
        state (a defense's running scores) likewise."""
        def rep(v: Tensor) -> Tensor:
            return v.detach().unsqueeze(0).expand(C, *v.shape).clone()
        return State(self.round, rep(self.theta), {k: rep(v) for k, v in self.buffers.items()},
                     None if self.momentum is None else rep(self.momentum),
                     {k: rep(v) for k, v in self.gossip.items()})

    def clone(self) -> "State":
        return State(self.round, self.theta.clone(), {k: v.clone() for k, v in self.buffers.items()},
                     None if self.momentum is None else self.momentum.clone(),
                     {k: v.clone() for k, v in self.gossip.items()})

    def to_payload(self) -> dict:
        """Plain tensors for ``torch.save`` (CPU); ``gossip`` only when there is gossip state."""
        p = {"round": self.round, "theta": self.theta.detach().cpu(),
             "buffers": {k: v.detach().cpu() for k, v in self.buffers.items()},
             "momentum": None if self.momentum is None else self.momentum.detach().cpu()}
        if self.gossip:
            # clone: a history that is a view of a larger tensor would save that tensor's whole storage
            p["gossip"] = {k: v.detach().cpu().clone() for k, v in self.gossip.items()}
        return p

    @staticmethod
    def from_payload(p: dict, device: torch.device, dtype: torch.dtype) -> "State":
        def cast(v: Tensor) -> Tensor:
            return v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        return State(int(p["round"]), cast(p["theta"]), {k: cast(v) for k, v in p["buffers"].items()},
                     None if p["momentum"] is None else cast(p["momentum"]),
                     {k: cast(v) for k, v in p.get("gossip", {}).items()})


class Inbox:
    """Round t's in-neighbourhoods padded to D slots: receiver k's slot 0 is k itself, slots 1..deg_k its
    in-neighbours l ≠ k with W^t_kl > 0 in increasing id, then padding (valid False, weight 0, sender k).

    sender, slot_of: [n, D], [n, n] (−1 where l is not an in-neighbour of k) long; valid [n, D] bool;
    weight [n, D] = W^t_{k, sender}; count [n] valid slots (self included); neighbour [n, D]: valid and
    not the self slot. Messages are materialised only by the rules that need every value (``messages``);
    reweighting rules use ``combine`` and ``dots``, which stay [n, n] products plus the Byzantine edges.
    """

    def __init__(self, W: np.ndarray, device: torch.device, dtype: torch.dtype):
        n = W.shape[0]
        lists = [[k] + [int(l) for l in np.flatnonzero(W[k] > 0) if l != k] for k in range(n)]
        D = max(len(r) for r in lists)
        sender = np.tile(np.arange(n)[:, None], (1, D))
        valid = np.zeros((n, D), dtype=bool)
        slot_of = np.full((n, n), -1, dtype=np.int64)
        for k, r in enumerate(lists):
            sender[k, :len(r)] = r
            valid[k, :len(r)] = True
            slot_of[k, r] = np.arange(len(r))
        self.n, self.D = n, D
        self.np_sender, self.np_valid = sender, valid
        self.sender = torch.as_tensor(sender, device=device)
        self.valid = torch.as_tensor(valid, device=device)
        self.slot_of = torch.as_tensor(slot_of, device=device)
        self.weight = torch.as_tensor(np.where(valid, W[np.arange(n)[:, None], sender], 0.0), device=device,
                                      dtype=dtype)
        self.count = self.valid.sum(-1)
        self.neighbour = self.valid.clone()
        self.neighbour[:, 0] = False                                  # slots of in-neighbours l ≠ k
        # constants of the small per-receiver bookkeeping (a defense's scores), built once per W
        self.sender_pad = torch.where(self.valid, self.sender, torch.full_like(self.sender, n))   # padding -> n
        self.inf_pad = torch.where(self.valid, 0.0, float("inf")).to(device=device, dtype=dtype)
        self.median_lo, self.median_hi = ((self.count - 1) // 2)[:, None], (self.count // 2)[:, None]
        self.self_slot = torch.zeros(n, D, device=device, dtype=dtype)
        self.self_slot[:, 0] = 1.0
        self.regular = bool(valid.all())                              # no padding: every receiver has D slots

    def gather(self, x: Tensor) -> Tensor:
        """x [.., n, F] -> [.., n, D, F]: slot s of receiver k holds x_{sender[k, s]} (one index_select)."""
        ax = x.dim() - 2
        return x.index_select(ax, self.sender.reshape(-1)).reshape(*x.shape[:ax], self.n, self.D, x.shape[-1])

    def edge_slots(self, edges: Edges) -> Tensor:
        """Flat slot index k·D + s of every edge: [E]."""
        return edges.receiver * self.D + self.slot_of[edges.receiver, edges.sender]

    def messages(self, half: Tensor, edges: Optional[Edges]) -> Tensor:
        """M [.., n, D, P]: slot s of receiver k holds m_{sender→k} (θ_sender^{t+½}, or the edge's message)."""
        M = self.gather(half)
        if edges is None:
            return M
        lead, P = M.shape[:-3], M.shape[-1]
        return M.reshape(*lead, self.n * self.D, P).index_copy(-2, self.edge_slots(edges),
                                                                edges.message).reshape(M.shape)

    def slot_values(self, pairs: Tensor) -> Tensor:
        """[.., n, n] -> slot values [.., n, D]: pairs[k, sender[k, s]] (padding slots read the self pair)."""
        return pairs.gather(-1, self.sender.expand(*pairs.shape[:-2], self.n, self.D))

    def to_pairs(self, x: Tensor, into: Optional[Tensor] = None) -> Tensor:
        """Slot values [.., n, D] -> [.., n, n]: 0 where l is neither an in-neighbour of k nor k itself, or
        the entries of ``into`` [.., n, n] there (padding slots are dropped)."""
        lead = x.shape[:-2]
        base = (torch.zeros(*lead, self.n, self.n + 1, dtype=x.dtype, device=x.device) if into is None else
                torch.cat([into, into.new_zeros(*lead, self.n, 1)], dim=-1))
        return base.scatter(-1, self.sender_pad.expand(x.shape), x)[..., :self.n]

    def median(self, x: Tensor) -> Tensor:
        """Median over the valid slots: x [.., n, D] -> [.., n, 1] (the mean of the two middle values when the
        count is even)."""
        s = (x if self.regular else x + self.inf_pad).sort(dim=-1).values
        shape = x.shape[:-1] + (1,)
        return 0.5 * (s.gather(-1, self.median_lo.expand(shape)) + s.gather(-1, self.median_hi.expand(shape)))

    def from_pairs(self, x: Tensor) -> Tensor:
        """[.., n, n] -> slot values [.., n, D] (padding slots read the self pair; mask them with valid)."""
        return self.slot_values(x)

    def combine(self, w: Tensor, half: Tensor, edges: Optional[Edges], pairs: Optional[Tensor] = None) -> Tensor:
        """Σ_s w[.., k, s] m_{k,s}: the product to_pairs(w) Θ^{t+½} plus, for the Byzantine edges,
        w_e (m_e − θ_l^{t+½}). w [.., n, D] (padding ignored; ``pairs``: to_pairs(w) if at hand) -> [.., n, P].

        A message with weight 0 is not used at all: a non-finite model that a receiver cut (an attacker that
        diverged) leaves its row finite, while a receiver that still mixes it gets NaN, as plain gossip would."""
        pairs = self.to_pairs(w) if pairs is None else pairs
        bad = ~torch.isfinite(half.sum(-1))              # [.., n]: a NaN / inf anywhere in the row (one reduction)
        if bool(bad.any()):
            used = ((pairs != 0) & bad.unsqueeze(-2)).any(-1, keepdim=True)                  # [.., n, 1]
            out = torch.matmul(pairs, torch.where(bad.unsqueeze(-1), torch.zeros_like(half), half))
            out = torch.where(used, torch.full_like(out, float("nan")), out)
        else:
            out = torch.matmul(pairs, half)
        if edges is not None:
            we = w.reshape(*w.shape[:-2], -1).index_select(-1, self.edge_slots(edges))        # [.., E]
            d = (edges.message - half.index_select(half.dim() - 2, edges.sender)) * we.unsqueeze(-1)
            d = torch.where((we != 0).unsqueeze(-1), d, torch.zeros_like(d))
            out = out.index_add(half.dim() - 2, edges.receiver, d)
        return out

    def dots(self, g: Tensor, x: Tensor, edges: Optional[Edges] = None, theta: Optional[Tensor] = None
             ) -> Tensor:
        """g_k · (m_{k,s} − θ^t_{sender}) on the slots [.., n, D], from g [.., n, P] and the honest updates
        x = Δ [.., n, P] (one [n, P] × [P, n] product); Byzantine edges use their message and ``theta`` = Θ^t."""
        out = self.slot_values(torch.matmul(g, x.transpose(-1, -2)))
        if edges is None:
            return out
        ax = g.dim() - 2
        upd = edges.message - theta.index_select(ax, edges.sender)
        val = (g.index_select(ax, edges.receiver) * upd).sum(-1)                              # [.., E]
        return out.reshape(*out.shape[:-2], -1).index_copy(-1, self.edge_slots(edges), val).reshape(out.shape)


class Mixing:
    """W^t as torch tensors on the device: dense, or sparse CSR when n ≥ 64 and W is ≤ 10% full."""

    def __init__(self, schedule, device: torch.device, dtype: torch.dtype):
        self.schedule, self.device, self.dtype = schedule, device, dtype
        self._cache: Dict[int, Tuple[Tensor, Optional[Tensor]]] = {}

    def numpy(self, t: int) -> np.ndarray:
        return self.schedule.at(t)

    def dense_sparse(self, t: int) -> Tuple[Tensor, Optional[Tensor]]:
        key = 0 if not self.schedule.time_varying else t
        if key not in self._cache:
            if self.schedule.time_varying:
                self._cache.clear()
            w = self.schedule.at(t)
            dense = torch.as_tensor(w, dtype=self.dtype, device=self.device)
            n = w.shape[0]
            sparse = None
            if n >= 64 and np.count_nonzero(w) <= 0.1 * n * n:
                with warnings.catch_warnings():  # "sparse CSR support is in beta"
                    warnings.simplefilter("ignore", UserWarning)
                    sparse = dense.to_sparse_csr()
            self._cache[key] = (dense, sparse)
        return self._cache[key]

    def apply(self, t: int, z: Tensor, copies: bool = False) -> Tensor:
        """W^t z over the node axis: z [n, ...], or [C, n, ...] when ``copies`` (same W^t per copy)."""
        dense, sparse = self.dense_sparse(t)
        n = dense.shape[0]
        use_sparse = sparse is not None and not z.requires_grad
        if not copies:
            flat = z.reshape(n, -1)
            return ((sparse if use_sparse else dense) @ flat).reshape(z.shape)
        c = z.shape[0]
        flat = z.reshape(c, n, -1)
        if use_sparse:
            out = (sparse @ flat.transpose(0, 1).reshape(n, -1)).reshape(n, c, -1).transpose(0, 1)
        else:
            out = torch.matmul(dense, flat)
        return out.reshape(z.shape)


    def apply_transpose(self, t: int, z: Tensor) -> Tensor:
        """(W^t)ᵀ z over the node axis for z [D, n, ...] (the adjoint of gossip; D directions)."""
        dense, _ = self.dense_sparse(t)
        n = dense.shape[0]
        flat = z.reshape(z.shape[0], n, -1)
        return torch.matmul(dense.t(), flat).reshape(z.shape)

    def effective(self, t: int, online: Tensor) -> Tensor:
        """The mixing matrix of round t when only some nodes take part: M [.., n, n] for availability
        a = ``online`` [.., n] (1 online, 0 offline; values in between interpolate, differentiably):

            M = diag(a) W̃ + diag(1 − a),   W̃_kl = W_kl a_l (l ≠ k),   W̃_kk = W_kk + Σ_{l≠k} W_kl (1 − a_l)

        An online receiver moves an offline sender's weight onto its own self-weight; an offline node
        keeps its own model (row e_k). Every row of M stays stochastic.
        """
        dense, _ = self.dense_sparse(t)
        n = dense.shape[0]
        a = online.to(dense.dtype)
        off = dense * (1 - torch.eye(n, dtype=dense.dtype, device=dense.device))
        senders = a.unsqueeze(-2)                                                    # [.., 1, n]
        kept = off * senders
        self_w = torch.diagonal(dense) + (off * (1 - senders)).sum(-1)               # [.., n]
        w_tilde = kept + torch.diag_embed(self_w)
        return a.unsqueeze(-1) * w_tilde + torch.diag_embed(1 - a)

    @staticmethod
    def apply_matrix(M: Tensor, z: Tensor, node_axis: int) -> Tensor:
        """M z over the node axis ``node_axis`` of z [.., n, ...]: M [n, n] (shared) or [.., n, n] per copy."""
        flat = z.reshape(*z.shape[:node_axis + 1], -1)
        out = torch.matmul(M, flat)
        return out.reshape(out.shape[:-1] + z.shape[node_axis + 1:])


class _DenseNet:
    """Explicit forward and backward of ``nn.Sequential(Flatten?, Linear, (ReLU, Linear)*)`` on stacked θ.

    The engine's hot path for model=logreg/mlp: batched matmuls over nodes with the gradient written out
    by hand (∂ℓ/∂logits = softmax − onehot, ReLU mask, Wᵀ products), so a round is ~20 ATen calls and no
    vmap/functional_call/autograd bookkeeping. Same mathematics as autograd on the module, so results
    differ only by float round-off. Used only when no graph is needed (``create_graph`` off, nothing in
    the inputs requires grad); everything else goes through the general vmap + autograd path.
    """

    def __init__(self, layers):
        self.layers = layers        # [(w_offset, b_offset or None, out, in)], in parameter order

    @staticmethod
    def build(fm: FunctionalModel) -> Optional["_DenseNet"]:
        mod = fm.module
        if not isinstance(mod, nn.Sequential) or fm.buffer_names:
            return None
        kids = list(mod.children())
        if kids and isinstance(kids[0], nn.Flatten) and kids[0].start_dim == 1 and kids[0].end_dim == -1:
            kids = kids[1:]
        # Linear (ReLU Linear)*
        if not kids or len(kids) % 2 == 0 or not all(
                isinstance(m, nn.Linear) if i % 2 == 0 else type(m) is nn.ReLU for i, m in enumerate(kids)):
            return None
        offsets, o = {}, 0
        for name, numel in zip(fm.names, fm.numels):
            offsets[name] = o
            o += numel
        names = dict(mod.named_children())
        inv = {id(m): k for k, m in names.items()}
        layers = []
        for m in kids[::2]:
            k = inv[id(m)]
            layers.append((offsets[f"{k}.weight"], offsets.get(f"{k}.bias"), m.out_features, m.in_features))
        if list(offsets) != [n for k in (inv[id(m)] for m in kids[::2])
                             for n in (f"{k}.weight", f"{k}.bias") if n in offsets]:
            return None     # parameters not in layer order: keep the general path
        return _DenseNet(layers)

    def logits(self, th: Tensor, a: Tensor) -> Tensor:
        """Logits [N, m, C] of the rows θ [N, P] on their inputs a [N, m, F] (the forward half of ``step``:
        one batched matmul per layer, each row its own product)."""
        N = th.shape[0]
        for i, (wo, bo, fo, fi) in enumerate(self.layers):
            W = th[:, wo:wo + fo * fi].view(N, fo, fi)
            if bo is None:
                a = torch.bmm(a, W.transpose(1, 2))
            else:
                a = torch.baddbmm(th[:, bo:bo + fo].unsqueeze(1), a, W.transpose(1, 2))
            if i + 1 < len(self.layers):
                a = a.relu_()
        return a

    def step(self, theta: Tensor, x: Tensor, y: Tensor, w: Optional[Tensor], scale: float
             ) -> Tuple[Tensor, Tensor]:
        """scale · ∇_θ (1/B) Σ_i w_i ℓ_i and the losses, for θ [.., n, P], x [n, B, ...], y [n, B].

        w: [.., n, B] or None (all ones). Returns (g [.., n, P], losses [.., n]).
        """
        lead, P = theta.shape[:-1], theta.shape[-1]
        n, B = y.shape
        th = theta.reshape(-1, P)
        N = th.shape[0]
        a = x.reshape(n, B, -1)
        if N != n:   # copies axis: every copy sees the same batches
            a = a.expand(N // n, n, B, a.shape[-1]).reshape(N, B, -1)
            y = y.expand(N // n, n, B).reshape(N, B)
        acts, ws = [a], []
        for i, (wo, bo, fo, fi) in enumerate(self.layers):
            W = th[:, wo:wo + fo * fi].view(N, fo, fi)
            ws.append(W)
            if bo is None:
                z = torch.bmm(a, W.transpose(1, 2))
            else:
                z = torch.baddbmm(th[:, bo:bo + fo].unsqueeze(1), a, W.transpose(1, 2))
            if i + 1 < len(self.layers):
                a = z.relu_()
                acts.append(a)
        # cross-entropy and its gradient softmax − onehot from one exp pass (ATen's log_softmax is slow
        # for a short class axis on CPU); same formula as log_softmax: ℓ = m + log Σ exp(z − m) − z_y
        yi = y.unsqueeze(-1)
        m = z.amax(-1, keepdim=True)
        e = (z - m).exp_()
        s = e.sum(-1, keepdim=True)
        ce = (s.log() + m - z.gather(-1, yi)).squeeze(-1)                     # [N, B]
        if w is None:
            losses = ce.sum(-1) / B
        else:
            w = w.reshape(N, B)
            losses = (w * ce).sum(-1) / B
        dz = e.div_(s)                                                        # softmax, in place
        dz.scatter_add_(-1, yi, torch.full(yi.shape, -1.0, dtype=dz.dtype, device=dz.device))
        dz.mul_(scale / B if w is None else (w * (scale / B)).unsqueeze(-1))
        grads = []
        for i in range(len(self.layers) - 1, -1, -1):
            a_in = acts[i]
            if self.layers[i][1] is not None:
                grads.append(dz.sum(1))
            grads.append(torch.bmm(dz.transpose(1, 2), a_in).view(N, -1))
            if i:
                dz = torch.ops.aten.threshold_backward(torch.bmm(dz, ws[i]), a_in, 0)   # ReLU backward
        g = torch.cat(grads[::-1], dim=1)
        return g.view(*lead, P), losses.view(lead)


    def rop(self, theta: Tensor, x: Tensor, y: Tensor, v: Tensor, hessian: bool = True
            ) -> Tuple[Optional[Tensor], Tensor]:
        """Second-order directional derivatives at unit weights along D directions v [D, N, P]:

            Hv  [D, N, P] = ∇²_θ (1/B) Σ_i ℓ_i(θ_k) · v_k        (per node: a Hessian-vector product)
            Jv  [D, N, B] = ∇_θ ℓ_i(θ_k)ᵀ v_k                     (per sample: a directional derivative)

        for θ [N, P], x [n, B, ...], y [n, B] (N = n, or C·n on a copies axis). Pearlmutter's R-operator
        applied to ``step``'s hand-written forward and backward: R{z_l} = R{a_{l−1}} W_lᵀ + a_{l−1} V_lᵀ + c_l,
        R{a_l} = R{z_l} ⊙ 1[z_l > 0], R{softmax} = p ⊙ (R{z} − pᵀR{z}), then the backward pass and its R.
        Hv is the VJP of the gradient (H is symmetric) that a reverse sweep through a round needs;
        Jv/B is the derivative of vᵀ∇L(w) in each loss weight w_i. ``hessian=False`` skips Hv (returns None).
        """
        N, P = theta.shape
        n, B = y.shape
        D = v.shape[0]
        a = x.reshape(n, B, -1)
        if N != n:
            a = a.expand(N // n, n, B, a.shape[-1]).reshape(N, B, -1)
            y = y.expand(N // n, n, B).reshape(N, B)
        acts, masks, ws, vs, cs = [a], [], [], [], []
        for i, (wo, bo, fo, fi) in enumerate(self.layers):
            W = theta[:, wo:wo + fo * fi].view(N, fo, fi)
            ws.append(W)
            vs.append(v[:, :, wo:wo + fo * fi].reshape(D, N, fo, fi))
            cs.append(None if bo is None else v[:, :, bo:bo + fo])
            z = torch.bmm(a, W.transpose(1, 2))
            if bo is not None:
                z = z + theta[:, bo:bo + fo].unsqueeze(1)
            if i + 1 < len(self.layers):
                masks.append(z > 0)
                a = z.relu()
                acts.append(a)
        p = torch.softmax(z, dim=-1)                                             # [N, B, K]
        e = p.scatter_add(-1, y.unsqueeze(-1), torch.full((N, B, 1), -1.0, dtype=p.dtype, device=p.device))
        # R-forward
        r_acts: List[Optional[Tensor]] = [None]
        for i in range(len(self.layers)):
            rz = torch.matmul(acts[i], vs[i].transpose(-1, -2))                  # [D, N, B, fo]
            if r_acts[i] is not None:
                rz = rz + torch.matmul(r_acts[i], ws[i].transpose(1, 2))
            if cs[i] is not None:
                rz = rz + cs[i].unsqueeze(-2)
            if i + 1 < len(self.layers):
                r_acts.append(rz * masks[i])
        jv = (e * rz).sum(-1)                                                    # [D, N, B]
        if not hessian:
            return None, jv
        rdz = (p * (rz - (p * rz).sum(-1, keepdim=True))) / B                    # R{dz_L}
        dz = e / B
        grads: List[Tensor] = []
        for i in range(len(self.layers) - 1, -1, -1):
            rgw = torch.matmul(rdz.transpose(-1, -2), acts[i])                   # [D, N, fo, fi]
            if r_acts[i] is not None:
                rgw = rgw + torch.matmul(dz.transpose(1, 2), r_acts[i])
            if self.layers[i][1] is not None:
                grads.append(rdz.sum(-2))
            grads.append(rgw.reshape(D, N, -1))
            if i:
                rda = torch.matmul(rdz, ws[i]) + torch.matmul(dz, vs[i])
                dz = torch.bmm(dz, ws[i]) * masks[i - 1]
                rdz = rda * masks[i - 1]
        return torch.cat(grads[::-1], dim=-1), jv


def _rows(x: Tensor, y: Tensor, nodes: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """The batches of the given nodes' rows (all nodes when ``nodes`` is None)."""
    if nodes is None:
        return x, y
    return x.index_select(0, nodes), y.index_select(0, nodes)


class Dynamics:
    """The deterministic map State^t -> State^{t+1} of a recorded run (spec §1).

    x, y: the whole training set on the device ([N, ...], [N]); plan: [T, n, B] dataset indices.
    attack: known misbehaviour applied at its rounds (``attacks.Attack``), or None.
    defense: the receivers' aggregation rule (``defenses.Defense``), or None = plain gossip.
    chunk_nodes: nodes per chunk of the local step and probe losses (0 = all at once; memory bound only).
    network: an unreliable network (``network.NetworkRuntime``: churn, drops, delays, compression), or None.
    With one, ``mixing`` holds the effective matrices M^t (churn and drops already applied), offline nodes'
    local steps are frozen in ``local_step`` and delays / compression run in ``gossip`` (``_network_gossip``).
    """

    def __init__(self, fm: FunctionalModel, x: Tensor, y: Tensor, plan: Tensor, mixing: Mixing,
                 optim: OptimConfig, lr: float, rounds: int, gossip_buffers: bool = True,
                 attack: Optional["Attack"] = None, chunk_nodes: int = 0, defense: Optional["Defense"] = None,
                 network: Optional["NetworkRuntime"] = None):
        self.fm, self.x, self.y, self.plan, self.mixing = fm, x, y, plan, mixing
        self.attack, self.defense, self.network = attack, defense, network
        self._inboxes: Dict[int, Inbox] = {}
        if isinstance(chunk_nodes, bool) or int(chunk_nodes) != chunk_nodes or chunk_nodes < 0:
            raise ValueError(f"chunk_nodes={chunk_nodes!r} must be an integer >= 0 (0 = all nodes at once)")
        self.chunk_nodes = int(chunk_nodes)
        self.optim, self.base_lr, self.rounds, self.gossip_buffers = optim, lr, rounds, gossip_buffers
        self.n, self.batch_size = int(plan.shape[1]), int(plan.shape[2])
        self._dense = _DenseNet.build(fm)
        self._x_flat = x.reshape(x.shape[0], -1)
        self._ones: Dict[tuple, Tensor] = {}

    def _spans(self, count: Optional[int] = None) -> Optional[List[Tuple[int, int]]]:
        """Ranges [lo, hi) of the chunks of ``count`` rows (default: the n nodes), or None when all go at
        once."""
        c, count = self.chunk_nodes, self.n if count is None else count
        if c <= 0 or c >= count:
            return None
        return [(lo, min(lo + c, count)) for lo in range(0, count, c)]

    def _dense_step(self, theta: Tensor, x: Tensor, y: Tensor, w: Optional[Tensor], scale: float
                    ) -> Tuple[Tensor, Tensor]:
        """``_DenseNet.step`` over node chunks (x [n, B, F], y [n, B] sliced on dim 0, θ and w on dim −2)."""
        spans = self._spans(y.shape[0])
        if spans is None:
            return self._dense.step(theta, x, y, w, scale)
        gs, ls = [], []
        for lo, hi in spans:
            g, l = self._dense.step(theta[..., lo:hi, :], x[lo:hi], y[lo:hi],
                                    None if w is None else w[..., lo:hi, :], scale)
            gs.append(g)
            ls.append(l)
        return torch.cat(gs, dim=-2), torch.cat(ls, dim=-1)

    def _fast(self, state_theta: Tensor, w: Optional[Tensor], create_graph: bool) -> bool:
        """The explicit-gradient path applies: plain MLP/logreg and no autograd graph wanted."""
        return (self._dense is not None and not create_graph and not state_theta.requires_grad
                and (w is None or not w.requires_grad))

    def _fast_batch(self, t: int, flip: bool = False, nodes: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Round t's batches flattened for the dense path: x [n, B, F], y [n, B]; with ``nodes`` [N] the
        rows of those nodes, in that order (repeats allowed)."""
        b = self.batch_size
        if nodes is not None and self.attack is None:
            idx = self.plan[t].index_select(0, nodes).reshape(-1)
            N = nodes.shape[0]
            return self._x_flat.index_select(0, idx).view(N, b, -1), self.y.index_select(0, idx).view(N, b)
        idx = self.plan[t].reshape(-1)
        n = self.n
        x, y = self._x_flat.index_select(0, idx).view(n, b, -1), self.y.index_select(0, idx).view(n, b)
        if self.attack is not None:
            x, y = self._attacked(t, self.plan[t], x, y, flip)
        return _rows(x, y, nodes)

    def _attacked(self, t: int, idx: Tensor, x: Tensor, y: Tensor, flip: bool) -> Tuple[Tensor, Tensor]:
        """The attack's view of round t's batches; ``flip``: stealth's label-flipped batch."""
        if flip:
            return x, self.attack.stealth_labels(y)
        return self.attack.corrupt_batch(t, idx, x, y)

    def _unit_weights(self, theta: Tensor) -> Tensor:
        """All-ones w [.., n, B], cached per shape/dtype/device (read-only)."""
        key = (tuple(theta.shape[:-1]), theta.dtype, theta.device)
        w = self._ones.get(key)
        if w is None:
            w = self._ones[key] = torch.ones(key[0] + (self.batch_size,), dtype=theta.dtype, device=theta.device)
        return w

    # ---- pieces of a round --------------------------------------------------------------------------
    def lr(self, t: int) -> float:
        return lr_at(self.optim, self.base_lr, t, self.rounds)

    def batch(self, t: int) -> Tuple[Tensor, Tensor]:
        """Round t's mini-batches: x [n, B, ...], y [n, B] (the attackers' corrupted at attack rounds)."""
        return self._batch(t)

    def _batch(self, t: int, flip: bool = False, nodes: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        idx = self.plan[t]
        if nodes is not None and self.attack is None:
            idx = idx.index_select(0, nodes)
            return self.x[idx], self.y[idx]
        x, y = self.x[idx], self.y[idx]
        if self.attack is not None:
            x, y = self._attacked(t, idx, x, y, flip)
        return _rows(x, y, nodes)

    def losses(self, theta: Tensor, buffers: Buffers, x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        """Per-node weighted batch losses [.., n] (train mode: BatchNorm uses batch statistics and
        updates ``buffers`` in place)."""
        f = vmap(self.fm.loss)
        if theta.dim() == 3:  # copies axis: same batches for every copy
            f = vmap(f, in_dims=(0, 0, None, None, 0))
        return f(theta, buffers, x, y, w)

    def grads(self, theta: Tensor, buffers: Buffers, t: int, w: Optional[Tensor] = None,
              create_graph: bool = False) -> Tuple[Tensor, Tensor, Buffers]:
        """∇ of each node's local loss at round t: g [.., n, P], losses [.., n], updated buffers."""
        return self._grads(theta, buffers, t, w, create_graph)

    def _grads(self, theta: Tensor, buffers: Buffers, t: int, w: Optional[Tensor], create_graph: bool,
               flip: bool = False, nodes: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Buffers]:
        if self._fast(theta, w, create_graph):
            x, y = self._fast_batch(t, flip, nodes)
            with torch.no_grad():
                g, losses = self._dense_step(theta, x, y, w, 1.0)
            return g, losses, dict(buffers)
        x, y = self._batch(t, flip, nodes)
        if w is None:
            w = self._unit_weights(theta)
        spans = self._spans(theta.shape[-2])
        if spans is None:
            return self._autograd_step(theta, buffers, x, y, w, create_graph)
        # node chunks: the batches are built (and attacked) for all nodes, then sliced; node axis = dim −2
        # of θ and w, dim θ.dim()−2 of the buffers
        ax = theta.dim() - 2
        gs, ls, bs = [], [], []
        for lo, hi in spans:
            g, losses, bufs = self._autograd_step(
                theta[..., lo:hi, :], {k: v.narrow(ax, lo, hi - lo) for k, v in buffers.items()},
                x[lo:hi], y[lo:hi], w[..., lo:hi, :], create_graph)
            gs.append(g)
            ls.append(losses)
            bs.append(bufs)
        return (torch.cat(gs, dim=-2), torch.cat(ls, dim=-1),
                {k: torch.cat([b[k] for b in bs], dim=ax) for k in buffers})

    def _autograd_step(self, theta: Tensor, buffers: Buffers, x: Tensor, y: Tensor, w: Tensor,
                       create_graph: bool) -> Tuple[Tensor, Tensor, Buffers]:
        """General path for the nodes in θ [.., m, P]: vmapped losses, one autograd pass (buffers cloned)."""
        new_buffers = {k: v.clone() for k, v in buffers.items()}
        with torch.enable_grad():
            th = theta if theta.requires_grad else theta.detach().requires_grad_(True)
            self.fm.module.train()
            with self.fm.tracking(create_graph):     # BatchNorm statistics join the graph when it is kept
                losses = self.losses(th, new_buffers, x, y, w)
            (g,) = torch.autograd.grad(losses.sum(), th, create_graph=create_graph)
        return g, losses, new_buffers

    def local_step(self, state: State, w: Optional[Tensor] = None, create_graph: bool = False,
                   nodes: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor], Buffers, Tensor]:
        """Δ^t = −η^t · (momentum-filtered gradient). Returns (Δ [.., n, P], momentum', buffers', losses).

        With an update attack active at round t, the attackers' rows of Δ are what they send (and keep);
        momentum', buffers' and losses stay the honest ones. Under churn (``network``) the nodes offline in
        round t do not train: Δ_k = 0, momentum and buffers frozen (``_freeze_offline``); losses stay those at θ^t.

        ``nodes`` [N] (int64): the state holds N rows (θ [N, P], w [N, B], buffers and momentum likewise),
        row i being a copy of node ``nodes[i]`` (repeats allowed: ``dice gt`` steps only the nodes a removal
        has reached, in many counterfactual copies at once). Row i gets node nodes[i]'s batch, lr and attack;
        rows never interact, so each comes out as that node's row of the full step. Not on a network run
        (``row_shortcuts``).
        """
        if nodes is not None and self.network is not None:
            raise ValueError("local_step(nodes=...) steps rows of plain W^t gossip; this run has network "
                             "conditions (see Dynamics.row_shortcuts)")
        out = self._local_step(state, w, create_graph, nodes=nodes)
        if self.attack is not None and self.attack.update_at(state.round):
            delta, mom, bufs, losses = out
            flipped = lambda: self._local_step(state, w, create_graph, flip=True, nodes=nodes)[0]  # noqa: E731
            if nodes is None:
                delta = self.attack.corrupt_update(state.round, delta, flipped,
                                                   lambda: self.attacker_probe_grads(state, create_graph))
            else:
                delta = self._corrupt_rows(state, delta, flipped, nodes, create_graph)
            out = delta, mom, bufs, losses
        if self.network is not None:
            a = self.network.online(state.round)
            if a is not None:
                delta, mom, bufs, losses = out
                delta, mom, bufs = self._freeze_offline(state, a, delta, mom, bufs)
                out = delta, mom, bufs, losses
        return out

    def _corrupt_rows(self, state: State, delta: Tensor, flipped, nodes: Tensor, create_graph: bool) -> Tensor:
        """``Attack.corrupt_update`` for rows of given nodes: the attackers' rows replaced by what they send."""
        atk = self.attack
        attackers = {k: i for i, k in enumerate(atk.nodes)}
        ids = nodes.tolist()
        pos = [r for r, k in enumerate(ids) if k in attackers]
        if not pos:
            return delta
        which = [attackers[ids[r]] for r in pos]
        rows = torch.as_tensor(pos, dtype=torch.long, device=delta.device)
        d = delta.index_select(-2, rows)
        d_flip = flipped().index_select(-2, rows) if atk.name in ("stealth", "orthogonal") else None
        g = (self.attacker_probe_grads(state, create_graph, rows=rows, probe_nodes=nodes.index_select(0, rows))
             if atk.name == "orthogonal" else None)
        return delta.index_copy(delta.dim() - 2, rows, atk.transform(state.round, d, d_flip, which=which, g=g))

    def attacker_probe_grads(self, state: State, create_graph: bool = False, rows: Optional[Tensor] = None,
                             probe_nodes: Optional[Tensor] = None) -> Tensor:
        """∇L̃_j(θ_j^t) of each attacker j on its copy of the probe set (eval mode): [.., m, P], rows in
        ``attack.nodes`` order (orthogonal's estimate of its receivers' probe gradient). ``rows`` /
        ``probe_nodes``: the state's rows to use and the attacker node each is (``local_step(nodes=...)``)."""
        atk = self.attack
        if rows is None:
            rows = probe_nodes = atk.rows(state.theta.device)
        ax = state.theta.dim() - 2
        theta = state.theta.index_select(ax, rows)
        bufs = {k: v.index_select(ax, rows) for k, v in state.buffers.items()}
        xp, yp, shared = atk.probe
        if not shared:
            xp, yp = xp.index_select(0, probe_nodes), yp.index_select(0, probe_nodes)
        fm = self.fm

        def one(th, b, xx, yy):
            return torch.nn.functional.cross_entropy(fm.logits(th, b, xx), yy)

        f = vmap(one, in_dims=(0, 0, None if shared else 0, None if shared else 0))
        if theta.dim() == 3:
            f = vmap(f, in_dims=(0, 0, None, None))
        # a differentiated pass (exact, value's reverse sweep) hands in BatchNorm statistics that carry a graph:
        # eval mode then needs the tracked forward, as in ``probe_losses_vmap`` (native batch_norm refuses them)
        track = any(v.requires_grad for v in bufs.values())
        with torch.enable_grad():
            th = theta if theta.requires_grad else theta.detach().requires_grad_(True)
            fm.module.eval()
            try:
                with fm.tracking(track):
                    loss = f(th, bufs, xp, yp)
            finally:
                fm.module.train()
            (g,) = torch.autograd.grad(loss.sum(), th, create_graph=create_graph)
        return g

    def _local_step(self, state: State, w: Optional[Tensor], create_graph: bool, flip: bool = False,
                    nodes: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor], Buffers, Tensor]:
        t = state.round
        if not self.optim.momentum and self._fast(state.theta, w, create_graph):
            # plain SGD: fold −η^t into the backward pass, so Δ comes out of it directly
            lr = self.lr(t)
            x, y = self._fast_batch(t, flip, nodes)
            with torch.no_grad():
                delta, losses = self._dense_step(state.theta, x, y, w, -lr)
                if self.optim.weight_decay:
                    delta = delta.add_(state.theta, alpha=-lr * self.optim.weight_decay)
            return delta, None, dict(state.buffers), losses
        g, losses, bufs = self._grads(state.theta, state.buffers, t, w, create_graph, flip, nodes)
        if self.optim.weight_decay:
            g = g + self.optim.weight_decay * state.theta
        mom = None
        if self.optim.momentum:
            mom = g if state.momentum is None else self.optim.momentum * state.momentum + g
            g = mom
        return -self.lr(t) * g, mom, bufs, losses

    def gossip_state(self, t: int, theta_half: Tensor, buffers: Buffers, online: Optional[Tensor] = None
                     ) -> Tuple[Tensor, Buffers]:
        """Θ^{t+1} = W^t Θ^{t+½}; float buffers (BatchNorm statistics) too when ``gossip_buffers``.

        ``online`` [.., n]: mix with ``Mixing.effective`` M^t(a) instead of W^t (see ``round``).
        """
        copies = theta_half.dim() == 3
        if online is not None:
            M = self.mixing.effective(t, online)
            ax = 1 if copies else 0
            theta = Mixing.apply_matrix(M, theta_half, ax)
            if self.gossip_buffers:
                buffers = {k: (Mixing.apply_matrix(M, v, ax) if v.is_floating_point() else v)
                           for k, v in buffers.items()}
            return theta, buffers
        theta = self.mixing.apply(t, theta_half, copies)
        if self.gossip_buffers:
            buffers = {k: (self.mixing.apply(t, v, copies) if v.is_floating_point() else v)
                       for k, v in buffers.items()}
        return theta, buffers

    # ---- the gossip step: per-edge messages and the receivers' aggregation ---------------------------
    @property
    def linear_gossip(self) -> bool:
        """Θ^{t+1} is the linear map W^t Θ^{t+½} (no defense, no per-edge message attack)."""
        return self.defense is None and (self.attack is None or self.attack.kind != "message")

    @property
    def row_shortcuts(self) -> bool:
        """Θ^{t+1} = W^t Θ^{t+½} row by row with the recorded W^t: linear gossip and no network conditions
        (churn, drops, delays, compression). gt's cascade-restricted pass and exact's hop 0-1 and cone
        shortcuts need it; otherwise they take their full twins."""
        return self.linear_gossip and self.network is None

    def nonlinear_reason(self) -> str:
        """What makes the gossip step non-linear ('' when it is linear)."""
        if self.defense is not None:
            return f"defense={self.defense.name} aggregates the received models with a non-linear rule"
        if self.attack is not None and self.attack.kind == "message":
            return (f"attack={self.attack.name} sends per-edge messages computed from the honest models "
                    f"(a non-linear function of them)")
        return ""

    def inbox(self, t: int) -> Inbox:
        """Round t's padded in-neighbourhoods (cached; once for a fixed W)."""
        key = 0 if not self.mixing.schedule.time_varying else t
        box = self._inboxes.get(key)
        if box is None:
            if self.mixing.schedule.time_varying:
                self._inboxes.clear()
            box = self._inboxes[key] = Inbox(self.mixing.numpy(t), self.mixing.device, self.mixing.dtype)
        return box

    def messages(self, state: State, half: Tensor) -> Optional[Edges]:
        """Round t's Byzantine per-edge messages (``attack.messages``), or None when every sender is honest."""
        t = state.round
        if self.attack is None or not self.attack.message_at(t):
            return None
        return self.attack.messages(self, t, state.theta, half)

    def correction(self, t: int, half: Tensor, edges: Edges) -> Tensor:
        """Σ_{e=(l→k)} W^t_kl (m_e − θ_l^{t+½}) on row k: [.., n, P] (what plain gossip adds for the edges)."""
        d = (edges.message - half.index_select(half.dim() - 2, edges.sender)) * edges.weight[:, None]
        return torch.zeros_like(half).index_add(half.dim() - 2, edges.receiver, d)

    def gossip(self, state: State, delta: Tensor, buffers: Buffers, momentum: Optional[Tensor],
               create_graph: bool = False, edges: Optional[Edges] = None,
               online: Optional[Tensor] = None) -> State:
        """The second half of round t: θ_k^{t+1} = AGG_k({(W^t_kl, m_{l→k})}) from θ^{t+½} = θ^t + Δ^t.

        Plain gossip (no defense): the product W^t Θ^{t+½} (fast path, unchanged) plus ``correction`` for
        the Byzantine edges. With a defense: ``defense.aggregate`` over the ``Inbox`` messages; BatchNorm
        buffers are averaged with W^t either way. ``edges``: the round's messages when already computed.
        Returns State^{t+1} (momentum as given, gossip state as the defense leaves it). ``online``: see
        ``round`` (plain gossip only).
        """
        if self.network is not None and self.network.rec.stateful:
            return self._network_gossip(state, delta, buffers, momentum, online)
        t = state.round
        half = state.theta + delta
        if online is not None:
            if not self.linear_gossip:
                from .errors import UserError

                raise UserError(f"removing participants (or churn) needs plain gossip, but "
                                f"{self.nonlinear_reason()}; measure this run with data units instead")
            theta, buffers = self.gossip_state(t, half, buffers, online)
            return State(t + 1, theta, buffers, momentum, state.gossip)
        if edges is None:
            edges = self.messages(state, half)
        if self.defense is None:
            theta, buffers = self.gossip_state(t, half, buffers)
            if edges is not None:
                theta = theta + self.correction(t, half, edges)
            return State(t + 1, theta, buffers, momentum, state.gossip)
        box = self.inbox(t)
        theta, gstate = self.defense.aggregate(self, t, state, half, buffers, box, edges, create_graph)
        if self.gossip_buffers:
            copies = half.dim() == 3
            buffers = {k: (self.mixing.apply(t, v, copies) if v.is_floating_point() else v)
                       for k, v in buffers.items()}
        return State(t + 1, theta, buffers, momentum, gstate)

    def _network_gossip(self, state: State, delta: Tensor, buffers: Buffers, momentum: Optional[Tensor],
                        online: Optional[Tensor]) -> State:
        """Gossip with stale messages and/or CHOCO compression (NETWORKS.md §3-4; dice_cli/network.py):

            X^t = θ^{t+½}  (or, compressed: θ̂ ← θ̂ + a ⊙ Q(θ^{t+½} − θ̂), X^t = θ̂)
            mix = Σ_d M^t_(d) X^{t−d}                                   (X^{t−d} from ``gossip["net.sent"]``)
            θ^{t+1} = mix   (or θ^{t+½} + γ (mix − θ̂))

        M^t is the effective matrix (``mixing``), or ``Mixing.effective(t, online)`` of it for removed
        participants (per copy); the history shifts by one round. Buffers mix with M^t (no delay).
        """
        t, net = state.round, self.network
        half = state.theta + delta
        node_ax = half.dim() - 2
        gossip = dict(state.gossip)
        n = self.n
        stacked = net.split(t, self.mixing)                               # [n, (D+1)·n]
        if online is not None:
            if not self.linear_gossip:
                from .errors import UserError

                raise UserError(f"removing participants needs plain gossip, but {self.nonlinear_reason()}")
            M = self.mixing.effective(t, online)                          # [.., n, n]
            support = stacked != 0
            support[:, :n] |= torch.eye(n, dtype=torch.bool, device=M.device)
            stacked = M.repeat(*([1] * (M.dim() - 1)), net.D + 1) * support
        if net.rec.compressed:
            pub = gossip["net.public"]
            q = net.compress(t, half - pub)
            sends = net.online(t)
            if sends is not None:
                q = q * sends.unsqueeze(-1)
            if online is not None:
                q = q * online.to(q.dtype).unsqueeze(-1)
            pub = pub + q
            gossip["net.public"] = pub
            x = pub
        else:
            x = half
        if net.D:
            hist = gossip["net.sent"]                                  # [.., D, n, P]: X^{t−1} … X^{t−D}
            full = torch.cat([x.unsqueeze(-3), hist], dim=-3)          # [.., D+1, n, P]: X^t … X^{t−D}
            mix = torch.matmul(stacked, full.reshape(*full.shape[:-3], (net.D + 1) * n, full.shape[-1]))
            gossip["net.sent"] = full[..., :-1, :, :]
        else:
            mix = torch.matmul(stacked, x)
        theta = half + net.rec.gamma * (mix - x) if net.rec.compressed else mix
        if self.gossip_buffers and buffers:
            M = self.mixing.effective(t, online) if online is not None else self.mixing.dense_sparse(t)[0]
            buffers = {k: (Mixing.apply_matrix(M, v, node_ax) if v.is_floating_point() else v)
                       for k, v in buffers.items()}
        return State(t + 1, theta, buffers, momentum, gossip)

    def round(self, state: State, w: Optional[Tensor] = None, create_graph: bool = False,
              online: Optional[Tensor] = None) -> Tuple[State, Tensor, Tensor]:
        """State^t -> State^{t+1}. Returns (next state, Δ^t, batch losses at θ^t).

        ``online``: optional availability a^t [.., n] of the nodes this round (per copy on a copies axis;
        1 = takes part, 0 = has left; in between interpolates, differentiably). An offline node neither
        trains, sends nor receives: Δ_k = 0, its momentum and BatchNorm buffers stay frozen and
        θ_k^{t+1} = θ_k^t; online receivers move the weight of offline senders onto their self-weight, so
        every row stays stochastic (``Mixing.effective``; NETWORKS.md §1 churn). Per node k:

            Δ_k ← a_k Δ_k,   m_k ← a_k m_k' + (1 − a_k) m_k,   b_k ← a_k b_k' + (1 − a_k) b_k,
            Θ^{t+1} = M^t(a) (Θ^t + Δ^t)

        (an offline node's momentum counts as 0 if it never had one: PyTorch's first step sets m = g
        = μ·0 + g). ``online=None`` is the plain round, bit for bit. ``dice value unit=participant``
        uses it; churn and participant coalitions reuse it.
        """
        delta, mom, bufs, losses = self.local_step(state, w, create_graph)
        if online is not None:
            delta, mom, bufs = self._freeze_offline(state, online, delta, mom, bufs)
        return self.gossip(state, delta, bufs, mom, create_graph, online=online), delta, losses

    @staticmethod
    def _freeze_offline(state: State, online: Tensor, delta: Tensor, mom: Optional[Tensor], bufs: Buffers
                        ) -> Tuple[Tensor, Optional[Tensor], Buffers]:
        """Offline nodes (a_k = 0) do not train: their Δ is 0, momentum and buffers keep their values."""
        a = online.to(delta.dtype)

        def per_node(v: Tensor) -> Tensor:      # a [.., n] -> [.., n, 1, ...] against v [.., n, ...]
            node_axis = state.theta.dim() - 2
            return a.reshape(a.shape + (1,) * (v.dim() - node_axis - 1))

        delta = delta * per_node(delta)
        if mom is not None:
            old = state.momentum if state.momentum is not None else torch.zeros_like(mom)
            am = per_node(mom)
            mom = am * mom + (1 - am) * old
        new = {}
        for k, v in bufs.items():
            ab = per_node(v)
            old = state.buffers[k]
            new[k] = ab * v + (1 - ab) * old if v.is_floating_point() else torch.where(ab > 0, v, old)
        return delta, mom, new

    # ---- reverse mode through one round (dice value method=exact) ------------------------------------
    def round_vjp(self, state: State, lam_theta: Tensor, lam_mom: Optional[Tensor] = None,
                  lam_bufs: Optional[Buffers] = None, want_w: bool = True
                  ) -> Tuple[Tensor, Optional[Tensor], Buffers, Optional[Tensor]]:
        """One step of a reverse sweep: cotangents of State^{t+1} = round(State^t, w) at w = 1, for D
        directions at once, pulled back to State^t and to the loss weights of round t.

        lam_theta [D, n, P] (= ∂F_d/∂Θ^{t+1}), lam_mom [D, n, P] or None, lam_bufs {float buffer: [D, n, ...]}
        (missing = 0). Returns (∂F_d/∂Θ^t, ∂F_d/∂m^t or None when m^t is None, {buffer: ∂F_d/∂b^t},
        ∂F_d/∂w^t [D, n, B] if ``want_w`` else None). For SGD (g = ∇L(θ; w) + λθ, m' = μm + g,
        Δ = −η m', Θ' = W(Θ + Δ)) with u = Wᵀ λ_Θ' and λ_g = −η u + λ_m':

            λ_Θ = u + H λ_g + λ_wd λ_g,   λ_m = μ λ_g,   λ_{w_i} = (1/|B|) ∇ℓ_iᵀ λ_g

        The plain MLP/logreg path computes exactly this with ``_DenseNet.rop`` (no autograd); everything else
        (BatchNorm with its running statistics, update attacks at their rounds) goes through autograd on
        ``round(create_graph=True)``: the same numbers to round-off (tested).
        """
        t = state.round
        dense_ok = (self._dense is not None and not state.buffers and self.linear_gossip and self.network is None
                    and not (self.attack is not None and self.attack.update_at(t)))
        if dense_ok:
            return self._round_vjp_dense(state, lam_theta, lam_mom, want_w)
        return self._round_vjp_autograd(state, lam_theta, lam_mom, lam_bufs or {}, want_w)

    def _round_vjp_dense(self, state: State, lam_theta: Tensor, lam_mom: Optional[Tensor], want_w: bool
                         ) -> Tuple[Tensor, Optional[Tensor], Buffers, Optional[Tensor]]:
        t = state.round
        lr, mu, wd = self.lr(t), self.optim.momentum, self.optim.weight_decay
        u = self.mixing.apply_transpose(t, lam_theta)                      # adjoint of Θ^{t+½}
        lam_g = u * (-lr)
        if mu and lam_mom is not None:
            lam_g = lam_g + lam_mom
        x, y = self._fast_batch(t)
        spans = self._spans() or [(0, self.n)]
        hv, jv = [], []
        for lo, hi in spans:
            h, j = self._dense.rop(state.theta[lo:hi], x[lo:hi], y[lo:hi], lam_g[:, lo:hi])
            hv.append(h)
            jv.append(j)
        hv = hv[0] if len(hv) == 1 else torch.cat(hv, dim=1)
        lam_prev = u + hv
        if wd:
            lam_prev = lam_prev + wd * lam_g
        mom_prev = mu * lam_g if (mu and state.momentum is not None) else None
        gw = None
        if want_w:
            gw = (jv[0] if len(jv) == 1 else torch.cat(jv, dim=1)) / self.batch_size
        return lam_prev, mom_prev, {}, gw

    def _round_vjp_autograd(self, state: State, lam_theta: Tensor, lam_mom: Optional[Tensor], lam_bufs: Buffers,
                            want_w: bool) -> Tuple[Tensor, Optional[Tensor], Buffers, Optional[Tensor]]:
        D = lam_theta.shape[0]
        dt, dev = state.theta.dtype, state.theta.device
        float_bufs = [k for k, v in state.buffers.items() if v.is_floating_point()]
        with torch.enable_grad():
            th = state.theta.detach().requires_grad_(True)
            mom = None if state.momentum is None else state.momentum.detach().requires_grad_(True)
            bufs = {k: (v.detach().requires_grad_(True) if k in float_bufs else v) for k, v in state.buffers.items()}
            w = torch.ones(self.n, self.batch_size, dtype=dt, device=dev, requires_grad=True) if want_w else None
            # a defense's carried state (dice's running scores) enters as a constant of the factual run; the
            # network's (sent-model history, public copies) is state like Θ: its cotangents ride in lam_bufs
            # under "gossip:<key>"
            net_keys = [k for k in state.gossip if k.startswith("net.")]
            gossip = {k: (v.detach().requires_grad_(True) if k in net_keys else v.detach())
                      for k, v in state.gossip.items()}
            nxt, _, _ = self.round(State(state.round, th, bufs, mom, gossip), w, create_graph=True)
            outs, cots = [nxt.theta], [lam_theta]
            for k in net_keys:
                if f"gossip:{k}" in lam_bufs:
                    outs.append(nxt.gossip[k])
                    cots.append(lam_bufs[f"gossip:{k}"])
            if nxt.momentum is not None and lam_mom is not None:
                outs.append(nxt.momentum)
                cots.append(lam_mom)
            for k in float_bufs:
                if k in lam_bufs and nxt.buffers[k].requires_grad:
                    outs.append(nxt.buffers[k])
                    cots.append(lam_bufs[k])
            ins = [th] + ([mom] if mom is not None else []) + [bufs[k] for k in float_bufs] + \
                [gossip[k] for k in net_keys] + ([w] if want_w else [])
            grads = _batched_grad(outs, ins, cots, D)
        out = [g.detach() if g is not None else torch.zeros((D,) + tuple(x.shape), dtype=dt, device=dev)
               for g, x in zip(grads, ins)]
        i = 0
        lam_prev = out[i]
        i += 1
        mom_prev = None
        if mom is not None:
            mom_prev = out[i]
            i += 1
        bufs_prev = {k: out[i + m] for m, k in enumerate(float_bufs)}
        i += len(float_bufs)
        for k in net_keys:
            bufs_prev[f"gossip:{k}"] = out[i]
            i += 1
        return lam_prev, mom_prev, bufs_prev, (out[i] if want_w else None)

    # ---- evaluation -----------------------------------------------------------------------------------
    def probe_grad(self, theta: Tensor, buffers: Buffers, xp: Tensor, yp: Tensor, shared: bool,
                   create_graph: bool = False) -> Tensor:
        """∇L_k(θ_k) for every node at any θ [.., n, P] (a defense's own probe gradient): the explicit
        MLP/logreg gradient when no graph is wanted, else autograd through ``probe_losses``."""
        if self._dense is not None and not create_graph and not theta.requires_grad:
            m = yp.shape[-1]
            x = xp.reshape(m, -1).expand(self.n, m, -1) if shared else xp.reshape(self.n, m, -1)
            y = yp.expand(self.n, m) if shared else yp
            with torch.no_grad():
                return self._dense_step(theta, x, y, None, 1.0)[0]
        with torch.enable_grad():
            th = theta if theta.requires_grad else theta.detach().requires_grad_(True)
            losses, _ = self.probe_losses(th, buffers, xp, yp, shared)
            (g,) = torch.autograd.grad(losses.sum(), th, create_graph=create_graph)
        return g

    def probe_grads(self, state: State, xp: Tensor, yp: Tensor, shared: bool) -> Tensor:
        """∇L_k(θ_k) for every node k at once: [n, P]. Node k's probe loss depends only on row k of Θ,
        so the gradient of the summed losses is the stack of the per-node gradients (one backward).

        MLP/logreg: the hand-written backward of ``_DenseNet.step`` on the probe sets (no autograd);
        ``probe_grads_autograd`` is its slow, obvious twin (tests/test_engine.py: equal to 1e-12 in float64).
        """
        if self._dense is not None:
            with torch.no_grad():
                x, y = self._probe_rows(state.theta.shape[:-1], xp, yp, shared)
                return self._dense_step(state.theta.detach(), x, y, None, 1.0)[0]
        return self.probe_grads_autograd(state, xp, yp, shared)

    def probe_grads_autograd(self, state: State, xp: Tensor, yp: Tensor, shared: bool) -> Tensor:
        """``probe_grads`` by autograd through the general (vmap) probe losses, for every model."""
        with torch.enable_grad():
            th = state.theta.detach().requires_grad_(True)
            losses, _ = self.probe_losses_vmap(th, state.buffers, xp, yp, shared)
            (g,) = torch.autograd.grad(losses.sum(), th)
        return g

    def _probe_rows(self, lead: torch.Size, xp: Tensor, yp: Tensor, shared: bool) -> Tuple[Tensor, Tensor]:
        """The probe sets as per-row inputs for the dense path: x [n, m, F], y [n, m] for the n = lead[-1]
        rows of the node axis (a shared set is expanded without a copy; ``_DenseNet.step`` expands over a
        copies axis itself)."""
        n = lead[-1]
        if shared:
            m = yp.shape[0]
            return xp.reshape(1, m, -1).expand(n, m, -1), yp.reshape(1, m).expand(n, m)
        return xp.reshape(n, yp.shape[1], -1), yp

    def probe_losses(self, theta: Tensor, buffers: Buffers, xp: Tensor, yp: Tensor, shared: bool,
                     nodes: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Per-node mean probe loss and accuracy [.., n] (eval mode). xp: [m, ...] shared or [n, m, ...].
        ``nodes`` [N]: θ holds N rows, row i a copy of node nodes[i] (its probe set), as in ``local_step``.

        MLP/logreg without a graph to keep: ``_DenseNet.logits`` and the cross-entropy written as in
        ``_DenseNet.step`` (batched matmuls, no vmap/functional_call); ``probe_losses_vmap`` is the general
        path and this one's twin (tests/test_engine.py: equal to 1e-12 in float64, same accuracies).
        """
        if nodes is not None and not shared:
            xp, yp = xp.index_select(0, nodes), yp.index_select(0, nodes)
        if self._dense is not None and not (theta.requires_grad and torch.is_grad_enabled()):
            with torch.no_grad():
                return self._dense_probe_losses(theta, xp, yp, shared)
        return self.probe_losses_vmap(theta, buffers, xp, yp, shared)

    def _dense_probe_losses(self, theta: Tensor, xp: Tensor, yp: Tensor, shared: bool) -> Tuple[Tensor, Tensor]:
        lead, P = theta.shape[:-1], theta.shape[-1]
        th = theta.reshape(-1, P)
        N = th.shape[0]
        x, y = self._probe_rows(lead, xp, yp, shared)                       # [n, m, F], [n, m]
        m = y.shape[1]
        rows = lead[-1]
        if N != rows:        # copies axis: every copy sees the same probes
            x = x.expand(N // rows, *x.shape).reshape(N, m, -1)
            y = y.expand(N // rows, *y.shape).reshape(N, m)
        loss, acc = [], []
        for lo, hi in self._spans(N) or [(0, N)]:
            z = self._dense.logits(th[lo:hi], x[lo:hi])                     # [c, m, C]
            yy = y[lo:hi].unsqueeze(-1)
            zmax, arg = z.max(-1, keepdim=True)          # one pass: the max and (first) argmax
            zy = z.gather(-1, yy)
            lse = (z - zmax).exp_().sum(-1, keepdim=True).log_() + zmax
            loss.append((lse - zy).squeeze(-1).sum(-1) / m)
            acc.append((arg == yy).squeeze(-1).to(theta.dtype).mean(-1))
        return torch.cat(loss).view(lead), torch.cat(acc).view(lead)

    def probe_losses_vmap(self, theta: Tensor, buffers: Buffers, xp: Tensor, yp: Tensor, shared: bool
                          ) -> Tuple[Tensor, Tensor]:
        """``probe_losses`` through vmap(functional_call) for every model (autograd-capable)."""
        fm = self.fm

        def one(th, bufs, xx, yy):
            logits = fm.logits(th, bufs, xx)
            ce = torch.nn.functional.cross_entropy(logits, yy)
            acc = (logits.argmax(-1) == yy).to(th.dtype).mean()
            return ce, acc

        in_x = None if shared else 0
        f = vmap(one, in_dims=(0, 0, in_x, in_x))
        if theta.dim() == 3:
            f = vmap(f, in_dims=(0, 0, None, None))
        spans = self._spans(theta.shape[-2])
        # differentiate through the running statistics when they carry a graph (estimate/value exact)
        track = torch.is_grad_enabled() and any(v.requires_grad for v in buffers.values())
        fm.module.eval()
        try:
            with fm.tracking(track):
                if spans is None:
                    return f(theta, buffers, xp, yp)
                ax = theta.dim() - 2
                parts = [f(theta[..., lo:hi, :], {k: v.narrow(ax, lo, hi - lo) for k, v in buffers.items()},
                           xp if shared else xp[lo:hi], yp if shared else yp[lo:hi]) for lo, hi in spans]
                return torch.cat([p[0] for p in parts], dim=-1), torch.cat([p[1] for p in parts], dim=-1)
        finally:
            fm.module.train()


def _batched_grad(outs: List[Tensor], ins: List[Tensor], cots: List[Tensor], D: int) -> List[Optional[Tensor]]:
    """Σ_o cots[o][d] · ∂outs[o]/∂ins for each of D directions: [D, *in.shape] per input (None if unused).

    One vmapped backward (``is_grads_batched``); a loop over d where vmap cannot run the graph; a plain
    backward for D = 1.
    """
    if D == 1:
        gs = torch.autograd.grad(outs, ins, [c[0] for c in cots], allow_unused=True)
        return [None if g is None else g.unsqueeze(0) for g in gs]
    try:
        return list(torch.autograd.grad(outs, ins, cots, retain_graph=True, allow_unused=True,
                                        is_grads_batched=True))
    except RuntimeError:
        per = [torch.autograd.grad(outs, ins, [c[d] for c in cots], retain_graph=True, allow_unused=True)
               for d in range(D)]
        return [None if per[0][i] is None else torch.stack([p[i] for p in per]) for i in range(len(ins))]


def consensus_distance(theta: Tensor) -> Tensor:
    """‖θ_k − θ̄‖² per node [n] (θ̄ the plain mean over the nodes whose parameters are finite: an attacker
    whose model diverged does not make every honest node's distance infinite)."""
    ok = torch.isfinite(theta.sum(-1))
    mean = theta.mean(0, keepdim=True) if bool(ok.all()) else theta[ok].mean(0, keepdim=True)
    return ((theta - mean) ** 2).sum(-1)

