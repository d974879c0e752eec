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
    net = getattr(dyn, "network", None)
    if net is not None and net.rec.stateful:
        # delays / compression (NETWORKS.md §3): δ^{(s)} = Σ_d A^{t+s−1}_(d) δ^{(s−1−d)} with δ^{(0)} = e_j δ_u the
        # source's half-step perturbation and δ^{(m)} = 0 for m < 0; A_(d) = ``NetworkRecord.propagators``
        # (the effective M^t split by delay; with compression Q straight-through: (1 − γ) I + γ M_(0), γ M_(d))
        for s in range(hops):
            A = net.rec.propagators(dyn.mixing.numpy(t + s), t + s)
            if self_loops:
                A = [np.abs(m) for m in A]
                A[0] = A[0] + np.eye(n)
            a = sum(A[d] @ out[s - d] for d in range(len(A)) if s - d >= 0)
            out.append(a)
        return np.stack(out)
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


def _update_dots(dyn: Dynamics, state: State, units, G: Tensor, a: np.ndarray, chunk: int,
                 differences: bool = True) -> np.ndarray:
    """D_u(s, k) = G[s, k]ᵀ δ_u for every unit u and every (s, k) its source reaches (a[s, k, j] != 0; hop 0
    on the source itself), else 0: [U, S, n] for G [S, n, P] and a = ``propagation`` [S, n, sources].

    The directions (s, k) a source j needs: hop 0 on itself and, at hop s, the nodes it reaches. Source
    j's update Δ_j depends only on its own weights, so one batched backward with a per-node cotangent
    (cot[d, j] = G[s, k] for j's d-th direction) serves every source at once: max_j |R_j| directions
    instead of n·S. ``differences``: a gaussian attacker's units take δ_u as the difference of the sent
    updates (first_order's definition); False keeps the derivative in w (exact's hops 0-1).
    """
    n = dyn.n
    src = np.asarray(units.source, dtype=np.int64)
    sources = np.unique(src)
    S = G.shape[0]
    reach = [[(0, int(j))] + [(s_, int(k)) for s_ in range(1, S) for k in np.flatnonzero(a[s_, :, c])]
             for c, j in enumerate(sources)]
    d_max = max(len(r) for r in reach)
    cot = torch.zeros(d_max, n, G.shape[-1], dtype=G.dtype, device=G.device)
    dir_s = np.zeros((n, d_max), dtype=np.int64)
    dir_k = np.zeros((n, d_max), dtype=np.int64)
    valid = np.zeros((n, d_max), dtype=bool)
    for j, r in zip(sources, reach):
        sk = np.asarray(r, dtype=np.int64)
        cot[: len(r), j] = G[sk[:, 0], sk[:, 1]]
        dir_s[j, : len(r)], dir_k[j, : len(r)], valid[j, : len(r)] = sk[:, 0], sk[:, 1], True
    dots = _cotangent_dots(dyn, state, cot, chunk)                                   # [d_max, n, B]

    # per unit: D_u(s, k) = Σ_{i∈u} dots[d, j_u, i] for j_u's direction d = (s, k)
    m = units.mask.to(device=dots.device, dtype=dots.dtype)
    per_unit = torch.einsum("dnb,unb->ud", dots, m)                                    # [U, d_max]
    bad = nonlinear_units(dyn, state.round, src)    # gaussian attackers: δ_u by difference (Δ_sent nonlinear)
    if bad.size and differences:
        bi = torch.as_tensor(bad, device=dots.device)
        delta = sent_differences(dyn, state, units.mask[torch.as_tensor(bad)]).to(cot.dtype)      # [Ub, P]
        per_unit[bi] = torch.einsum("up,dup->ud", delta, cot[:, torch.as_tensor(src[bad], device=cot.device)])
    per_unit = per_unit.cpu().numpy()
    full = np.zeros((src.shape[0], S, n))
    uu, dd = np.nonzero(valid[src])
    full[uu, dir_s[src[uu], dd], dir_k[src[uu], dd]] = per_unit[uu, dd]
    return full


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
    t = state.round
    src = np.asarray(units.source, dtype=np.int64)
    u_count = src.shape[0]
    sources = np.unique(src)
    col = np.searchsorted(sources, src)                      # unit -> column of its source in `a`
    a = propagation(dyn, t, sources, hops)                   # [hops+1, n, S]

    G = factual_probe_grads(dyn, state, hops, x_probe, y_probe, shared_probe)        # [hops+1, n, P]
    full = _update_dots(dyn, state, units, G, a, chunk)                              # [U, hops+1, n]

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
    t = state.round
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
          shared_probe: bool, q: Tensor, chunk: int = DEFAULT_CHUNK, path: str = "auto") -> pd.DataFrame:
    """The exact derivative at w = 1 of every probe loss along the trajectory w.r.t. the units' weights
    (spec §4, ``hessian: exact``): reverse mode through ``hops`` unrolled rounds, all units at once.

    Curvature only where it exists. Hops 0 and 1 hold no second derivative: θ^{t+½} = θ^t + Δ^t(w) and
    θ^{t+1} = W^t θ^{t+½} depend on w only through Δ_j^t (buffers and momentum before round t do not
    depend on it), so E(u, j, 0) = q_j ∇L_j(θ_j^{t+½})ᵀ δ_u and E(u, k, 1) = q_k W^t_kj ∇L_k(θ_k^{t+1})ᵀ δ_u
    — the first-order machinery (``_update_dots``) with hop 0 taken at θ^{t+½}, after the local step's
    buffers, as the exact derivative is. Hops s ≥ 2 unroll rounds t..t+s−1 with ``create_graph``:

    - models without buffers, when it steps at most half the rows (``path="auto"``; ``"cones"`` always):
      per target k one copy of the nodes that can influence
      θ_k^{t+hops} (its backward cone through W + I, shrinking by a hop per round), stepped as flat rows
      (``Dynamics.local_step(nodes=)``, gossip by ``gt._RowMixer``); one backward per hop for all targets
      at once. Cost ∝ Σ_k |cone_k| instead of n² per hop;
    - otherwise (BatchNorm), or ``path="unrolled"``: the whole system unrolled and one batched reverse pass
      per hop over the reached targets (``_exact_unrolled``; with ``path="unrolled"`` it computes every hop,
      hops 0 and 1 included: the slow, obvious twin of the two shortcuts above).
    """
    qn = _check(dyn, state, units, hops, q)
    if path not in ("auto", "cones", "unrolled"):
        raise ValueError(f"path={path!r}: use 'auto', 'cones' or 'unrolled'")
    t, n = state.round, dyn.n
    src = np.asarray(units.source, dtype=np.int64)
    u_count = src.shape[0]
    if path == "unrolled" or not dyn.row_shortcuts:     # defense, message attack, network: no W^t shortcut
        full = _exact_unrolled(dyn, state, units, hops, x_probe, y_probe, shared_probe, range(hops + 1), chunk)
    else:
        full = np.zeros((u_count, hops + 1, n))
        full[:, : min(hops, 1) + 1] = _exact_near(dyn, state, units, min(hops, 1), x_probe, y_probe,
                                                  shared_probe, chunk)
        if hops >= 2:
            far = range(2, hops + 1)
            if not dyn.fm.buffer_names and (path == "cones" or _cones_are_cheaper(dyn, t, src, hops)):
                full[:, 2:] = _exact_cones(dyn, state, units, hops, x_probe, y_probe, shared_probe)
            else:
                full[:, 2:] = _exact_unrolled(dyn, state, units, hops, x_probe, y_probe, shared_probe, far,
                                              chunk)[:, 2:]
    hop0 = qn[src] * full[np.arange(u_count), 0, src]
    hopk = qn[None, None, :] * full[:, 1:, :]
    return _frame(t, units, hops, hop0, hopk, "exact")


def _exact_near(dyn: Dynamics, state: State, units, hops: int, x_probe, y_probe, shared: bool, chunk: int
                ) -> np.ndarray:
    """Exact hops 0..hops (hops ≤ 1) without unrolling: [U, hops+1, n] of ∂L_k(θ_k^{t+s})/∂w summed over
    each unit (hop 0 on the source only; hop 1 with the mixing weight W^t_kj)."""
    t = state.round
    src = np.asarray(units.source, dtype=np.int64)
    sources = np.unique(src)
    with torch.no_grad():
        delta, mom, bufs, _ = dyn.local_step(state)
        half = State(t, state.theta + delta, bufs, mom)
        G = [dyn.probe_grads(half, x_probe, y_probe, shared)]                         # ∇L_j(θ_j^{t+½})
        if hops:
            theta, bufs1 = dyn.gossip_state(t, half.theta, bufs)
            G.append(dyn.probe_grads(State(t + 1, theta, bufs1, mom), x_probe, y_probe, shared))
    a = propagation(dyn, t, sources, hops)                                            # a[1] = W^t[:, j]
    full = _update_dots(dyn, state, units, torch.stack(G), a, chunk, differences=False)
    if hops:
        full[:, 1] *= a[1][:, np.searchsorted(sources, src)].T
    return full


def _backward_cones(dyn: Dynamics, t: int, targets: np.ndarray, hops: int) -> List[np.ndarray]:
    """For each target k, the nodes whose state at the start of round t+m can influence θ_k^{t+hops}:
    [T, n] bool per level m = 0..hops (level hops = {k}; level m = level m+1 ∪ its in-neighbours under
    W^{t+m})."""
    n = dyn.n
    c = np.zeros((len(targets), n), dtype=bool)
    c[np.arange(len(targets)), targets] = True
    cones = [c]
    for m in range(hops - 1, -1, -1):
        A = (dyn.mixing.numpy(t + m) > 0).astype(np.float64)          # A[x, l]: x hears l
        c = c | ((c.astype(np.float64) @ A) > 0)
        cones.append(c)
    return cones[::-1]


def _far_targets(dyn: Dynamics, t: int, sources: np.ndarray, hops: int) -> np.ndarray:
    """The targets some source reaches at a hop s ≥ 2 (through W + I)."""
    reach = propagation(dyn, t, np.unique(sources), hops, self_loops=True)
    return np.flatnonzero((reach[2:] != 0).any(axis=(0, 2)))


def _cones_are_cheaper(dyn: Dynamics, t: int, sources: np.ndarray, hops: int) -> bool:
    """Rows stepped by the cones (Σ_k Σ_m |cone_k(m)|) at most half the full unroll's cost for the same
    targets (each reverse pass runs through all n nodes of every round)."""
    targets = _far_targets(dyn, t, sources, hops)
    if len(targets) == 0:
        return True
    rows = sum(int(c.sum()) for c in _backward_cones(dyn, t, targets, hops)[:hops])
    return rows <= 0.5 * len(targets) * hops * dyn.n


def _exact_cones(dyn: Dynamics, state: State, units, hops: int, x_probe, y_probe, shared: bool) -> np.ndarray:
    """Exact hops 2..hops for a model without buffers: [U, hops−1, n], see ``exact``."""
    from .gt import _RowMixer

    t, n, b = state.round, dyn.n, dyn.batch_size
    dt, dev = state.theta.dtype, state.theta.device
    src = np.asarray(units.source, dtype=np.int64)
    out = np.zeros((src.shape[0], hops - 1, n))
    targets = _far_targets(dyn, t, src, hops)
    if len(targets) == 0:
        return out
    cones = _backward_cones(dyn, t, targets, hops)
    T = len(targets)
    levels = []                      # per level: (copy of each row, node of each row, pos [T, n] or -1)
    for c in cones:
        cc, kk = np.nonzero(c)
        pos = np.full((T, n), -1, dtype=np.int64)
        pos[cc, kk] = np.arange(len(cc))
        levels.append((cc, kk, pos))
    target_rows = [torch.as_tensor(lv[2][np.arange(T), targets], device=dev) for lv in levels]

    def pick(v: Optional[Tensor], idx: Tensor) -> Optional[Tensor]:
        return None if v is None else v.index_select(0, idx)

    tgt = torch.as_tensor(targets, device=dev)
    with torch.enable_grad():
        nodes0 = torch.as_tensor(levels[0][1], device=dev)
        w = torch.ones(len(nodes0), b, dtype=dt, device=dev, requires_grad=True)
        st = State(t, pick(state.theta.detach(), nodes0), {},
                   pick(None if state.momentum is None else state.momentum.detach(), nodes0))
        losses = {}
        for m in range(hops):
            cc, kk, pos = levels[m]
            nodes = torch.as_tensor(kk, device=dev)
            delta, mom, _, _ = dyn.local_step(st, w if m == 0 else None, create_graph=True, nodes=nodes)
            half = st.theta + delta
            occ, okk, _ = levels[m + 1]
            mixer = _RowMixer(dyn.mixing.numpy(t + m), dev, dt)
            idx = pos[occ[:, None], mixer.nbr[okk]]
            assert (idx >= 0).all(), "a receiver's sender is outside its cone"
            own = torch.as_tensor(pos[occ, okk], device=dev)
            st = State(t + m + 1, mixer(half, torch.as_tensor(okk, device=dev), torch.as_tensor(idx, device=dev)),
                       {}, pick(mom, own))
            if m + 1 >= 2:
                th = st.theta.index_select(0, target_rows[m + 1])
                losses[m + 1] = dyn.probe_losses(th, {}, x_probe, y_probe, shared, nodes=tgt)[0]
        grads = {s_: torch.autograd.grad(losses[s_].sum(), w, retain_graph=s_ < hops)[0].detach()
                 for s_ in range(2, hops + 1)}
    # unit u of source j on target i: Σ_{b∈u} ∂L_i/∂w at row (i, j) of level 0, where j is in i's cone
    m_u = units.mask.to(device=dev, dtype=dt)[torch.arange(src.shape[0], device=dev),
                                               torch.as_tensor(src, device=dev)]           # [U, B]
    rows0 = levels[0][2][:, src]                                                           # [T, U]
    ii, uu = np.nonzero(rows0 >= 0)
    r = torch.as_tensor(rows0[ii, uu], device=dev)
    mu = m_u[torch.as_tensor(uu, device=dev)]
    for s_, g in grads.items():
        out[uu, s_ - 2, targets[ii]] = (g[r] * mu).sum(-1).cpu().numpy()
    return out


def _exact_unrolled(dyn: Dynamics, state: State, units, hops: int, x_probe, y_probe, shared_probe: bool,
                    which: Sequence[int], chunk: int) -> np.ndarray:
    """∂L_k(θ_k^{t+s})/∂w summed over each unit, for the hops s in ``which``, by unrolling the whole system
    (all n nodes) with ``create_graph``: [U, hops+1, n] (zeros for hops not in ``which``)."""
    t, n, b = state.round, dyn.n, dyn.batch_size
    src = np.asarray(units.source, dtype=np.int64)
    sources = np.unique(src)
    # outputs that can depend on the units' weights: reach through W + I (momentum stays on its node)
    reach = propagation(dyn, t, sources, hops, self_loops=True)
    need = np.zeros((hops + 1, n), dtype=bool)
    need[0, sources] = True
    if hops:
        need[1:] = (reach[1:] != 0).any(-1)
    if getattr(dyn, "network", None) is not None and dyn.network.rec.stateful:
        need[1:] = True          # history and public copies are state too: measure every target
    need[[s_ for s_ in range(hops + 1) if s_ not in set(which)]] = False

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
    return torch.einsum("skjb,ujb->usk", jac, m).cpu().numpy()                           # [U, hops+1, n]
