"""Anomaly detection by proximal influence (spec §5).

Every receiver k can score each in-neighbour l from what it holds locally: its own probe gradient after
gossip and the update Δ_l^t that l sends with its model,

    P_t(l→k) = q_k W^t_kl ∇L_k(θ_k^{t+1})ᵀ Δ_l^t,        P(l→k) = Σ_t P_t(l→k)   over a window of rounds.

Positive = l's updates RAISE k's probe loss (suspicious); negative = they help. The paper's code scored the
raw dot product ⟨∇L_k(θ_k^t), g_l^t⟩ at the receiver's pre-gossip model, with g_l^t = −Δ_l^t / η^t (the
momentum-filtered, weight-decayed gradient when those are on); it is offered as the second score ``dot``.

Pipeline (the ``dice detect`` command wires it to a recorded run):

    pairs = proximal_scores(dyn, state, rounds, x_probe, y_probe, shared_probe, q)   # per round and edge
    pair_table, sender_table = aggregate(pairs, normalize="receiver", aggregation="mean")
    sender_table = flag(sender_table, k=3.0)
    metrics = evaluate(sender_table, anomalous=[2])                                 # ROC AUC, AP, precision

Self pairs (k == l) are never scored: a node does not judge itself. The window may be time-varying: only
the edges present in W^t (W^t_kl > 0) at round t contribute a row for that round.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .engine import Dynamics, State
from .errors import UserError, check_choice, check_range
from .lock import scoped

NORMALIZE = ["receiver", "none"]
AGGREGATION = ["mean", "median"]
SCORES = ["proximal_influence", "dot"]
SUSPICION_SIGN = {"proximal_influence": 1.0, "dot": -1.0}     # high suspicion = raises the receiver's loss
MAD_SCALE = 1.4826          # MAD · 1.4826 estimates the standard deviation of a normal distribution
PAIR_COLUMNS = ["round", "receiver", "sender", "weight", "proximal_influence", "dot"]


# --------------------------------------------------------------------------- per-round scores


def proximal_scores(dyn: Dynamics, state: State, rounds: int, x_probe: Tensor, y_probe: Tensor,
                    shared_probe: bool, q: Tensor) -> pd.DataFrame:
    """Proximal influence and the raw dot score of every edge l → k (W^t_kl > 0, k ≠ l) for rounds
    t = state.round .. state.round + rounds − 1, advancing the factual trajectory with ``dyn.round``.

    Returns a long table, one row per (round, edge): round, receiver (k), sender (l), weight (W^t_kl),
    proximal_influence (q_k W^t_kl ∇L_k(θ_k^{t+1})ᵀ Δ_l^t) and dot (⟨∇L_k(θ_k^t), −Δ_l^t / η^t⟩; NaN when
    η^t = 0). Cost per round: one training round and one probe backward for all n nodes, plus two
    [n, P] × [P, n] products; Θ^{t+1}'s probe gradient is reused as round t+1's pre-gossip gradient.
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

    eye = np.eye(n, dtype=bool)
    blocks: List[Dict[str, np.ndarray]] = []
    st = state.detached()
    g_pre = dyn.probe_grads(st, x_probe, y_probe, shared_probe)                       # ∇L_k(θ_k^t)
    for t in range(t0, t0 + rounds_i):
        with torch.no_grad():
            nxt, delta, _ = dyn.round(st)
        nxt = nxt.detached()
        delta = delta.detach()
        g_post = dyn.probe_grads(nxt, x_probe, y_probe, shared_probe)                 # ∇L_k(θ_k^{t+1})
        with torch.no_grad():
            post = (g_post @ delta.T).to("cpu", torch.float64).numpy()                  # [k, l] ∇L_kᵀ Δ_l
            pre = (g_pre @ delta.T).to("cpu", torch.float64).numpy()
        W = np.asarray(dyn.mixing.numpy(t), dtype=np.float64)
        lr = float(dyn.lr(t))
        recv, send = np.nonzero((W > 0) & ~eye)
        w = W[recv, send]
        blocks.append({
            "round": np.full(recv.shape, t, dtype=np.int64),
            "receiver": recv.astype(np.int64),
            "sender": send.astype(np.int64),
            "weight": w,
            "proximal_influence": qv[recv] * w * post[recv, send],
            "dot": (-pre[recv, send] / lr) if lr != 0 else np.full(recv.shape, np.nan),
        })
        st, g_pre = nxt, g_post
    cols = {c: np.concatenate([b[c] for b in blocks]) for c in PAIR_COLUMNS}
    return pd.DataFrame(cols, columns=PAIR_COLUMNS)


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

    pair_table (one row per receiver, sender): proximal_influence and dot summed over the window
    (P(l→k) = Σ_t P_t(l→k)), rounds (how many rounds the edge existed), normalized (what the sender score
    aggregates: the mean over rounds of the per-round robust z-score with normalize=receiver, the window
    sum of the suspicion with normalize=none) and rank (1 = most suspicious of that receiver's
    in-neighbours by the summed suspicion, descending; ties share the smallest rank). The suspicion is
    ``proximal_influence`` itself, or −``dot`` for score=dot: a positive dot means the sender's gradient
    agrees with the receiver's (its step lowers the receiver's loss), so a large dot is reassuring and a
    large negative dot suspicious. Either way a high sender score = suspicious.

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
    for c in SCORES:
        if c not in df.columns:
            df[c] = np.nan
    keys = ["receiver", "sender"]
    # suspicion: high = suspicious for both scores. A positive dot means the sender's gradient points
    # where the receiver's does (its step LOWERS the receiver's loss), so dot counts negated.
    df["_s"] = df[score].astype(np.float64) * SUSPICION_SIGN[score]
    if normalize == "receiver":
        df["_z"] = _receiver_normalized(df)
    g = df.groupby(keys, sort=True)
    pair_table = g[SCORES].sum(min_count=1).reset_index()
    pair_table["rounds"] = g.size().to_numpy()
    suspicion = pair_table[score].to_numpy(np.float64) * SUSPICION_SIGN[score]
    if normalize == "receiver":
        pair_table["normalized"] = g["_z"].mean().to_numpy()
    else:
        pair_table["normalized"] = suspicion
    pair_table["rank"] = (pd.Series(suspicion).groupby(pair_table["receiver"].to_numpy())
                          .rank(method="min", ascending=False).fillna(0).astype(np.int64).to_numpy())
    pair_table = pair_table[keys + SCORES + ["rounds", "normalized", "rank"]]

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
    from .run import RunDir, environment

    rp = open_replay(cfg.run, cfg.dtype, cfg.device)
    run, train_cfg, setup = rp.run, rp.cfg, rp.setup
    out = Path(out) if out else run.path / "detect"
    rd = RunDir(out, "detect")
    config_dict = {**config_dict, "run": str(run.path)}   # resolved: outputs/latest may move
    mode = rd.check(config_dict, cfg.overwrite)
    if mode == "complete":
        print(f"dice detect: {out} is already complete with this config; nothing to do.")
        return out
    first, length = parse_window(cfg.window, train_cfg.rounds)
    attack = run.manifest().get("attack") or {}
    anomalous = sorted(int(k) for k in attack.get("nodes", []))
    rd.claim(config_dict, "fresh" if mode == "resume" else mode)
    rd.update_manifest(kind="detect", status="running", run=str(run.path), window=[first, first + length],
                       environment=environment(), started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    t0 = time.perf_counter()
    state = rp.state_at(first)
    pairs = proximal_scores(setup.dyn, state, length, *rp.probe, rp.q(cfg.q))
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
    seconds = time.perf_counter() - t0
    pair_table["anomalous"] = pair_table["sender"].isin(anomalous)
    atomic.write_text(out / "pairs.csv", pair_table.to_csv(index=False, float_format="%.17g"))
    atomic.write_text(out / "senders.csv", senders.to_csv(index=False, float_format="%.17g"))
    atomic.write_text(out / "rounds.csv", pairs.to_csv(index=False, float_format="%.17g"))
    summary.update({"window": [first, first + length], "score": cfg.score, "normalize": cfg.normalize,
                    "aggregation": cfg.aggregation, "k": cfg.k, "attack": attack or None,
                    "seconds": round(seconds, 3),
                    "local_only": "scores use only receiver-local quantities (own probe gradient, received updates)"})
    atomic.write_json(out / "summary.json", summary)
    if summary.get("roc_auc") is not None:
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
    rd.update_manifest(status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       timings={"seconds": round(seconds, 3), "rounds": length})
    auc = summary.get("roc_auc")
    print(f"dice detect: flagged {summary['flagged']} (anomalous {anomalous or 'none recorded'})"
          + (f"; ROC AUC {auc:.3f}, AP {summary['average_precision']:.3f}" if auc is not None else "")
          + f" -> {out}")
    return out
