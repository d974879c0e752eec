"""Faithfulness of DICE estimates against counterfactual ground truth (spec §3, §4, §6).

Four studies, each written under ``outputs/faithfulness/<study>/`` (run directories, tables, PNG plots,
a log of the library's own messages) and printed as a table:

  digits    digits MLP, 16 nodes, ring and exponential, lr 0.05, float64: Spearman/Pearson/sign agreement
            of first_order and exact against GT per hop, for batch units (all sources, every k-th round)
            and for sample units (a seeded subset of samples per batch).
  paper     the paper's alignment preset (configs/experiment/paper_alignment*.yaml) through the CLI:
            the CIFAR-100 preset must fail offline with exit code 2 naming data/cifar-100-python; the
            digits twin is trained and measured with `dice gt` / `dice estimate` (both methods, hops 1-3).
  lr        learning-rate sweep on digits, 16-node exponential: Spearman and relative error per hop.
  topology  influence against the source's out-degree (star hub vs leaves, exponential, Erdős–Rényi):
            all sources measured as recorded, plus the literal "same batch at another node" experiment
            (one round's batch rows swapped in a copy of the batch plan, GT re-simulated per placement).

The studies call what the CLI calls, in-process: configs are composed by Hydra from ``configs/`` exactly
as ``dice train`` / ``dice gt`` / ``dice estimate`` compose them, then ``dice_cli.training.train`` and
``dice_cli.influence.measure.measure`` run with the typed configs (so every run directory is the one the
CLI would write, and re-running the equivalent CLI command on it reports "already complete"). The paper
study drives the real CLI through subprocesses, because selecting the preset from the CLI is the point.
The plumbing (study directories, Hydra composition, in-process and subprocess commands, tables, plots, the main
loop) is shared with scripts/detect_study.py in scripts/study_harness.py.

    .venv/bin/python scripts/faithfulness.py --quick                     # all studies, smoke sizes (< 2 min)
    .venv/bin/python scripts/faithfulness.py --smoke --out /tmp/f        # every code path, tiny sizes (< 30 s)
    .venv/bin/python scripts/faithfulness.py --study digits              # one study, full size
    .venv/bin/python scripts/faithfulness.py --study lr --lrs 0.01 0.1 --rounds 60

Correlations are computed two ways per hop: over all rows of the influence table (what ``alignment.json``
reports; for hop s ≥ 1 these include the targets the unit cannot reach in s rounds, whose GT and estimate
are both exactly 0) and over the reached rows only (GT ≠ 0 or estimate ≠ 0), which is the stricter test.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from study_harness import (Study, cli_all, cli_steps, in_process, main_parser, parse, pyplot, run_studies, save_figure,
                           save_table, train_run)

METHODS = ["exact", "first_order"]
NODES = 16              # nodes of the digits, lr and topology studies (--nodes)


# --------------------------------------------------------------------------- plumbing

def digits_mlp(args, topology: Sequence[str], lr: float, rounds: int) -> List[str]:
    """``dice train`` overrides of the digits, lr and topology studies: digits MLP, --nodes nodes, float64, --seed."""
    return ["dataset=digits", "model=mlp", f"nodes={args.nodes}", *topology, f"lr={lr}", "dtype=float64",
            f"rounds={rounds}", f"seed={args.seed}"]


def measure_run(study: Study, kind: str, run: Path, out: Path, overrides: Sequence[str]) -> Path:
    """``dice gt|estimate run=RUN out=OUT overrides... progress=false`` in-process."""
    from dice_cli.config import EstimateConfig, GtConfig
    from dice_cli.influence.measure import measure

    in_process(study, kind, [f"run={run}", f"out={out}", *overrides, "progress=false"],
               GtConfig if kind == "gt" else EstimateConfig,
               lambda typed, config: measure(typed, kind, Path(out), config))
    return Path(out)


def gt_and_estimates(study: Study, run: Path, selection: Sequence[str], tag: str = "") -> Dict[str, Path]:
    """GT into RUN/gt<tag>, then both estimates into RUN/est_<method><tag>, aligned with that GT."""
    gt_dir = measure_run(study, "gt", run, run / f"gt{tag}", selection)
    dirs = {"gt": gt_dir}
    for method in METHODS:
        dirs[method] = measure_run(study, "estimate", run, run / f"est_{method}{tag}",
                                   [*selection, f"method={method}", f"gt={gt_dir}"])
    return dirs


def read_table(d: Path) -> pd.DataFrame:
    return pd.read_csv(d / "influence.csv")


def agreement_rows(gt: pd.DataFrame, est: pd.DataFrame, labels: dict) -> List[dict]:
    """Per hop: the library's agreement over all rows and over reached rows (GT ≠ 0 or estimate ≠ 0)."""
    from dice_cli.influence.alignment import agreement, merge

    merged = merge(gt, est)
    rows = []
    for h, d in merged.groupby("hop"):
        all_ = agreement(d["gt"].to_numpy(), d["est"].to_numpy())
        r = d[(d["gt"] != 0) | (d["est"] != 0)]
        reached = agreement(r["gt"].to_numpy(), r["est"].to_numpy())
        rows.append({**labels, "hop": int(h),
                     "spearman": reached["spearman"], "pearson": reached["pearson"],
                     "sign_agreement": reached["sign_agreement"], "rel_error": reached["relative_error"],
                     "n": reached["n"], "spearman_all_rows": all_["spearman"], "n_all_rows": all_["n"],
                     "mean_abs_gt": reached["mean_abs_gt"]})
    return rows


TABLE_COLS = ["topology", "unit", "method", "hop", "spearman", "pearson", "sign_agreement", "rel_error", "n",
              "spearman_all_rows", "n_all_rows"]


# --------------------------------------------------------------------------- study 1: digits

def study_digits(args, root: Path) -> dict:
    st = Study(root, "digits", args.fresh)
    rounds = args.rounds or (40 if args.quick else 200)
    every = args.every or 10
    sample_every = 20 if not args.quick else 20
    samples = args.samples or (2 if args.quick else 4)
    rows, fd_rows = [], []
    for topo in args.topologies:
        run, _ = train_run(st, st.dir / topo, digits_mlp(args, [f"topology={topo}"], args.lr, rounds))
        batch = gt_and_estimates(st, run, ["unit=batch", f"hops={args.hops}", f"rounds=every:{every}"])
        sample = gt_and_estimates(st, run, ["unit=sample", f"samples={samples}", f"hops={args.hops}",
                                            f"rounds=every:{sample_every}"], tag="_sample")
        for unit, dirs in [("batch", batch), ("sample", sample)]:
            gt = read_table(dirs["gt"])
            for method in METHODS:
                rows += agreement_rows(gt, read_table(dirs[method]),
                                       {"topology": topo, "unit": unit, "method": method})
        rows_fd = _finite_difference_check(st, run, topo, args.hops, every)
        fd_rows.extend(rows_fd)
    df = pd.DataFrame(rows)
    save_table(st, pd.DataFrame(fd_rows),
                 f"exact vs central finite differences of GT in the unit weight (w = 1 ± {FD_EPS:g}), batch units "
                 f"every:{every}: the derivative the exact method claims to be (spec §4)",
                 ["topology", "hop", "spearman", "pearson", "rel_error", "median_round_rel_error",
                  "max_round_rel_error", "rounds_over_1e-4", "n"], name="exact_vs_fd")
    title = (f"digits MLP, {args.nodes} nodes, lr {args.lr}, float64, {rounds} rounds; batch units every:{every}, "
             f"sample units samples={samples} every:{sample_every}; reached rows (all rows in the last columns)")
    save_table(st, df, title, TABLE_COLS)
    _plot_spearman_bars(df, st.dir / "spearman_per_hop.png")
    _plot_scatter(st, args.topologies)
    return st.finish(f"; plots: {st.dir}/spearman_per_hop.png, {st.dir}/scatter.png", table=df)


FD_EPS = 1e-4


def _finite_difference_check(st: Study, run: Path, topo: str, hops: int, every: int) -> List[dict]:
    """Exact estimate against (GT(w=1−ε) − GT(w=1+ε)) / (2ε): GT re-simulated with the unit's weights at
    1 ± ε instead of 0 (``Units.weights(scale=...)``). The gap between exact and GT is then split into the
    method's own error (this check) and the non-linearity of removing a whole unit (the main table)."""
    import torch

    from dice_cli.influence.alignment import agreement, merge
    from dice_cli.influence.gt import ground_truth
    from dice_cli.influence.units import Units, select_units
    from dice_cli.replay import open_replay

    class Scaled(Units):
        scale = 0.0

        def weights(self, dtype, device, scale=None):
            return super().weights(dtype, device, self.scale)

        def subset(self, idx):
            u = super().subset(idx)
            out = Scaled(u.round, u.kind, u.source, u.sample, u.mask)
            out.scale = self.scale
            return out

    rp = open_replay(run)
    train_cfg, setup = rp.cfg, rp.setup
    q = rp.q("one")
    fd = []
    for t in range(0, train_cfg.rounds - hops + 1, every):
        state = rp.state_at(t)
        u = select_units(setup.plan[t], "batch", "all", "all", 0, t)
        tabs = {}
        for sign in (-1, 1):
            su = Scaled(u.round, u.kind, u.source, u.sample, u.mask)
            su.scale = 1.0 + sign * FD_EPS
            with torch.no_grad():
                tabs[sign] = ground_truth(setup.dyn, state, su, hops, setup.x_probe, setup.y_probe,
                                          setup.shared_probe, q)
        d = tabs[-1].copy()
        d["influence"] = (tabs[-1]["influence"].to_numpy() - tabs[1]["influence"].to_numpy()) / (2 * FD_EPS)
        fd.append(d)
    fd = pd.concat(fd, ignore_index=True)
    m = merge(fd, read_table(run / "est_exact"))
    rows = []
    for h, d in m.groupby("hop"):
        d = d[(d["gt"] != 0) | (d["est"] != 0)]
        a = agreement(d["gt"].to_numpy(), d["est"].to_numpy())
        # per measured round: Σ|FD − exact| / Σ|FD|. The MLP is piecewise linear (ReLU): a ±ε step that
        # crosses a kink in some round makes that round's FD differ from the derivative (not a method error)
        per_round = d.groupby("round").apply(
            lambda g: float((g["gt"] - g["est"]).abs().sum() / max(g["gt"].abs().sum(), 1e-300)))
        rows.append({"topology": topo, "hop": int(h), "spearman": a["spearman"], "pearson": a["pearson"],
                     "rel_error": a["relative_error"], "median_round_rel_error": float(per_round.median()),
                     "max_round_rel_error": float(per_round.max()),
                     "rounds_over_1e-4": f"{int((per_round > 1e-4).sum())}/{len(per_round)}", "n": a["n"]})
    return rows


def _plot_spearman_bars(df: pd.DataFrame, path: Path) -> None:
    p = pyplot()
    units = sorted(df["unit"].unique())
    fig, axes = p.subplots(1, len(units), figsize=(6 * len(units), 3.8), squeeze=False)
    for ax, unit in zip(axes[0], units):
        d = df[df["unit"] == unit]
        for (topo, method), g in d.groupby(["topology", "method"]):
            ax.plot(g["hop"], g["spearman"], marker="o", ls="-" if method == "exact" else "--",
                    label=f"{topo} · {method}")
        ax.axhline(0.99, color="grey", lw=0.6, ls=":")
        ax.set_xlabel("hop s (0 = direct term)")
        ax.set_ylabel("Spearman(GT, estimate), reached rows")
        ax.set_title(f"{unit} units")
        ax.legend(fontsize=8)
    save_figure(fig, path)


def _plot_scatter(st: Study, topologies: Sequence[str]) -> None:
    from dice_cli.influence.alignment import merge

    p = pyplot()
    fig, axes = p.subplots(len(topologies), 2, figsize=(10, 4.6 * len(topologies)), squeeze=False)
    for i, topo in enumerate(topologies):
        gt = read_table(st.dir / topo / "gt")
        for j, method in enumerate(METHODS):
            m = merge(gt, read_table(st.dir / topo / f"est_{method}"))
            m = m[(m["gt"] != 0) | (m["est"] != 0)]
            ax = axes[i, j]
            for h, d in m.groupby("hop"):
                ax.scatter(d["gt"], d["est"], s=5, alpha=0.5, label=f"hop {h}")
            lim = float(np.abs(m[["gt", "est"]].to_numpy()).max())
            ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.7)
            ax.set_xscale("symlog", linthresh=lim * 1e-4)
            ax.set_yscale("symlog", linthresh=lim * 1e-4)
            ax.set_xlabel("GT")
            ax.set_ylabel(method)
            ax.set_title(f"{topo}: batch units, {method}")
            ax.legend(fontsize=7, markerscale=2)
    save_figure(fig, st.dir / "scatter.png", dpi=100)


# --------------------------------------------------------------------------- study 2: the paper preset

def study_paper(args, root: Path) -> dict:
    st = Study(root, "paper", args.fresh)
    rounds = args.rounds or (40 if args.quick else 200)
    every = args.every or 10
    hops = args.hops
    # 1. the CIFAR-100 preset offline: a clear usage error (exit 2) that names the missing folder; and "+experiment"
    cifar, plus = cli_all(st, [["train", "experiment=paper_alignment", f"out={st.dir / 'cifar100_run'}",
                                "data_dir=data", "progress=false"],
                               ["train", "+experiment=paper_alignment_digits", "--cfg", "job"]])
    msg = (cifar.stderr.strip().splitlines() or [""])[-1]
    cifar_ok = cifar.returncode == 2 and "cifar-100-python" in msg
    print(f"\n[paper] dice train experiment=paper_alignment (offline): exit {cifar.returncode}\n  {msg}")
    plus_msg = (plus.stderr.strip().splitlines() or [""])[0]
    print(f"[paper] dice train +experiment=paper_alignment_digits --cfg job: exit {plus.returncode} "
          f"({plus_msg})")
    # 2. the digits twin through the CLI: train, gt, both estimates (side by side)
    run = st.dir / "digits_run"
    steps = [
        ["train", "experiment=paper_alignment_digits", "dtype=float64", f"rounds={rounds}", f"out={run}",
         "progress=false"],
        ["gt", f"run={run}", f"hops={hops}", f"rounds=every:{every}", "progress=false"],
        ["estimate", f"run={run}", f"hops={hops}", f"rounds=every:{every}", "method=exact", "progress=false"],
        ["estimate", f"run={run}", f"hops={hops}", f"rounds=every:{every}", "method=first_order",
         f"out={run / 'est_first_order'}", "progress=false"],
    ]
    cli_steps(st, [steps[:1], steps[1:2], steps[2:]])
    cfg = json.loads(json.dumps(__import__("yaml").safe_load((run / "config.yaml").read_text())))
    gt = read_table(run / "gt")
    rows = []
    for method, d in [("exact", run / "estimate"), ("first_order", run / "est_first_order")]:
        rows += agreement_rows(gt, read_table(d), {"topology": "exponential", "unit": "batch", "method": method})
        rep = json.loads((d / "alignment.json").read_text())
        st.log(f"alignment.json ({method}): " + json.dumps(rep["per_hop"]))
    df = pd.DataFrame(rows)
    final = json.loads((run / "manifest.json").read_text()).get("final", {})
    title = (f"paper alignment preset on digits (4 nodes exponential, mlp_paper {cfg['model']['hidden']}, "
             f"batch {cfg['batch_size']}, lr {cfg['lr']}, per_node {cfg['partition']['per_node']}, probe "
             f"{cfg['probe']['size']}), {rounds} rounds, float64, batch units every:{every}")
    save_table(st, df, title, TABLE_COLS)
    (st.dir / "checks.json").write_text(json.dumps({
        "cifar100_offline": {"exit": cifar.returncode, "message": msg, "ok": cifar_ok},
        "plus_experiment": {"exit": plus.returncode, "message": plus_msg},
        "digits_final": final, "commands": [" ".join(["dice", *a]) for a in steps]}, indent=2))
    secs = st.seconds()
    print(f"[paper] final probe acc {final.get('probe_acc', float('nan')):.3f}; {secs:.1f} s; plots: "
          f"{run}/estimate/alignment.png, {run}/est_first_order/alignment.png")
    return {"study": "paper", "seconds": secs, "table": df, "cifar_ok": cifar_ok}


# --------------------------------------------------------------------------- study 3: lr sweep

def study_lr(args, root: Path) -> dict:
    st = Study(root, "lr", args.fresh)
    rounds = args.rounds or (40 if args.quick else 100)
    every = args.every or 10
    lrs = args.lrs or ([0.01, 0.1, 0.5] if args.quick else [0.001, 0.01, 0.05, 0.1, 0.2, 0.5])
    rows = []
    for lr in lrs:
        run = st.dir / f"lr_{lr:g}"
        try:
            train_run(st, run, digits_mlp(args, ["topology=exponential"], lr, rounds))
        except Exception as e:  # a diverged run is a result too
            print(f"[lr] lr={lr:g}: training failed: {e}")
            continue
        dirs = gt_and_estimates(st, run, ["unit=batch", f"hops={args.hops}", f"rounds=every:{every}"])
        acc = json.loads((run / "manifest.json").read_text()).get("final", {}).get("probe_acc", float("nan"))
        gt = read_table(dirs["gt"])
        for method in METHODS:
            for r in agreement_rows(gt, read_table(dirs[method]), {"lr": lr, "method": method}):
                rows.append({**r, "probe_acc": acc})
    df = pd.DataFrame(rows)
    title = (f"lr sweep: digits MLP, {args.nodes}-node exponential, float64, {rounds} rounds, batch units "
             f"every:{every}, all sources (reached rows)")
    save_table(st, df, title, ["lr", "probe_acc", "method", "hop", "spearman", "pearson", "sign_agreement",
                                 "rel_error", "n", "spearman_all_rows"])
    p = pyplot()
    fig, axes = p.subplots(1, 2, figsize=(12, 4.2))
    for (method, hop), g in df.groupby(["method", "hop"]):
        g = g.sort_values("lr")
        kw = dict(marker="o", ls="-" if method == "exact" else "--", label=f"{method} hop {hop}",
                  color=p.get_cmap("viridis")(hop / max(args.hops, 1)))
        axes[0].plot(g["lr"], g["spearman"], **kw)
        axes[1].plot(g["lr"], g["rel_error"], **kw)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
    axes[0].set_ylabel("Spearman(GT, estimate)")
    axes[1].set_ylabel("relative error Σ|GT − E| / Σ|GT|")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7, ncol=2)
    axes[0].set_title("rank agreement vs learning rate")
    axes[1].set_title("relative error vs learning rate")
    save_figure(fig, st.dir / "lr_sweep.png")
    return st.finish(f"; plot: {st.dir}/lr_sweep.png", table=df)


# --------------------------------------------------------------------------- study 4: topology

def out_degree(W: np.ndarray) -> np.ndarray:
    """Out-degree of each sender j: receivers k ≠ j with W_kj > 0 (row k = weights receiver k puts on senders)."""
    A = W > 0
    np.fill_diagonal(A, False)
    return A.sum(axis=0)


def swapped_gt(setup, state, t: int, ref: int, place: int, hops: int, q):
    """GT of node ``ref``'s round-t batch when it is trained on by node ``place`` instead.

    A copy of the dynamics gets a copy of the batch plan with rows ``ref`` and ``place`` of round t
    swapped (``place`` trains on B_ref^t, ``ref`` on B_place^t; every other round and node is unchanged,
    so the state at the start of round t is the recorded one). The unit is ``place``'s whole batch.
    """
    import torch

    from dice_cli.influence.gt import ground_truth
    from dice_cli.influence.units import select_units

    dyn = copy.copy(setup.dyn)
    plan = setup.dyn.plan.clone()
    if place != ref:
        plan[t, [ref, place]] = setup.dyn.plan[t, [place, ref]]
    dyn.plan = plan
    units = select_units(plan[t].cpu().numpy(), "batch", [place], "all", 0, t)
    with torch.no_grad():
        return ground_truth(dyn, state, units, hops, setup.x_probe, setup.y_probe, setup.shared_probe, q)


def study_topology(args, root: Path) -> dict:
    from dice_cli.replay import open_replay

    st = Study(root, "topology", args.fresh)
    rounds = args.rounds or (40 if args.quick else 100)
    every = args.every or 10
    swap_every = 20
    hops = args.hops
    topologies = [("star", ["topology=star"]), ("exponential", ["topology=exponential"]),
                  ("erdos_renyi", ["topology=erdos_renyi", "topology.p=0.2"])]
    if args.quick:
        topologies = topologies[:2]
    per_unit, swaps, decay = [], [], []
    for name, topo in topologies:
        run, _ = train_run(st, st.dir / name, digits_mlp(args, topo, args.lr, rounds))
        gt_dir = measure_run(st, "gt", run, run / "gt", ["unit=batch", f"hops={hops}", f"rounds=every:{every}"])
        W = np.load(run / "mixing.npy")
        deg = out_degree(W)
        gt = read_table(gt_dir)
        keys = ["round", "source"]
        direct = gt[gt["hop"] == 0].set_index(keys)["influence"].abs()
        later = gt[gt["hop"] >= 1]
        spread = later.groupby(keys)["influence"].apply(lambda v: v.abs().sum())
        others = later[later["target"] != later["source"]].groupby(keys)["influence"].apply(
            lambda v: v.abs().sum())
        u = pd.DataFrame({"direct_abs": direct, "total_abs_hops_ge1": spread,
                          "others_abs_hops_ge1": others}).reset_index()
        u["topology"], u["out_degree"] = name, deg[u["source"].to_numpy()]
        u["self_weight"] = np.diag(W)[u["source"].to_numpy()]
        u["normalised"] = u["total_abs_hops_ge1"] / u["direct_abs"]
        per_unit.append(u)
        per_hop = gt.groupby(["round", "source", "hop"])["influence"].apply(lambda v: v.abs().sum())
        for h, v in per_hop.groupby("hop").mean().items():
            decay.append({"topology": name, "hop": int(h), "mean_sum_abs_gt": float(v)})

        # the literal experiment: the same batch placed at every node in turn
        rp = open_replay(run)
        setup = rp.setup
        q = rp.q("one")
        ref = 1 if name == "star" else 0          # star: a leaf's batch; elsewhere node 0's
        places = range(args.nodes) if not args.quick else ([0, 1, 2, 3] if name == "star" else [0, 1, 2])
        for t in range(0, rounds - hops + 1, swap_every):
            state = rp.state_at(t)
            for b in places:
                df = swapped_gt(setup, state, t, ref, b, hops, q)
                swaps.append({"topology": name, "round": t, "ref": ref, "place": b, "out_degree": int(deg[b]),
                              "self_weight": float(W[b, b]),
                              "direct_abs": float(df.loc[df["hop"] == 0, "influence"].abs().sum()),
                              "total_abs_hops_ge1": float(df.loc[df["hop"] >= 1, "influence"].abs().sum()),
                              "others_abs_hops_ge1": float(df.loc[(df["hop"] >= 1) & (df["target"] != b),
                                                                  "influence"].abs().sum()),
                              **{f"hop{h}_sum_abs": float(df.loc[df["hop"] == h, "influence"].abs().sum())
                                 for h in range(1, hops + 1)}})
        st.log(f"{name}: out-degrees {deg.tolist()}")
    units = pd.concat(per_unit, ignore_index=True)
    sw = pd.DataFrame(swaps)
    units.to_csv(st.dir / "per_unit.csv", index=False)
    sw.to_csv(st.dir / "same_batch.csv", index=False)
    pd.DataFrame(decay).to_csv(st.dir / "decay.csv", index=False)

    # summaries: by topology and out-degree
    a = units.groupby(["topology", "out_degree"]).agg(
        units=("source", "size"), self_weight=("self_weight", "first"),
        direct_abs=("direct_abs", "mean"), total_abs_hops_ge1=("total_abs_hops_ge1", "mean"),
        others_abs_hops_ge1=("others_abs_hops_ge1", "mean"), normalised=("normalised", "mean")).reset_index()
    b = sw.groupby(["topology", "out_degree"]).agg(
        placements=("place", "size"), self_weight=("self_weight", "first"), direct_abs=("direct_abs", "mean"),
        total_abs_hops_ge1=("total_abs_hops_ge1", "mean"),
        others_abs_hops_ge1=("others_abs_hops_ge1", "mean")).reset_index()
    b["normalised"] = b["total_abs_hops_ge1"] / b["direct_abs"]
    rho = {}
    for name, g in units.groupby("topology"):
        from scipy import stats
        rho[name] = float(stats.spearmanr(g["out_degree"], g["total_abs_hops_ge1"])[0]) \
            if g["out_degree"].nunique() > 1 else float("nan")
    a["spearman_deg_vs_total(topology)"] = a["topology"].map(rho)
    title_a = (f"all sources as recorded (lr {args.lr}, {rounds} rounds, batch units every:{every}, hops 1..{hops}): "
               f"mean Σ_s≥1 Σ_k |GT| per out-degree")
    save_table(st, a, title_a, name="by_degree")
    title_b = (f"same batch at another node (round every:{swap_every}, one reference batch per round, "
               f"rows swapped in a copy of the plan): mean Σ_s≥1 Σ_k |GT| per out-degree of the placement")
    save_table(st, b, title_b, name="same_batch")
    dec = pd.DataFrame(decay)
    save_table(st, dec.pivot(index="hop", columns="topology", values="mean_sum_abs_gt").reset_index(),
                 "hop decay: mean over units of Σ_k |GT| per hop", name="decay")

    p = pyplot()
    fig, axes = p.subplots(1, 4, figsize=(21, 4.6))
    rng = np.random.default_rng(0)
    colors = {name: p.get_cmap("tab10")(i) for i, (name, _) in enumerate(topologies)}
    for name, g in units.groupby("topology"):
        jit = rng.uniform(-0.15, 0.15, len(g))
        axes[0].scatter(g["out_degree"] + jit, g["total_abs_hops_ge1"], s=8, alpha=0.45, color=colors[name],
                        label=f"{name} (recorded batches)")
        axes[1].scatter(g["out_degree"] + jit, g["others_abs_hops_ge1"], s=8, alpha=0.45, color=colors[name],
                        label=f"{name} (recorded batches)")
        axes[2].scatter(g["out_degree"] + jit, g["normalised"], s=8, alpha=0.45, color=colors[name], label=name)
    for name, g in sw.groupby("topology"):
        for ax, col in [(axes[0], "total_abs_hops_ge1"), (axes[1], "others_abs_hops_ge1")]:
            m = g.groupby("out_degree")[col].mean()
            ax.plot(m.index, m.values, marker="s", ms=8, lw=1.5, color=colors[name], mec="k",
                    label=f"{name}: same batch moved (mean)")
    axes[0].set_ylabel("Σ_{s≥1} Σ_k |GT|  (per unit)")
    axes[1].set_ylabel("Σ_{s≥1} Σ_{k≠j} |GT|  (per unit)")
    axes[2].set_ylabel("Σ_{s≥1} Σ_k |GT| / |GT hop 0|")
    for ax in axes[:3]:
        ax.set_xlabel("out-degree of the source j (receivers ≠ j)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    axes[0].set_title("total influence vs out-degree")
    axes[1].set_title("influence on the other nodes only")
    axes[2].set_title("normalised by the direct term")
    for name, g in dec.groupby("topology"):
        axes[3].plot(g["hop"], g["mean_sum_abs_gt"], marker="o", color=colors[name], label=name)
    axes[3].set_yscale("log")
    axes[3].set_xlabel("hop s (0 = direct)")
    axes[3].set_ylabel("mean over units of Σ_k |GT|")
    axes[3].set_title("hop decay per topology")
    axes[3].legend(fontsize=8)
    save_figure(fig, st.dir / "topology.png")
    return st.finish(f"; plot: {st.dir}/topology.png", table=a)


# --------------------------------------------------------------------------- main

STUDIES = {"digits": study_digits, "paper": study_paper, "lr": study_lr, "topology": study_topology}


# smallest sizes that still run every study end to end (--smoke; the numbers mean nothing)
SMOKE = {"quick": True, "nodes": 4, "rounds": 4, "every": 2, "hops": 1, "samples": 1, "lrs": [0.5],
         "topologies": ["ring"]}


def main(argv: Optional[List[str]] = None) -> int:
    ap = main_parser(__doc__, STUDIES, "outputs/faithfulness",
                     {"nodes": NODES, "lr": 0.05, "topologies": ["ring", "exponential"]},
                     {"smoke": "smallest run of every study (4 nodes, 4 rounds, 1 hop, one lr, ring only; about 25 s): "
                               "checks the code paths, its numbers mean nothing",
                      "quick": "smoke sizes: short runs, fewer rounds/lrs (< 2 min)",
                      "rounds": "training rounds (default: 200 digits/paper, 100 lr/topology)",
                      "nodes": "nodes of the digits, lr and topology studies",
                      "lr": "lr of the digits and topology studies", "topologies": "digits study graphs",
                      "threads": "torch CPU threads (1: these models are tiny and the machine is shared)"})
    ap.add_argument("--every", type=int, help="measure every k-th round (default 10)")
    ap.add_argument("--hops", type=int, default=3)
    ap.add_argument("--samples", type=int, help="sample units per batch (digits study; default 4)")
    ap.add_argument("--lrs", type=float, nargs="+", help="lr sweep values")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse", dest="fresh", action="store_false",
                    help="keep existing study directories (complete runs are skipped, not recomputed)")
    return run_studies("faithfulness", STUDIES, parse(ap, argv, SMOKE))


if __name__ == "__main__":
    sys.exit(main())
