"""DICE ground truth (spec §3): counterfactual re-simulation of the run without one unit.

For a unit u of source j at round t = state.round and every target k, horizon s = 1..hops:

    GT(u, k, s) = q_k [ L_k(θ_k^{t+s}) − L_k(θ_{k∖u}^{t+s}) ]       (with − without: > 0 means u hurt k)
    GT(u, j, 0) = q_j [ L_j(θ_j^{t+½}) − L_j(θ_{j∖u}^{t+½}) ]        (direct term, before gossip)

Vectorised over units: a pass carries C = 2 + (units in the chunk) copies of the whole system on the
engine's copies axis, Θ [C, n, P]. Copy 0 is the factual trajectory (all weights 1), copy 1 a null copy
(also all weights 1: its GT is the noise floor and must be exactly 0), copy 2 + u has unit u's weights
set to 0 at round t. All copies advance together through the same ``Dynamics`` calls, so "with" and
"without" come from the same operations in the same order; only the unit's weights differ.

    rp = replay.open_replay("outputs/latest")
    df = ground_truth(rp.dyn, rp.state_at(t), units, hops=3, x_probe=rp.setup.x_probe,
                      y_probe=rp.setup.y_probe, shared_probe=rp.setup.shared_probe, q=rp.q("one"))
"""
from __future__ import annotations

import sys
from typing import List, Tuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..engine import Dynamics, State
from ..errors import UserError
from .units import Units

COLUMNS = ["round", "source", "unit", "sample", "target", "hop", "influence", "loss_with", "loss_without"]
FACTUAL, NULL, FIRST_UNIT = 0, 1, 2


def _copies(state: State, C: int) -> State:
    """C independent copies of a single system (``State.copies``)."""
    return state.copies(C)


def _check(dyn: Dynamics, state: State, units: Units, hops: int, q: Tensor) -> int:
    if state.theta.dim() != 2:
        raise ValueError(f"ground_truth needs one system (theta [n, P]); got theta of shape "
                         f"{tuple(state.theta.shape)}")
    t = int(state.round)
    if units.round != t:
        raise UserError(f"the units were selected for round {units.round} but the state is at round {t}")
    if tuple(units.mask.shape[1:]) != (dyn.n, dyn.batch_size):
        raise ValueError(f"units.mask is [U, {', '.join(map(str, units.mask.shape[1:]))}] but the run's plan "
                         f"is [n={dyn.n}, B={dyn.batch_size}]")
    if isinstance(hops, bool) or int(hops) != hops or hops < 0:
        raise UserError(f"hops={hops!r} is not valid; it must be an integer >= 0 (0 = direct term only)")
    hops = int(hops)
    T = int(dyn.rounds)
    need = max(hops, 1)
    if t + need > T:
        last = T - need
        rng = f"rounds 0..{last}" if last >= 0 else "no round"
        raise UserError(f"hops={hops} from round {t} needs rounds {t}..{t + need - 1}, but the run has rounds "
                        f"0..{T - 1}; with hops={hops} choose a round in {rng}"
                        + ("" if last >= 0 else f" (use hops <= {T})"))
    if tuple(q.shape) != (dyn.n,):
        raise ValueError(f"q must hold one weight per node, shape [{dyn.n}]; got {tuple(q.shape)}")
    return hops


@torch.no_grad()
def _simulate(dyn: Dynamics, state: State, w: Tensor, hops: int, x_probe, y_probe, shared: bool
              ) -> Tuple[Tensor, Tensor]:
    """Advance the copies in ``state`` (weights w [C, n, B] at round t, 1 afterwards) for ``hops`` rounds.

    Returns probe losses at θ^{t+½} [C, n] and at θ^{t+1..t+hops} [hops, C, n]. Round t is split into its two
    halves (local step, gossip) only to read θ^{t+½}; the halves are exactly those of ``Dynamics.round``.
    """
    delta, mom, bufs, _ = dyn.local_step(state, w)
    half = state.theta + delta
    loss_half = dyn.probe_losses(half, bufs, x_probe, y_probe, shared)[0]
    losses: List[Tensor] = []
    if hops >= 1:
        s = dyn.gossip(state, delta, bufs, mom)
        del delta, half
        losses.append(dyn.probe_losses(s.theta, s.buffers, x_probe, y_probe, shared)[0])
        for _ in range(hops - 1):
            s, _, _ = dyn.round(s)
            losses.append(dyn.probe_losses(s.theta, s.buffers, x_probe, y_probe, shared)[0])
    stacked = torch.stack(losses) if losses else loss_half.new_zeros((0,) + tuple(loss_half.shape))
    return loss_half, stacked


def ground_truth(dyn: Dynamics, state: State, units: Units, hops: int, x_probe: Tensor, y_probe: Tensor,
                 shared_probe: bool, q: Tensor, chunk: int = 256, progress: bool = False) -> pd.DataFrame:
    """GT of every unit on every target for hops 0..``hops`` (spec §3), as a long table.

    Columns: round, source, unit ("batch"/"sample"), sample (dataset index, -1 for a batch unit), target,
    hop, influence, loss_with, loss_without. Hop 0 (direct term) rows exist only for target == source;
    hop s >= 1 rows for all n targets. ``chunk`` units are re-simulated per pass (chunk + 2 copies).
    ``df.attrs``: noise_floor = max |GT| of the null copy (exactly 0.0 when with/without are computed
    identically), roundoff = eps(dtype) × max |probe loss|, hops, chunk.
    """
    hops = _check(dyn, state, units, hops, q)
    if int(chunk) < 1:
        raise UserError(f"chunk={chunk!r} is not valid; it must be >= 1 (units re-simulated per pass)")
    chunk = int(chunk)
    t, n, B = int(state.round), dyn.n, dyn.batch_size
    dtype, device = state.theta.dtype, state.theta.device
    q = q.to(dtype=dtype, device=device)
    U = len(units)
    frames: List[pd.DataFrame] = []
    noise, max_loss = 0.0, 0.0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=U, desc="dice gt", unit="unit", dynamic_ncols=True, file=sys.stderr)
    try:
        for start in range(0, U, chunk):
            sub = units.subset(slice(start, start + chunk))
            c = len(sub)
            w = torch.cat([torch.ones(FIRST_UNIT, n, B, dtype=dtype, device=device), sub.weights(dtype, device)])
            loss_half, loss = _simulate(dyn, _copies(state, c + FIRST_UNIT), w, hops, x_probe, y_probe,
                                        shared_probe)
            # noise floor: the null copy against the factual one, every hop and node
            null = torch.cat([loss_half[None, NULL] - loss_half[None, FACTUAL], loss[:, NULL] - loss[:, FACTUAL]])
            noise = max(noise, float((q * null).abs().max()))
            max_loss = max(max_loss, float(loss_half.abs().max()), float(loss.abs().max()) if hops else 0.0)
            frames.append(_table(sub, t, hops, n, q, loss_half, loss))
            if bar is not None:
                bar.update(c)
    finally:
        if bar is not None:
            bar.close()
    df = pd.concat(frames, ignore_index=True) if frames else _table(units, t, hops, n, q, None, None)
    df.attrs.update(noise_floor=noise, roundoff=float(torch.finfo(dtype).eps) * max_loss, hops=hops,
                    chunk=chunk, round=t)
    return df


def _table(sub: Units, t: int, hops: int, n: int, q: Tensor, loss_half, loss) -> pd.DataFrame:
    """Rows of one chunk, unit by unit: hop 0 on the source, then hops 1..H over targets 0..n-1."""
    c = len(sub)
    R = 1 + hops * n
    src = sub.source.astype(np.int64)
    hop = np.tile(np.concatenate([[0], np.repeat(np.arange(1, hops + 1), n)]), (c, 1))
    target = np.empty((c, R), dtype=np.int64)
    target[:, 0] = src
    target[:, 1:] = np.tile(np.arange(n), hops)
    if c == 0:
        lw = lwo = infl = np.zeros((0, R))
    else:
        srct = torch.as_tensor(src, device=q.device)
        ar = torch.arange(c, device=q.device)
        with_ = torch.empty(c, R, dtype=q.dtype, device=q.device)
        without = torch.empty_like(with_)
        qk = torch.empty_like(with_)
        with_[:, 0] = loss_half[FACTUAL, srct]
        without[:, 0] = loss_half[FIRST_UNIT + ar, srct]
        qk[:, 0] = q[srct]
        if hops:
            with_[:, 1:] = loss[:, FACTUAL, :].reshape(1, hops * n)
            without[:, 1:] = loss[:, FIRST_UNIT:, :].permute(1, 0, 2).reshape(c, hops * n)
            qk[:, 1:] = q.repeat(hops)
        infl = (qk * (with_ - without)).cpu().numpy()
        lw, lwo = with_.cpu().numpy(), without.cpu().numpy()
    return pd.DataFrame({
        "round": np.full(c * R, t, dtype=np.int64),
        "source": np.repeat(src, R),
        "unit": np.full(c * R, sub.kind, dtype=object),
        "sample": np.repeat(sub.sample.astype(np.int64), R),
        "target": target.reshape(-1),
        "hop": hop.reshape(-1).astype(np.int64),
        "influence": infl.reshape(-1).astype(np.float64),
        "loss_with": lw.reshape(-1).astype(np.float64),
        "loss_without": lwo.reshape(-1).astype(np.float64),
    }, columns=COLUMNS)
