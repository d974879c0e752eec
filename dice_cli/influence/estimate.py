"""DICE estimates (DICE-E, spec §4): the influence of one round's removal units, without re-simulation.

A unit u of source node j at round t is a set of positions of j's batch whose loss weights w (all 1 in the
recorded run) are moved to 0 on removal. Every estimate is a derivative at w = 1, so

    influence(u, k, s) ≈ q_k [ L_k(θ_k^{t+s}) − L_k(θ_{k∖u}^{t+s}) ]  ≈  q_k Σ_{i∈u} ∂L_k(θ_k^{t+s}) / ∂w_i

(loss WITH the unit − loss WITHOUT it; negative = the unit helped). Two methods, one table each
(columns ``COLUMNS``, the same rows as the ground truth: hop 0 on the source only, hop s ≥ 1 on every node):

``first_order`` (``hessian: none``, the paper's practical estimator, Prop. 1 / Thm. 2 with (I − ηH) → I)
    δ_u = Δ_j − Δ_{j∖u} = Σ_{i∈u} ∂Δ_j/∂w_i  (exact: the local loss is linear in w; momentum is linear, the
    weight decay term does not depend on w), and

        E(u, j, 0) = q_j ∇L_j(θ_j^t)ᵀ δ_u,       E(u, k, s) = q_k ∇L_k(θ_k^{t+s})ᵀ δ_k^{(s)},
        δ^{(1)} = W^t[:, j] δ_u,   δ^{(s+1)} = W^{t+s} δ^{(s)}      (the dynamic-programming path sum)

    With (I − ηH) dropped δ_k^{(s)} = a_k^{(s)} δ_u with a^{(s)} = W^{t+s−1}(⋯(W^t e_j)), so only the n-vector
    a^{(s)} is propagated, and the scalars ∇L_k(θ_k^{t+s})ᵀ ∂Δ_j/∂w_i are obtained for every node j and every
    batch position i at once, without per-sample gradients: one batched double-backward of Δ(w) along the
    probe-gradient directions (``update_dots``). Units are then sums over their mask.

``exact`` (``hessian: exact``)
    The exact derivative of the trajectory: w of round t is a leaf, rounds t..t+s−1 are unrolled with
    ``create_graph=True`` (curvature at the intermediate nodes, momentum, weight decay all included), and
    batched reverse passes over the (hops+1)·n probe losses (one per hop: hop s reaches back s rounds) give
    ∂L_k(θ_k^{t+s})/∂w for every batch position, hence for every unit (sums over its mask).
    Hop 0 is the derivative of q_j L_j(θ_j^{t+½}), θ^{t+½} = θ^t + Δ^t (spec §3's direct term).

Under ``attack=gaussian`` (Δ_sent = ‖Δ‖·z, nonlinear in w) the attackers' units at attack rounds take
δ_u = Δ_sent(w = 1) − Δ_sent(w without u) by difference (``sent_differences``), the spec's definition; for
every other attack Δ_sent is linear in w and the derivative is that difference.

BatchNorm: ``exact`` differentiates through the running statistics too. The rounds it unrolls run with
``create_graph=True``, under which the engine's BatchNorm layers (``models.TrackedBatchNorm2d``) update
their running statistics with tracked math, and the eval-mode probe loss is differentiated in them, so
``exact`` is the derivative of the trajectory for BatchNorm models as well (checked against finite
differences to 1e-6 at every hop).

    from dice_cli.influence.estimate import first_order, exact
    df = exact(dyn, state_t, units, hops=3, x_probe=xp, y_probe=yp, shared_probe=True, q=torch.ones(n))
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..engine import Dynamics, State

COLUMNS = ["round", "source", "unit", "sample", "target", "hop", "influence", "method"]

# Directions / outputs per batched backward pass: bounds memory (each costs one [n, P] cotangent).
DEFAULT_CHUNK = 64


# --------------------------------------------------------------------------- shared pieces

def _check(dyn: Dynamics, state: State, units, hops: int, q: Tensor) -> np.ndarray:
    if state.theta.dim() != 2:
        raise ValueError(f"estimates need Θ [n, P] (no copies axis); got shape {tuple(state.theta.shape)}")
    if int(units.round) != int(state.round):
        raise ValueError(f"units are of round {units.round} but the state is at round {state.round}")
    if hops < 0:
        raise ValueError(f"hops={hops} must be >= 0")
    if state.round + hops > dyn.rounds:
        raise ValueError(f"round {state.round} + hops={hops} goes past the run's {dyn.rounds} rounds")
    n, b = dyn.n, dyn.batch_size
    if tuple(units.mask.shape[1:]) != (n, b):
        raise ValueError(f"units.mask has shape {tuple(units.mask.shape)}, expected [U, {n}, {b}]")
    q = torch.as_tensor(q).detach().to("cpu", torch.float64).numpy().reshape(-1)
    if q.shape[0] != n:
        raise ValueError(f"q has {q.shape[0]} entries, expected one per node ({n})")
    return q


def factual_probe_grads(dyn: Dynamics, state: State, hops: int, xp: Tensor, yp: Tensor, shared: bool
                        ) -> Tensor:
    """∇L_k(θ_k^{t+s}) on the factual trajectory (plain ``dyn.round``), s = 0..hops: [hops+1, n, P]."""
    out = []
    st = state
    for s in range(hops + 1):
        out.append(dyn.probe_grads(st, xp, yp, shared))
        if s < hops:
            st, _, _ = dyn.round(st)
            st = st.detached()
    return torch.stack(out)


def propagation(dyn: Dynamics, t: int, sources: Sequence[int], hops: int, self_loops: bool = False
                ) -> np.ndarray:
    """a^{(s)} = W^{t+s−1} ⋯ W^t e_j for each source j, s = 0..hops: [hops+1, n, S] (a^{(0)} = e_j).

    This is the dynamic-programming form of the path sum: a_k^{(s)} = Σ over paths j → … → k of the
    product of mixing weights. ``self_loops`` uses W + I instead (only its support is meaningful: the
    nodes a perturbation can reach when local state such as momentum also carries it).
    """
    n = dyn.n
    a = np.zeros((n, len(sources)))
    a[np.asarray(sources, dtype=np.int64), np.arange(len(sources))] = 1.0
    out = [a]
    for s in range(hops):
        W = dyn.mixing.numpy(t + s)
        if self_loops:
            W = W + np.eye(n)
        a = W @ a
        out.append(a)
    return np.stack(out)


def _batched_vjp(output: Tensor, inp: Tensor, cot: Tensor) -> Tensor:
    """Σ cot[c] · ∂output/∂inp for each c (one vmapped backward; a loop if vmap cannot run the graph)."""
    try:
        (g,) = torch.autograd.grad(output, inp, cot, retain_graph=True, is_grads_batched=True)
        return g
    except RuntimeError:
        return torch.stack([torch.autograd.grad(output, inp, c, retain_graph=True)[0] for c in cot])


def _cotangent_dots(dyn: Dynamics, state: State, cot: Tensor, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """cot[d, j]ᵀ ∂Δ_j^t/∂w_{j,i} for every d, node j and batch position i: [D, n, B] (cot: [D, n, P]).

    One double-backward of the local step Δ(w) per chunk of d; per-sample gradients are never materialised.
    """
    n, b = dyn.n, dyn.batch_size
    out = torch.zeros(cot.shape[0], n, b, dtype=state.theta.dtype, device=state.theta.device)
    if cot.shape[0] == 0:
        return out
    with torch.enable_grad():
        w = torch.ones(n, b, dtype=state.theta.dtype, device=state.theta.device, requires_grad=True)
        delta, _, _, _ = dyn.local_step(state, w, create_graph=True)
        for lo in range(0, cot.shape[0], chunk):
            out[lo:lo + chunk] = _batched_vjp(delta, w, cot[lo:lo + chunk]).detach()
    return out


def update_dots(dyn: Dynamics, state: State, directions: Tensor, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """vᵀ ∂Δ_j^t/∂w_{j,i} for every direction v, node j and batch position i: [D, n, B].

    directions: [D, P], each applied to every node. For plain SGD ∂Δ_j/∂w_i = −(η/|B|) ∇ℓ_i(θ_j^t).
    """
    cot = directions[:, None, :].expand(-1, dyn.n, -1).contiguous()
    return _cotangent_dots(dyn, state, cot, chunk)


def nonlinear_units(dyn: Dynamics, t: int, source: np.ndarray) -> np.ndarray:
    """Indices of the units whose source sends a nonlinear function of its update at round t
    (``attack=gaussian``: Δ_sent = ‖Δ‖·z), for which δ_u must be taken by difference, not by derivative."""
    rows = dyn.attack.nonlinear_at(t) if dyn.attack is not None else []
    return np.flatnonzero(np.isin(np.asarray(source, dtype=np.int64), rows)) if rows else np.zeros(0, np.int64)


def sent_differences(dyn: Dynamics, state: State, mask: Tensor) -> Tensor:
    """δ_u = Δ_sent,j(w = 1) − Δ_sent,j(w with u's positions at 0) for each unit u of source j: [U, P].

    mask: [U, n, B] bool. The spec's definition (DICE.md §4), computed by one local step on a copies axis
    [1 + U, n, P] (copy 0 factual); exact whatever the update transform is.
    """
    U, n, b = mask.shape[0], dyn.n, dyn.batch_size
    dt, dev = state.theta.dtype, state.theta.device
    w = torch.ones(U + 1, n, b, dtype=dt, device=dev)
    w[1:] = w[1:].masked_fill(mask.to(dev), 0.0)
    with torch.no_grad():
        delta = dyn.local_step(state.detached().copies(U + 1), w)[0]            # [1 + U, n, P]
    src = torch.as_tensor(mask.reshape(U, n, b).any(-1).to(torch.int64).argmax(-1), device=dev)
    return delta[0][src] - delta[1 + torch.arange(U, device=dev), src]


def unit_deltas(dyn: Dynamics, state: State, mask: Tensor) -> Tensor:
    """δ_u = Δ_j − Δ_{j∖u} for each unit: [U, P] (materialised; for small U).

    mask: [U, n, B] bool. Σ_{i∈u} ∂Δ_j/∂w_i, a forward-mode product computed as the derivative of a VJP:
    exact because Δ_sent is linear in w, except under a nonlinear update attack (gaussian), whose units
    are taken by difference (``sent_differences``).
    """
    n, b = dyn.n, dyn.batch_size
    m = mask.to(state.theta.dtype)
    with torch.enable_grad():
        w = torch.ones(n, b, dtype=state.theta.dtype, device=state.theta.device, requires_grad=True)
        delta, _, _, _ = dyn.local_step(state, w, create_graph=True)
        v = torch.zeros_like(delta, requires_grad=True)
        (h,) = torch.autograd.grad(delta, w, v, create_graph=True)      # h = vᵀ ∂Δ/∂w, linear in v
        jv = _batched_vjp(h, v, m)                                      # [U, n, P]
    src = mask.reshape(mask.shape[0], n, b).any(-1).to(torch.int64).argmax(-1)
    out = jv[torch.arange(mask.shape[0]), src].detach()
    bad = nonlinear_units(dyn, state.round, src.cpu().numpy())
    if bad.size:
        out[torch.as_tensor(bad)] = sent_differences(dyn, state, mask[torch.as_tensor(bad)]).to(out.dtype)
    return out


def _frame(t: int, units, hops: int, hop0: np.ndarray, hopk: np.ndarray, method: str) -> pd.DataFrame:
    """Long table in ``gt.ground_truth``'s row order: per unit, hop 0 on its source, then hops 1..hops over
    targets 0..n-1. ``unit`` is the unit kind ("batch"/"sample"), as in the GT table.

    hop0: [U], hopk: [U, hops, n].
    """
    u_count, n = hopk.shape[0], hopk.shape[2]
    per = 1 + hops * n
    src = np.asarray(units.source, dtype=np.int64)
    smp = np.asarray(units.sample, dtype=np.int64)
    target = np.concatenate([src[:, None], np.tile(np.arange(n, dtype=np.int64), (u_count, hops))], axis=1)
    hop = np.concatenate([np.zeros(1, np.int64), np.repeat(np.arange(1, hops + 1, dtype=np.int64), n)])
    vals = np.concatenate([hop0[:, None], hopk.reshape(u_count, hops * n)], axis=1)
    return pd.DataFrame({
        "round": np.full(u_count * per, t, dtype=np.int64),
        "source": np.repeat(src, per),
        "unit": np.full(u_count * per, units.kind, dtype=object),
        "sample": np.repeat(smp, per),
        "target": target.reshape(-1),
        "hop": np.tile(hop, u_count),
        "influence": vals.reshape(-1).astype(np.float64),
        "method": method,
    }, columns=COLUMNS)


# --------------------------------------------------------------------------- first order (hessian: none)

def check_linear(dyn: Dynamics) -> None:
    """UserError (exit 2) unless Θ^{t+1} = W^t Θ^{t+½}: first_order's propagation assumes linear gossip."""
    if not dyn.linear_gossip:
        from ..errors import UserError

        raise UserError(f"method=first_order assumes linear gossip (Θ^{{t+1}} = W^t Θ^{{t+½}}), but "
                        f"{dyn.nonlinear_reason()}; use method=exact, which differentiates through the "
                        f"gossip step (ROBUST.md §4)")


def first_order(dyn: Dynamics, state: State, units, hops: int, x_probe: Tensor, y_probe: Tensor,
                shared_probe: bool, q: Tensor, chunk: int = DEFAULT_CHUNK) -> pd.DataFrame:
    """The paper's practical estimator (spec §4, ``hessian: none``) for all units of round ``state.round``.
    It propagates through W^t, so it refuses a run whose gossip step is not linear (``check_linear``)."""
    check_linear(dyn)
    qn = _check(dyn, state, units, hops, q)
    t, n = state.round, dyn.n
    src = np.asarray(units.source, dtype=np.int64)
    u_count = src.shape[0]
    sources = np.unique(src)
    col = np.searchsorted(sources, src)                      # unit -> column of its source in `a`
    a = propagation(dyn, t, sources, hops)                   # [hops+1, n, S]

    # The directions (s, k) a source j needs: hop 0 on itself and, at hop s, the nodes it reaches
    # (a[s, k, j] != 0). Source j's update Δ_j depends only on its own weights, so one batched backward
    # with a per-node cotangent (cot[d, j] = ∇L_k(θ_k^{t+s}) for j's d-th direction) serves every source
    # at once: max_j |R_j| directions instead of n·(hops+1).
    reach = [[(0, int(j))] + [(s_, int(k)) for s_ in range(1, hops + 1) for k in np.flatnonzero(a[s_, :, c])]
             for c, j in enumerate(sources)]
    d_max = max(len(r) for r in reach)
    G = factual_probe_grads(dyn, state, hops, x_probe, y_probe, shared_probe)        # [hops+1, n, P]
    cot = torch.zeros(d_max, n, G.shape[-1], dtype=G.dtype, device=G.device)
    dir_s = np.zeros((n, d_max), dtype=np.int64)
    dir_k = np.zeros((n, d_max), dtype=np.int64)
    valid = np.zeros((n, d_max), dtype=bool)
    for j, r in zip(sources, reach):
        sk = np.asarray(r, dtype=np.int64)
        cot[: len(r), j] = G[sk[:, 0], sk[:, 1]]
        dir_s[j, : len(r)], dir_k[j, : len(r)], valid[j, : len(r)] = sk[:, 0], sk[:, 1], True
    dots = _cotangent_dots(dyn, state, cot, chunk)                                   # [d_max, n, B]

    # per unit: D_u(s, k) = ∇L_k(θ_k^{t+s})ᵀ δ_u = Σ_{i∈u} dots[d, j_u, i] for j_u's direction d = (s, k)
    m = units.mask.to(device=dots.device, dtype=dots.dtype)
    per_unit = torch.einsum("dnb,unb->ud", dots, m)                                    # [U, d_max]
    bad = nonlinear_units(dyn, t, src)      # gaussian attackers: δ_u by difference (Δ_sent nonlinear in w)
    if bad.size:
        bi = torch.as_tensor(bad, device=dots.device)
        delta = sent_differences(dyn, state, units.mask[torch.as_tensor(bad)]).to(cot.dtype)      # [Ub, P]
        per_unit[bi] = torch.einsum("up,dup->ud", delta, cot[:, torch.as_tensor(src[bad], device=cot.device)])
    per_unit = per_unit.cpu().numpy()
    full = np.zeros((u_count, hops + 1, n))
    uu, dd = np.nonzero(valid[src])
    full[uu, dir_s[src[uu], dd], dir_k[src[uu], dd]] = per_unit[uu, dd]

    hop0 = qn[src] * full[np.arange(u_count), 0, src]
    coef = a[1:][:, :, col].transpose(2, 0, 1)                                       # [U, hops, n]
    hopk = qn[None, None, :] * coef * full[:, 1:, :]
    return _frame(t, units, hops, hop0, hopk, "first_order")


def first_order_paths(dyn: Dynamics, state: State, source: int, delta_u: Tensor, hops: int,
                      x_probe: Tensor, y_probe: Tensor, shared_probe: bool, q: Tensor,
                      max_paths: int = 100_000) -> pd.DataFrame:
    """Per-path terms of the first-order estimate (a visualisation extra, NOT the method: the number of
    paths grows like degree^s). Columns: path ("j>k1>…>ks"), hop, target, weight (product of mixing
    weights along the path), value (= q_k · weight · ∇L_k(θ_k^{t+s})ᵀ δ_u). Hop 0 is the path "j".
    Summing value over the paths that end in k at hop s gives ``first_order``'s E(u, k, s).
    """
    t, n = state.round, dyn.n
    qn = torch.as_tensor(q).detach().to("cpu", torch.float64).numpy().reshape(-1)
    G = factual_probe_grads(dyn, state, hops, x_probe, y_probe, shared_probe)
    gd = (G @ delta_u.to(G.dtype).to(G.device)).cpu().numpy()                           # [hops+1, n]
    rows = [(str(source), 0, source, 1.0, qn[source] * gd[0, source])]
    frontier: List[Tuple[str, int, float]] = [(str(source), source, 1.0)]
    for s in range(1, hops + 1):
        W = dyn.mixing.numpy(t + s - 1)
        nxt = []
        for path, last, weight in frontier:
            for k in np.flatnonzero(W[:, last] > 0):
                nxt.append((f"{path}>{k}", int(k), weight * float(W[k, last])))
        if len(rows) + len(nxt) > max_paths:
            raise ValueError(f"more than max_paths={max_paths} paths by hop {s}; use fewer hops "
                             f"(first_order gives the same sums without enumerating paths)")
        rows += [(p, s, k, wt, qn[k] * wt * gd[s, k]) for p, k, wt in nxt]
        frontier = nxt
    return pd.DataFrame(rows, columns=["path", "hop", "target", "weight", "value"])


# --------------------------------------------------------------------------- exact (hessian: exact)

def exact(dyn: Dynamics, state: State, units, hops: int, x_probe: Tensor, y_probe: Tensor,
          shared_probe: bool, q: Tensor, chunk: int = DEFAULT_CHUNK) -> pd.DataFrame:
    """The exact derivative at w = 1 of every probe loss along the trajectory w.r.t. the units' weights
    (spec §4, ``hessian: exact``): reverse mode through ``hops`` unrolled rounds, all units at once."""
    qn = _check(dyn, state, units, hops, q)
    t, n, b = state.round, dyn.n, dyn.batch_size
    src = np.asarray(units.source, dtype=np.int64)
    u_count = src.shape[0]
    sources = np.unique(src)
    # outputs that can depend on the units' weights: reach through W + I (momentum stays on its node)
    reach = propagation(dyn, t, sources, hops, self_loops=True)
    need = np.zeros((hops + 1, n), dtype=bool)
    need[0, sources] = True
    if hops:
        need[1:] = (reach[1:] != 0).any(-1)

    dt, dev = state.theta.dtype, state.theta.device
    jac = torch.zeros(hops + 1, n, n, b, dtype=dt, device=dev)
    with torch.enable_grad():
        w = torch.ones(n, b, dtype=dt, device=dev, requires_grad=True)
        # round t by hand, to take hop 0 at θ^{t+½} with the buffers after the local step, as GT does
        delta, mom, bufs, _ = dyn.local_step(state, w, create_graph=True)
        outs = [dyn.probe_losses(state.theta + delta, bufs, x_probe, y_probe, shared_probe)[0]]
        st = dyn.gossip(state, delta, bufs, mom, create_graph=True)
        for s in range(1, hops + 1):
            outs.append(dyn.probe_losses(st.theta, st.buffers, x_probe, y_probe, shared_probe)[0])
            if s < hops:
                st, _, _ = dyn.round(st, create_graph=True)
        # one batched reverse pass per hop (hop s's losses only reach back through s rounds)
        for s, y in enumerate(outs):
            idx = torch.as_tensor(np.flatnonzero(need[s]), device=dev)
            for lo in range(0, idx.numel(), chunk):
                part = idx[lo:lo + chunk]
                cot = torch.zeros(part.numel(), n, dtype=dt, device=dev)
                cot[torch.arange(part.numel(), device=dev), part] = 1.0
                jac[s, part] = _batched_vjp(y, w, cot).detach()

    m = units.mask.to(device=dev, dtype=dt)
    full = torch.einsum("skjb,ujb->usk", jac, m).cpu().numpy()                           # [U, hops+1, n]
    hop0 = qn[src] * full[np.arange(u_count), 0, src]
    hopk = qn[None, None, :] * full[:, 1:, :]
    return _frame(t, units, hops, hop0, hopk, "exact")
