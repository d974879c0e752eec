"""Anomaly detection by proximal influence (spec §5) and the literature's detector scores (ROBUST.md §3).

Every receiver k can score each in-neighbour l from what it holds locally: its own probe gradient after
gossip and the update Δ_{l→k} that l sends with its model m_{l→k} (Δ_{l→k} = m_{l→k} − θ_l^t: DICE's Δ_l^t for
an honest sender, the update consistent with the model sent for a Byzantine one),

    P_t(l→k) = q_k W^t_kl ∇L_k(θ_k^{t+1})ᵀ Δ_{l→k},        P(l→k) = Σ_t P_t(l→k)   over a window of rounds.

Positive = l's updates RAISE k's probe loss (suspicious); negative = they help. The paper's code scored the
raw dot product ⟨∇L_k(θ_k^t), g_l^t⟩ at the receiver's pre-gossip model, with g_l^t = −Δ_l^t / η^t (the
momentum-filtered, weight-decayed gradient when those are on); it is offered as the second score ``dot``.
The literature's simple scores, from the same messages in the same pass (``proximal_scores(..., scores=)``):

    cosine    −cos(m_{l→k} − θ_k^t, θ_k^{t+½} − θ_k^t)   the move l's model asks of k, against k's own update
    distance  ‖m_{l→k} − θ_k^{t+½}‖                       (BALANCE-style)
    loss      L_k(m_{l→k}) − L_k(θ_k^{t+½})               on k's probe set (LPC / MOZI style)
    krum      Σ of the |N_k| − f − 2 smallest ‖m_{l→k} − m_{j→k}‖² over k's other received models
    norm      ‖m_{l→k} − θ_k^t‖

Every score is oriented so that high = suspicious except ``dot`` (counted negated, ``SUSPICION_SIGN``), and
all go through the same aggregation, so a comparison isolates the score.

Pipeline (the ``dice detect`` command wires it to a recorded run):

    pairs = proximal_scores(dyn, state, rounds, x_probe, y_probe, shared_probe, q, scores=SCORES)
    pair_table, sender_table = aggregate(pairs, normalize="receiver", aggregation="mean", score="krum")
    sender_table = flag(sender_table, k=3.0)
    metrics = evaluate(sender_table, anomalous=[2])                                 # ROC AUC, AP, precision
    per_score = score_metrics(pairs, [2], SCORES)          # + TPR at 1 % / 5 % FPR and detection delay

Self pairs (k == l) are never scored: a node does not judge itself. The window may be time-varying: only
the edges present in W^t (W^t_kl > 0) at round t contribute a row for that round.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .engine import Dynamics, State
from .errors import UserError, check_choice, check_range
from .lock import scoped

NORMALIZE = ["receiver", "none"]
AGGREGATION = ["mean", "median"]
SCORES = ["proximal_influence", "dot", "cosine", "distance", "loss", "krum", "norm"]
SUSPICION_SIGN = {"proximal_influence": 1.0, "dot": -1.0, "cosine": 1.0, "distance": 1.0, "loss": 1.0,
                  "krum": 1.0, "norm": 1.0}     # high suspicion = raises the receiver's loss / looks far away
MAD_SCALE = 1.4826          # MAD · 1.4826 estimates the standard deviation of a normal distribution
PAIR_COLUMNS = ["round", "receiver", "sender", "weight", "proximal_influence", "dot"]
DELAY_AUC = 0.95            # detection delay: the first round after which the cumulative AUC stays ≥ this


# --------------------------------------------------------------------------- per-round scores


def _message_losses(dyn: Dynamics, theta: Tensor, recv: Tensor, buffers, xp: Tensor, yp: Tensor,
                    shared: bool) -> Tensor:
    """L_k(θ_e) for models θ [E, P] evaluated by receivers recv [E] (their probe sets and buffers; eval
    mode), in chunks of n models: [E]. MLP / logreg: the engine's explicit forward (its losses output)."""
    from torch.func import vmap

    fm = dyn.fm
    if dyn._dense is not None and not buffers:
        m = yp.shape[-1]
        out = []
        for lo in range(0, theta.shape[0], dyn.n):
            r = recv[lo:lo + dyn.n]
            x = xp.reshape(m, -1).expand(len(r), m, -1) if shared else xp.index_select(0, r).reshape(len(r), m, -1)
            y = yp.expand(len(r), m) if shared else yp.index_select(0, r)
            out.append(dyn._dense.step(theta[lo:lo + dyn.n], x, y, None, 1.0)[1])
        return torch.cat(out) if out else theta.new_zeros(0)

    def one(th, b, xx, yy):
        return torch.nn.functional.cross_entropy(fm.logits(th, b, xx), yy)

    f = vmap(one, in_dims=(0, 0, None if shared else 0, None if shared else 0))
    out = []
    fm.module.eval()
    try:
        for lo in range(0, theta.shape[0], dyn.n):
            r = recv[lo:lo + dyn.n]
            out.append(f(theta[lo:lo + dyn.n], {k: v.index_select(0, r) for k, v in buffers.items()},
                         xp if shared else xp.index_select(0, r), yp if shared else yp.index_select(0, r)))
    finally:
        fm.module.train()
    return torch.cat(out) if out else theta.new_zeros(0)


def _krum(M: Tensor, box, f: int) -> Tensor:
    """Krum scores on the neighbour slots: for slot s of receiver k, the sum of the |N_k| − f − 2 smallest
    squared distances to k's other received models: [n, D] (NaN where |N_k| − f − 2 < 1 or not a neighbour)."""
    nb = box.neighbour
    d2 = torch.cdist(M, M) ** 2                                                     # [n, D, D]
    pair_ok = nb[:, :, None] & nb[:, None, :] & ~torch.eye(M.shape[1], dtype=torch.bool, device=M.device)
    srt = torch.where(pair_ok, d2, torch.full_like(d2, float("inf"))).sort(dim=-1).values
    m = (nb.sum(-1) - f - 2)                                                         # closest to sum
    r = torch.arange(M.shape[1], device=M.device)
    take = r[None, None, :] < m[:, None, None]
    out = torch.where(take, srt, torch.zeros_like(srt)).sum(-1)
    return torch.where(nb & (m[:, None] >= 1), out, torch.full_like(out, float("nan")))


def proximal_scores(dyn: Dynamics, state: State, rounds: int, x_probe: Tensor, y_probe: Tensor,
                    shared_probe: bool, q: Tensor, scores: Sequence[str] = ("proximal_influence", "dot"),
                    krum_f: int = 0, progress: bool = False) -> pd.DataFrame:
    """Detector scores of every edge l → k (W^t_kl > 0, k ≠ l) for rounds t = state.round .. state.round +
    rounds − 1, in one pass that advances the factual trajectory exactly as ``dyn.round`` does (messages,
    attacks and defenses included).

    Returns a long table, one row per (round, edge): round, receiver (k), sender (l), weight (W^t_kl),
    proximal_influence (q_k W^t_kl ∇L_k(θ_k^{t+1})ᵀ Δ_{l→k}), dot (⟨∇L_k(θ_k^t), −Δ_{l→k} / η^t⟩; NaN when
    η^t = 0), then the other requested ``scores`` (module docstring; krum with ``krum_f`` assumed attackers).
    Cost per round: one training round and one probe backward for all n nodes, [E, P] dot products; loss
    adds one probe forward per distinct received model, krum a [D, D] distance matrix per receiver.
    Θ^{t+1}'s probe gradient is reused as round t+1's pre-gossip gradient. ``progress``: a bar over the
    rounds (only when stderr is a terminal).
    """
    n = dyn.n
    if state.theta.dim() != 2 or state.theta.shape[0] != n:
        raise ValueError(f"state.theta has shape {tuple(state.theta.shape)}; expected [n={n}, P] "
                         f"(no copies axis)")
    try:
        rounds_i = int(rounds)
    except (TypeError, ValueError):
        rounds_i = None
    t0 = int(state.round)
    last = int(dyn.rounds) - t0
    if rounds_i is None or rounds_i != rounds or not 1 <= rounds_i <= max(last, 0):
        raise UserError(f"window={rounds!r} rounds starting at round {t0} is not valid: the run has "
                        f"{dyn.rounds} rounds, so the window must be an integer in 1..{last}"
                        if last >= 1 else
                        f"no rounds left to score after round {t0}: the run has {dyn.rounds} rounds; "
                        f"start the window earlier")
    qv = torch.as_tensor(q).detach().to("cpu", torch.float64).numpy().reshape(-1)
    if qv.shape[0] != n:
        raise ValueError(f"q has {qv.shape[0]} entries, expected one per node ({n})")
    for sc in scores:
        check_choice("scores[]", sc, SCORES)
    extra = [sc for sc in SCORES if sc in scores and sc not in ("proximal_influence", "dot")]
    columns = PAIR_COLUMNS + extra
    dedupe = shared_probe and not state.buffers      # L_k(θ) the same for every receiver k

    blocks: List[Dict[str, np.ndarray]] = []
    st = state.detached()
    g_pre = dyn.probe_grad(st.theta, st.buffers, x_probe, y_probe, shared_probe)      # ∇L_k(θ_k^t)
    from .progress import bar

    ticker = bar(progress, rounds_i, "dice detect")
    try:
        for t in range(t0, t0 + rounds_i):
            with torch.no_grad():
                delta, mom, bufs, _ = dyn.local_step(st)
                half = st.theta + delta
                edges = dyn.messages(st, half)
                nxt = dyn.gossip(st, delta, bufs, mom, edges=edges).detached()
            g_post = dyn.probe_grad(nxt.theta, nxt.buffers, x_probe, y_probe, shared_probe)  # ∇L_k(θ_k^{t+1})
            box = dyn.inbox(t)
            kk, ss = np.nonzero(box.np_valid & (np.arange(box.D) > 0)[None, :])
            ll = box.np_sender[kk, ss]
            rk, rl = torch.as_tensor(kk, device=half.device), torch.as_tensor(ll, device=half.device)
            rs = torch.as_tensor(ss, device=half.device)
            with torch.no_grad():
                M = box.messages(half, edges)                                              # [n, D, P]
                msg = M[rk, rs]                                                             # [E, P]
                upd = msg - st.theta[rl]                                                    # Δ_{l→k}
                post = (g_post[rk] * upd).sum(-1).to("cpu", torch.float64).numpy()
                pre = (g_pre[rk] * upd).sum(-1).to("cpu", torch.float64).numpy()
                cols: Dict[str, np.ndarray] = {}
                if "cosine" in extra:
                    a, b = msg - st.theta[rk], delta[rk]
                    den = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
                    cos = torch.where(den > 0, (a * b).sum(-1) / torch.where(den > 0, den, torch.ones_like(den)),
                                      torch.zeros_like(den))
                    cols["cosine"] = -cos
                if "distance" in extra:
                    cols["distance"] = torch.linalg.vector_norm(msg - half[rk], dim=-1)
                if "norm" in extra:
                    cols["norm"] = torch.linalg.vector_norm(msg - st.theta[rk], dim=-1)
                if "loss" in extra:
                    own = _message_losses(dyn, half, torch.arange(n, device=half.device), bufs, x_probe, y_probe,
                                          shared_probe)                                    # L_k(θ_k^{t+½})
                    if dedupe:
                        of = own[rl].clone()                                                # honest: L(θ_l^{t+½})
                        if edges is not None:
                            hit = box.slot_of[edges.receiver, edges.sender]
                            flat = torch.full((n, box.D), -1, dtype=torch.long, device=half.device)
                            flat[rk, rs] = torch.arange(len(kk), device=half.device)
                            pos = flat[edges.receiver, hit]
                            of[pos] = _message_losses(dyn, edges.message, edges.receiver, bufs, x_probe, y_probe,
                                                      shared_probe)
                    else:
                        of = _message_losses(dyn, msg, rk, bufs, x_probe, y_probe, shared_probe)
                    cols["loss"] = of - own[rk]
                if "krum" in extra:
                    cols["krum"] = _krum(M, box, int(krum_f))[rk, rs]
            W = np.asarray(dyn.mixing.numpy(t), dtype=np.float64)
            lr = float(dyn.lr(t))
            w = W[kk, ll]
            block = {
                "round": np.full(kk.shape, t, dtype=np.int64),
                "receiver": kk.astype(np.int64),
                "sender": ll.astype(np.int64),
                "weight": w,
                "proximal_influence": qv[kk] * w * post,
                "dot": (-pre / lr) if lr != 0 else np.full(kk.shape, np.nan),
            }
            for c, v in cols.items():
                block[c] = v.to("cpu", torch.float64).numpy()
            blocks.append(block)
            st, g_pre = nxt, g_post
            ticker.update(1)
    finally:
        ticker.close()
    out = {c: np.concatenate([b[c] for b in blocks]) for c in columns}
    return pd.DataFrame(out, columns=columns)


# --------------------------------------------------------------------------- aggregation


def _robust_z(values: np.ndarray) -> np.ndarray:
    """(v − median) / spread, spread = 1.4826·MAD, or the standard deviation (ddof 0) when MAD = 0;
    all zeros when every value is equal (or there is one value: nothing to compare with)."""
    v = np.asarray(values, dtype=np.float64)
    med = np.median(v)
    dev = v - med
    spread = MAD_SCALE * np.median(np.abs(dev))
    if not spread > 0:
        spread = float(np.std(v))
    if not spread > 0:
        return np.zeros_like(v)
    return dev / spread


def _robust_z_by(df: pd.DataFrame, by: List[str], col: str) -> np.ndarray:
    """``_robust_z`` within each group of ``by``, vectorised (no Python loop over groups)."""
    v = df[col].astype(np.float64)
    keys = [df[b] for b in by]

    def per_group(x: pd.Series, how: str) -> pd.Series:
        return x.groupby(keys, sort=False).transform(how)

    dev = v - per_group(v, "median")
    mad = MAD_SCALE * per_group(dev.abs(), "median")
    centred = v - per_group(v, "mean")
    std = np.sqrt(per_group(centred * centred, "mean"))            # ddof 0
    dev, mad, std = dev.to_numpy(), mad.to_numpy(), std.to_numpy()
    spread = np.where(mad > 0, mad, std)
    out = np.zeros(len(v))
    ok = spread > 0
    out[ok] = dev[ok] / spread[ok]
    return out


def _receiver_normalized(df: pd.DataFrame) -> np.ndarray:
    """Per (round, receiver): the robust z-score of the in-neighbours' suspicion ``_s`` when there are at
    least 3 of them. With 1 or 2 (a ring, a 4-node exponential graph, one-peer graphs) a z-score is a bare
    sign vote (±0.6745 for two values) that hides how far apart they are, so those receivers use a
    scale-only normalisation instead: ``_s`` / scale_k, where scale_k is the smallest, over k's
    in-neighbours l, of median_t |``_s``_t(l→k)| — one loud sender cannot inflate it and so cannot make
    its honest co-neighbours look better or worse than they are."""
    z = _robust_z_by(df, ["round", "receiver"], "_s")
    size = df.groupby(["round", "receiver"], sort=False)["_s"].transform("size").to_numpy()
    small = size < 3
    if small.any():
        s = df["_s"].astype(np.float64)
        typical = s.abs().groupby([df["receiver"], df["sender"]], sort=False).transform("median")
        scale = typical.groupby(df["receiver"], sort=False).transform("min").to_numpy()
        ok = small & (scale > 0)
        z[ok] = s.to_numpy()[ok] / scale[ok]
        z[small & ~(scale > 0)] = 0.0
    return z


def _check_pairs(pairs: pd.DataFrame, score: str) -> None:
    need = ["round", "receiver", "sender", score]
    missing = [c for c in need if c not in pairs.columns]
    if missing:
        raise UserError(f"the pair table lacks column(s) {missing}; it needs {need} "
                        f"(the output of proximal_scores); it has {list(pairs.columns)}")


def aggregate(pairs: pd.DataFrame, normalize: str = "receiver", aggregation: str = "mean",
              score: str = "proximal_influence") -> Tuple[pd.DataFrame, pd.DataFrame]:
    """Per-round edge scores -> (pair_table, sender_table).

    pair_table (one row per receiver, sender): every score column of ``pairs`` summed over the window
    (P(l→k) = Σ_t P_t(l→k)), rounds (how many rounds the edge existed), normalized (what the sender score
    aggregates: the mean over rounds of the per-round robust z-score with normalize=receiver, the window
    sum of the suspicion with normalize=none) and rank (1 = most suspicious of that receiver's
    in-neighbours by the summed suspicion, descending; ties share the smallest rank). The suspicion is
    ``proximal_influence`` itself, or −``dot`` for score=dot: a positive dot means the sender's gradient
    agrees with the receiver's (its step lowers the receiver's loss), so a large dot is reassuring and a
    large negative dot suspicious. The other scores (cosine, distance, loss, krum, norm) are suspicions as
    they are. Either way a high sender score = suspicious.

    sender_table (one row per sender, by sender id): score (``aggregation`` over its receivers of
    ``normalized``), n_receivers, rank (1 = most suspicious network-wide).

    normalize=receiver: at each round each receiver z-scores the suspicion of its in-neighbours robustly
    ((s − median) / (1.4826·MAD), the standard deviation when MAD = 0, 0 when all are equal), so
    receivers with large or small gradients count alike; a pair's normalized score is the mean of its
    per-round z over the rounds the edge existed. A receiver with fewer than 3 in-neighbours in a round
    is scaled instead of z-scored (see ``_receiver_normalized``).
    normalize=none aggregates the raw window sums.
    """
    check_choice("normalize", normalize, NORMALIZE)
    check_choice("aggregation", aggregation, AGGREGATION)
    check_choice("score", score, SCORES)
    _check_pairs(pairs, score)
    df = pairs.copy()
    present = [c for c in SCORES if c in df.columns]
    keys = ["receiver", "sender"]
    # suspicion: high = suspicious for both scores. A positive dot means the sender's gradient points
    # where the receiver's does (its step LOWERS the receiver's loss), so dot counts negated.
    df["_s"] = df[score].astype(np.float64) * SUSPICION_SIGN[score]
    if normalize == "receiver":
        df["_z"] = _receiver_normalized(df)
    g = df.groupby(keys, sort=True)
    pair_table = g[present].sum(min_count=1).reset_index()
    pair_table["rounds"] = g.size().to_numpy()
    suspicion = pair_table[score].to_numpy(np.float64) * SUSPICION_SIGN[score]
    if normalize == "receiver":
        pair_table["normalized"] = g["_z"].mean().to_numpy()
    else:
        pair_table["normalized"] = suspicion
    pair_table["rank"] = (pd.Series(suspicion).groupby(pair_table["receiver"].to_numpy())
                          .rank(method="min", ascending=False).fillna(0).astype(np.int64).to_numpy())
    pair_table = pair_table[keys + present + ["rounds", "normalized", "rank"]]

    s = pair_table.groupby("sender", sort=True)["normalized"]
    sender_table = pd.DataFrame({
        "sender": s.size().index.to_numpy(np.int64),
        "score": (s.mean() if aggregation == "mean" else s.median()).to_numpy(np.float64),
        "n_receivers": s.size().to_numpy(np.int64),
    })
    sender_table["rank"] = sender_table["score"].rank(method="min", ascending=False).fillna(0).astype(np.int64)
    return pair_table, sender_table


# --------------------------------------------------------------------------- flags and metrics


def flag(sender_table: pd.DataFrame, k: float = 3.0) -> pd.DataFrame:
    """A copy with ``flagged``: score > median + k · 1.4826·MAD over the senders. When MAD = 0 (most
    senders score the same) a tiny epsilon replaces it, so exactly the senders strictly above the median
    flag. NaN scores never flag."""
    check_range("k", float(k), 0.0)
    if "score" not in sender_table.columns:
        raise UserError(f"the sender table lacks a 'score' column (the output of aggregate); "
                        f"it has {list(sender_table.columns)}")
    out = sender_table.copy()
    s = out["score"].to_numpy(np.float64)
    ok = np.isfinite(s)
    flagged = np.zeros(s.shape, dtype=bool)
    if ok.any():
        v = s[ok]
        med = float(np.median(v))
        mad = MAD_SCALE * float(np.median(np.abs(v - med)))
        if not mad > 0:
            mad = 1e-12 * max(1.0, float(np.max(np.abs(v))))
        flagged[ok] = v > med + float(k) * mad
    out["flagged"] = flagged
    return out


def _anomalous_mask(sender_table: pd.DataFrame, anomalous: Sequence[int]) -> Tuple[np.ndarray, List[int]]:
    senders = sender_table["sender"].to_numpy(np.int64)
    try:
        ids = sorted({int(a) for a in anomalous})
    except (TypeError, ValueError):
        raise UserError(f"anomalous={list(anomalous)!r} must be a list of node ids (integers)") from None
    unknown = [a for a in ids if a not in set(senders.tolist())]
    if unknown:
        raise UserError(f"anomalous node(s) {unknown} are not scored senders in this window; the scored "
                        f"senders are {sorted(senders.tolist())} (a node is scored when it sends to "
                        f"another node during the window)")
    return np.isin(senders, ids), ids


def evaluate(sender_table: pd.DataFrame, anomalous: Sequence[int]) -> dict:
    """Score the detector against the known anomalous nodes. Sets sender_table['anomalous'] (bool, in
    place) and flags with ``flag`` (default k) when the table has no ``flagged`` column yet.

    Returns roc_auc and average_precision of the scores (sklearn; None with a ``note`` when only one class
    is present or a score is NaN), precision and recall of the flags (None when nothing is flagged /
    nothing is anomalous), the anomalous and flagged node ids and n_senders.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    if "score" not in sender_table.columns or "sender" not in sender_table.columns:
        raise UserError(f"the sender table needs 'sender' and 'score' columns (the output of aggregate); "
                        f"it has {list(sender_table.columns)}")
    mask, ids = _anomalous_mask(sender_table, anomalous)
    sender_table["anomalous"] = mask
    flagged_col = (sender_table["flagged"].to_numpy(bool) if "flagged" in sender_table.columns
                   else flag(sender_table)["flagged"].to_numpy(bool))
    scores = sender_table["score"].to_numpy(np.float64)
    senders = sender_table["sender"].to_numpy(np.int64)
    n = int(len(senders))
    notes = []
    roc_auc = ap = None
    n_pos = int(mask.sum())
    if n_pos == 0 or n_pos == n:
        which = "no sender is" if n_pos == 0 else "every sender is"
        notes.append(f"ROC AUC and average precision are undefined: {which} anomalous (they need both "
                     f"anomalous and normal senders); pass the anomalous node ids")
    elif not np.isfinite(scores).all():
        notes.append("ROC AUC and average precision are undefined: some sender scores are NaN "
                     "(the learning rate was 0 in the window with score=dot)")
    else:
        roc_auc = float(roc_auc_score(mask, scores))
        ap = float(average_precision_score(mask, scores))
    tp = int((mask & flagged_col).sum())
    n_flag = int(flagged_col.sum())
    precision = tp / n_flag if n_flag else None
    recall = tp / n_pos if n_pos else None
    if n_flag == 0:
        notes.append("no sender was flagged, so precision is undefined")
    out = {"roc_auc": roc_auc, "average_precision": ap, "precision": precision, "recall": recall,
           "anomalous": ids, "flagged": sorted(senders[flagged_col].tolist()), "n_senders": n}
    if notes:
        out["note"] = "; ".join(notes)
    return out


def roc_points(sender_table: pd.DataFrame, anomalous: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the sender scores against the anomalous ids (sklearn.metrics.roc_curve)."""
    from sklearn.metrics import roc_curve

    mask, _ = _anomalous_mask(sender_table, anomalous)
    if mask.all() or not mask.any():
        raise UserError("a ROC curve needs both anomalous and normal senders; "
                        f"anomalous={list(anomalous)} covers {int(mask.sum())} of {len(mask)} senders")
    fpr, tpr, _ = roc_curve(mask, sender_table["score"].to_numpy(np.float64))
    return fpr, tpr


def tpr_at(fpr: np.ndarray, tpr: np.ndarray, at: float) -> float:
    """The largest true positive rate of the ROC curve at a false positive rate ≤ ``at`` (no interpolation)."""
    ok = fpr <= at + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def cumulative_sender_scores(pairs: pd.DataFrame, normalize: str = "receiver", aggregation: str = "mean",
                             score: str = "proximal_influence") -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sender scores ``aggregate`` gives on every prefix of the window (rounds first..e, e = each round):
    (rounds [R], senders [S], scores [R, S]; NaN for a sender not yet scored). The last row equals
    ``aggregate(pairs, ...)[1]["score"]``; computed from running per-pair sums (and running medians for
    the scale-only receivers), so all R prefixes cost about as much as a few calls of ``aggregate``."""
    check_choice("normalize", normalize, NORMALIZE)
    check_choice("aggregation", aggregation, AGGREGATION)
    check_choice("score", score, SCORES)
    _check_pairs(pairs, score)
    df = pairs[["round", "receiver", "sender", score]].copy()
    df["_s"] = df[score].astype(np.float64) * SUSPICION_SIGN[score]
    rounds = np.sort(df["round"].unique())
    senders = np.sort(df["sender"].unique())
    pair_keys = df[["receiver", "sender"]].drop_duplicates().sort_values(["receiver", "sender"])
    P = len(pair_keys)
    pid = pd.MultiIndex.from_frame(pair_keys).get_indexer(pd.MultiIndex.from_frame(df[["receiver", "sender"]]))
    rid = np.searchsorted(rounds, df["round"].to_numpy())
    R = len(rounds)
    S = np.full((R, P), np.nan)
    S[rid, pid] = df["_s"].to_numpy()
    present = ~np.isnan(S)
    count = np.cumsum(present, axis=0)                                          # [R, P]
    if normalize == "none":
        value = np.cumsum(np.nan_to_num(S), axis=0)
    else:
        z = np.full((R, P), np.nan)
        z[rid, pid] = _robust_z_by(df, ["round", "receiver"], "_s")
        size = df.groupby(["round", "receiver"], sort=False)["_s"].transform("size").to_numpy()
        small = np.zeros((R, P), dtype=bool)
        small[rid, pid] = size < 3
        big_sum = np.cumsum(np.where(present & ~small, np.nan_to_num(z), 0.0), axis=0)
        small_sum = np.cumsum(np.where(present & small, np.nan_to_num(S), 0.0), axis=0)
        recv_of = pair_keys["receiver"].to_numpy()
        value = big_sum.copy()
        if small.any():
            absS = np.abs(S)
            for e in range(R):
                typical = np.nanmedian(absS[:e + 1], axis=0) if present[:e + 1].any() else np.full(P, np.nan)
                scale = pd.Series(typical).groupby(recv_of).transform("min").to_numpy()
                contrib = np.where(scale > 0, small_sum[e] / np.where(scale > 0, scale, 1.0), 0.0)
                value[e] = big_sum[e] + contrib
        value = value / np.maximum(count, 1)
    value = np.where(count > 0, value, np.nan)
    send_of = pair_keys["sender"].to_numpy()
    out = np.full((R, len(senders)), np.nan)
    for i, l in enumerate(senders):
        v = value[:, send_of == l]
        have = ~np.isnan(v)
        with np.errstate(all="ignore"):
            if aggregation == "mean":
                out[:, i] = np.where(have.any(1), np.nansum(v, 1) / np.maximum(have.sum(1), 1), np.nan)
            else:
                out[:, i] = np.array([np.median(r[h]) if h.any() else np.nan for r, h in zip(v, have)])
    return rounds, senders, out


def detection_delay(pairs: pd.DataFrame, anomalous: Sequence[int], normalize: str = "receiver",
                    aggregation: str = "mean", score: str = "proximal_influence", level: float = DELAY_AUC
                    ) -> Tuple[Optional[int], Optional[int], np.ndarray]:
    """ROBUST.md §3: the first round t after which the cumulative score (rounds first..t) has ROC AUC ≥
    ``level`` and keeps it to the end of the window. Returns (delay = rounds of evidence needed, t − first + 1,
    or None when the AUC ends below ``level``; that round t; the AUC after every round [R], NaN where
    undefined)."""
    from sklearn.metrics import roc_auc_score

    rounds, senders, sc = cumulative_sender_scores(pairs, normalize, aggregation, score)
    bad = np.isin(senders, [int(a) for a in anomalous])
    auc = np.full(len(rounds), np.nan)
    for e in range(len(rounds)):
        ok = ~np.isnan(sc[e])
        y = bad[ok]
        if y.any() and not y.all():
            auc[e] = roc_auc_score(y, sc[e][ok])
    good = auc >= level
    if not len(good) or not good[-1]:
        return None, None, auc
    e = len(good) - 1
    while e > 0 and good[e - 1]:
        e -= 1
    return int(rounds[e] - rounds[0] + 1), int(rounds[e]), auc


def score_metrics(pairs: pd.DataFrame, anomalous: Sequence[int], scores: Sequence[str], normalize: str = "receiver",
                  aggregation: str = "mean") -> Tuple[Dict[str, dict], Dict[str, tuple]]:
    """Every score through the same aggregation against the attackers: ({score: {roc_auc, average_precision,
    tpr_at_1fpr, tpr_at_5fpr, delay, delay_round}}, {score: (fpr, tpr, auc)} for the ROC overlay). Values
    are None when undefined (one class only, or NaN scores)."""
    from sklearn.metrics import roc_curve

    table, curves = {}, {}
    for sc in scores:
        _, senders = aggregate(pairs, normalize, aggregation, sc)
        m = evaluate(senders, anomalous)
        row = {"roc_auc": m["roc_auc"], "average_precision": m["average_precision"], "tpr_at_1fpr": None,
               "tpr_at_5fpr": None, "delay": None, "delay_round": None}
        if m["roc_auc"] is not None:
            fpr, tpr, _ = roc_curve(senders["anomalous"].to_numpy(), senders["score"].to_numpy(np.float64))
            row["tpr_at_1fpr"], row["tpr_at_5fpr"] = tpr_at(fpr, tpr, 0.01), tpr_at(fpr, tpr, 0.05)
            row["delay"], row["delay_round"], _ = detection_delay(pairs, anomalous, normalize, aggregation, sc)
            curves[sc] = (fpr, tpr, m["roc_auc"])
        table[sc] = row
    return table, curves


def krum_bound(dyn: Dynamics, first: int, length: int, attackers: Sequence[int], krum_f: Optional[int]
               ) -> Tuple[int, Optional[str], Optional[str]]:
    """Krum's f for the window and what stops it: (f, tolerance problem, definition problem).

    f = ``krum_f``, or the largest number of attacking in-neighbours of any honest receiver in the window.
    Tolerance: an explicit krum_f below that number (Krum assumes at most f). Definition: a receiver with
    fewer than f + 3 in-neighbours has no |N_k| − f − 2 ≥ 1 closest models to sum."""
    bad = set(int(a) for a in attackers)
    steps = range(first, first + length) if dyn.mixing.schedule.time_varying else [first]
    worst = (0, None, None)
    short = None
    for t in steps:
        box = dyn.inbox(t)
        for k in range(dyn.n):
            nbrs = [int(l) for l, v in zip(box.np_sender[k, 1:], box.np_valid[k, 1:]) if v]
            byz = sum(1 for l in nbrs if l in bad)
            if k not in bad and byz > worst[0]:
                worst = (byz, k, t)
    f = worst[0] if krum_f is None else int(krum_f)
    tol = None
    if krum_f is not None and worst[0] > krum_f:
        tol = (f"score krum with krum_f={krum_f} assumes at most {krum_f} attacking in-neighbours per receiver, "
               f"but receiver {worst[1]} has {worst[0]} at round {worst[2]}; set krum_f ≥ {worst[0]} "
               f"(or leave it null: the run's largest count)")
    for t in steps:
        box = dyn.inbox(t)
        deg = box.neighbour.sum(-1)
        k = int(deg.argmin())
        if int(deg[k]) < f + 3:
            short = (f"score krum sums the |N_k| − f − 2 smallest squared distances among a receiver's received "
                     f"models, so it needs at least f + 3 = {f + 3} in-neighbours per receiver (f = {f}), but "
                     f"receiver {k} has {int(deg[k])} at round {t}; use a denser topology, a smaller krum_f, or "
                     f"leave krum out of scores")
            break
    return f, tol, short


# --------------------------------------------------------------------------------------- dice detect

def parse_window(spec, total: int) -> tuple:
    """``window`` -> (first round, number of rounds): an int w = the last w rounds; "a:b" = rounds a … b−1."""
    from .errors import bad_value

    if isinstance(spec, str) and ":" in spec:
        try:
            a, b = (int(p) if p else None for p in spec.split(":", 1))
        except ValueError:
            raise bad_value("window", spec, fix="Use an int w (the last w rounds) or a:b (rounds a … b−1).")
        a = 0 if a is None else a
        b = total if b is None else b
    else:
        try:
            w = int(spec)
        except (TypeError, ValueError):
            raise bad_value("window", spec, fix="Use an int w (the last w rounds) or a:b (rounds a … b−1).")
        a, b = total - w, total
    if not (0 <= a < b <= total):
        raise UserError(f"window={spec!r} selects rounds {a}..{b - 1}, which is empty or outside the run's "
                        f"rounds 0..{total - 1}; choose 1 ≤ window ≤ {total} or a:b with 0 ≤ a < b ≤ {total}")
    return a, b - a


SCORE_FIELDS = ["roc_auc", "average_precision", "tpr_at_1fpr", "tpr_at_5fpr", "delay", "delay_round"]


def resolve_scores(cfg, dyn: Dynamics, first: int, length: int, attackers: Sequence[int]
                   ) -> Tuple[List[str], List[str], int]:
    """The scores one ``dice detect`` pass computes (the primary ``score`` first), notes for the summary, and
    Krum's f. Krum asked for by name but undefined or out of its tolerance is a usage error; with
    ``scores=all`` an undefined Krum (too few in-neighbours) is left out with a note."""
    from .config import parse_scores

    asked = parse_scores(cfg.scores)
    named = (not (isinstance(cfg.scores, str) and cfg.scores.strip() == "all")) or cfg.score == "krum"
    wanted = list(dict.fromkeys([cfg.score] + asked))
    notes: List[str] = []
    f = 0
    if "krum" in wanted:
        f, tolerance, undefined = krum_bound(dyn, first, length, attackers, cfg.krum_f)
        if tolerance:
            raise UserError(tolerance)
        if undefined:
            if named or cfg.score == "krum":
                raise UserError(undefined)
            wanted.remove("krum")
            notes.append("krum left out of scores=all: " + undefined)
    return wanted, notes, f


@scoped
def run_detect(cfg, out, config_dict: dict):
    """``dice detect``: replay the window, score every edge, aggregate per sender, flag, evaluate, plot.

    Every per-round score uses only what a receiver has locally — its own probe gradient and the updates
    its in-neighbours send with their models — so a deployment could compute them online, round by round;
    the aggregation over the window (and its normalisation) is what this command adds on top.
    """
    import time
    from pathlib import Path

    from . import atomic, plots
    from .plots import topology_plot
    from .replay import open_replay
    from .rerun import already_complete
    from .run import RunDir, environment

    rp = open_replay(cfg.run, cfg.dtype, cfg.device)
    run, train_cfg, setup = rp.run, rp.cfg, rp.setup
    out = Path(out) if out else run.path / "detect"
    rd = RunDir(out, "detect")
    config_dict = {**config_dict, "run": str(run.path)}   # resolved: outputs/latest may move
    if already_complete("detect", out, config_dict, cfg.overwrite):
        return out
    mode = rd.check(config_dict, cfg.overwrite)
    first, length = parse_window(cfg.window, train_cfg.rounds)
    attack = run.manifest().get("attack") or {}
    anomalous = sorted(int(k) for k in attack.get("nodes", []))
    wanted, notes, krum_f = resolve_scores(cfg, setup.dyn, first, length, anomalous)
    rd.claim(config_dict, "fresh" if mode == "resume" else mode)
    rd.update_manifest(kind="detect", status="running", run=str(run.path), window=[first, first + length],
                       environment=environment(), started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    t0 = time.perf_counter()
    state = rp.state_at(first)
    pairs = proximal_scores(setup.dyn, state, length, *rp.probe, rp.q(cfg.q), scores=wanted, krum_f=krum_f,
                            progress=cfg.progress)
    score_seconds = time.perf_counter() - t0
    pair_table, senders = aggregate(pairs, cfg.normalize, cfg.aggregation, cfg.score)
    senders = flag(senders, cfg.k)
    if anomalous:
        summary = evaluate(senders, anomalous)
    else:
        senders["anomalous"] = False
        summary = {"roc_auc": None, "average_precision": None, "precision": None, "recall": None,
                   "anomalous": [], "flagged": [int(s) for s in senders.loc[senders.flagged, "sender"]],
                   "n_senders": int(len(senders)),
                   "note": "the run records no attack (manifest has no attack nodes): flags only, no ROC"}
    per_score, curves = (score_metrics(pairs, anomalous, wanted, cfg.normalize, cfg.aggregation)
                         if anomalous else ({sc: dict.fromkeys(SCORE_FIELDS) for sc in wanted}, {}))
    seconds = time.perf_counter() - t0
    pair_table["anomalous"] = pair_table["sender"].isin(anomalous)
    table = pd.DataFrame([{"score": sc, **v} for sc, v in per_score.items()])
    atomic.write_text(out / "scores.csv", table.to_csv(index=False, float_format="%.17g"))
    atomic.write_text(out / "pairs.csv", pair_table.to_csv(index=False, float_format="%.17g"))
    atomic.write_text(out / "senders.csv", senders.to_csv(index=False, float_format="%.17g"))
    atomic.write_text(out / "rounds.csv", pairs.to_csv(index=False, float_format="%.17g"))
    summary.update({"window": [first, first + length], "score": cfg.score, "normalize": cfg.normalize,
                    "aggregation": cfg.aggregation, "k": cfg.k, "attack": attack or None,
                    "scores": per_score, "krum_f": krum_f if "krum" in wanted else None,
                    "delay_definition": f"rounds of the window after which the cumulative score's ROC AUC is "
                                        f"≥ {DELAY_AUC} and stays so (delay_round: that round)",
                    "seconds": round(seconds, 3), "scoring_seconds": round(score_seconds, 3),
                    "local_only": "scores use only receiver-local quantities (own probe gradient, received updates)"})
    if notes:
        summary["note"] = "; ".join(([summary["note"]] if summary.get("note") else []) + notes)
    atomic.write_json(out / "summary.json", summary)
    if len(curves) > 1:
        plots.roc_overlay(curves, out / "roc.png",
                          title=f"ROC of every detector score (window {first}..{first + length - 1})")
    elif summary.get("roc_auc") is not None:
        fpr, tpr = roc_points(senders, anomalous)
        plots.roc_curve_plot(fpr, tpr, summary["roc_auc"], out / "roc.png",
                             title=f"senders by {cfg.score} (window {first}..{first + length - 1})")
    topology_plot(setup.schedule.at(first), out / "topology.png",
                  scores={int(s_): float(v) for s_, v in zip(senders.sender, senders.score)},
                  score_label=f"sender score ({cfg.score}, {cfg.normalize}-normalised)",
                  flagged=senders.loc[senders.flagged, "sender"].astype(int).tolist(), anomalous=anomalous,
                  anomalous_label="recorded attacker",
                  title=f"detection over rounds {first}..{first + length - 1}: node colour = sender score"
                        + (" (W of the window's first round)" if setup.schedule.time_varying else ""))
    plots.wait()                    # every figure is on disk before the result is marked complete
    rd.update_manifest(status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       timings={"seconds": round(seconds, 3), "rounds": length})
    auc = summary.get("roc_auc")
    print(f"dice detect: flagged {summary['flagged']} (anomalous {anomalous or 'none recorded'})"
          + (f"; ROC AUC {auc:.3f}, AP {summary['average_precision']:.3f}" if auc is not None else "")
          + f" -> {out}")
    return out
