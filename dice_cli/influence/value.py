"""Whole-run influence estimates (VALUE.md §3): one table of the same shape as GT_run for every method.

Let f_{u,d}(c) = F_d(θ^{T_e}(w)), w = 1 − c·1_u, with F_k = q_k L_k(θ_k^{T_e}) (``targets=all``) or
F = Σ_k q_k L_k(θ_k^{T_e}) (``targets=network``). GT = f(0) − f(1); every estimate approximates it by a
derivative at the factual run (w = 1). δ_{u,t} = the part of j's round-t update that u is responsible for,
Σ_{i ∈ u at t} ∂Δ_j^t/∂w_i (for ``attack=gaussian`` attackers: Δ_sent(w=1) − Δ_sent(w∖u), by difference).

``exact`` (``sweep.exact_values``): −f'(0) through every round a … T_e − 1, by one reverse sweep.

``first_order`` (Theorem 2 with (I − ηH) → I, horizon extended to T_e):

    E(u, k) = q_k ∇L_k(θ_k^{T_e})ᵀ Σ_{t ∈ window} A^t_{kj} δ_{u,t},     A^t = W^{T_e−1} ⋯ W^t

``cascade_sum`` (``hops=r``): the per-round r-hop first-order DICE-E of every window round, added up:

    C(u, k) = Σ_{t ∈ window} Σ_{s=1}^{r_t} q_k ∇L_k(θ_k^{t+s})ᵀ (W^{t+s−1} ⋯ W^t)_{kj} δ_{u,t},   r_t = min(r, T_e − t)

i.e. the sum of the hop 1 … r_t rows of ``dice estimate method=first_order hops=r_t`` at each round t,
with each row's own test gradient at θ^{t+s}. Hop 0 (the source's loss at θ_j^{t+½}, a model no node
holds after gossip) is left out: the source's own effect enters through the self-loop W^t_jj of hop 1,
and r = 1 is then exactly the proximal influence of DICE.md §5 accumulated over the window.

Both are computed for all units at once: per round, cotangent directions c_{d,j} [D, n, P] (the test
gradients carried back to source j by the mixing products) are dotted with ∂Δ_j^t/∂w_{j,i} for every
position in one batched pass (``weight_dots``) and summed into units (``RunUnits.index_at``).

    vals = first_order_values(dyn, tape, units, probe, q)                 # [n, U]
"""
from __future__ import annotations

import sys
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ..engine import Dynamics, State
from ..replay import StateTape
from .estimate import _cotangent_dots, sent_differences
from .run_units import RunUnits
from .sweep import target_blocks

Probe = Tuple[Tensor, Tensor, bool]


def weight_dots(dyn: Dynamics, state: State, cot: Tensor, chunk: int = 64) -> Tensor:
    """cot[d, j]ᵀ ∂Δ_j^t/∂w_{j,i} for every direction d, node j and batch position i: [D, n, B].

    ∂Δ_j/∂w_i = −(η/|B|) ∇ℓ_i(θ_j^t) for SGD with or without momentum (m' = μm + g: only g depends on w),
    so on the plain MLP/logreg path it is −(η/|B|) × the R-operator's per-sample directional derivative
    (``_DenseNet.rop``); elsewhere (BatchNorm, update attacks) a batched double-backward of Δ(w)
    (``estimate._cotangent_dots``).
    """
    t = state.round
    if (dyn._dense is not None and not state.buffers
            and not (dyn.attack is not None and dyn.attack.update_at(t))):
        x, y = dyn._fast_batch(t)
        spans = dyn._spans() or [(0, dyn.n)]
        parts = [dyn._dense.rop(state.theta[lo:hi], x[lo:hi], y[lo:hi], cot[:, lo:hi], hessian=False)[1]
                 for lo, hi in spans]
        jv = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return jv * (-dyn.lr(t) / dyn.batch_size)
    return _cotangent_dots(dyn, state, cot, chunk)


class _Accumulator:
    """Sums per-position values of round t [D, n, B] into units ([D, U]); gaussian attackers' positions are
    replaced by their units' δ_{u,t} taken by difference."""

    def __init__(self, dyn: Dynamics, units: RunUnits, D: int, dtype, device):
        self.dyn, self.units, self.U = dyn, units, len(units)
        self.acc = torch.zeros(D, self.U + 1, dtype=dtype, device=device)

    def add(self, state: State, cot: Tensor, chunk: int) -> None:
        t, U = state.round, self.U
        idx = self.units.index_at(t)
        bad_rows = self.dyn.attack.nonlinear_at(t) if self.dyn.attack is not None else []
        dots = weight_dots(self.dyn, state, cot, chunk)                      # [D, n, B]
        special = []
        for j in bad_rows:
            for u in np.unique(idx[j][idx[j] >= 0]):
                special.append((j, int(u)))
            idx[j] = -1
        flat = torch.as_tensor(np.where(idx < 0, U, idx).reshape(-1), device=self.acc.device)
        self.acc.index_add_(1, flat, dots.reshape(dots.shape[0], -1))
        if special:                       # δ_u by difference: Δ_sent(w = 1) − Δ_sent(w∖u) (nonlinear transform)
            mask = torch.zeros(len(special), self.dyn.n, self.dyn.batch_size, dtype=torch.bool)
            full = self.units.index_at(t)
            for m, (j, u) in enumerate(special):
                mask[m, j] = torch.as_tensor(full[j] == u)
            delta = sent_differences(self.dyn, state, mask).to(cot.dtype)    # [S, P]
            rows = torch.as_tensor([j for j, _ in special], device=cot.device)
            cols = torch.as_tensor([u for _, u in special], device=cot.device)
            self.acc.index_add_(1, cols, torch.einsum("sp,dsp->ds", delta, cot[:, rows]))

    def values(self) -> Tensor:
        return self.acc[:, :self.U]


def _blocks(targets: str, n: int, chunk: int, blocks):
    return target_blocks(targets, n, chunk) if blocks is None else blocks


def _directions(M: Tensor, qG: Tensor, block: Optional[np.ndarray]) -> Tensor:
    """Cotangents c[d, j] = M[k_d, j] qG[k_d] for the block's targets ([D, n, P]), or for the network target
    c[0, j] = Σ_k M[k, j] qG[k] ([1, n, P]). M [n, n] (mixing product), qG [n, P] (q_k ∇L_k)."""
    if block is None:
        return (M.t() @ qG).unsqueeze(0)
    rows = torch.as_tensor(block, device=qG.device)
    return M[rows][:, :, None] * qG[rows][:, None, :]


def first_order_values(dyn: Dynamics, tape: StateTape, units: RunUnits, probe: Probe, q: Tensor,
                       targets: str = "all", chunk: int = 64, blocks=None, progress: bool = False) -> Tensor:
    """first_order(u, d) for every unit and target: [D, U] (VALUE.md §3, see the module docstring)."""
    a, b = units.window
    e = tape.end
    dt, dev = tape.final.theta.dtype, tape.final.theta.device
    q = q.to(dtype=dt, device=dev)
    qG = q[:, None] * dyn.probe_grads(tape.final, *probe)                    # q_k ∇L_k(θ_k^{T_e}) [n, P]
    blocks = _blocks(targets, dyn.n, chunk, blocks)
    accs = [_Accumulator(dyn, units, 1 if blk is None else len(blk), dt, dev) for blk in blocks]
    A = torch.eye(dyn.n, dtype=dt, device=dev)                                # A^t = W^{T_e−1} ⋯ W^t
    bar = _bar(progress, e - a, "dice value first_order")
    try:
        for t in range(e - 1, a - 1, -1):
            A = A @ dyn.mixing.dense_sparse(t)[0]
            if units.in_window(t):
                state = tape.get(t)
                for blk, acc in zip(blocks, accs):
                    acc.add(state, _directions(A, qG, blk), chunk)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return torch.cat([acc.values() for acc in accs], dim=0)


def cascade_values(dyn: Dynamics, tape: StateTape, units: RunUnits, probe: Probe, q: Tensor, hops: int = 1,
                   targets: str = "all", chunk: int = 64, blocks=None, progress: bool = False) -> Tensor:
    """cascade_sum(u, d) for every unit and target: [D, U] (VALUE.md §3, see the module docstring)."""
    a, b = units.window
    e = tape.end
    dt, dev = tape.final.theta.dtype, tape.final.theta.device
    q = q.to(dtype=dt, device=dev)
    blocks = _blocks(targets, dyn.n, chunk, blocks)
    accs = [_Accumulator(dyn, units, 1 if blk is None else len(blk), dt, dev) for blk in blocks]
    grads: Dict[int, Tensor] = {}

    def qg(t: int) -> Tensor:                                                 # q_k ∇L_k(θ_k^t) [n, P]
        if t not in grads:
            grads[t] = q[:, None] * dyn.probe_grads(tape.get(t), *probe)
        return grads[t]

    bar = _bar(progress, b - a, f"dice value cascade_sum (hops={hops})")
    try:
        for t in range(a, b):
            for old in [r for r in grads if r <= t]:
                del grads[old]
            r_t = min(hops, e - t)
            products: List[Tensor] = []
            P = None
            for s in range(1, r_t + 1):
                W = dyn.mixing.dense_sparse(t + s - 1)[0]
                P = W if P is None else W @ P                                  # W^{t+s−1} ⋯ W^t
                products.append(P)
            state = tape.get(t)
            for blk, acc in zip(blocks, accs):
                cot = sum(_directions(P_s, qg(t + s), blk) for s, P_s in enumerate(products, start=1))
                acc.add(state, cot, chunk)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return torch.cat([acc.values() for acc in accs], dim=0)


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="round", dynamic_ncols=True, file=sys.stderr, disable=None)
