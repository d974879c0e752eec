"""Detection study: how well proximal influence (spec §5) finds anomalous senders, and at what cost.

Five studies, each written under ``outputs/detection/<study>/`` (tables as CSV and Markdown, PNG plots, a log
of every equivalent CLI command and the library's own messages) and printed as tables. Training runs live in
``outputs/detection/runs/<topology>/<attack>/seed<k>`` and are shared between studies.

  attacks   digits MLP, 32 nodes, exponential and ring, attack.count=3, every attack (label_flip with
            flip_fraction 1, label_noise, feature_noise sigma 100, sign_flip, scale, gaussian, free_rider,
            stealth), several seeds: ROC AUC and AP (mean ± std over seeds) of both scores
            (proximal_influence and the paper's dot) with the CLI's default detector.
  stealth   the stealth attack with attack.strength swept from 1 down to 0.02: how AUC degrades.
  window    on the attacks study's runs: AUC against where the window ends and against its length, and the
            normalize × aggregation × score grid; the numbers behind the recommended defaults.
  paper     the paper's anomaly preset (configs/experiment/paper_anomaly*.yaml) through the real CLI: the
            CIFAR-10 preset must fail offline with exit 2 naming data/cifar-10-batches-py; the digits twin is
            run through ``dice train`` + ``dice detect`` for several seeds.
  cost      time of ``dice detect`` per detected round against one training round, same process, interleaved.

How the detector is evaluated. Runs are trained with ``dtype=float64`` so that the float64 replay ``dice detect``
does is bit-identical to training; one replay of the whole run (``detect.proximal_scores`` from round 0) then
gives every round's per-edge scores, and any window a:b is evaluated by slicing it and calling the library's
``aggregate`` / ``flag`` / ``evaluate`` — exactly what ``dice detect window=a:b`` computes. The attacks study
checks this on every run: ``dice_cli.detect.run_detect`` (config composed by Hydra from ``configs/``, as the CLI
does) with the default window must give the same AUC as the slice. The cost study uses a float32 run (the
CLI default), so training time is the realistic one. The plumbing (study directories, Hydra composition, in-process
and subprocess commands, tables, plots, the main loop) is shared with scripts/faithfulness.py in
scripts/study_harness.py.

    .venv/bin/python scripts/detect_study.py --quick                 # all studies, smoke sizes
    .venv/bin/python scripts/detect_study.py --smoke --out /tmp/d    # every code path, tiny sizes (< 30 s)
    .venv/bin/python scripts/detect_study.py                         # full size (5 seeds, 200 rounds)
    .venv/bin/python scripts/detect_study.py --study stealth cost    # some studies
    .venv/bin/python scripts/detect_study.py --reuse                 # keep finished runs (skipped, not retrained)
"""
from __future__ import annotations

import functools
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

import study_harness
from study_harness import (Study, cli_all, cli_steps, in_process, main_parser, parse, pyplot, run_studies, save_figure,
                           train_run)

ATTACKS = ["label_flip", "label_noise", "feature_noise", "sign_flip", "scale", "gaussian", "free_rider", "stealth"]
ATTACK_OVERRIDES = {"label_flip": ["attack.flip_fraction=1.0"], "feature_noise": ["attack.sigma=100"]}
TARGET_ATTACKS = ["label_flip", "feature_noise", "sign_flip"]       # the AUC ≥ 0.98 targets
TARGET_AUC = 0.98
SCORES = ["proximal_influence", "dot"]
NORMALIZE = ["receiver", "none"]
AGGREGATION = ["mean", "median"]
DEFAULT = {"window": 20, "normalize": "receiver", "aggregation": "mean", "score": "proximal_influence"}
LENGTHS = [1, 5, 10, 20, 50, 100, 200]
END_FRACTIONS = [0.05, 0.1, 0.15, 0.25, 0.375, 0.5, 0.75, 1.0]
STRENGTHS = [1.0, 0.5, 0.2, 0.1, 0.05, 0.02]


# --------------------------------------------------------------------------- plumbing

save_table = functools.partial(study_harness.save_table, decimals=3, sci=False)    # 3 decimals, never 1e-05


def detect(study: Study, run: Path, out: Path, overrides: Sequence[str]) -> dict:
    """``dice detect run=RUN out=OUT overrides... progress=false overwrite=true`` in-process -> summary.json."""
    from dice_cli.config import DetectConfig
    from dice_cli.detect import run_detect

    in_process(study, "detect", [f"run={run}", f"out={out}", *overrides, "progress=false", "overwrite=true"],
               DetectConfig, lambda typed, config: run_detect(typed, Path(out), config))
    return json.loads((Path(out) / "summary.json").read_text())


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def pm(values) -> str:
    """'mean ± std' over seeds (std with ddof 0; a single seed shows its value)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0 or np.isnan(v).all():
        return "n/a"
    return f"{np.nanmean(v):.3f} ± {np.nanstd(v):.3f}" if v.size > 1 else f"{v[0]:.3f}"


# --------------------------------------------------------------------------- runs and the per-window grid

def run_overrides(args, topology: str, attack: str, seed: int, extra: Sequence[str] = ()) -> List[str]:
    """The 32-node digits setup of the issue (float64 so the detect replay is bit-identical to training)."""
    return ["dataset=digits", "model=mlp", f"nodes={args.nodes}", f"topology={topology}", f"rounds={args.rounds}",
            f"lr={args.lr}", f"batch_size={args.batch}", "dtype=float64", "engine=vmap", f"seed={seed}",
            f"attack={attack}", f"attack.count={args.count}", *ATTACK_OVERRIDES.get(attack, []), *extra,
            f"record.every={max(1, args.rounds // 4)}", "record.deltas=false"]


def replay(run: Path) -> Tuple[pd.DataFrame, List[int]]:
    """Every round's per-edge scores of the whole run (one float64 replay from round 0) and the attackers."""
    from dice_cli.detect import proximal_scores
    from dice_cli.replay import open_replay

    rp = open_replay(run, "float64", "cpu")
    pairs = proximal_scores(rp.dyn, rp.state_at(0), rp.rounds, *rp.probe, rp.q("one"))
    return pairs, sorted(int(k) for k in manifest(run)["attack"]["nodes"])


def windows(rounds: int, full: bool) -> List[Tuple[int, int]]:
    """(first, length) windows: every length in LENGTHS ending at each END_FRACTIONS point (full), or the
    lengths ending at the last round only."""
    ends = sorted({max(1, int(round(f * rounds))) for f in END_FRACTIONS}) if full else [rounds]
    lengths = sorted({min(L, rounds) for L in LENGTHS})
    return [(e - L, L) for e in ends for L in lengths if L <= e]


def grid(pairs: pd.DataFrame, anomalous: List[int], wins: List[Tuple[int, int]], full: bool) -> List[dict]:
    """AUC/AP (and flag precision/recall) for each window × score × normalize × aggregation, via the library."""
    from dice_cli.detect import aggregate, evaluate, flag

    combos = [(s, n, a) for s in SCORES for n in NORMALIZE for a in AGGREGATION] if full else \
        [(s, DEFAULT["normalize"], DEFAULT["aggregation"]) for s in SCORES]
    rows = []
    rounds = pairs["round"].to_numpy()
    for first, length in wins:
        p = pairs[(rounds >= first) & (rounds < first + length)]
        for score, norm, agg in combos:
            _, senders = aggregate(p, norm, agg, score)
            m = evaluate(flag(senders), anomalous)
            rows.append({"first": first, "length": length, "end": first + length, "score": score,
                         "normalize": norm, "aggregation": agg, "roc_auc": m["roc_auc"],
                         "average_precision": m["average_precision"], "precision": m["precision"],
                         "recall": m["recall"]})
    return rows


_GRIDS: Dict[str, pd.DataFrame] = {}


def measured_run(study: Study, args, topology: str, attack: str, seed: int, extra: Sequence[str] = (),
                 tag: str = "", full: bool = True, check_cli: bool = False) -> pd.DataFrame:
    """Train (or reuse) one run, replay it once and return its window grid, labelled (memoised per run)."""
    run = Path(args.out) / "runs" / topology / (tag or attack) / f"seed{seed}"
    key = f"{run}|{full}"
    if key in _GRIDS and not check_cli:
        return _GRIDS[key]
    run, train_s = train_run(study, run, run_overrides(args, topology, attack, seed, extra))
    t0 = time.perf_counter()
    pairs, anomalous = replay(run)
    replay_s = time.perf_counter() - t0
    g = pd.DataFrame(grid(pairs, anomalous, windows(args.rounds, full), full))
    g.insert(0, "seed", seed)
    g.insert(0, "attack", tag or attack)
    g.insert(0, "topology", topology)
    g["probe_acc"] = manifest(run).get("final", {}).get("probe_acc", np.nan)
    g["anomalous"] = " ".join(map(str, anomalous))
    study.log(f"{run}: train {train_s:.2f} s, full replay {replay_s:.2f} s, attackers {anomalous}")
    if check_cli:   # the CLI's detect with its default window must give the slice's numbers
        s = detect(study, run, run / "detect", [])
        d = default_rows(g, args.rounds)
        d = d[d.score == DEFAULT["score"]].iloc[0]
        g["cli_roc_auc"] = s["roc_auc"]
        g["cli_auc_diff"] = abs(s["roc_auc"] - d["roc_auc"])
    _GRIDS[key] = g
    return g


def default_rows(g: pd.DataFrame, rounds: int, window: int = DEFAULT["window"], norm: str = DEFAULT["normalize"],
                 agg: str = DEFAULT["aggregation"]) -> pd.DataFrame:
    return g[(g.length == min(window, rounds)) & (g.end == rounds) & (g.normalize == norm) & (g.aggregation == agg)]


# --------------------------------------------------------------------------- study 1: every attack

def attack_runs(study: Study, args, check_cli: bool = False) -> pd.DataFrame:
    return pd.concat([measured_run(study, args, topo, attack, seed, check_cli=check_cli)
                      for topo in args.topologies for attack in ATTACKS for seed in args.seeds], ignore_index=True)


def summarise(d: pd.DataFrame, by: List[str]) -> pd.DataFrame:
    rows = []
    for keys, g in d.groupby(by, sort=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        rows.append({**dict(zip(by, keys)), "auc_mean": g.roc_auc.mean(), "auc": pm(g.roc_auc),
                     "ap": pm(g.average_precision), "auc_min": g.roc_auc.min(), "n": len(g)})
    return pd.DataFrame(rows)


def study_attacks(args, root: Path) -> dict:
    st = Study(root, "attacks")
    g = attack_runs(st, args, check_cli=True)
    g.to_csv(st.dir / "grid.csv", index=False)
    d = default_rows(g, args.rounds)
    rows = []
    for (topo, attack), a in d.groupby(["topology", "attack"], sort=False):
        row = {"topology": topo, "attack": attack, "probe_acc": a.probe_acc.mean()}
        for score, short in [("proximal_influence", "prox"), ("dot", "dot")]:
            s = a[a.score == score]
            row[f"{short}_auc"] = pm(s.roc_auc)
            row[f"{short}_ap"] = pm(s.average_precision)
        s = a[a.score == DEFAULT["score"]]
        row["prox_flag_precision"] = pm(s.precision.astype(float))
        row["prox_flag_recall"] = pm(s.recall.astype(float))
        if attack in TARGET_ATTACKS:
            row["target"] = "met" if s.roc_auc.mean() >= TARGET_AUC else "MISSED"
        else:
            row["target"] = "-"
        rows.append(row)
    table = pd.DataFrame(rows)
    check = float(g["cli_auc_diff"].max())
    title = (f"every attack: digits MLP, {args.nodes} nodes, {args.rounds} rounds, lr {args.lr}, batch {args.batch}, "
             f"attack.count={args.count}, seeds {args.seeds}; detector window={DEFAULT['window']} (last rounds), "
             f"normalize=receiver, aggregation=mean; mean ± std over seeds (target AUC ≥ {TARGET_AUC} for "
             f"{', '.join(TARGET_ATTACKS)}). dice detect (CLI path) vs sliced replay: max |ΔAUC| = {check:.2e}")
    save_table(st, table, title)
    return st.finish(cli_auc_diff=check)


# --------------------------------------------------------------------------- study 2: stealth strength

def study_stealth(args, root: Path) -> dict:
    st = Study(root, "stealth")
    parts = []
    for s in args.strengths:
        for topo in args.topologies:
            for seed in args.seeds:
                tag = "stealth" if s == 0.1 else f"stealth_s{s:g}"     # 0.1 is configs/attack/stealth.yaml's
                g = measured_run(st, args, topo, "stealth", seed, extra=[f"attack.strength={s}"], tag=tag,
                                 full=(s == 0.1))
                g = g[(g.end == args.rounds) & (g.normalize == DEFAULT["normalize"])
                      & (g.aggregation == DEFAULT["aggregation"])].copy()
                g["strength"] = s
                parts.append(g)
    g = pd.concat(parts, ignore_index=True)
    g.to_csv(st.dir / "grid.csv", index=False)
    rows = []
    for (s, topo), a in g.groupby(["strength", "topology"], sort=False):
        row = {"strength": s, "topology": topo, "probe_acc": a.probe_acc.mean()}
        for score, short in [("proximal_influence", "prox"), ("dot", "dot")]:
            for L in [DEFAULT["window"], 50, args.rounds]:
                L = min(L, args.rounds)
                row[f"{short}_auc_w{L}"] = pm(a[(a.score == score) & (a.length == L)].roc_auc)
        rows.append(row)
    save_table(st, pd.DataFrame(rows).drop_duplicates(),
               f"stealth: AUC (mean ± std over seeds {args.seeds}) vs attack.strength; windows = last w rounds, "
               f"normalize=receiver, aggregation=mean")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(args.topologies), figsize=(6 * len(args.topologies), 4.2), squeeze=False)
    for ax, topo in zip(axes[0], args.topologies):
        for score, ls in [("proximal_influence", "-"), ("dot", "--")]:
            for L, c in zip(sorted({min(w, args.rounds) for w in (DEFAULT["window"], 50, args.rounds)}),
                            ["C0", "C1", "C2"]):
                a = g[(g.topology == topo) & (g.score == score) & (g.length == L)]
                m = a.groupby("strength").roc_auc.agg(["mean", "std"]).sort_index()
                ax.errorbar(m.index, m["mean"], yerr=m["std"].fillna(0), ls=ls, marker="o", color=c, capsize=3,
                            label=f"{score}, window {L}")
        ax.set_xscale("log")
        ax.axhline(0.5, color="grey", lw=0.6, ls=":")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("attack.strength (log)")
        ax.set_ylabel("ROC AUC (mean ± std over seeds)")
        ax.set_title(f"stealth, {topo}, {args.nodes} nodes")
        ax.legend(fontsize=7)
    save_figure(fig, st.dir / "stealth_auc.png")
    return st.finish(f"; plot {st.dir}/stealth_auc.png")


# --------------------------------------------------------------------------- study 3: window, normalize, aggregation

def study_window(args, root: Path) -> dict:
    saved = root / "attacks" / "grid.csv"
    have = any(k.startswith(str(Path(args.out) / "runs")) and k.endswith("|True") for k in _GRIDS)
    st = Study(root, "window")
    g = None
    if not have and saved.exists():     # the attacks study ran in an earlier invocation: use its grid
        g = pd.read_csv(saved)
        same = (set(g.seed) == set(args.seeds) and int(g.end.max()) == args.rounds
                and set(g.topology) == set(args.topologies) and set(g.attack) == set(ATTACKS))
        st.log(f"grid from {saved}: {'used' if same else 'stale (other seeds/rounds/topologies), recomputed'}")
        g = g if same else None
    if g is None:
        g = attack_runs(st, args)
    T = args.rounds
    # (a) AUC vs window end (default length), (b) AUC vs window length (ending at the last round)
    base = g[(g.normalize == DEFAULT["normalize"]) & (g.aggregation == DEFAULT["aggregation"])]
    plt = pyplot()
    for name, sel, x, xlabel in [
        ("window_end", base[base.length == min(DEFAULT["window"], T)], "end",
         f"window end (exclusive round); length {min(DEFAULT['window'], T)}"),
        ("window_length", base[base.end == T], "length", f"window length (rounds), ending at round {T}"),
    ]:
        fig, axes = plt.subplots(len(SCORES), len(args.topologies), figsize=(6.2 * len(args.topologies), 8),
                                 squeeze=False)
        for i, score in enumerate(SCORES):
            for j, topo in enumerate(args.topologies):
                ax = axes[i, j]
                for k, attack in enumerate(ATTACKS):
                    a = sel[(sel.topology == topo) & (sel.score == score) & (sel.attack == attack)]
                    m = a.groupby(x).roc_auc.mean().sort_index()
                    ax.plot(m.index, m.values, marker="o", ms=3, color=pyplot().get_cmap("tab10")(k), label=attack)
                if x == "length":
                    ax.set_xscale("log")
                ax.set_ylim(0, 1.02)
                ax.axhline(0.5, color="grey", lw=0.6, ls=":")
                ax.set_title(f"{topo} · {score} (normalize=receiver, mean)")
                ax.set_xlabel(xlabel)
                ax.set_ylabel("ROC AUC, mean over seeds")
        axes[0, 0].legend(fontsize=7)
        save_figure(fig, st.dir / f"{name}.png", dpi=100)
    # tables: by window end / length, mean over attacks (per topology and score)
    t_end = (base[base.length == min(DEFAULT["window"], T)]
             .groupby(["score", "topology", "end"]).roc_auc.mean().unstack("end").reset_index())
    t_end.columns = [str(c) for c in t_end.columns]
    save_table(st, t_end, f"mean AUC over attacks and seeds vs window END (length {min(DEFAULT['window'], T)}); "
                          f"columns = round at which the window ends", name="by_end")
    t_len = base[base.end == T].groupby(["score", "topology", "length"]).roc_auc.mean().unstack("length").reset_index()
    t_len.columns = [str(c) for c in t_len.columns]
    save_table(st, t_len, f"mean AUC over attacks and seeds vs window LENGTH (ending at round {T})", name="by_length")
    # per-attack detail at the last round for every length (both scores)
    det = base[base.end == T].groupby(["attack", "score", "length"]).roc_auc.mean().unstack("length").reset_index()
    det.columns = [str(c) for c in det.columns]
    save_table(st, det, f"AUC per attack (mean over topologies and seeds) vs window length ending at round {T}",
               name="by_length_per_attack")
    # normalize × aggregation × score at the default window and at the full run
    rows = []
    for L in sorted({min(DEFAULT["window"], T), min(50, T), T}):
        sel = g[(g.end == T) & (g.length == L)]
        for (score, norm, agg), a in sel.groupby(["score", "normalize", "aggregation"], sort=False):
            per = a.groupby(["topology", "attack"]).roc_auc.mean()
            tgt = a[a.attack.isin(TARGET_ATTACKS)].groupby(["topology", "attack"]).roc_auc.mean()
            rows.append({"window": L, "score": score, "normalize": norm, "aggregation": agg,
                         "auc_all_attacks": a.roc_auc.mean(), "ap_all_attacks": a.average_precision.mean(),
                         "worst_attack_auc": per.min(), "worst_attack": " / ".join(per.idxmin()),
                         "targets_min_auc": tgt.min(), "exp_auc": a[a.topology == "exponential"].roc_auc.mean(),
                         "ring_auc": a[a.topology == "ring"].roc_auc.mean(),
                         "flag_recall_exp": a[a.topology == "exponential"].recall.astype(float).mean(),
                         "flag_recall_ring": a[a.topology == "ring"].recall.astype(float).mean(),
                         "flag_precision": a.precision.astype(float).mean()})
    combos = pd.DataFrame(rows)
    save_table(st, combos, "normalize × aggregation × score (ending at the last round): mean AUC over attacks, "
                           "topologies and seeds; worst = lowest per-(topology, attack) mean; targets_min = lowest "
                           f"among {', '.join(TARGET_ATTACKS)}", name="combos")
    # windows that start at round 0 (the whole history up to a point) against the last-w windows
    rows = []
    for (first, length), sel in g[(g["first"] == 0) | (g.end == T)].groupby(["first", "length"]):
        for (score, norm, agg), a in sel.groupby(["score", "normalize", "aggregation"], sort=False):
            per = a.groupby(["topology", "attack"]).roc_auc.mean()
            tgt = a[a.attack.isin(TARGET_ATTACKS)].groupby(["topology", "attack"]).roc_auc.mean()
            rows.append({"window": f"{first}:{first + length}", "score": score, "normalize": norm,
                         "aggregation": agg, "auc_all_attacks": a.roc_auc.mean(),
                         "ap_all_attacks": a.average_precision.mean(), "worst_attack_auc": per.min(),
                         "worst_attack": " / ".join(per.idxmin()), "targets_min_auc": tgt.min(),
                         "flag_recall_exp": a[a.topology == "exponential"].recall.astype(float).mean(),
                         "flag_recall_ring": a[a.topology == "ring"].recall.astype(float).mean()})
    ws = pd.DataFrame(rows)
    ws = ws[ws.score == "proximal_influence"].sort_values("auc_all_attacks", ascending=False)
    save_table(st, ws, "proximal_influence: every window that starts at round 0 or ends at the last round, "
                       "ranked by mean AUC over attacks, topologies and seeds", name="windows_ranked")
    # every attack with the recommended detector: the whole run as window (normalize=receiver, mean)
    rows = []
    rec = g[(g["first"] == 0) & (g.end == T) & (g.normalize == "receiver") & (g.aggregation == "mean")]
    for (topo, attack), a in rec.groupby(["topology", "attack"], sort=False):
        p, d = a[a.score == "proximal_influence"], a[a.score == "dot"]
        rows.append({"topology": topo, "attack": attack, "prox_auc": pm(p.roc_auc), "prox_ap": pm(p.average_precision),
                     "dot_auc": pm(d.roc_auc), "dot_ap": pm(d.average_precision),
                     "target": ("met" if p.roc_auc.mean() >= TARGET_AUC else "MISSED")
                     if attack in TARGET_ATTACKS else "-"})
    save_table(st, pd.DataFrame(rows), f"every attack with window 0:{T} (the whole run), normalize=receiver, "
                                       f"aggregation=mean; mean ± std over seeds", name="attacks_whole_run")
    # the same grid per attack at the default window
    pa = g[(g.end == T) & (g.length == min(DEFAULT["window"], T))]
    pa = pa.groupby(["attack", "score", "normalize", "aggregation"]).roc_auc.mean().unstack("attack").reset_index()
    save_table(st, pa, f"per-attack AUC (mean over topologies and seeds) per combination, window "
                       f"{min(DEFAULT['window'], T)}", name="combos_per_attack")
    # the recommendation: highest mean AUC over attacks among combos whose worst target-attack AUC is highest
    return st.finish(f"; plots {st.dir}/window_end.png, {st.dir}/window_length.png")


# --------------------------------------------------------------------------- study 4: the paper preset

def study_paper(args, root: Path) -> dict:
    st = Study(root, "paper")
    cifar, shown = cli_all(st, [["train", "experiment=paper_anomaly", f"out={st.dir / 'cifar10_run'}", "data_dir=data",
                                 "progress=false"],
                                ["train", "experiment=paper_anomaly", "--cfg", "job"]])
    msg = (cifar.stderr.strip().splitlines() or [""])[-1]
    ok = cifar.returncode == 2 and "cifar-10-batches-py" in msg
    print(f"\n[paper] dice train experiment=paper_anomaly (offline): exit {cifar.returncode} "
          f"({'as expected' if ok else 'NOT as expected'})\n  {msg}")
    rows = []
    for seed in args.seeds:
        run = st.dir / f"digits_seed{seed}"
        steps = [["train", "experiment=paper_anomaly_digits", f"seed={seed}", f"rounds={args.paper_rounds}",
                  f"out={run}", "progress=false"],
                 ["detect", f"run={run}", "progress=false"],
                 ["detect", f"run={run}", "score=dot", f"out={run / 'detect_dot'}", "progress=false"],
                 ["detect", f"run={run}", "normalize=none", f"out={run / 'detect_none'}", "progress=false"],
                 ["detect", f"run={run}", f"window={args.paper_rounds}", f"out={run / 'detect_all'}",
                  "progress=false"]]
        cli_steps(st, [steps[:1], steps[1:]])         # train, then the four detects side by side
        m = manifest(run)
        for sub, label in [("detect", "proximal_influence, window 20"), ("detect_dot", "dot, window 20"),
                           ("detect_none", "proximal_influence, window 20, normalize=none"),
                           ("detect_all", f"proximal_influence, window {args.paper_rounds}")]:
            s = json.loads((run / sub / "summary.json").read_text())
            rows.append({"seed": seed, "detector": label, "attacker": m["attack"]["nodes"][0],
                         "roc_auc": s["roc_auc"], "average_precision": s["average_precision"],
                         "flagged": " ".join(map(str, s["flagged"])) or "-",
                         "probe_acc": m.get("final", {}).get("probe_acc", np.nan)})
    df = pd.DataFrame(rows)
    df.to_csv(st.dir / "per_seed.csv", index=False)
    summ = pd.DataFrame([{"detector": k, "auc": pm(a.roc_auc), "ap": pm(a.average_precision),
                          "auc_values": " ".join(f"{v:.3f}" for v in a.roc_auc), "probe_acc": a.probe_acc.mean()}
                         for k, a in df.groupby("detector", sort=False)])
    save_table(st, summ, f"paper anomaly preset on digits (experiment=paper_anomaly_digits: 4 nodes exponential, "
                         f"mlp_paper, batch 10, feature_noise sigma 100, 1 attacker), {args.paper_rounds} rounds, "
                         f"seeds {args.seeds}; with 1 attacker among 4 senders AUC takes only the values 0, 1/3, "
                         f"2/3, 1")
    (st.dir / "checks.json").write_text(json.dumps({
        "cifar10_offline": {"exit": cifar.returncode, "message": msg, "ok": ok},
        "cifar10_cfg_job_exit": shown.returncode}, indent=2))
    return st.finish(cifar_ok=ok)


# --------------------------------------------------------------------------- study 5: cost

def study_cost(args, root: Path) -> dict:
    import torch

    from dice_cli.replay import open_replay

    st = Study(root, "cost")
    T = args.rounds
    over = ["dataset=digits", "model=mlp", f"nodes={args.nodes}", "topology=exponential", f"rounds={T}",
            f"lr={args.lr}", f"batch_size={args.batch}", "engine=vmap", "seed=0", "attack=label_flip",
            f"attack.count={args.count}", "attack.flip_fraction=1.0"]
    run = st.dir / "run_float32"
    rows: Dict[str, List[float]] = {}

    def add(k, v):
        rows.setdefault(k, []).append(v)

    setups = {}
    for dt in ("float32", "float64"):
        if not (run / "manifest.json").exists():
            train_run(st, run, over)
        setups[dt] = open_replay(run, dt, "cpu")

    def bare_rounds(s, n):
        state = s.init
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(n):
                state, _, _ = s.dyn.round(state)
        return (time.perf_counter() - t0) / n

    for rep in range(args.reps):
        # the CLI's training (fresh run each time: includes per-round probe eval and checkpoint writes)
        shutil.rmtree(run, ignore_errors=True)
        _, secs = train_run(st, run, over)
        add("train_cli_ms_per_round", 1e3 * manifest(run)["timings"]["train_seconds_this_session"] / T)
        add("train_cli_wall_ms_per_round", 1e3 * secs / T)
        add("engine_round_f32_ms", 1e3 * bare_rounds(setups["float32"].setup, T))
        add("engine_round_f64_ms", 1e3 * bare_rounds(setups["float64"].setup, T))
        rp64 = setups["float64"]
        s64 = rp64.setup
        st0 = rp64.state_at(T // 2)
        t0 = time.perf_counter()
        for _ in range(20):
            s64.dyn.probe_grads(st0, s64.x_probe, s64.y_probe, s64.shared_probe)
        add("probe_grad_f64_ms", 1e3 * (time.perf_counter() - t0) / 20)
        for w in sorted({min(DEFAULT["window"], T), T}):
            t0 = time.perf_counter()
            summ = detect(st, run, run / f"detect_w{w}", [f"window={w}"])
            wall = time.perf_counter() - t0
            add(f"detect_w{w}_ms_per_round", 1e3 * summ["seconds"] / w)
            add(f"detect_w{w}_wall_ms_per_round", 1e3 * wall / w)
            add(f"detect_w{w}_auc", summ["roc_auc"])
    med = {k: float(np.median(v)) for k, v in rows.items()}
    pd.DataFrame(rows).to_csv(st.dir / "reps.csv", index=False)
    ref = med["train_cli_ms_per_round"]
    out = []
    for k, v in med.items():
        if k.endswith("_auc"):
            continue
        out.append({"quantity": k, "median_ms": v, "min_ms": float(np.min(rows[k])), "max_ms": float(np.max(rows[k])),
                    "vs_train_cli_round": v / ref, "vs_engine_f32_round": v / med["engine_round_f32_ms"]})
    save_table(st, pd.DataFrame(out),
               f"cost, digits MLP {args.nodes} nodes exponential, {T} rounds, float32 run (CLI default), detect in "
               f"float64; median of {args.reps} interleaved repetitions; torch threads {torch.get_num_threads()}. "
               f"train_cli = dice train's own timing (per-round probe evaluation and checkpoint writes included); "
               f"engine_round = bare Dynamics.round; detect = run_detect's 'seconds' (replay + scores + aggregate + "
               f"evaluate) / window; *_wall = the whole call (run loading, CSVs, plots). "
               f"AUC (float32 run): " + ", ".join(f"{k} {np.median(v):.3f}" for k, v in rows.items()
                                                  if k.endswith('_auc')))
    return st.finish(ratio=med)


# --------------------------------------------------------------------------- main

STUDIES = {"attacks": study_attacks, "stealth": study_stealth, "window": study_window, "paper": study_paper,
           "cost": study_cost}


# smallest sizes that still run every study end to end (--smoke; the numbers mean nothing)
SMOKE = {"rounds": 4, "paper_rounds": 3, "seeds": [0], "nodes": 6, "count": 2, "topologies": ["exponential"],
         "strengths": [1.0, 0.1], "reps": 1}


def main(argv: Optional[List[str]] = None) -> int:
    ap = main_parser(__doc__, STUDIES, "outputs/detection",
                     {"nodes": 32, "lr": 0.1, "topologies": ["exponential", "ring"]},
                     {"smoke": "smallest run of every study (6 nodes, 4 rounds, 1 seed, exponential only; about 30 s): "
                               "checks the code paths, its numbers mean nothing",
                      "quick": "smoke sizes: 60 rounds, 2 seeds, 2 strengths",
                      "rounds": "training rounds (default 200; quick 60)",
                      "threads": "torch CPU threads (the machine is shared)"})
    ap.add_argument("--paper-rounds", type=int, help="rounds of the paper preset on digits (default 200; quick 40)")
    ap.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 3 4 (quick: 0 1)")
    ap.add_argument("--count", type=int, default=3, help="attack.count")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--strengths", type=float, nargs="+", help=f"stealth sweep (default {STRENGTHS})")
    ap.add_argument("--reps", type=int, help="cost study repetitions (default 5; quick 2)")
    ap.add_argument("--reuse", action="store_true", help="keep outputs/detection/runs (finished runs are skipped)")
    args = parse(ap, argv, SMOKE)
    args.rounds = args.rounds or (60 if args.quick else 200)
    args.paper_rounds = args.paper_rounds or (40 if args.quick else 200)
    args.seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2, 3, 4])
    args.strengths = args.strengths or ([1.0, 0.1] if args.quick else STRENGTHS)
    args.reps = args.reps or (2 if args.quick else 5)

    def fresh_runs(root: Path) -> None:
        if not args.reuse and (root / "runs").exists():
            shutil.rmtree(root / "runs")

    return run_studies("detect_study", STUDIES, args, before=fresh_runs)


if __name__ == "__main__":
    sys.exit(main())
