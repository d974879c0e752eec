"""``dice contrib``: who gave value to whom (VALUE.md §5), and the Shapley baselines DICE is compared with (§6).

From a node-unit ``dice value`` table (any method; targets=all) of a run with n nodes:

    V[j, k] = −I(node j's data, k) = −q_k [L_k(θ_k^{T_e}) − L_k(θ_{k∖j}^{T_e})]     (positive: j's data helped k)
    given_j = Σ_{k≠j} V[j, k]     received_k = Σ_{j≠k} V[j, k]     self_k = V[k, k]
    reciprocity_j = given_j − received_j          ratio_j = given_j / received_j

with τ = ``free_rider_tol`` · mean_k |received_k| (the typical amount a node receives: the scale of the
matrix): ratio is left empty (NaN) where |received_j| ≤ τ; free_rider_j = received_j > τ and |given_j| ≤ τ;
harmful_j = given_j < −τ (below zero by more than τ, so roundoff around an exact 0 is neither). The Gini
coefficient of ``given`` and of ``received`` counts negative entries as 0 (a node that harmed others
contributed nothing; how many were clipped is reported).

Output (``<run>/contrib/`` or ``out=``): contributions.csv (``node, given, received, self, reciprocity, ratio,
free_rider, harmful``), matrix.csv (V as an n × n table: row j = source, column k = target), summary.json
(Gini, ranks, the run's attack record, thresholds), plots (values.png, flows.png, lorenz.png, graph.png).
With ``valuation=loo|shapley_exact|shapley_mc`` (``shapley``): shapley.csv (``node, value, stderr``: the
valuation's values; stderr 0 for loo and exact), comparison.csv (Spearman / Kendall / Pearson of every DICE
table of the run against LOO and the valuation, and the cost ratio), comparison.png, and in summary.json
``utility_all``, ``utility_empty``, ``coalitions``, ``seconds``.

The DICE node value compared with a valuation is d_j = Σ_{k∈K} V[j, k] (self included; K = the utility's
nodes), which is exactly −(the influence of j's data on the network loss Σ_{k∈K} q_k L_k): for a gt table and
``player=data``, d_j = U(N) − U(N∖{j}) = loo_j by definition (tested).

    dice value run=R && dice contrib run=R valuation=shapley_exact
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pandas as pd
from scipy import stats

from . import atomic, plots
from .config import ContribConfig
from .errors import UserError
from .influence.table import read_table, write_table
from .replay import Replay, open_replay
from .run import RunDir, environment, read_result
from .shapley import MAX_EXACT, CoalitionGame, exact_values, loo_values, mc_values

KIND = "contrib"
COLUMNS = ["node", "given", "received", "self", "reciprocity", "ratio", "free_rider", "harmful"]
SHAPLEY_COLUMNS = ["node", "value", "stderr"]
COMPARISON_COLUMNS = ["dice", "table", "reference", "player", "utility", "eval", "spearman", "kendall", "pearson",
                      "dice_attack_auc", "reference_attack_auc", "dice_seconds", "reference_seconds",
                      "reference_coalitions", "cost_ratio"]
DICE_ORDER = ["gt", "exact", "first_order", "cascade_sum"]


# ------------------------------------------------------------------------------------------ accounting
def node_matrix(table: pd.DataFrame, n: int) -> np.ndarray:
    """V [n, n] from a node-unit value table: V[j, k] = −Σ influence of source j on target k."""
    V = np.zeros((n, n))
    np.add.at(V, (table["source"].to_numpy(np.int64), table["target"].to_numpy(np.int64)),
              -table["influence"].to_numpy(np.float64))
    return V


def threshold(V: np.ndarray, tol: float) -> float:
    """τ = tol · mean_k |received_k| (0 for an all-zero matrix)."""
    off = V - np.diag(np.diag(V))
    return float(tol * np.abs(off.sum(0)).mean()) if V.size else 0.0


def accounting(V: np.ndarray, tol: float = 0.05) -> pd.DataFrame:
    """contributions.csv from V [n, n] (module docstring): one row per node."""
    V = np.asarray(V, dtype=np.float64)
    n = V.shape[0]
    selfv = np.diag(V).copy()
    off = V - np.diag(selfv)
    given, received = off.sum(1), off.sum(0)
    tau = threshold(V, tol)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(np.abs(received) > tau, given / np.where(received == 0, 1.0, received), np.nan)
    return pd.DataFrame({"node": np.arange(n), "given": given, "received": received, "self": selfv,
                         "reciprocity": given - received, "ratio": ratio,
                         "free_rider": (received > tau) & (np.abs(given) <= tau), "harmful": given < -tau})


def gini(x: np.ndarray) -> Optional[float]:
    """Gini coefficient of max(x, 0): G = Σ_i (2i − n − 1) x_(i) / (n Σ x) over the ascending x_(1..n); None
    when Σ max(x, 0) = 0."""
    v = np.sort(np.clip(np.asarray(x, dtype=np.float64), 0.0, None))
    n, total = len(v), float(np.sum(np.clip(x, 0.0, None)))
    if n == 0 or total <= 0:
        return None
    i = np.arange(1, n + 1)
    return float(np.sum((2 * i - n - 1) * v) / (n * total))


def lorenz(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Lorenz curve of max(x, 0): (share of nodes [n+1], share of the total held by the poorest [n+1])."""
    v = np.sort(np.clip(np.asarray(x, dtype=np.float64), 0.0, None))
    total = v.sum()
    L = np.concatenate([[0.0], np.cumsum(v) / total]) if total > 0 else np.linspace(0, 1, len(v) + 1)
    return np.linspace(0.0, 1.0, len(v) + 1), L


def ranks(x: np.ndarray) -> List[int]:
    """Rank of every node, 1 = the largest value (ties share the better rank)."""
    return [int(r) for r in stats.rankdata(-np.asarray(x, dtype=np.float64), method="min")]


def attack_auc(values: np.ndarray, attackers: List[int]) -> Optional[float]:
    """ROC AUC of 'low value' (−value) separating the recorded attackers from the other nodes (ties half)."""
    values = np.asarray(values, dtype=np.float64)
    bad = np.zeros(len(values), dtype=bool)
    bad[list(attackers)] = True
    if not bad.any() or bad.all():
        return None
    a, h = -values[bad], -values[~bad]
    return float(((a[:, None] > h[None, :]).sum() + 0.5 * (a[:, None] == h[None, :]).sum()) / (len(a) * len(h)))


# ------------------------------------------------------------------------------------------ inputs
def attack_record(rp: Replay) -> Optional[dict]:
    """The run manifest's attack record ({name, kind, nodes, rounds, ...}) or None."""
    rec = rp.run.manifest().get("attack") or None
    return rec if rec and rec.get("nodes") else None


def _same_run(cfg: dict, d: Path, run: Path) -> bool:
    rec = cfg.get("run")
    if rec is not None and Path(str(rec)).resolve() == run.resolve():
        return True
    return run.resolve() in d.resolve().parents        # moved or copied together with its run


def read_value(d: Path, rp: Replay, key: str = "value") -> Tuple[pd.DataFrame, dict, dict]:
    """A finished node-unit ``dice value`` table of this run covering every (source, target): (table, its
    config, its summary); UserError with the fix otherwise."""
    n, run = rp.n, rp.run.path
    if not (d / "influence.csv").exists() and not (d / "manifest.json").exists():
        raise UserError(f"{key}={str(d)!r} holds no dice value result. dice contrib accounts a node-unit value "
                        f"table: make one with `dice value run={run}` (exact by default; method=gt for the "
                        f"retrained ground truth), or point {key}= at one")
    cfg = read_result(d, "value", "influence.csv", key=key)
    if not _same_run(cfg, d, run):
        raise UserError(f"{key}={str(d)!r} was computed from run {cfg.get('run')!r}, not from run={str(run)!r}; "
                        f"point value= at a dice value result of this run, or run= at its run")
    unit, targets = cfg.get("unit", "node"), cfg.get("targets", "all")
    if unit != "node":
        raise UserError(f"{key}={str(d)!r} holds {unit} units, not node units: dice contrib accounts what each "
                        f"node's data did for every node (V[j, k] = −I(node j's data, k)). Make a node-unit table "
                        f"with `dice value run={run} unit=node` (any method) and point {key}= at it"
                        + ("; for participants use valuation=loo|shapley_exact|shapley_mc player=participant"
                           if unit == "participant" else ""))
    if targets != "all":
        raise UserError(f"{key}={str(d)!r} holds targets={targets} (one number per node for the network loss); "
                        f"the accounting needs every target k: `dice value run={run} unit=node targets=all`")
    table = read_table(d / "influence.csv")
    pairs = set(zip(table["source"].astype(int), table["target"].astype(int)))
    missing = n * n - len({(j, k) for j, k in pairs if 0 <= j < n and 0 <= k < n})
    if missing:
        srcs = sorted(set(table["source"].astype(int)))
        raise UserError(f"{key}={str(d)!r} covers {n * n - missing} of the {n} × {n} (source, target) pairs "
                        f"(sources {srcs[:12]}{' ...' if len(srcs) > 12 else ''}); accounting needs every node as "
                        f"a source: `dice value run={run} unit=node sources=all targets=all`")
    summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
    return table, cfg, summary


def dice_values(table: pd.DataFrame, cfg: dict, n: int, K: np.ndarray) -> Optional[np.ndarray]:
    """The DICE node value d_j = Σ_{k∈K} V[j, k] [n] of a value table (targets=network: −influence, only when K
    is every node); None when the table cannot give it."""
    if cfg.get("targets", "all") == "network":
        if not K.all():
            return None
        d = np.zeros(n)
        np.add.at(d, table["source"].to_numpy(np.int64), -table["influence"].to_numpy(np.float64))
        return d
    return node_matrix(table, n) @ K.astype(np.float64)


def find_dice_tables(rp: Replay, primary: Path, q: str) -> Tuple[List[dict], List[str]]:
    """Every finished whole-run value table of this run (its directory's children and the primary one) with
    node (or participant gt) units of every source and the primary's q: [{label, dir, table, cfg, seconds}],
    and notes on the ones left out."""
    run, T, n = rp.run.path, rp.rounds, rp.n
    cands = [primary] + sorted(p for p in run.iterdir() if p.is_dir() and p.resolve() != primary.resolve())
    found, notes, labels = [], [], set()
    for d in cands:
        try:
            m = json.loads((d / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        if m.get("kind") != "value":
            continue
        try:
            cfg = read_result(d, "value", "influence.csv", key="value")
        except UserError as e:
            notes.append(f"{d}: {e}")
            continue
        summ = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
        unit, method = cfg.get("unit"), cfg.get("method")
        why = None
        if unit not in ("node", "participant"):
            why = f"{unit} units"
        elif summ.get("window") != [0, T] or summ.get("horizon") != T:
            why = f"window {summ.get('window')} / horizon {summ.get('horizon')}, not the whole run [0, {T}] / {T}"
        elif cfg.get("q") != q:
            why = f"q={cfg.get('q')}, not q={q} of value="
        elif not _same_run(cfg, d, run):
            why = f"computed from another run ({cfg.get('run')})"
        if why:
            notes.append(f"{d}: left out of the comparison ({why})")
            continue
        table = read_table(d / "influence.csv")
        if set(table["source"].astype(int)) != set(range(n)):
            notes.append(f"{d}: left out of the comparison (not every node is a source)")
            continue
        label = method + ("_participant" if unit == "participant" else "")
        if method == "cascade_sum":
            label += f"_hops{cfg.get('hops', 1)}"
        if cfg.get("eval", "probe") != "probe":
            label += f"@{cfg['eval']}"
        if label in labels:
            label += f"@{d.name}"
        labels.add(label)
        found.append({"label": label, "dir": d, "table": table, "cfg": cfg,
                      "seconds": (summ.get("seconds") or {}).get("compute")})
    order = {m: i for i, m in enumerate(DICE_ORDER)}
    found.sort(key=lambda f: (order.get(f["cfg"].get("method"), len(order)), f["label"]))
    return found, notes


def comparison(dice: List[dict], refs: Dict[str, dict], n: int, K: np.ndarray, attackers: List[int],
               player: str, utility: str, eval_set: str) -> Tuple[pd.DataFrame, Dict[str, np.ndarray]]:
    """comparison.csv: one row per (DICE table, reference valuation) with rank agreement and cost; and the
    DICE node values used, {label: [n]}."""
    rows, used = [], {}
    for f in dice:
        d = dice_values(f["table"], f["cfg"], n, K)
        if d is None:
            continue
        used[f["label"]] = d
        for name, ref in refs.items():
            v = ref["values"]
            ok = np.std(d) > 0 and np.std(v) > 0
            rs = float(stats.spearmanr(d, v)[0]) if ok and n >= 3 else float("nan")
            kt = float(stats.kendalltau(d, v)[0]) if ok and n >= 3 else float("nan")
            pr = float(stats.pearsonr(d, v)[0]) if ok and n >= 3 else float("nan")
            ds, rsec = f["seconds"], ref["seconds"]
            rows.append({"dice": f["label"], "table": str(f["dir"]), "reference": name, "player": player,
                         "utility": utility, "eval": eval_set, "spearman": rs, "kendall": kt, "pearson": pr,
                         "dice_attack_auc": attack_auc(d, attackers), "reference_attack_auc": attack_auc(v, attackers),
                         "dice_seconds": ds, "reference_seconds": rsec, "reference_coalitions": ref["coalitions"],
                         "cost_ratio": (ds / rsec) if ds is not None and rsec else None})
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS), used


# ------------------------------------------------------------------------------------------ the command
def _valuation(cfg: ContribConfig, rp: Replay, honest: np.ndarray, q_kind: str, probe) -> Tuple[Dict[str, dict], dict]:
    """Run the chosen valuation (and LOO beside it) with the value table's node weights ``q_kind``, losses on
    ``probe``: ({"loo": ref, valuation: ref}, summary fields); a ref is {values, stderr, seconds, coalitions}."""
    n, T = rp.n, rp.rounds
    q = rp.q(q_kind)
    game = CoalitionGame(rp.dyn, rp.state_at(0), T, cfg.player, probe, q, rp.setup.plan, rp.setup.nodes.parts,
                         honest=honest if cfg.utility == "honest" else None, chunk=cfg.chunk,
                         progress=f"dice contrib {cfg.valuation}" if cfg.progress else None)
    extra: dict = {}
    if cfg.valuation == "loo":
        res = loo_values(game)
        loo = res["values"]
    elif cfg.valuation == "shapley_exact":
        res = exact_values(game)
        loo = res["loo"]
    else:
        res = mc_values(game, cfg.tolerance, cfg.budget, cfg.truncation, cfg.seed)
        extra.update(permutations=res["permutations"], stopped=res["stopped"], truncated=res["truncated"],
                     tolerance=cfg.tolerance, budget=cfg.budget, truncation=cfg.truncation)
    coalitions, seconds = game.trained, game.seconds
    per = seconds / max(coalitions, 1)
    if cfg.valuation == "shapley_mc":
        t_before, s_before = game.trained, game.seconds
        loo = loo_values(game)["values"]
        extra["loo_extra_coalitions"] = game.trained - t_before
        extra["loo_extra_seconds"] = round(game.seconds - s_before, 3)
    refs = {"loo": {"values": np.asarray(loo), "stderr": np.zeros(n), "coalitions": n + 2,
                    "seconds": (n + 2) * per if cfg.valuation != "loo" else seconds}}
    if cfg.valuation != "loo":
        refs[cfg.valuation] = {"values": np.asarray(res["values"]), "stderr": np.asarray(res["stderr"]),
                               "coalitions": coalitions, "seconds": seconds}
    span = res["utility_all"] - res["utility_empty"]
    extra.update(utility_all=res["utility_all"], utility_empty=res["utility_empty"], coalitions=coalitions,
                 seconds=round(seconds, 3), passes=game.passes, seconds_per_coalition=per,
                 efficiency={"sum_of_values": float(np.sum(res["values"])), "utility_all_minus_empty": span,
                             "gap": float(np.sum(res["values"]) - span)},
                 stderr_max=float(np.nanmax(res["stderr"])) if n else 0.0,
                 loo={"values": [float(v) for v in loo], "coalitions": n + 2,
                      "seconds": round(refs["loo"]["seconds"], 3),
                      "note": "U(all) − U(all∖j); its seconds are n + 2 coalitions at this command's per-coalition "
                              "time" if cfg.valuation != "loo" else "U(all) − U(all∖j)"})
    return refs, extra


def contrib(cfg: ContribConfig, out: Optional[Path], config_dict: dict) -> Path:
    """Run ``dice contrib`` and write its directory (module docstring); returns the directory."""
    t_begin = time.perf_counter()
    rp = open_replay(cfg.run, cfg.dtype, cfg.device)
    run, n = rp.run, rp.n
    if cfg.valuation == "shapley_exact" and n > MAX_EXACT:
        raise UserError(f"valuation=shapley_exact trains all 2^n coalitions, 2^{n} = {2 ** n:,} for this run's "
                        f"n={n} nodes; exact is offered for n <= {MAX_EXACT} ({2 ** MAX_EXACT} coalitions). Use "
                        f"valuation=shapley_mc (permutation sampling with truncation; tolerance=, budget=) or "
                        f"valuation=loo (n + 2 = {n + 2} coalitions)")
    if cfg.valuation == "shapley_mc" and cfg.budget < n + 1:
        raise UserError(f"budget={cfg.budget} is too small for valuation=shapley_mc on n={n} nodes: U(all), U(∅) "
                        f"and one permutation's {n - 1} nested coalitions need {n + 1} trainings. Use budget >= "
                        f"{n + 1} (the default 2000; a few hundred permutations cost about that many × {n - 1})")
    if cfg.valuation != "none" and cfg.player == "participant" and not rp.dyn.linear_gossip:
        raise UserError(f"player=participant retrains coalitions with the nodes outside them offline, which needs "
                        f"plain gossip (W^t Θ), but in this run {rp.dyn.nonlinear_reason()}. Use player=data (the "
                        f"coalition's data counts, every node stays in the network and aggregates as recorded)")
    attack = attack_record(rp)
    attackers = sorted(int(a) for a in (attack or {}).get("nodes", []))
    honest = np.ones(n, dtype=bool)
    honest[attackers] = False
    if cfg.valuation != "none" and cfg.utility == "honest" and not honest.any():
        raise UserError("utility=honest leaves no node: every node is in the run's attack record; use utility=all")
    probe = rp.evaluation(cfg.eval) if cfg.valuation != "none" else rp.probe
    vdir = Path(cfg.value) if cfg.value else run.path / "value"
    table, vcfg, vsum = read_value(vdir, rp)
    out = Path(out) if out else run.path / KIND
    identity = dict(config_dict)
    identity["run"] = str(run.path)
    identity["value"] = str(vdir.resolve())
    identity["value_sha256"] = (RunDir(vdir, "value").files().get("influence.csv") or {}).get("sha256")
    rd = RunDir(out, KIND)
    mode = rd.check(identity, cfg.overwrite)
    if mode == "complete":
        print(f"dice contrib: {out} is already complete with this config; nothing to do.")
        return out
    rd.claim(identity, "fresh" if mode == "resume" else mode)
    rd.update_manifest(kind=KIND, status="running", run=str(run.path), value=str(vdir), valuation=cfg.valuation,
                       player=cfg.player, environment=environment(), started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    V = node_matrix(table, n)
    contributions = accounting(V, cfg.free_rider_tol)
    tau = threshold(V, cfg.free_rider_tol)
    given, received = contributions["given"].to_numpy(), contributions["received"].to_numpy()
    summary: dict = {
        "value": str(vdir), "value_method": vcfg.get("method"), "q": vcfg.get("q", "one"),
        "window": vsum.get("window"), "horizon": vsum.get("horizon"), "nodes": n,
        "gini": {"given": gini(given), "received": gini(received),
                 "note": "Gini of max(x, 0): negative given/received count as 0"},
        "negatives_clipped": {"given": int((given < 0).sum()), "received": int((received < 0).sum())},
        "free_rider_threshold": {"tau": tau, "free_rider_tol": cfg.free_rider_tol,
                                 "rule": "free_rider: received > tau and |given| <= tau; harmful: given < -tau; "
                                         "ratio empty where |received| <= tau; tau = free_rider_tol · mean_k "
                                         "|received_k|"},
        "free_riders": [int(j) for j in contributions.node[contributions.free_rider]],
        "harmful": [int(j) for j in contributions.node[contributions.harmful]],
        "totals": {"given": float(given.sum()), "self": float(np.trace(V)), "all": float(V.sum())},
        "ranks": {"given": ranks(given), "received": ranks(received), "reciprocity": ranks(given - received)},
        "attack": attack,
    }
    if attackers:
        summary["attack_auc_low_given"] = attack_auc(given, attackers)
    refs: Dict[str, dict] = {}
    comp = None
    dice_used: Dict[str, np.ndarray] = {}
    if cfg.valuation != "none":
        refs, extra = _valuation(cfg, rp, honest, summary["q"], probe)
        summary.update(valuation=cfg.valuation, player=cfg.player, utility=cfg.utility, eval=cfg.eval, **extra)
        main = refs[cfg.valuation]
        summary["ranks"]["valuation"] = ranks(main["values"])
        if attackers:
            summary["attack_auc_low_valuation"] = attack_auc(main["values"], attackers)
        write_table(out / "shapley.csv", pd.DataFrame({"node": np.arange(n), "value": main["values"],
                                                       "stderr": main["stderr"]}))
        K = honest if cfg.utility == "honest" else np.ones(n, dtype=bool)
        tables, notes = find_dice_tables(rp, vdir, summary["q"])
        comp, dice_used = comparison(tables, refs, n, K, attackers, cfg.player, cfg.utility, cfg.eval)
        summary["comparison_notes"] = notes
        summary["comparison"] = comp.drop(columns=["table"]).to_dict(orient="records")
        write_table(out / "comparison.csv", comp)
    write_table(out / "contributions.csv", contributions[COLUMNS])
    write_table(out / "matrix.csv", pd.DataFrame(V, index=pd.Index(range(n), name="source"),
                                                 columns=[str(k) for k in range(n)]).reset_index())
    _plots(cfg, rp, out, contributions, refs, dice_used, comp, attackers)
    summary["seconds_total"] = round(time.perf_counter() - t_begin, 3)
    atomic.write_json(out / "summary.json", _jsonable(summary))
    rd.update_manifest(status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       timings={"total": summary["seconds_total"], "valuation": summary.get("seconds")})
    g = summary["gini"]
    msg = f"dice contrib: wrote {out / 'contributions.csv'} ({n} nodes; Gini of given {_fmt(g['given'])}"
    if summary["free_riders"] or summary["harmful"]:
        msg += f"; free riders {summary['free_riders']}, harmful {summary['harmful']}"
    msg += ")"
    if cfg.valuation != "none":
        msg += (f"; {cfg.valuation} ({cfg.player}): {summary['coalitions']} coalitions, {summary['seconds']:.2f} s")
        if comp is not None and len(comp):
            best = comp[comp.reference == cfg.valuation]
            if len(best):
                msg += "; Spearman vs DICE " + ", ".join(f"{r.dice} {r.spearman:.3f}" for r in best.itertuples())
    print(msg, file=sys.stdout)
    return out


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _jsonable(x):
    """NaN/inf -> None, numpy scalars -> Python (summary.json stays strict JSON)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    return x


def _plots(cfg: ContribConfig, rp: Replay, out: Path, contributions: pd.DataFrame, refs: Dict[str, dict],
           dice_used: Dict[str, np.ndarray], comp: Optional[pd.DataFrame], attackers: List[int]) -> None:
    given = contributions["given"].to_numpy()
    received = contributions["received"].to_numpy()
    series: Dict[str, Tuple[np.ndarray, Optional[np.ndarray]]] = {}
    for name in sorted(refs, key=lambda r: r != cfg.valuation):          # the valuation first (top panel)
        series[name] = (refs[name]["values"], refs[name]["stderr"])
    for label, d in dice_used.items():
        series[f"DICE {label}"] = (d, None)
    if not series:
        series["given (DICE)"] = (given, None)
    what = f"{cfg.valuation} ({cfg.player} players, utility over {cfg.utility} nodes, {cfg.eval} losses)"
    plots.contrib_values(series, out / "values.png", attackers=attackers,
                         title=("node values: " + what) if refs else "value each node's data gave the others")
    plots.contrib_flows(given, received, out / "flows.png", attackers=attackers,
                        free_riders=contributions.node[contributions.free_rider].tolist(),
                        title="value given vs received per node (V[j, k] = −influence of j's data on k)")
    lor = {"given": given, "received": received}
    if cfg.valuation in refs:
        lor[cfg.valuation] = refs[cfg.valuation]["values"]
    plots.lorenz_plot({k: (*lorenz(v), gini(v)) for k, v in lor.items()}, out / "lorenz.png", title="Lorenz curves of node value (negatives counted as 0)")
    panels = {"given (DICE)": given}
    if cfg.valuation in refs:
        panels[cfg.valuation] = refs[cfg.valuation]["values"]
    plots.value_graph(rp.setup.schedule.at(0), panels, out / "graph.png", attackers=attackers,
                      title="the graph, node size = |value| (blue: positive, red: negative)")
    if comp is not None and len(comp):
        plots.comparison_plot(comp, dice_used, {k: v["values"] for k, v in refs.items()}, out / "comparison.png",
                              title=f"DICE node values vs {', '.join(refs)} ({cfg.player} players)")
