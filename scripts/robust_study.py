#!/usr/bin/env python
"""Byzantine robustness study (ROBUST.md §5, issue 13): the literature's attacks, its detectors, and defenses
that act on DICE, on digits.

Four studies, each written under ``outputs/robustness/<study>/`` (tables as CSV and Markdown, PNG figures, a
log of every equivalent CLI command). Training runs live in ``outputs/robustness/runs/<name>`` and are shared.

  detection  every attack × every detector score of ``dice detect`` (scores=all) on the three topologies,
             defense=none: ROC AUC, TPR at 5% FPR and detection delay, mean ± std over seeds; the issue's
             targets (proximal influence best or within 0.02 of the best score except on the attacks built to
             evade it, orthogonal and inflate; better than the simple scores on ALIE and IPM).
  defense    every defense × every attack (and no attack): honest nodes' final accuracy on the held-out test
             images (the probe set is part of the test set and the dice rules train their decisions on it,
             so it would flatter them) and on the probe set; the price of each defense (no attack) and its
             worst case over attacks; heatmaps of the worst case over Byzantine fraction × Dirichlet α.
  adaptive   the orthogonal attack against its strength: harm to honest nodes (defense=none and dice),
             proximal influence's AUC and delay, and when the dice defense has cut every attacker.
  select     dice_select (collaborators chosen by proximal influence) against choosing by model similarity
             and against static graphs: honest accuracy, the out-degree distribution (how many receivers keep
             each node) over time, and whether the choice collapses onto a few nodes.

Common setup: ``dice train dataset=digits model=mlp model.init=shared nodes=16 rounds=200 batch_size=16 lr=0.1
dtype=float64 partition=dirichlet partition.alpha=<α> topology=<ring|exponential|random_regular
topology.degree=6> attack=<name> attack.count=<f·16> defense=<name> seed=<s>`` (float64 so ``dice detect``'s
replay is bit-identical to training; a shared initial model because BALANCE rejects every independently
initialised neighbour). trimmed_mean's ``defense.b`` is set per run to the largest number of attacking
in-neighbours of an honest receiver (at least 1, the literature's known-f convention); a run where that leaves
nothing to average, or where the median cannot tolerate it, is reported as n/a (``dice train`` exits 2 there).

    .venv/bin/python scripts/robust_study.py                     # the reduced grid of docs/robustness.md
    .venv/bin/python scripts/robust_study.py --full              # the whole grid (3 seeds everywhere, ring too)
    .venv/bin/python scripts/robust_study.py --smoke --out /tmp/r  # every code path, tiny sizes
    .venv/bin/python scripts/robust_study.py --study detection --reuse --workers 2
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

import study_harness
from study_harness import Study, main_parser, parse, pyplot, run_studies, save_figure

# attack label -> dice train overrides. The literature's defaults and the strong variants of epfml's
# experiments (ALIE with z = 10) and of a large IPM step (ε = 10).
ATTACKS = {
    "label_flip": ["attack=label_flip"],
    "sign_flip": ["attack=sign_flip"],
    "alie": ["attack=alie"],
    "alie_z10": ["attack=alie", "attack.z=10.0"],
    "ipm": ["attack=ipm"],
    "ipm_e10": ["attack=ipm", "attack.epsilon=10.0"],
    "dissensus": ["attack=dissensus"],
    "orthogonal": ["attack=orthogonal", "attack.strength=1.0"],
    "inflate": ["attack=inflate"],
    "stealth": ["attack=stealth"],           # the project's own adaptive attack; the adaptive study's twin
}
EVADE = ["orthogonal", "inflate"]                 # built to evade proximal influence: outside the detection target
HEATMAP_ATTACKS = ["label_flip", "sign_flip", "alie_z10", "ipm_e10", "dissensus"]
DEFENSES = ["none", "clipped_gossip", "trimmed_mean", "median", "balance", "dice", "dice_select"]
SCORES = ["proximal_influence", "dot", "cosine", "distance", "loss", "krum", "norm"]
SIMPLE = ["cosine", "distance", "loss", "krum", "norm"]          # the literature's simple scores (dot: DICE's own)
TOPOLOGY = {"ring": ["topology=ring"], "exponential": ["topology=exponential"],
            "random_regular": ["topology=random_regular", "topology.degree=6"]}
STRENGTHS = [0.1, 0.3, 1.0, 3.0, 10.0]

save_table = functools.partial(study_harness.save_table, decimals=3, sci=False)


def pm(values) -> str:
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and np.isnan(x))], float)
    if v.size == 0:
        return "n/a"
    return f"{v.mean():.3f} ± {v.std():.3f}" if v.size > 1 else f"{v[0]:.3f}"


# --------------------------------------------------------------------------- one run (in a worker process)


def base_overrides(args, topology: str, attack: str, fraction: float, alpha: float, defense: str, seed: int,
                   extra: Sequence[str] = ()) -> List[str]:
    # attack.count, not attack.fraction: the attack presets set count, which takes precedence over fraction
    atk = (["attack=none"] if attack == "none" or fraction == 0 else
           [*ATTACKS[attack], f"attack.count={int(np.floor(fraction * args.nodes + 0.5))}"])
    return ["dataset=digits", "model=mlp", "model.init=shared", f"nodes={args.nodes}", f"rounds={args.rounds}",
            f"batch_size={args.batch}", f"lr={args.lr}", "dtype=float64", "device=cpu", "partition=dirichlet",
            f"partition.alpha={alpha}", *TOPOLOGY[topology], *atk, f"defense={defense}", f"seed={seed}",
            "record.every=50", "record.deltas=false", f"eval_every={args.eval_every}", *extra]


def attacked_in_neighbours(overrides: Sequence[str]) -> Optional[int]:
    """The largest number of attacking in-neighbours of an honest receiver in the run these overrides make
    (attackers chosen exactly as ``dice train`` chooses them); None without attackers."""
    from dice_cli.attacks import select_nodes
    from dice_cli.commands import plain_config  # noqa: F401  (registers the resolvers)
    from dice_cli.config import TrainConfig, to_dataclass
    from dice_cli.graph import build_schedule

    cfg = to_dataclass(study_harness.compose("train", [o for o in overrides if not o.startswith("defense")]),
                       TrainConfig)
    if cfg.attack.name == "none":
        return None
    bad = set(select_nodes(cfg.attack, cfg.nodes, cfg.seed if cfg.attack.seed is None else cfg.attack.seed))
    W = build_schedule(cfg.topology, cfg.nodes, cfg.seed).at(0)
    return max(sum(1 for l in np.flatnonzero(W[k] > 0) if l != k and l in bad) for k in range(cfg.nodes) if k not in bad)


def held_out_accuracy(run: Path) -> Dict[str, float]:
    """Honest (and attacker) nodes' final accuracy on the test images outside the probe set."""
    import torch

    from dice_cli.replay import open_replay

    rp = open_replay(run, "float64", "cpu")
    s = rp.setup
    final = rp.state_at(rp.rounds)
    mask = np.ones(len(s.data.y_test), dtype=bool)
    mask[np.asarray(s.nodes.probe).reshape(-1)] = False
    x = s.data.x_test[torch.as_tensor(mask)].to(dtype=s.dtype)
    y = s.data.y_test[torch.as_tensor(mask)]
    _, acc = s.dyn.probe_losses(final.theta, final.buffers, x, y, True)
    acc = acc.numpy()
    bad = set(s.attack.nodes) if s.attack is not None else set()
    honest = [k for k in range(rp.n) if k not in bad]
    out = {"heldout_acc": float(acc[honest].mean()), "heldout_samples": int(mask.sum())}
    if not np.isfinite(out["heldout_acc"]):
        out["heldout_acc"] = float(np.nanmean(np.where(np.isfinite(acc[honest]), acc[honest], 0.0)))
    return out


def do_run(spec: dict) -> dict:
    """Train one run (or reuse it), then measure it: returns the row of numbers the studies tabulate."""
    import torch

    torch.set_num_threads(1)
    from dice_cli.commands import plain_config
    from dice_cli.config import TrainConfig, to_dataclass
    from dice_cli.errors import UserError
    from dice_cli.training import DivergenceError, train

    run = Path(spec["run"])
    done = run / "study_row.json"
    if done.exists():
        cached = json.loads(done.read_text())
        # the same run serves several studies: trained once per invocation (or once with --reuse)
        if spec.get("reuse") or cached.get("session") == spec.get("session"):
            cached["run_dir"] = str(run)
            if spec.get("detect") and cached.get("status") == "ok" and cached.get("attackers") and \
                    "scores" not in cached:
                log = [f"$ dice detect run={run} scores=all"]
                cached.update(detect_scores(run, log))
                done.write_text(json.dumps({k: v for k, v in cached.items() if k != "log"}))
                return {**cached, "log": log}
            return cached
    row = {k: v for k, v in spec.items() if k not in ("run", "overrides", "reuse", "detect")}
    row["run_dir"] = str(run)
    overrides = list(spec["overrides"])
    log = [f"$ dice train {' '.join(overrides)} out={run}"]
    if spec.get("defense") == "trimmed_mean":
        f = attacked_in_neighbours(overrides)
        overrides.append(f"defense.b={max(1, f or 0)}")
        log[0] = f"$ dice train {' '.join(overrides)} out={run}"
    t0 = time.perf_counter()
    try:
        cfg = study_harness.compose("train", [*overrides, f"out={run}", "progress=false", "overwrite=true"])
        typed = to_dataclass(cfg, TrainConfig)
        with contextlib.redirect_stdout(io.StringIO()) as buf:
            train(typed, run, {**plain_config(cfg), "out": str(run)})
        log.append(buf.getvalue().strip())
    except DivergenceError as e:      # honest nodes' models went non-finite: they are at chance level
        row.update(status="ok", diverged=True, reason=str(e), heldout_acc=0.1, probe_acc=0.1, attackers=[],
                   curve={})
        log.append(f"[exit 2: diverged] {e}")
        done.write_text(json.dumps({**row, "log": log}))
        return {**row, "log": log}
    except UserError as e:
        row.update(status="n/a", reason=str(e))
        log.append(f"[exit 2] {e}")
        return {**row, "log": log}
    row["train_s"] = time.perf_counter() - t0
    m = json.loads((run / "manifest.json").read_text())
    final = m["final"]
    row["probe_acc"] = final.get("honest", final)["probe_acc"]
    row["probe_acc_all"] = final["probe_acc"]
    row.update(held_out_accuracy(run))
    row["attackers"] = (m.get("attack") or {}).get("nodes", [])
    row["status"], row["diverged"] = "ok", False
    metrics = pd.read_csv(run / "metrics.csv")
    row["curve"] = (metrics[~metrics.attacker].groupby("round").probe_acc.mean().round(5).to_dict())
    if spec.get("defense") in ("dice", "dice_select"):
        rows = []
        for t, g in metrics.groupby("round"):
            od = g.set_index("node").out_degree
            honest = od.drop(row["attackers"], errors="ignore")
            bad = od.reindex(row["attackers"]).to_numpy() if row["attackers"] else np.zeros(0)
            rows.append({"round": int(t), "out_max": int(od.max()), "out_gini": gini(od.to_numpy()),
                         "honest_out_zero": int((honest == 0).sum()), "attacker_out": float(bad.sum())})
        row["degrees"] = rows
        row["final_out_degree"] = metrics[metrics["round"] == metrics["round"].max()].out_degree.tolist()
    if spec.get("detect") and row["attackers"]:
        log.append(f"$ dice detect run={run} scores=all")
        row.update(detect_scores(run, log))
    done.write_text(json.dumps(row))
    row["log"] = log
    return row


def detect_scores(run: Path, log: List[str]) -> dict:
    """``dice detect run=RUN scores=all`` in-process: every score's metrics from its summary.json."""
    from dice_cli.commands import plain_config
    from dice_cli.config import DetectConfig, to_dataclass
    from dice_cli.detect import run_detect

    dcfg = study_harness.compose("detect", [f"run={run}", "scores=all", "progress=false", "overwrite=true"])
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        run_detect(to_dataclass(dcfg, DetectConfig), None, plain_config(dcfg))
    log.append(buf.getvalue().strip())
    s = json.loads((run / "detect" / "summary.json").read_text())
    return {"scores": s["scores"], "detect_note": s.get("note", "")}


def gini(x) -> float:
    x = np.sort(np.asarray(x, dtype=float))
    if x.sum() == 0:
        return 0.0
    n = len(x)
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * x.sum()))


def run_all(study: Study, args, specs: List[dict]) -> List[dict]:
    """Every spec through ``do_run`` in ``args.workers`` processes; commands and outputs go to log.txt."""
    for s in specs:
        s["reuse"], s["session"] = args.reuse, args.session
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        rows = list(pool.map(do_run, specs))
    for r in rows:
        for line in r.pop("log", []):
            if line:
                study.log(line)
    return rows


def spec(args, name: str, topology: str, attack: str, fraction: float, alpha: float, defense: str, seed: int,
         detect: bool = False, extra: Sequence[str] = (), **labels) -> dict:
    run = Path(args.out) / "runs" / name
    return {"run": str(run), "overrides": base_overrides(args, topology, attack, fraction, alpha, defense, seed, extra),
            "topology": topology, "attack": attack, "fraction": fraction, "alpha": alpha, "defense": defense,
            "seed": seed, "detect": detect, **labels}


# --------------------------------------------------------------------------- studies


def study_detection(args, root: Path) -> dict:
    st = Study(root, "detection")
    specs = [spec(args, f"{topo}/a{args.fraction}/alpha1/{atk}/none/s{seed}", topo, atk, args.fraction, 1.0, "none",
                  seed, detect=True)
             for topo in args.topologies for atk in args.attacks for seed in args.seeds]
    every = run_all(st, args, specs)
    rows = [r for r in every if r.get("status") == "ok" and "scores" in r]
    lost = [r for r in every if r not in rows]
    if lost:
        save_table(st, pd.DataFrame([{k: r.get(k) for k in ("topology", "attack", "seed", "reason")} for r in lost]),
                   "runs without detection scores (training diverged or was refused)", name="unscored")
    long = []
    for r in rows:
        for sc, v in r["scores"].items():
            long.append({"topology": r["topology"], "attack": r["attack"], "seed": r["seed"], "score": sc, **v})
    df = pd.DataFrame(long)
    df.to_csv(st.dir / "scores_long.csv", index=False)
    table = []
    for (topo, atk), g in df.groupby(["topology", "attack"], sort=False):
        row = {"topology": topo, "attack": atk}
        for sc in SCORES:
            gs = g[g.score == sc]
            row[sc] = pm(gs.roc_auc) if len(gs) else "n/a"
        table.append(row)
    save_table(st, pd.DataFrame(table), "ROC AUC of every score (mean ± std over seeds), defense=none",
               name="auc")
    for metric, title in [("tpr_at_5fpr", "TPR at 5% FPR"), ("delay", "detection delay (rounds until the cumulative "
                                                                         "AUC stays ≥ 0.95; n/a = never)")]:
        t = []
        for (topo, atk), g in df.groupby(["topology", "attack"], sort=False):
            row = {"topology": topo, "attack": atk}
            for sc in SCORES:
                gs = g[g.score == sc]
                row[sc] = pm(gs[metric]) if len(gs) else "n/a"
                have = int(gs[metric].notna().sum())
                if metric == "delay" and 0 < have < len(gs):        # the seeds whose AUC reaches 0.95
                    row[sc] += f" ({have}/{len(gs)})"
            t.append(row)
        save_table(st, pd.DataFrame(t), f"{title} (mean ± std over seeds)", name=metric)
    # the targets, per (topology, attack), on mean AUC
    tgt = []
    for (topo, atk), g in df.groupby(["topology", "attack"], sort=False):
        mean = g.groupby("score").roc_auc.mean()
        others = mean.drop("proximal_influence")
        best, pi = others.max(), mean.get("proximal_influence", np.nan)
        row = {"topology": topo, "attack": atk, "proximal_influence": pi, "best_other": best,
               "best_other_score": others.idxmax(),
               "within_0.02": "built to evade" if atk in EVADE else ("met" if pi >= best - 0.02 else "MISSED")}
        if atk in ("alie", "ipm", "alie_z10", "ipm_e10"):
            # beats the literature's simple scores: strictly above each, or tied with it at AUC 1
            simple = mean.reindex(SIMPLE).dropna()
            lose = simple[(simple >= pi) & ~((simple == 1.0) & (pi == 1.0))]
            row["beats_simple"] = "met" if lose.empty else "MISSED (" + ", ".join(lose.index) + ")"
            d = mean.get("dot", np.nan)
            row["vs_dot"] = "better" if pi > d else "tied" if pi == d else f"worse by {d - pi:.3f}"
        else:
            row["beats_simple"] = row["vs_dot"] = "-"
        tgt.append(row)
    save_table(st, pd.DataFrame(tgt), "detection targets: proximal influence against the best other score (mean AUC)",
               name="targets")
    plot_detection(st, df)
    return st.finish(runs=len(rows))


def plot_detection(st: Study, df: pd.DataFrame) -> None:
    plt = pyplot()
    topos = list(dict.fromkeys(df.topology))
    attacks = list(dict.fromkeys(df.attack))
    fig, axes = plt.subplots(len(topos), 1, figsize=(13, 3.2 * len(topos) + 0.6), squeeze=False)
    width = 0.8 / len(SCORES)
    colors = plt.get_cmap("tab10").colors
    for ax, topo in zip(axes[:, 0], topos):
        g = df[df.topology == topo].groupby(["attack", "score"]).roc_auc.mean()
        for i, sc in enumerate(SCORES):
            vals = np.array([g.get((a, sc), np.nan) for a in attacks], dtype=float)
            xs = np.arange(len(attacks)) + (i - len(SCORES) / 2 + 0.5) * width
            ax.bar(xs, np.nan_to_num(vals), width, color=colors[i], label=sc if ax is axes[0, 0] else None)
            for x, v in zip(xs, vals):
                if np.isnan(v):
                    ax.text(x, 0.02, "n/a", rotation=90, fontsize=6, ha="center", va="bottom")
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xticks(np.arange(len(attacks)))
        ax.set_xticklabels(attacks, fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("ROC AUC (mean over seeds)")
        ax.set_title(f"{topo}: detector scores by attack (dice detect scores=all, defense=none; n/a: Krum undefined)",
                     fontsize=10)
    axes[-1, 0].set_xlabel("attack")
    fig.legend(loc="upper center", ncol=len(SCORES), fontsize=8, title="score")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.7 / (3.2 * len(topos) + 0.6)))
    fig.savefig(st.dir / "auc.png", dpi=110)
    plt.close(fig)


def study_defense(args, root: Path) -> dict:
    st = Study(root, "defense")
    specs = []
    for topo in args.defense_topologies:
        for d in DEFENSES:
            for seed in args.seeds:
                specs.append(spec(args, f"{topo}/a0/alpha1/none/{d}/s{seed}", topo, "none", 0.0, 1.0, d, seed))
                for atk in args.attacks:
                    specs.append(spec(args, f"{topo}/a{args.fraction}/alpha1/{atk}/{d}/s{seed}", topo, atk,
                                      args.fraction, 1.0, d, seed))
    for d in DEFENSES:                                            # heatmaps: fraction × α, worst case over attacks
        for alpha in args.alphas:
            for seed in args.heatmap_seeds:
                specs.append(spec(args, f"exponential/a0/alpha{alpha}/none/{d}/s{seed}", "exponential", "none", 0.0,
                                  alpha, d, seed, grid="heatmap"))
                for frac in [f for f in args.fractions if f > 0]:
                    for atk in HEATMAP_ATTACKS:
                        specs.append(spec(args, f"exponential/a{frac}/alpha{alpha}/{atk}/{d}/s{seed}", "exponential",
                                          atk, frac, alpha, d, seed, grid="heatmap"))
    uniq = {s["run"]: s for s in specs}
    rows = run_all(st, args, list(uniq.values()))
    df = pd.DataFrame([{k: v for k, v in r.items() if k not in ("curve", "degrees", "final_out_degree", "scores")}
                       for r in rows])
    df.to_csv(st.dir / "runs.csv", index=False)
    ok = df[df.status == "ok"]
    main = ok[(ok.alpha == 1.0) & ok.fraction.isin([0.0, args.fraction])]
    tables = []
    for topo in args.defense_topologies:
        t = main[main.topology == topo]
        clean = t[t.attack == "none"].groupby("defense").heldout_acc.mean()
        out = []
        for d in DEFENSES:
            g = t[t.defense == d]
            row = {"topology": topo, "defense": d, "no_attack": pm(g[g.attack == "none"].heldout_acc),
                   "price": clean.get(d, np.nan) - clean.get("none", np.nan)}
            worst, worst_name = np.inf, "-"
            for atk in args.attacks:
                ga = g[g.attack == atk]
                if len(ga) == 0 or len(ga) < len(args.seeds):
                    row[atk] = "n/a" if len(ga) == 0 else pm(ga.heldout_acc) + "*"
                    if len(ga) == 0:
                        continue
                row[atk] = pm(ga.heldout_acc)
                if ga.heldout_acc.mean() < worst:
                    worst, worst_name = ga.heldout_acc.mean(), atk
            row["worst_case"] = worst if np.isfinite(worst) else np.nan
            row["worst_attack"] = worst_name
            out.append(row)
        tab = pd.DataFrame(out)
        tables.append(tab)
        save_table(st, tab, f"{topo}: honest nodes' held-out accuracy by defense and attack (α=1, attack.fraction="
                            f"{args.fraction}; mean ± std over seeds; price = no-attack accuracy − defense=none's)",
                   name=f"accuracy_{topo}")
        probe = []
        for d in DEFENSES:
            g = t[t.defense == d]
            row = {"topology": topo, "defense": d, "no_attack": pm(g[g.attack == "none"].probe_acc)}
            for atk in args.attacks:
                row[atk] = pm(g[g.attack == atk].probe_acc)
            probe.append(row)
        save_table(st, pd.DataFrame(probe), f"{topo}: honest nodes' probe-set accuracy (the spec's metric; the dice "
                                            f"rules decide on this set)", name=f"probe_accuracy_{topo}")
    div = df[df.get("diverged", False) == True]  # noqa: E712
    if len(div):
        save_table(st, div[["topology", "attack", "fraction", "alpha", "defense", "seed", "reason"]],
                   "runs whose honest nodes diverged (counted at chance accuracy 0.1)", name="diverged")
    na = df[df.status != "ok"]
    if len(na):
        save_table(st, na[["topology", "attack", "fraction", "alpha", "defense", "seed", "reason"]],
                   "runs refused by a defense's tolerance bound (exit 2): n/a in the tables", name="refused")
    heat = ok[ok["grid"] == "heatmap"] if "grid" in ok.columns else ok.iloc[:0]
    plot_heatmaps(st, args, heat, df)
    return st.finish(runs=len(rows))


def plot_heatmaps(st: Study, args, heat: pd.DataFrame, df: pd.DataFrame) -> None:
    """Worst case over HEATMAP_ATTACKS of honest held-out accuracy, fraction × α, one panel per defense."""
    plt = pyplot()
    fracs, alphas = sorted(set(args.fractions)), sorted(args.alphas)
    fig, axes = plt.subplots(1, len(DEFENSES), figsize=(2.5 * len(DEFENSES) + 1.5, 3.6), squeeze=False,
                             sharey=True)
    cells = []
    for ax, d in zip(axes[0], DEFENSES):
        M = np.full((len(fracs), len(alphas)), np.nan)
        for i, f in enumerate(fracs):
            for j, a in enumerate(alphas):
                g = heat[(heat.defense == d) & (heat.alpha == a) & (heat.fraction == f)]
                refused = df[(df.defense == d) & (df.alpha == a) & (df.fraction == f) & (df.status != "ok")]
                if f == 0:
                    M[i, j] = g.heldout_acc.mean() if len(g) else np.nan
                elif len(g) and not len(refused):
                    M[i, j] = g.groupby("attack").heldout_acc.mean().min()
                cells.append({"defense": d, "fraction": f, "alpha": a, "worst_case_heldout_acc": M[i, j],
                              "refused_runs": len(refused)})
        im = ax.imshow(M, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        for i in range(len(fracs)):
            for j in range(len(alphas)):
                ax.text(j, i, "n/a" if np.isnan(M[i, j]) else f"{M[i, j]:.2f}", ha="center", va="center",
                        fontsize=7, color="white" if not np.isnan(M[i, j]) and M[i, j] < 0.6 else "black")
        ax.set_xticks(range(len(alphas)))
        ax.set_xticklabels([str(a) for a in alphas])
        ax.set_yticks(range(len(fracs)))
        ax.set_yticklabels([f"{f:.3g}" for f in fracs])
        ax.set_title(d, fontsize=9)
    axes[0, 0].set_ylabel("Byzantine fraction")
    fig.supxlabel("Dirichlet α of the partition (small = heterogeneous)", fontsize=9)
    fig.suptitle("worst case over attacks (" + ", ".join(HEATMAP_ATTACKS) + ") of honest nodes' held-out accuracy; "
                 "exponential graph, 16 nodes; n/a: the rule's bound refuses the run", fontsize=9)
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="accuracy")
    fig.savefig(st.dir / "heatmaps.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    save_table(st, pd.DataFrame(cells), "heatmap cells: worst case over attacks (n/a: a tolerance bound refused some "
                                        "run)", name="heatmaps")


def study_adaptive(args, root: Path) -> dict:
    st = Study(root, "adaptive")
    specs = []
    for seed in args.seeds:
        for d in ("none", "dice"):
            specs.append(spec(args, f"adaptive/clean/{d}/s{seed}", "exponential", "none", 0.0, 1.0, d, seed,
                              extra=["eval_every=1"]))
            for s_ in args.strengths:
                for atk in ("orthogonal", "stealth"):
                    specs.append(spec(args, f"adaptive/{atk}{s_}/{d}/s{seed}", "exponential", atk, args.fraction,
                                      1.0, d, seed, detect=(d == "none"),
                                      extra=[f"attack.strength={s_}", "eval_every=1"], strength=s_))
    rows = run_all(st, args, specs)
    ok = [r for r in rows if r.get("status") == "ok"]
    clean = {(r["defense"], r["seed"]): r for r in ok if r["attack"] == "none"}
    out = []
    for r in ok:
        if r["attack"] == "none":
            continue
        c = clean[(r["defense"], r["seed"])]
        row = {"attack": r["attack"], "strength": r["strength"], "defense": r["defense"], "seed": r["seed"],
               "heldout_acc": r["heldout_acc"], "harm": c["heldout_acc"] - r["heldout_acc"]}
        ca = {int(k): v for k, v in c["curve"].items()}
        ra = {int(k): v for k, v in r["curve"].items()}
        if r["defense"] == "dice":
            hist = honest_cut_history(Path(r["run_dir"]))
            row["cut_fraction_end"] = float(hist.cut.iloc[-1] / max(hist.edges.iloc[-1], 1))
            stays = [t for t in hist["round"] if (hist[hist["round"] >= t].weight == 0).all()]
            row["cut_round"] = stays[0] if stays else np.nan
            t = row["cut_round"]
            before = [ca[k] - ra[k] for k in ra if k in ca and (not np.isfinite(t) or k <= t)]
            row["harm_before_cut"] = max(before) if (before and np.isfinite(t)) else np.nan
        else:
            sc = r.get("scores", {}).get("proximal_influence", {})
            row["pi_auc"], row["pi_delay"] = sc.get("roc_auc"), sc.get("delay")
            t = sc.get("delay_round")
            row["harm_at_pi_delay"] = (max(ca[k] - ra[k] for k in ra if k in ca and k <= t)
                                       if t is not None else np.nan)
            row["dot_auc"] = r.get("scores", {}).get("dot", {}).get("roc_auc")
            row["loss_auc"] = r.get("scores", {}).get("loss", {}).get("roc_auc")
        out.append(row)
    df = pd.DataFrame(out)
    df.to_csv(st.dir / "runs.csv", index=False)
    summ = []
    for (atk, s_), g in df.groupby(["attack", "strength"]):
        n, d = g[g.defense == "none"], g[g.defense == "dice"]
        summ.append({"attack": atk, "strength": s_, "harm_none": pm(n.harm), "pi_auc": pm(n.pi_auc),
                     "pi_delay": pm(n.pi_delay) + (f" ({int(n.pi_delay.notna().sum())}/{len(n)})"
                                                   if 0 < n.pi_delay.notna().sum() < len(n) else ""),
                     "harm_at_pi_delay": pm(n.harm_at_pi_delay), "loss_auc": pm(n.loss_auc),
                     "harm_dice": pm(d.harm), "cut_at_end": pm(d.cut_fraction_end),
                     "dice_cut_round": pm(d.cut_round) + (f" ({int(d.cut_round.notna().sum())}/{len(d)})"
                                                          if 0 < d.cut_round.notna().sum() < len(d) else ""),
                     "harm_before_cut": pm(d.harm_before_cut)})
    summ = pd.DataFrame(summ)
    save_table(st, summ, "adaptive attack (orthogonal) and its non-orthogonal twin (stealth) against strength: harm = "
                         "clean − attacked honest held-out accuracy at the end; pi_* = proximal influence's "
                         "detection (defense=none) and harm_at_pi_delay the largest probe-accuracy gap to the clean "
                         "run until its delay round; with defense=dice: cut_at_end = share of honest→attacker "
                         "edges cut, dice_cut_round = first round after which all of them stay cut, "
                         "harm_before_cut = the largest probe-accuracy gap until then",
               name="results")
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for atk, style in (("orthogonal", "-o"), ("stealth", "--s")):
        g = df[df.attack == atk].groupby(["strength", "defense"])
        harm = g.harm.mean().unstack()
        for d in harm.columns:
            axes[0].plot(harm.index, harm[d], style, label=f"{atk}, defense={d}")
        auc = df[(df.attack == atk) & (df.defense == "none")].groupby("strength").pi_auc.mean()
        axes[1].plot(auc.index, auc.values, style, label=atk)
        cut = df[(df.attack == atk) & (df.defense == "dice")].groupby("strength").cut_round.mean()
        axes[2].plot(cut.index, cut.values, style, label=atk)
    for ax, yl, title in zip(axes, ["honest accuracy lost (held-out)", "proximal influence ROC AUC",
                                    "round after which all attackers stay cut"],
                             ["harm vs strength", "detection by proximal influence", "when the dice defense cuts"]):
        ax.set_xscale("log")
        ax.set_xlabel("attack.strength")
        ax.set_ylabel(yl)
        ax.set_title(title)
        ax.legend(fontsize=7)
    save_figure(fig, st.dir / "adaptive.png")
    return st.finish(runs=len(rows))


def honest_cut_history(run: Path) -> pd.DataFrame:
    """Per round of a dice-defended run (float64 replay from round 0): the weight honest receivers give
    attackers (sum over honest→attacker edges of W'), the number of those edges and how many are cut."""
    from dice_cli.replay import open_replay

    rp = open_replay(run, "float64", "cpu")
    bad = rp.setup.attack.nodes
    honest = [k for k in range(rp.n) if k not in bad]
    st, rows = rp.state_at(0), []
    for t in range(rp.rounds):
        st, _, _ = rp.dyn.round(st)
        W = rp.dyn.mixing.numpy(t)[np.ix_(honest, bad)] > 0
        mix = st.gossip["mix"].numpy()[np.ix_(honest, bad)]
        rows.append({"round": t, "weight": float(mix[W].sum()), "edges": int(W.sum()),
                     "cut": int((mix[W] == 0).sum())})
    return pd.DataFrame(rows)


def study_select(args, root: Path) -> dict:
    st = Study(root, "select")
    specs = []
    for alpha in args.select_alphas:
        for seed in args.seeds:
            for how in ("influence", "similarity"):
                specs.append(spec(args, f"select/alpha{alpha}/{how}/s{seed}", "exponential", "label_flip",
                                  args.fraction, alpha, "dice_select", seed,
                                  extra=["topology=complete", f"defense.select_by={how}", f"defense.keep={args.keep}"],
                                  selector=how))
            specs.append(spec(args, f"select/alpha{alpha}/static/s{seed}", "exponential", "label_flip", args.fraction,
                              alpha, "none", seed, extra=["topology=random_regular", f"topology.degree={args.keep}"],
                              selector=f"static random_regular degree {args.keep}"))
            specs.append(spec(args, f"select/alpha{alpha}/complete/s{seed}", "exponential", "label_flip",
                              args.fraction, alpha, "none", seed, extra=["topology=complete"],
                              selector="static complete graph"))
    for s in specs:                     # the topology comes from `extra` (its last topology= wins)
        s["topology"] = [o for o in s["overrides"] if o.startswith("topology=")][-1].split("=", 1)[1]
    rows = run_all(st, args, specs)
    ok = [r for r in rows if r.get("status") == "ok"]
    out, series = [], []
    for r in ok:
        row = {"alpha": r["alpha"], "selector": r["selector"], "seed": r["seed"], "heldout_acc": r["heldout_acc"],
               "probe_acc": r["probe_acc"]}
        if r.get("degrees"):
            deg = pd.DataFrame(r["degrees"])
            last = deg.iloc[-1]
            fod = np.asarray(r["final_out_degree"])
            honest = [k for k in range(len(fod)) if k not in r["attackers"]]
            import torch

            T = int(deg["round"].max()) + 1
            kept = torch.load(Path(r["run_dir"]) / "checkpoints" / f"round_{T:06d}.pt",
                              weights_only=True)["gossip"]["kept"].numpy()
            row.update(final_out_max=int(last.out_max), final_out_gini=float(last.out_gini),
                       honest_never_chosen=int(last.honest_out_zero),
                       attacker_links=int(kept[np.ix_(honest, r["attackers"])].sum()),
                       honest_out_degrees=" ".join(str(int(v)) for v in sorted(fod[honest], reverse=True)))
            for _, d in deg.iterrows():
                series.append({"alpha": r["alpha"], "selector": r["selector"], "seed": r["seed"], **d.to_dict()})
        out.append(row)
    df = pd.DataFrame(out)
    df.to_csv(st.dir / "runs.csv", index=False)
    pd.DataFrame(series).to_csv(st.dir / "out_degree_over_time.csv", index=False)
    summ = []
    for (alpha, sel), g in df.groupby(["alpha", "selector"], sort=False):
        row = {"alpha": alpha, "selector": sel, "heldout_acc": pm(g.heldout_acc)}
        if "final_out_max" in g and g.final_out_max.notna().any():
            row.update(final_out_max=pm(g.final_out_max), final_out_gini=pm(g.final_out_gini),
                       honest_never_chosen=pm(g.honest_never_chosen), attacker_links=pm(g.attacker_links))
        summ.append(row)
    save_table(st, pd.DataFrame(summ), f"collaborator choice among all 15 others (keep {args.keep}, every 10 rounds), "
                                       f"label_flip attackers: honest held-out accuracy and out-degrees at the end "
                                       f"(how many receivers keep a node; a uniform choice gives {args.keep} each; "
                                       f"attacker_links: honest receivers' kept slots that hold an attacker)",
               name="results")
    plot_select(st, pd.DataFrame(series), df)
    return st.finish(runs=len(rows))


def plot_select(st: Study, series: pd.DataFrame, df: pd.DataFrame) -> None:
    plt = pyplot()
    if series.empty:
        return
    alphas = sorted(series.alpha.unique())
    fig, axes = plt.subplots(2, len(alphas), figsize=(6 * len(alphas), 6.4), squeeze=False)
    for j, a in enumerate(alphas):
        for sel, g in series[series.alpha == a].groupby("selector"):
            m = g.groupby("round")[["out_max", "out_gini"]].mean()
            axes[0, j].plot(m.index, m.out_max, label=f"select_by={sel}")
            axes[1, j].plot(m.index, m.out_gini, label=f"select_by={sel}")
        axes[0, j].set_title(f"α={a}: most receivers keeping one node")
        axes[0, j].set_ylabel("max out-degree (mean over seeds)")
        axes[1, j].set_title(f"α={a}: inequality of the out-degrees")
        axes[1, j].set_ylabel("Gini of out-degrees")
        for ax in axes[:, j]:
            ax.set_xlabel("round")
            ax.legend(fontsize=8)
    save_figure(fig, st.dir / "out_degree.png")


STUDIES = {"detection": study_detection, "defense": study_defense, "adaptive": study_adaptive, "select": study_select}

SMOKE = {"rounds": 6, "seeds": [0], "heatmap_seeds": [0], "attacks": ["label_flip", "alie"], "alphas": [1.0],
         "fractions": [0.0, 0.125], "topologies": ["exponential"], "defense_topologies": ["exponential"],
         "strengths": [1.0], "select_alphas": [1.0], "nodes": 16}


def main(argv: Optional[List[str]] = None) -> int:
    ap = main_parser(__doc__, STUDIES, "outputs/robustness",
                     {"nodes": 16, "lr": 0.1, "topologies": ["ring", "exponential", "random_regular"]},
                     {"smoke": "every code path at toy sizes (6 rounds, 1 seed, 2 attacks); its numbers mean nothing",
                      "quick": "the reduced grid with 60 rounds and 1 seed",
                      "rounds": "training rounds (default 200)", "topologies": "topologies of the detection study"})
    ap.add_argument("--full", action="store_true", help="the whole grid: ring too in the defense study, 3 heatmap seeds")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--heatmap-seeds", type=int, nargs="+")
    ap.add_argument("--attacks", nargs="+", choices=list(ATTACKS))
    ap.add_argument("--fraction", type=float, default=0.125, help="attack.fraction of the main tables (2 of 16)")
    ap.add_argument("--fractions", type=float, nargs="+", help="heatmap rows (default 0 0.0625 0.125 0.25)")
    ap.add_argument("--alphas", type=float, nargs="+", help="heatmap columns (default 0.1 1 10)")
    ap.add_argument("--defense-topologies", nargs="+")
    ap.add_argument("--strengths", type=float, nargs="+")
    ap.add_argument("--select-alphas", type=float, nargs="+")
    ap.add_argument("--keep", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2, help="parallel training processes (1 torch thread each)")
    ap.add_argument("--reuse", action="store_true", help="keep finished runs of outputs/robustness/runs")
    args = parse(ap, argv, SMOKE)
    args.session = f"{os.getpid()}-{time.time()}"
    args.rounds = args.rounds or (60 if args.quick else 200)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.heatmap_seeds = args.heatmap_seeds or ([0, 1, 2] if args.full else [0])
    args.attacks = args.attacks or list(ATTACKS)
    args.fractions = args.fractions or [0.0, 0.0625, 0.125, 0.25]
    args.alphas = args.alphas or [0.1, 1.0, 10.0]
    args.defense_topologies = args.defense_topologies or (["ring", "exponential", "random_regular"] if args.full
                                                          else ["exponential", "random_regular"])
    args.strengths = args.strengths or STRENGTHS
    args.select_alphas = args.select_alphas or [1.0, 0.1]

    def fresh_runs(root: Path) -> None:
        if not args.reuse and (root / "runs").exists():
            shutil.rmtree(root / "runs")

    return run_studies("robust_study", STUDIES, args, before=fresh_runs)


if __name__ == "__main__":
    sys.exit(main())
