#!/usr/bin/env python
"""DICE on unreliable networks (issue 14; docs/networks.md): three questions, digits MLP, 16 nodes, ring and
exponential, two seeds, every command run in-process through the real CLI (``dice_cli.cli.main``).

1. delays   — the influence cascade with stale messages (network.delay=uniform, D = 0, 1, 2, 4): mean |GT| per
              hop (hop decay) and the Pearson / Spearman alignment of exact and first_order with GT.
2. churn    — stability of node values (``dice value unit=node method=exact targets=network``) and of detection
              (``dice detect``, 2 label-flip attackers) under bernoulli / markov churn: Kendall τ of the node
              ranking against the churn-free run of the same seed, ROC AUC of detect.
3. compress — CHOCO gossip (top_k, random_k, qsgd): final probe accuracy and alignment of exact / first_order
              with GT (hops 2) against the bytes sent.

    python scripts/network_study.py                 # all three, outputs/network_study/ (≈ 15 min on 2 busy cores, two processes: --study delays | churn compress)
    python scripts/network_study.py --study delays --rounds 40
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOPOLOGIES = ["ring", "exponential"]


def dice(*args: str) -> None:
    """``dice ARGS`` in-process; raises on a non-zero exit."""
    import contextlib
    import io

    from dice_cli import cli

    buf = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            cli.main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if code != 0:
        raise RuntimeError(f"dice {' '.join(args)} exited {code}:\n{buf.getvalue()[-2000:]}")


def base(args, topology: str, seed: int) -> List[str]:
    return [f"nodes={args.nodes}", f"rounds={args.rounds}", "batch_size=16", "lr=0.1", "dtype=float64",
            f"topology={topology}", f"seed={seed}", "progress=false", "device=cpu", "overwrite=true"]


def train(out: Path, args, topology: str, seed: int, extra: List[str]) -> Path:
    dice("train", *base(args, topology, seed), *extra, f"out={out}")
    return out


def alignment(est_dir: Path) -> Dict[str, float]:
    a = json.loads((est_dir / "alignment.json").read_text())
    last = a["per_hop"][max(a["per_hop"], key=int)]
    return {"pearson": a["overall"]["pearson"], "spearman": a["overall"]["spearman"],
            "pearson_last_hop": last["pearson"]}


def gt_and_estimates(run: Path, hops: int, rounds: str) -> dict:
    dice("gt", f"run={run}", f"hops={hops}", f"rounds={rounds}", "progress=false", "overwrite=true")
    out = {}
    gsum = json.loads((run / "gt" / "summary.json").read_text())
    out["per_hop"] = gsum["mean_abs_influence_per_hop_reachable"]
    for m in ("exact", "first_order"):
        d = run / f"est_{m}"
        dice("estimate", f"run={run}", f"hops={hops}", f"rounds={rounds}", f"method={m}", f"out={d}",
             f"gt={run / 'gt'}", "progress=false", "overwrite=true")
        out[m] = alignment(d)
    return out


def fmt(v, d=3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return f"{v:.{d}f}" if abs(v) >= 10 ** -d or v == 0 else f"{v:.2e}"


def pm(values, d=3) -> str:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if not len(v):
        return "–"
    return f"{fmt(float(v.mean()), d)} ± {fmt(float(v.std()), d)}" if len(v) > 1 else fmt(float(v[0]), d)


# --------------------------------------------------------------------------------------------- studies


def study_delays(args, root: Path) -> str:
    rows = []
    for topo in TOPOLOGIES:
        for seed in args.seeds:
            for D in (0, 1, 2, 4):
                run = root / "delays" / f"{topo}_s{seed}_D{D}"
                net = [] if D == 0 else ["network.delay=uniform", f"network.max_delay={D}"]
                train(run, args, topo, seed, net)
                r = gt_and_estimates(run, args.hops, args.gt_rounds)
                rows.append({"topology": topo, "seed": seed, "D": D,
                             **{f"hop{h}": r["per_hop"].get(str(h)) for h in range(args.hops + 1)},
                             "exact_pearson": r["exact"]["pearson"], "exact_spearman": r["exact"]["spearman"],
                             "fo_pearson": r["first_order"]["pearson"], "fo_spearman": r["first_order"]["spearman"],
                             "fo_pearson_last_hop": r["first_order"]["pearson_last_hop"]})
    df = pd.DataFrame(rows)
    df.to_csv(root / "delays.csv", index=False)
    lines = ["| topology | D | " + " | ".join(f"mean abs GT hop {h}" for h in range(args.hops + 1)) +
             f" | exact vs GT (Pearson) | first_order vs GT (Pearson) | first_order (Spearman) | first_order "
             f"Pearson at hop {args.hops} |",
             "|---|---|" + "---|" * (args.hops + 1) + "---|---|---|---|"]
    for (topo, D), g in df.groupby(["topology", "D"]):
        lines.append(f"| {topo} | {D} | " + " | ".join(pm(g[f"hop{h}"], 2) for h in range(args.hops + 1)) +
                     f" | {pm(g.exact_pearson, 4)} | {pm(g.fo_pearson)} | {pm(g.fo_spearman)} | "
                     f"{pm(g.fo_pearson_last_hop)} |")
    return "\n".join(lines)


def node_values(run: Path) -> np.ndarray:
    d = run / "value"
    dice("value", f"run={run}", "unit=node", "method=exact", "targets=network", f"out={d}", "progress=false",
         "overwrite=true")
    t = pd.read_csv(d / "influence.csv")
    return t.sort_values("source").influence.to_numpy()


def detect_auc(run: Path) -> float:
    d = run / "detect"
    dice("detect", f"run={run}", f"out={d}", "progress=false", "overwrite=true")
    s = json.loads((d / "summary.json").read_text())
    return s.get("roc_auc")


def study_churn(args, root: Path) -> str:
    from scipy.stats import kendalltau

    cases = [("none", []), ("bernoulli p=0.8", ["network.churn=bernoulli", "network.churn_p=0.8"]),
             ("bernoulli p=0.5", ["network.churn=bernoulli", "network.churn_p=0.5"]),
             ("markov p_on=0.5 p_off=0.1", ["network.churn=markov", "network.p_on=0.5", "network.p_off=0.1"])]
    rows = []
    for topo in TOPOLOGIES:
        for seed in args.seeds:
            ref = None
            for name, net in cases:
                tag = name.replace(" ", "_").replace("=", "")
                run = root / "churn" / f"{topo}_s{seed}_{tag}"
                train(run, args, topo, seed, [*net, "attack=label_flip", "attack.count=2"])
                vals = node_values(run)
                if ref is None:
                    ref = vals
                tau = float(kendalltau(ref, vals)[0])
                online = pd.read_csv(run / "metrics.csv")
                on = float(online["online"].mean()) if "online" in online else 1.0
                acc = float(online[online["round"] == args.rounds - 1].probe_acc.mean())
                rows.append({"topology": topo, "seed": seed, "churn": name, "online": on, "tau": tau,
                             "auc": detect_auc(run), "acc": acc})
    df = pd.DataFrame(rows)
    df.to_csv(root / "churn.csv", index=False)
    lines = ["| topology | churn | share online | Kendall τ of node values vs churn-free | detect ROC AUC | "
             "final probe acc |", "|---|---|---|---|---|---|"]
    for (topo, name), g in df.groupby(["topology", "churn"], sort=False):
        lines.append(f"| {topo} | {name} | {pm(g.online, 2)} | {pm(g.tau)} | {pm(g.auc)} | {pm(g.acc)} |")
    return "\n".join(lines)


def study_compress(args, root: Path) -> str:
    cases = [("none", []),
             ("top_k 0.1", ["network.compression=top_k", "network.ratio=0.1"]),
             ("random_k 0.3", ["network.compression=random_k", "network.ratio=0.3"]),
             ("qsgd s=4", ["network.compression=qsgd", "network.levels=4"])]
    rows = []
    for topo in TOPOLOGIES:
        for seed in args.seeds:
            for name, net in cases:
                run = root / "compress" / f"{topo}_s{seed}_{name.replace(' ', '').replace('=', '')}"
                train(run, args, topo, seed, [*net, f"network.gamma={args.gamma}"] if net else [])
                m = pd.read_csv(run / "metrics.csv")
                acc = float(m[m["round"] == args.rounds - 1].probe_acc.mean())
                if "bytes_sent" in m:
                    mb = float(m.bytes_sent.sum()) / 2**20
                else:     # a plain run: P·8 bytes per out-edge per round
                    P = json.loads((run / "manifest.json").read_text())["num_params"]
                    mb = float(m.out_degree.sum()) * P * 8 / 2**20
                r = gt_and_estimates(run, 2, args.gt_rounds)
                rows.append({"topology": topo, "seed": seed, "compression": name, "acc": acc, "MB": mb,
                             "exact_pearson": r["exact"]["pearson"], "fo_pearson": r["first_order"]["pearson"],
                             "fo_spearman": r["first_order"]["spearman"]})
    df = pd.DataFrame(rows)
    df.to_csv(root / "compress.csv", index=False)
    lines = [f"| topology | compression (γ={args.gamma}) | MB sent (whole run) | final probe acc | exact vs GT (Pearson) | "
             "first_order vs GT (Pearson) | first_order (Spearman) |", "|---|---|---|---|---|---|---|"]
    for (topo, name), g in df.groupby(["topology", "compression"], sort=False):
        lines.append(f"| {topo} | {name} | {pm(g.MB, 1)} | {pm(g.acc)} | {pm(g.exact_pearson, 4)} | "
                     f"{pm(g.fo_pearson)} | {pm(g.fo_spearman)} |")
    return "\n".join(lines)


STUDIES = {"delays": study_delays, "churn": study_churn, "compress": study_compress}


def collect(root: Path) -> str:
    """The tables from whatever runs of a (possibly unfinished) study exist under ``root``: a run counts once
    all its analysis outputs are there. Prints how many runs each row averages."""
    from scipy.stats import kendalltau

    out = []
    rows = []
    for d in sorted((root / "delays").glob("*_s*_D*")):
        if not (d / "est_first_order" / "alignment.json").exists():
            continue
        topo, seed, D = d.name.rsplit("_", 2)
        g = json.loads((d / "gt" / "summary.json").read_text())["mean_abs_influence_per_hop_reachable"]
        ex, fo = alignment(d / "est_exact"), alignment(d / "est_first_order")
        rows.append({"topology": topo, "D": int(D[1:]), **{f"hop{h}": v for h, v in g.items()},
                     "exact": ex["pearson"], "fo": fo["pearson"], "fo_s": fo["spearman"], "fo_last": fo["pearson_last_hop"]})
    if rows:
        df = pd.DataFrame(rows)
        hops = sorted(int(c[3:]) for c in df.columns if c.startswith("hop"))
        out.append("| topology | D | runs | " + " | ".join(f"mean abs GT hop {h}" for h in hops) +
                   " | exact vs GT (Pearson) | first_order vs GT (Pearson) | first_order (Spearman) | first_order "
                   f"Pearson at hop {hops[-1]} |\n|---|---|---|" + "---|" * len(hops) + "---|---|---|---|")
        for (topo, D), g in df.groupby(["topology", "D"]):
            out.append(f"| {topo} | {D} | {len(g)} | " + " | ".join(pm(g[f"hop{h}"], 2) for h in hops) +
                       f" | {pm(g.exact, 4)} | {pm(g.fo)} | {pm(g.fo_s)} | {pm(g.fo_last)} |")
        out.append("")
    rows = []
    for d in sorted((root / "churn").glob("*_s*_*")):
        if not (d / "detect" / "summary.json").exists() or not (d / "value" / "influence.csv").exists():
            continue
        topo, seed, tag = d.name.split("_", 2)
        ref = root / "churn" / f"{topo}_{seed}_none" / "value" / "influence.csv"
        if not ref.exists():
            continue
        a = pd.read_csv(ref).sort_values("source").influence.to_numpy()
        b = pd.read_csv(d / "value" / "influence.csv").sort_values("source").influence.to_numpy()
        m = pd.read_csv(d / "metrics.csv")
        rows.append({"topology": topo, "churn": tag, "online": float(m["online"].mean()) if "online" in m else 1.0,
                     "tau": float(kendalltau(a, b)[0]),
                     "auc": json.loads((d / "detect" / "summary.json").read_text())["roc_auc"],
                     "acc": float(m[m["round"] == m["round"].max()].probe_acc.mean())})
    if rows:
        df = pd.DataFrame(rows)
        out.append("| topology | churn | runs | share online | Kendall τ of node values vs churn-free | detect ROC AUC | "
                   "final probe acc |\n|---|---|---|---|---|---|---|")
        for (topo, tag), g in df.groupby(["topology", "churn"], sort=False):
            out.append(f"| {topo} | {tag} | {len(g)} | {pm(g.online, 2)} | {pm(g.tau)} | {pm(g.auc)} | {pm(g.acc)} |")
        out.append("")
    rows = []
    for d in sorted((root / "compress").glob("*_s*_*")):
        if not (d / "est_first_order" / "alignment.json").exists():
            continue
        topo, seed, tag = d.name.split("_", 2)
        m = pd.read_csv(d / "metrics.csv")
        if "bytes_sent" in m:
            mb = float(m.bytes_sent.sum()) / 2**20
        else:
            mb = float(m.out_degree.sum()) * json.loads((d / "manifest.json").read_text())["num_params"] * 8 / 2**20
        ex, fo = alignment(d / "est_exact"), alignment(d / "est_first_order")
        rows.append({"topology": topo, "compression": tag, "MB": mb,
                     "acc": float(m[m["round"] == m["round"].max()].probe_acc.mean()),
                     "exact": ex["pearson"], "fo": fo["pearson"], "fo_s": fo["spearman"]})
    if rows:
        df = pd.DataFrame(rows)
        out.append("| topology | compression | runs | MB sent (whole run) | final probe acc | exact vs GT (Pearson) | "
                   "first_order vs GT (Pearson) | first_order (Spearman) |\n|---|---|---|---|---|---|---|---|")
        for (topo, tag), g in df.groupby(["topology", "compression"], sort=False):
            out.append(f"| {topo} | {tag} | {len(g)} | {pm(g.MB, 1)} | {pm(g.acc)} | {pm(g.exact, 4)} | {pm(g.fo)} | "
                       f"{pm(g.fo_s)} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", nargs="+", default=list(STUDIES), choices=list(STUDIES))
    ap.add_argument("--out", default="outputs/network_study")
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--hops", type=int, default=4)
    ap.add_argument("--gt-rounds", default="10:30:10", help="rounds measured by gt/estimate (a:b:k)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--gamma", type=float, default=0.5)
    ap.add_argument("--collect", action="store_true", help="only build the tables from the runs under --out")
    args = ap.parse_args()
    if args.collect:
        print(collect(Path(args.out)))
        return
    import os

    os.environ.setdefault("DICE_LATEST", "")
    import torch

    torch.set_num_threads(1)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    report = []
    for name in args.study:
        t0 = time.perf_counter()
        table = STUDIES[name](args, root)
        secs = time.perf_counter() - t0
        block = f"## {name} ({secs:.0f} s)\n\n{table}\n"
        print(block, flush=True)
        report.append(block)
    (root / "report.md").write_text("\n".join(report))


if __name__ == "__main__":
    main()
