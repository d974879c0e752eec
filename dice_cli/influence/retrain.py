"""``dice value method=gt`` and LDS's actual effects: counterfactual retraining on the copies axis (VALUE.md §2).

    GT_run(u, k) = q_k [ L_k(θ_k^{T_e}) − L_k(θ_{k∖u}^{T_e}) ]          (loss WITH − loss WITHOUT)

θ_{∖u} is the run retrained from θ^a (the state at the window start) with u's loss weights at 1 − c
(``scale=c``; c = 1 removes u) in every window round — for a participant unit, with the node offline
(``Dynamics.round(online=...)``) — and everything else identical: batch plan, W^t, attacks, optimizer.

A pass advances C = 2 + m copies of the whole system together: copy 0 factual, copy 1 null (nothing
removed: its GT is the noise floor and must be exactly 0) and copies 2.. each removing a set of units
given by a membership matrix [m, U] (one unit each for GT, a random subset each for LDS). All copies go
through the same ``Dynamics`` calls, so "with" and "without" come from the same operations in the same
order and differ only where the removed weights do.

    gt = gt_values(dyn, s_a, horizon, units, probe, q)                   # one unit per copy
    lds = gt_values(dyn, s_a, horizon, units, probe, q, member=subsets)   # LDS: a random subset per copy
"""
from __future__ import annotations

import sys
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ..engine import Dynamics, State
from .run_units import RunUnits

FACTUAL, NULL, FIRST = 0, 1, 2
Probe = Tuple[Tensor, Tensor, bool]


@torch.no_grad()
def retrain_states(dyn: Dynamics, start: State, horizon: int, units: RunUnits, member: Tensor, scale: float = 1.0,
                   tick: Optional[Callable[[], None]] = None) -> State:
    """The states at ``horizon`` of C copies retrained from ``start`` (round a), copy c removing the units
    with member[c, u] = 1 (member [C, U], 0/1) at weight 1 − scale (participant units: offline). A state
    with a copies axis: θ [C, n, P]. ``tick()`` is called after every round (progress)."""
    C = member.shape[0]
    member = member.to(dtype=start.theta.dtype, device=start.theta.device)
    state = start.detached().copies(C)
    part = units.kind == "participant"
    while state.round < horizon:
        t = state.round
        if part:
            state, _, _ = dyn.round(state, online=units.online_at(t, member, scale))
        else:
            state, _, _ = dyn.round(state, units.weights_at(t, member, scale))
        if tick is not None:
            tick()
    return state


@torch.no_grad()
def retrain_pass(dyn: Dynamics, start: State, horizon: int, units: RunUnits, member: Tensor, probe: Probe,
                 scale: float = 1.0, tick: Optional[Callable[[], None]] = None) -> Tensor:
    """Probe losses L_k(θ_k^{T_e}) [C, n] of C copies retrained from ``start`` (round a) to ``horizon``,
    copy c removing the units with member[c, u] = 1 (member [C, U], 0/1) at weight 1 − scale
    (``retrain_states``). ``tick()`` is called after every round (progress)."""
    state = retrain_states(dyn, start, horizon, units, member, scale, tick)
    xp, yp, shared = probe
    return dyn.probe_losses(state.theta, state.buffers, xp, yp, shared)[0]


def gt_values(dyn: Dynamics, start: State, horizon: int, units: RunUnits, probe: Probe, q: Tensor,
              targets: str = "all", scale: float = 1.0, chunk: int = 64, member: Optional[Tensor] = None,
              progress: Optional[str] = None) -> dict:
    """GT_run of every row of ``member`` [M, U] (default: one unit each, the identity) on every target.

    Returns {"influence": [M, D], "loss_with": [M, D], "loss_without": [M, D], "noise_floor", "roundoff"}
    with D = n (targets=all: q_k (L_k − L_k∖u)) or 1 (targets=network: Σ_k q_k (L_k − L_k∖u), and the
    q-weighted sums as the two losses). "with" is the factual copy of the unit's own pass.
    """
    dt, dev = start.theta.dtype, start.theta.device
    if member is None:
        member = torch.eye(len(units), dtype=dt, device=dev)
    q = q.to(dtype=dt, device=dev)
    M = member.shape[0]
    infl, lw, lwo = [], [], []
    noise, big = 0.0, 0.0
    bar = None
    passes = -(-M // chunk)
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=passes * (horizon - start.round), desc=f"{progress}: {passes} pass(es) of <= {chunk} copies",
                   unit="round", dynamic_ncols=True, file=sys.stderr, disable=None)
    try:
        for lo in range(0, M, chunk):
            rows = member[lo:lo + chunk].to(dtype=dt, device=dev)
            full = torch.cat([rows.new_zeros(FIRST, rows.shape[1]), rows])
            L = retrain_pass(dyn, start, horizon, units, full, probe, scale,
                             tick=None if bar is None else lambda: bar.update(1))           # [C, n]
            noise = max(noise, float((q * (L[NULL] - L[FACTUAL])).abs().max()))
            big = max(big, float(L.abs().max()))
            f, wo = L[FACTUAL].expand_as(L[FIRST:]), L[FIRST:]
            if targets == "network":
                infl.append((q * (f - wo)).sum(-1, keepdim=True))
                lw.append((q * f).sum(-1, keepdim=True))
                lwo.append((q * wo).sum(-1, keepdim=True))
            else:
                infl.append(q * (f - wo))
                lw.append(f)
                lwo.append(wo)
    finally:
        if bar is not None:
            bar.close()
    D = 1 if targets == "network" else dyn.n
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, D, dtype=dt, device=dev)  # noqa: E731
    return {"influence": cat(infl), "loss_with": cat(lw), "loss_without": cat(lwo), "noise_floor": noise,
            "roundoff": float(torch.finfo(dt).eps) * big}
