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

    dice train engine=vmap nodes=256      # this module;  engine=loop is reference.py
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.func import vmap

from .config import OptimConfig
from .models import FunctionalModel

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
    """System state at the start of round ``round``: Θ [.., n, P], buffers {name: [.., n, ...]}, momentum."""
    round: int
    theta: Tensor
    buffers: Buffers
    momentum: Optional[Tensor]

    def clone(self) -> "State":
        return State(self.round, self.theta.clone(), {k: v.clone() for k, v in self.buffers.items()},
                     None if self.momentum is None else self.momentum.clone())

    def to_payload(self) -> dict:
        """Plain tensors for ``torch.save`` (CPU)."""
        return {"round": self.round, "theta": self.theta.detach().cpu(),
                "buffers": {k: v.detach().cpu() for k, v in self.buffers.items()},
                "momentum": None if self.momentum is None else self.momentum.detach().cpu()}

    @staticmethod
    def from_payload(p: dict, device: torch.device, dtype: torch.dtype) -> "State":
        def cast(v: Tensor) -> Tensor:
            return v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        return State(int(p["round"]), cast(p["theta"]), {k: cast(v) for k, v in p["buffers"].items()},
                     None if p["momentum"] is None else cast(p["momentum"]))


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


class Dynamics:
    """The deterministic map State^t -> State^{t+1} of a recorded run (spec §1).

    x, y: the whole training set on the device ([N, ...], [N]); plan: [T, n, B] dataset indices.
    """

    def __init__(self, fm: FunctionalModel, x: Tensor, y: Tensor, plan: Tensor, mixing: Mixing,
                 optim: OptimConfig, lr: float, rounds: int, gossip_buffers: bool = True):
        self.fm, self.x, self.y, self.plan, self.mixing = fm, x, y, plan, mixing
        self.optim, self.base_lr, self.rounds, self.gossip_buffers = optim, lr, rounds, gossip_buffers
        self.n, self.batch_size = int(plan.shape[1]), int(plan.shape[2])

    # ---- pieces of a round --------------------------------------------------------------------------
    def lr(self, t: int) -> float:
        return lr_at(self.optim, self.base_lr, t, self.rounds)

    def batch(self, t: int) -> Tuple[Tensor, Tensor]:
        """Round t's mini-batches: x [n, B, ...], y [n, B]."""
        idx = self.plan[t]
        return self.x[idx], self.y[idx]

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
        x, y = self.batch(t)
        if w is None:
            w = torch.ones(theta.shape[:-1] + (self.batch_size,), dtype=theta.dtype, device=theta.device)
        new_buffers = {k: v.clone() for k, v in buffers.items()}
        with torch.enable_grad():
            th = theta if theta.requires_grad else theta.detach().requires_grad_(True)
            self.fm.module.train()
            losses = self.losses(th, new_buffers, x, y, w)
            (g,) = torch.autograd.grad(losses.sum(), th, create_graph=create_graph)
        return g, losses, new_buffers

    def local_step(self, state: State, w: Optional[Tensor] = None, create_graph: bool = False
                   ) -> Tuple[Tensor, Optional[Tensor], Buffers, Tensor]:
        """Δ^t = −η^t · (momentum-filtered gradient). Returns (Δ [.., n, P], momentum', buffers', losses)."""
        t = state.round
        g, losses, bufs = self.grads(state.theta, state.buffers, t, w, create_graph)
        if self.optim.weight_decay:
            g = g + self.optim.weight_decay * state.theta
        mom = None
        if self.optim.momentum:
            mom = g if state.momentum is None else self.optim.momentum * state.momentum + g
            g = mom
        return -self.lr(t) * g, mom, bufs, losses

    def gossip_state(self, t: int, theta_half: Tensor, buffers: Buffers) -> Tuple[Tensor, Buffers]:
        """Θ^{t+1} = W^t Θ^{t+½}; float buffers (BatchNorm statistics) too when ``gossip_buffers``."""
        copies = theta_half.dim() == 3
        theta = self.mixing.apply(t, theta_half, copies)
        if self.gossip_buffers:
            buffers = {k: (self.mixing.apply(t, v, copies) if v.is_floating_point() else v)
                       for k, v in buffers.items()}
        return theta, buffers

    def round(self, state: State, w: Optional[Tensor] = None, create_graph: bool = False
              ) -> Tuple[State, Tensor, Tensor]:
        """State^t -> State^{t+1}. Returns (next state, Δ^t, batch losses at θ^t)."""
        delta, mom, bufs, losses = self.local_step(state, w, create_graph)
        theta, bufs = self.gossip_state(state.round, state.theta + delta, bufs)
        return State(state.round + 1, theta, bufs, mom), delta, losses

    # ---- evaluation -----------------------------------------------------------------------------------
    def probe_losses(self, theta: Tensor, buffers: Buffers, xp: Tensor, yp: Tensor, shared: bool
                     ) -> Tuple[Tensor, Tensor]:
        """Per-node mean probe loss and accuracy [.., n] (eval mode). xp: [m, ...] shared or [n, m, ...]."""
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
        fm.module.eval()
        try:
            return f(theta, buffers, xp, yp)
        finally:
            fm.module.train()


def consensus_distance(theta: Tensor) -> Tensor:
    """‖θ_k − θ̄‖² per node [n] (θ̄ the plain mean over nodes)."""
    return ((theta - theta.mean(0, keepdim=True)) ** 2).sum(-1)

