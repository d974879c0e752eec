"""``dice value method=exact``: the whole-run metagradient by one reverse sweep (VALUE.md §3).

For targets F_d (``targets=all``: F_k = q_k L_k(θ_k^{T_e}), one per node; ``targets=network``: one
F = Σ_k q_k L_k(θ_k^{T_e})) and every loss-weight position (node j, round t ∈ [a, b), batch slot i):

    exact(u, d) = Σ_{i ∈ u} ∂F_d / ∂w_i  at w = 1          (= −f'(0) for w = 1 − c·1_u: GT's derivative in c)

through **all** rounds a … T_e − 1 (curvature, momentum, weight decay, BatchNorm running statistics,
attacks). The sweep runs backwards from the horizon, round by round, carrying the adjoint of the whole
state λ^t = (∂F/∂Θ^t, ∂F/∂m^t, ∂F/∂buffers^t):

    λ^{T_e} = ∂F/∂s^{T_e}   (probe gradients: Θ rows q_k ∇L_k, BatchNorm running statistics in eval mode)
    (λ^t, ∂F/∂w^t) = VJP of s^{t+1} = Φ_t(s^t, w^t) at (s^t, 1) with λ^{t+1}     (``Dynamics.round_vjp``)

Round t's forward is recomputed from s^t (a ``replay.StateTape`` of the factual trajectory from the window
start: memory O(one round's graph) + the tape, never the T-round graph). D targets go through the sweep
together (a leading directions axis: batched VJPs), ``chunk`` targets per sweep. Every position's
∂F_d/∂w^t [D, n, B] is summed into its unit as the sweep passes round t (``RunUnits.index_at``), so all
units — every node, batch and sample at once — cost one sweep per block of targets.

    vals = exact_values(dyn, tape, units, probe, q, targets="all")       # [n, U]
"""
from __future__ import annotations

import sys
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ..engine import Dynamics, State
from ..replay import StateTape
from .run_units import RunUnits

Probe = Tuple[Tensor, Tensor, bool]


def horizon_cotangent(dyn: Dynamics, state: State, probe: Probe, q: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
    """∂/∂s of Σ_k q_k L_k(θ_k) at ``state``: (Θ part [n, P], {float buffer: [n, ...]}).

    Node k's probe loss depends only on row k of Θ and of the buffers, so row k is q_k ∂L_k/∂(θ_k, b_k)
    (the buffers' part is non-zero for BatchNorm models: the eval-mode probe loss uses running statistics).
    """
    xp, yp, shared = probe
    names = [k for k, v in state.buffers.items() if v.is_floating_point()]
    with torch.enable_grad():
        th = state.theta.detach().requires_grad_(True)
        bufs = {k: (v.detach().requires_grad_(True) if k in names else v) for k, v in state.buffers.items()}
        losses = dyn.probe_losses(th, bufs, xp, yp, shared)[0]
        grads = torch.autograd.grad((q.to(losses.dtype) * losses).sum(), [th] + [bufs[k] for k in names],
                                    allow_unused=True)
    gb = {k: (g if g is not None else torch.zeros_like(bufs[k])).detach() for k, g in zip(names, grads[1:])}
    return grads[0].detach(), gb


def target_blocks(targets: str, n: int, chunk: int) -> List[Optional[np.ndarray]]:
    """Blocks of target nodes swept together: ``all`` -> [0..c−1], [c..2c−1], ...; ``network`` -> [None]."""
    if targets == "network":
        return [None]
    return [np.arange(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]


def seed(G: Tensor, Gb: Dict[str, Tensor], block: Optional[np.ndarray]) -> Tuple[Tensor, Dict[str, Tensor]]:
    """λ^{T_e} for a block of targets: direction d keeps only row block[d] of the horizon cotangent
    ([D, n, ...]); the network target (block None) keeps every row (D = 1)."""
    if block is None:
        return G.unsqueeze(0).clone(), {k: v.unsqueeze(0).clone() for k, v in Gb.items()}
    D = len(block)
    rows = torch.as_tensor(block, device=G.device)
    ar = torch.arange(D, device=G.device)
    lam = G.new_zeros((D,) + tuple(G.shape))
    lam[ar, rows] = G[rows]
    lb = {}
    for k, v in Gb.items():
        z = v.new_zeros((D,) + tuple(v.shape))
        z[ar, rows] = v[rows]
        lb[k] = z
    return lam, lb


def exact_values(dyn: Dynamics, tape: StateTape, units: RunUnits, probe: Probe, q: Tensor, targets: str = "all",
                 chunk: int = 64, blocks: Optional[List[Optional[np.ndarray]]] = None,
                 progress: bool = False) -> Tensor:
    """exact(u, d) for every unit and target: [D, U] (D = n for ``all``, 1 for ``network``).

    ``tape``: the factual states from (at most) the window start a to the horizon T_e (its ``end``).
    ``blocks``: the target blocks to compute (default all of them, ``chunk`` targets per sweep); rows of
    the result follow the blocks' concatenated targets.
    """
    if units.kind == "participant":
        raise ValueError("participant units remove no loss weight; only gt (retraining) measures them")
    a, b = units.window
    e = tape.end
    if tape.start > a or e < b:
        raise ValueError(f"the tape covers rounds {tape.start}..{e} but the window is [{a}, {b})")
    q = q.to(dtype=tape.final.theta.dtype, device=tape.final.theta.device)
    G, Gb = horizon_cotangent(dyn, tape.final, probe, q)
    blocks = target_blocks(targets, dyn.n, chunk) if blocks is None else blocks
    U = len(units)
    out = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(blocks) * (e - a), desc="dice value exact (reverse sweep)", unit="round",
                   dynamic_ncols=True, file=sys.stderr, disable=None)
    idx_cache: Dict[int, Tensor] = {}
    try:
        for block in blocks:
            lam, lam_b = seed(G, Gb, block)
            lam_m: Optional[Tensor] = None
            D = lam.shape[0]
            acc = lam.new_zeros(D, U + 1)                       # column U collects positions of no unit
            for t in range(e - 1, a - 1, -1):
                want = units.in_window(t)
                lam, lam_m, lam_b, gw = dyn.round_vjp(tape.get(t), lam, lam_m, lam_b, want_w=want)
                if gw is not None:
                    if t not in idx_cache:
                        idx = torch.as_tensor(units.index_at(t).reshape(-1), device=acc.device)
                        idx_cache[t] = torch.where(idx < 0, torch.full_like(idx, U), idx)
                    acc.index_add_(1, idx_cache[t], gw.reshape(D, -1))
                if bar is not None:
                    bar.update(1)
            out.append(acc[:, :U])
    finally:
        if bar is not None:
            bar.close()
    return torch.cat(out, dim=0)
