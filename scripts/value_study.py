"""Whole-run influence study (``dice value``): how well exact, first_order and cascade_sum track GT_run.

For every topology × learning rate it trains the digits MLP (16 nodes, 200 rounds, float64) with ``dice train``
(in-process, the CLI's config composition) and, on that run directory, through the same library calls
``dice value`` makes:

  - GT_run by retraining (copies axis) for all node units and a seeded subset of sample units (``--samples`` per
    node), and the estimates exact, first_order, cascade_sum (hops 1 and 3) for every unit;
  - Spearman / Pearson / sign agreement / relative error of each estimate against GT_run over all
    (unit, target) pairs (node: 16 × 16; sample: subset × 16);
  - LDS (``--lds`` subsets, α = 0.5 node / 0.1 sample units) of every estimate and of GT_run itself;
  - the cascade over the run: the share of node k's loss reduction Σ_j −GT(j, k) that comes from sources at graph
    distance d from k (d = 0: its own data), mean over targets (a plot and a table).

    .venv/bin/python scripts/value_study.py                                # the full grid (2 × 3 runs)
    .venv/bin/python scripts/value_study.py --lrs 0.05 --topologies ring   # one run
    .venv/bin/python scripts/value_study.py --smoke                        # tiny (tests)

Results: ``outputs/value_study/grid/`` (results.csv/.md, lds.csv/.md, cascade.csv/.md, cascade.png, cost.csv/.md,
log.txt with the equivalent CLI commands, one run directory per setting). See docs/value.md.
"""
from __future__ import annotations

import time
from pathlib import Path

import networkx as nx
import numpy as np
import pandas as pd
import torch

from study_harness import Study, main_parser, parse, pyplot, run_studies, save_figure, save_table, train_run

from dice_cli.influence.alignment import agreement
from dice_cli.influence.lds import draw_subsets, lds_score
from dice_cli.influence.retrain import gt_values
from dice_cli.influence.run_units import select_run_units
from dice_cli.influence.sweep import exact_values
from dice_cli.influence.value import cascade_values, first_order_values
from dice_cli.replay import StateTape, open_replay

SMOKE = {"nodes": 4, "rounds": 8, "lrs": [0.05], "topologies": ["ring"], "lds": 5, "samples": 2}
METHODS = ["exact", "first_order", "cascade_sum (hops=1)", "cascade_sum (hops=3)"]


def distances(W: np.ndarray) -> np.ndarray:
    """d[j, k]: hops from sender j to receiver k along edges j → k (W[k, j] > 0, k ≠ j); 0 on the diagonal."""
    n = W.shape[0]
    G = nx.DiGraph()
    G.add_nodes_from(range(n))
    G.add_edges_from((j, k) for k in range(n) for j in range(n) if j != k and W[k, j] > 0)
    d = np.full((n, n), -1, dtype=int)
    for j, lengths in nx.all_pairs_shortest_path_length(G):
        for k, L in lengths.items():
            d[j, k] = L
    return d


def grid(args, root: Path) -> dict:
    study = Study(root, "grid")
    n, R, M = args.nodes, args.rounds or 200, args.lds
    corr, lds_rows, cascade_rows, cost = [], [], [], []
    for topo in args.topologies:
        for lr in args.lrs:
            name = f"{topo}_lr{lr}"
            run, t_train = train_run(study, study.dir / name, [f"nodes={n}", f"rounds={R}", f"topology={topo}",
                                                               f"lr={lr}", "dtype=float64"])
            for cmd in [f"run={run} unit=node method=gt lds={M} out={run}/value_gt",
                        f"run={run} unit=node method=exact lds={M}",
                        f"run={run} unit=sample samples={args.samples} method=gt lds={M} out={run}/value_gt_samples",
                        f"run={run} unit=node method=cascade_sum hops=3 out={run}/value_cascade3"]:
                study.log(f"$ dice value {cmd}   # equivalent CLI (the script calls the library directly)")
            rp = open_replay(run, "float64", "cpu")
            dyn, T, setup = rp.dyn, rp.rounds, rp.setup
            q, probe = rp.q("one"), rp.probe
            s0 = rp.state_at(0)
            plan, parts = setup.plan, setup.nodes.parts
            every = select_run_units(plan, parts, "sample", (0, T))                 # every sample drawn
            nodes = select_run_units(plan, parts, "node", (0, T))
            subset = select_run_units(plan, parts, "sample", (0, T), samples=args.samples, seed=0)
            where = {int(s): i for i, s in enumerate(every.sample)}
            pos = np.array([where[int(s)] for s in subset.sample])
            t0 = time.perf_counter()
            tape = StateTape(dyn, s0, T)
            cost.append((name, "state tape", time.perf_counter() - t0))
            est = {}
            for m, fn in [("exact", lambda: exact_values(dyn, tape, every, probe, q, chunk=n)),
                          ("first_order", lambda: first_order_values(dyn, tape, every, probe, q, chunk=n)),
                          ("cascade_sum (hops=1)", lambda: cascade_values(dyn, tape, every, probe, q, 1, chunk=n)),
                          ("cascade_sum (hops=3)", lambda: cascade_values(dyn, tape, every, probe, q, 3, chunk=n))]:
                t0 = time.perf_counter()
                V = fn().T.numpy()                                                   # [all samples, n]
                cost.append((name, m, time.perf_counter() - t0))
                node_v = np.stack([V[every.source == j].sum(0) for j in range(n)])   # node = Σ of its samples
                est[m] = {"node": node_v, "sample": V[pos]}
            t0 = time.perf_counter()
            gt = {"node": gt_values(dyn, s0, T, nodes, probe, q, chunk=n)["influence"].numpy()}
            cost.append((name, "gt node units", time.perf_counter() - t0))
            t0 = time.perf_counter()
            gt["sample"] = gt_values(dyn, s0, T, subset, probe, q, chunk=len(subset))["influence"].numpy()
            cost.append((name, f"gt {len(subset)} sample units", time.perf_counter() - t0))
            acc = float(pd.read_csv(run / "metrics.csv").query(f"round == {T - 1}")["probe_acc"].mean())
            for kind in ("node", "sample"):
                for m in METHODS:
                    a = agreement(gt[kind].ravel(), est[m][kind].ravel())
                    corr.append({"topology": topo, "lr": lr, "probe_acc": acc, "unit": kind, "method": m,
                                 "spearman": a["spearman"], "pearson": a["pearson"],
                                 "sign_agreement": a["sign_agreement"], "rel_error": a["relative_error"],
                                 "n": a["n"]})
                U = gt[kind].shape[0]
                alpha = 0.5 if kind == "node" else 0.1
                S = draw_subsets(U, M, alpha, seed=0)
                units = nodes if kind == "node" else subset
                t0 = time.perf_counter()
                actual = gt_values(dyn, s0, T, units, probe, q, chunk=M,
                                   member=torch.as_tensor(S, dtype=torch.float64))["influence"].numpy()
                cost.append((name, f"lds retraining ({kind}, {M} subsets)", time.perf_counter() - t0))
                for m, V in [("gt", gt[kind])] + [(m, est[m][kind]) for m in METHODS]:
                    rep = lds_score(S @ V, actual, seed=0)
                    lds_rows.append({"topology": topo, "lr": lr, "unit": kind, "method": m, "lds": rep["lds"],
                                     "ci_lo": rep["ci"][0], "ci_hi": rep["ci"][1], "targets": rep["targets_scored"],
                                     "subsets": M, "alpha": alpha})
            # the cascade: share of k's loss reduction from sources at graph distance d
            W = dyn.mixing.numpy(0)
            d = distances(W)
            for m, V in [("gt", gt["node"]), ("exact", est["exact"]["node"])]:
                red = -V                                                           # loss reduction j gave k
                share = np.zeros((d.max() + 1, n))
                for k in range(n):
                    tot = red[:, k].sum()
                    for dist in range(d.max() + 1):
                        share[dist, k] = red[d[:, k] == dist, k].sum() / tot
                for dist in range(d.max() + 1):
                    cascade_rows.append({"topology": topo, "lr": lr, "method": m, "distance": dist,
                                         "sources": int((d[:, 0] == dist).sum()),
                                         "share_mean": share[dist].mean(), "share_min": share[dist].min(),
                                         "share_max": share[dist].max()})
            study.log(f"{name}: trained in {t_train:.1f} s, final probe accuracy {acc:.3f}")
    res = pd.DataFrame(corr)
    save_table(study, res, "Estimates vs GT_run over all (unit, target) pairs",
               ["topology", "lr", "probe_acc", "unit", "method", "spearman", "pearson", "sign_agreement",
                "rel_error", "n"], decimals=3)
    save_table(study, pd.DataFrame(lds_rows), f"LDS ({M} subsets, bootstrap 95% interval over subsets)",
               ["topology", "lr", "unit", "method", "lds", "ci_lo", "ci_hi", "targets", "alpha"], name="lds",
               decimals=3)
    casc = pd.DataFrame(cascade_rows)
    save_table(study, casc, "Share of node k's loss reduction from sources at graph distance d (mean over k)",
               ["topology", "lr", "method", "distance", "sources", "share_mean", "share_min", "share_max"],
               name="cascade", decimals=3)
    save_table(study, pd.DataFrame(cost, columns=["run", "computation", "seconds"]), "Cost (seconds)",
               name="cost", decimals=2)
    _plot_cascade(casc, args.nodes, args.rounds or 200, study.dir / "cascade.png")
    return study.finish(f" ({len(args.topologies) * len(args.lrs)} runs)")


def _plot_cascade(casc: pd.DataFrame, nodes: int, rounds: int, path: Path) -> None:
    """Top: share of k's loss reduction from all sources at distance d; bottom: per source at that distance."""
    plt = pyplot()
    topos = list(dict.fromkeys(casc.topology))
    lrs = sorted(set(casc.lr))
    fig, axes = plt.subplots(2, len(topos), figsize=(5.4 * len(topos), 7.2), squeeze=False)
    colours = plt.get_cmap("viridis", max(len(lrs), 2) + 1)
    for col, topo in enumerate(topos):
        for i, lr in enumerate(lrs):
            for m, style in [("gt", dict(marker="o")), ("exact", dict(ls="--", marker="x", alpha=0.8))]:
                d = casc[(casc.topology == topo) & (casc.lr == lr) & (casc.method == m)].sort_values("distance")
                label = f"{'GT_run' if m == 'gt' else 'exact'}, lr {lr}"
                for row, per in [(0, 1.0), (1, d.sources.to_numpy())]:
                    ax = axes[row, col]
                    ax.plot(d.distance, d.share_mean / per, color=colours(i), label=label, **style)
                    if m == "gt":
                        ax.fill_between(d.distance, d.share_min / per, d.share_max / per, color=colours(i), alpha=0.1)
        top, bottom = axes[0, col], axes[1, col]
        top.set_title(f"{topo}, {nodes} nodes, {rounds} rounds: share of node k's final-loss reduction\n"
                      f"Σ_j −I(j, k) from all sources at distance d (mean over k; band: min–max)", fontsize=9)
        top.set_ylabel("share (all sources at distance d)")
        bottom.set_title("the same per source: share / number of sources at distance d", fontsize=9)
        bottom.set_ylabel("share per source")
        for ax in (top, bottom):
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_xticks(sorted(set(casc[casc.topology == topo].distance)))
            ax.set_xlabel("graph distance d from source j to target k (0 = k's own data)")
        top.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


STUDIES = {"grid": grid}


def main(argv=None) -> int:
    ap = main_parser(__doc__, STUDIES, "outputs/value_study", {"nodes": 16, "lr": 0.05,
                                                               "topologies": ["ring", "exponential"]},
                     {"smoke": "tiny sizes for the tests", "quick": "same as --smoke",
                      "rounds": "training rounds (default 200)", "nodes": "nodes (default 16)"})
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.05, 0.1])
    ap.add_argument("--lds", type=int, default=50, help="LDS subsets M (default 50)")
    ap.add_argument("--samples", type=int, default=4, help="sample units per node for GT (seeded; default 4)")
    args = parse(ap, argv, SMOKE)
    if args.quick and not args.smoke:
        args = parse(ap, ["--smoke", *(argv or [])], SMOKE)
    return run_studies("value_study", STUDIES, args)


if __name__ == "__main__":
    raise SystemExit(main())
