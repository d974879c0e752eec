"""DICE ground truth (spec §3): counterfactual re-simulation of the run without one unit.

For a unit u of source j at round t = state.round and every target k, horizon s = 1..hops:

    GT(u, k, s) = q_k [ L_k(θ_k^{t+s}) − L_k(θ_{k∖u}^{t+s}) ]       (with − without: > 0 means u hurt k)
    GT(u, j, 0) = q_j [ L_j(θ_j^{t+½}) − L_j(θ_{j∖u}^{t+½}) ]        (direct term, before gossip)

Vectorised over units: a pass carries C = 2 + (units in the chunk) copies of the whole system on the
engine's copies axis, Θ [C, n, P]. Copy 0 is the factual trajectory (all weights 1), copy 1 a null copy
(also all weights 1: its GT is the noise floor and must be exactly 0), copy 2 + u has unit u's weights
set to 0 at round t. All copies advance together through the same ``Dynamics`` calls, so "with" and
"without" come from the same operations in the same order; only the unit's weights differ.

Cost that follows the cascade (``restrict``): a unit of source j changes, at round t+s, only the nodes
R_s(j) it can reach in s steps through W + I (self-loops: momentum and unmixed buffers stay on their node;
R_0 = {j}). The restricted pass therefore carries, per level s, the factual and null copies on all n nodes
and each unit's copy on R_s(j) only — one flat batch of (copy, node) rows that ``Dynamics.local_step``
and ``probe_losses`` advance row by row (``nodes=``). Gossip is written per row as a fixed sequence over
the receiver's in-neighbours in ascending order, Σ_l W_kl θ_l (``_RowMixer``), where a neighbour outside
the copy's reach reads the factual copy's row: the same operations, in the same order, for every copy's
row of node k, so a row whose inputs equal the factual ones equals it bit for bit (the null copy's GT is
exactly 0, an unreached target's exactly 0). The per-unit cost is then Σ_s |R_s(j)| node-steps instead of
(hops + 1)·n. ``restrict="auto"`` picks it when it needs at most half the node-steps of the full copies
(sparse graphs; a complete graph is reached in one hop and keeps the full copies); the choice depends only
on the selection, not on ``chunk``, so chunking stays bit-identical. A run whose gossip step is not
plain W^t (a defense, a message attack, network conditions) keeps the full copies. The two passes agree to round-off
(their gossip sums are ordered differently); tests/test_gt.py checks both against the one-unit-at-a-time
twin to 1e-12.

    rp = replay.open_replay("outputs/latest")
    df = ground_truth(rp.dyn, rp.state_at(t), units, hops=3, x_probe=rp.setup.x_probe,
                      y_probe=rp.setup.y_probe, shared_probe=rp.setup.shared_probe, q=rp.q("one"))
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

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


def reach_sets(dyn: Dynamics, t: int, sources: np.ndarray, hops: int) -> List[np.ndarray]:
    """R_s(j) for every source, s = 0..hops: [S, n] bool per level (R_0 = {j}; R_{s+1} = R_s ∪ its
    out-neighbours under W^{t+s}: the nodes whose state the removal can have changed by round t+s+1)."""
    n = dyn.n
    r = np.zeros((len(sources), n), dtype=bool)
    r[np.arange(len(sources)), np.asarray(sources, dtype=np.int64)] = True
    out = [r]
    for s in range(hops):
        A = (dyn.mixing.numpy(t + s) > 0).astype(np.float64)          # A[k, l]: k hears l
        r = r | ((r.astype(np.float64) @ A.T) > 0)
        out.append(r)
    return out


class _RowMixer:
    """Gossip over rows: out[r] = Σ_d W[k_r, l_d] · src[idx[r, d]] over receiver k_r's in-neighbours l_d in
    ascending order, accumulated in that fixed order (padding slots add exactly 0·x). Each output row is
    computed from its own inputs only, with the same operations for every copy's row of node k."""

    def __init__(self, W: np.ndarray, device: torch.device, dtype: torch.dtype):
        n = W.shape[0]
        nbrs = [np.flatnonzero(W[k] > 0) for k in range(n)]
        D = max(1, max(len(v) for v in nbrs))
        self.nbr = np.zeros((n, D), dtype=np.int64)
        wt = np.zeros((n, D))
        for k, v in enumerate(nbrs):
            self.nbr[k, :len(v)] = v
            self.nbr[k, len(v):] = v[0] if len(v) else k
            wt[k, :len(v)] = W[k, v]
        self.wt = torch.as_tensor(wt, dtype=dtype, device=device)
        self.D = D

    def __call__(self, src: Tensor, out_nodes: Tensor, idx: Tensor) -> Tensor:
        """src [M, ...] rows at level s; out_nodes [R] receivers; idx [R, D] source rows of their slots."""
        flat = src.reshape(src.shape[0], -1)
        w = self.wt.index_select(0, out_nodes)                                    # [R, D]
        out = flat.index_select(0, idx[:, 0]) * w[:, :1]
        for d in range(1, self.D):
            out = out.addcmul_(flat.index_select(0, idx[:, d]), w[:, d:d + 1])
        return out.reshape((out.shape[0],) + tuple(src.shape[1:]))


class _Layout:
    """The (copy, node) rows of one level: copies 0 (factual) and 1 (null) on all n nodes, unit u's copy
    (2 + u) on its reach. ``pos[c, k]``: the row holding copy c's node k, or the factual copy's row of k
    when node k is outside copy c's reach (its state there is the factual one)."""

    def __init__(self, reach: np.ndarray, n: int, device: torch.device):
        c = reach.shape[0]
        uu, kk = np.nonzero(reach)                         # row-major: unit by unit, nodes ascending
        self.copy = np.concatenate([np.zeros(n, np.int64), np.ones(n, np.int64), FIRST_UNIT + uu])
        self.node = np.concatenate([np.arange(n), np.arange(n), kk]).astype(np.int64)
        self.pos = np.tile(np.arange(n, dtype=np.int64), (c + FIRST_UNIT, 1))
        self.pos[NULL] = n + np.arange(n)
        self.pos[FIRST_UNIT + uu, kk] = 2 * n + np.arange(len(uu))
        self.nodes = torch.as_tensor(self.node, device=device)
        self.unit_rows = (uu, kk)

    def __len__(self) -> int:
        return len(self.node)

    def full(self, values: Tensor) -> Tensor:
        """Per-row values [rows] -> [copies, n] (unreached entries read the factual copy's value)."""
        return values[torch.as_tensor(self.pos, device=values.device)]


@torch.no_grad()
def _simulate_restricted(dyn: Dynamics, state: State, w_units: Tensor, reach: List[np.ndarray], hops: int,
                         x_probe, y_probe, shared: bool) -> Tuple[Tensor, Tensor]:
    """``_simulate`` for copies [factual, null, units...] stepping only the rows each copy has reached.

    w_units [c, n, B]: the units' weights at round t; reach[s] [c, n]: each unit's R_s. Returns what
    ``_simulate`` returns: probe losses at θ^{t+½} [C, n] and at θ^{t+1..t+hops} [hops, C, n].
    """
    t, n, dev = state.round, dyn.n, state.theta.device
    lay = _Layout(reach[0], n, dev)
    rows = lay.nodes

    def pick(v: Optional[Tensor], idx: Tensor) -> Optional[Tensor]:
        return None if v is None else v.index_select(0, idx)

    # level 0: every copy's rows start from θ^t; unit rows carry the unit's weights at round t
    st = State(t, pick(state.theta, rows), {k: pick(v, rows) for k, v in state.buffers.items()},
               pick(state.momentum, rows))
    w = torch.ones(len(lay), dyn.batch_size, dtype=state.theta.dtype, device=dev)
    uu, kk = lay.unit_rows
    w[2 * n:] = w_units[torch.as_tensor(uu, device=dev), torch.as_tensor(kk, device=dev)]
    losses: List[Tensor] = []
    loss_half = None
    for s in range(max(hops, 1)):
        delta, mom, bufs, _ = dyn.local_step(st, w if s == 0 else None, nodes=lay.nodes)
        half = st.theta + delta
        if s == 0:
            loss_half = lay.full(dyn.probe_losses(half, bufs, x_probe, y_probe, shared, nodes=lay.nodes)[0])
            if hops == 0:
                break
        nxt = _Layout(reach[s + 1], n, dev)
        out_copy, out_node = nxt.copy, nxt.node
        mixer = _RowMixer(dyn.mixing.numpy(t + s), dev, half.dtype)
        idx = torch.as_tensor(lay.pos[out_copy[:, None], mixer.nbr[out_node]], device=dev)   # [R, D]
        own = torch.as_tensor(lay.pos[out_copy, out_node], device=dev)                       # [R]
        theta = mixer(half, nxt.nodes, idx)
        new_bufs = {k: (mixer(v, nxt.nodes, idx) if (dyn.gossip_buffers and v.is_floating_point())
                        else v.index_select(0, own)) for k, v in bufs.items()}
        st = State(t + s + 1, theta, new_bufs, pick(mom, own))
        lay = nxt
        losses.append(lay.full(dyn.probe_losses(st.theta, st.buffers, x_probe, y_probe, shared,
                                                nodes=lay.nodes)[0]))
        del delta, half
    stacked = torch.stack(losses) if losses else loss_half.new_zeros((0,) + tuple(loss_half.shape))
    return loss_half, stacked


def restricted_is_cheaper(reach: List[np.ndarray], units_per_source: np.ndarray, n: int) -> bool:
    """Node-steps of the restricted pass (factual and null on all n, each unit on its source's reach, every
    level) at most half those of the full copies ((units + 2)·n per level). reach: per level [S, n]."""
    units = int(units_per_source.sum())
    restricted = sum(2 * n + int(units_per_source @ r.sum(axis=1)) for r in reach)
    return restricted <= 0.5 * (units + 2) * n * len(reach)


def ground_truth(dyn: Dynamics, state: State, units: Units, hops: int, x_probe: Tensor, y_probe: Tensor,
                 shared_probe: bool, q: Tensor, chunk: int = 256, progress=False,
                 restrict: Union[bool, str] = "auto") -> pd.DataFrame:
    """GT of every unit on every target for hops 0..``hops`` (spec §3), as a long table.

    Columns: round, source, unit ("batch"/"sample"), sample (dataset index, -1 for a batch unit), target,
    hop, influence, loss_with, loss_without. Hop 0 (direct term) rows exist only for target == source;
    hop s >= 1 rows for all n targets. ``chunk`` units are re-simulated per pass (chunk + 2 copies).
    ``df.attrs``: noise_floor = max |GT| of the null copy (exactly 0.0 when with/without are computed
    identically), roundoff = eps(dtype) × max |probe loss|, hops, chunk, restricted. ``progress``: True for
    a bar of its own, or a callable given the number of units after each pass.
    ``restrict``: True = step only the reached nodes (see the module docstring), False = full copies,
    "auto" = whichever needs fewer node-steps for this selection.
    """
    hops = _check(dyn, state, units, hops, q)
    if int(chunk) < 1:
        raise UserError(f"chunk={chunk!r} is not valid; it must be >= 1 (units re-simulated per pass)")
    chunk = int(chunk)
    t, n, B = int(state.round), dyn.n, dyn.batch_size
    dtype, device = state.theta.dtype, state.theta.device
    q = q.to(dtype=dtype, device=device)
    U = len(units)
    sources, col = np.unique(np.asarray(units.source, dtype=np.int64), return_inverse=True)
    reach_src = reach_sets(dyn, t, sources, hops) if U else []        # per source; units index it by col
    if restrict == "auto":       # the restricted pass mixes rows by W^t: a defended gossip step needs all rows
        restrict = bool(U) and dyn.row_shortcuts and restricted_is_cheaper(reach_src, np.bincount(col), n)
    elif not isinstance(restrict, bool):
        raise ValueError(f"restrict={restrict!r}: use True, False or 'auto'")
    elif restrict and not dyn.row_shortcuts:
        raise ValueError("restrict=True needs plain W^t gossip (no defense, message attack or network conditions)")
    frames: List[pd.DataFrame] = []
    noise, max_loss = 0.0, 0.0
    own = None
    tick = progress if callable(progress) else None      # a caller's bar: ticked by the units of each pass
    if progress is True:
        from ..progress import bar

        own = bar(True, U, "dice gt", unit="unit")
        tick = own.update
    try:
        for start in range(0, U, chunk):
            sub = units.subset(slice(start, start + chunk))
            c = len(sub)
            if restrict:
                reach = [r[col[start:start + c]] for r in reach_src]
                loss_half, loss = _simulate_restricted(dyn, state, sub.weights(dtype, device), reach, hops,
                                                       x_probe, y_probe, shared_probe)
            else:
                w = torch.cat([torch.ones(FIRST_UNIT, n, B, dtype=dtype, device=device),
                               sub.weights(dtype, device)])
                loss_half, loss = _simulate(dyn, _copies(state, c + FIRST_UNIT), w, hops, x_probe, y_probe,
                                            shared_probe)
            # noise floor: the null copy against the factual one, every hop and node
            null = torch.cat([loss_half[None, NULL] - loss_half[None, FACTUAL], loss[:, NULL] - loss[:, FACTUAL]])
            noise = max(noise, float((q * null).abs().max()))
            max_loss = max(max_loss, float(loss_half.abs().max()), float(loss.abs().max()) if hops else 0.0)
            frames.append(_table(sub, t, hops, n, q, loss_half, loss))
            if tick is not None:
                tick(c)
    finally:
        if own is not None:
            own.close()
    df = pd.concat(frames, ignore_index=True) if frames else _table(units, t, hops, n, q, None, None)
    df.attrs.update(noise_floor=noise, roundoff=float(torch.finfo(dtype).eps) * max_loss, hops=hops,
                    chunk=chunk, round=t, restricted=bool(restrict))
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
