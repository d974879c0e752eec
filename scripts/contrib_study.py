"""Contribution study (``dice contrib``): do DICE node values rank bad, rich and central nodes like Shapley does,
at what fraction of its cost, and can an attacker game them?

Every setting trains the digits MLP (float64, ``--rounds`` rounds, lr ``--lr``, ring unless said) with ``dice train``
(in-process, the CLI's config composition), computes the node-unit value tables ``dice value`` makes (gt, exact,
first_order, cascade_sum hops=3; each timed), and on the same run, through the library calls ``dice contrib``
makes, the exact Shapley values over all 2^n coalitions for ``player=data`` and ``player=participant`` (one
training of the coalitions serves the utilities over all / honest nodes on the probe and on the held-out set),
with LOO read off the same coalitions. Studies:

  bad       attack=free_rider, label_flip, label_noise (2 attackers each) and a Dirichlet split α = 0.1, 1, 10;
            per seed: Spearman / Kendall of every DICE table against Shapley and LOO, the ROC AUC of "low value"
            for the attackers, the Spearman of value with the node's data size, the cost ratio.
  position  identical (iid, equal-size) data on star, ring and exponential graphs: hub vs leaf, spread, Gini,
            reciprocity.
  large     16 nodes, label_flip (3 attackers) and a Dirichlet split α = 0.3: TMC Shapley (``shapley_mc``) with its
            standard errors against the DICE tables.
  gaming    attack=inflate (1 attacker trains on the public probe set; ROBUST.md §2) against the same run with the
            node honest: how much its share of the value rises under DICE (probe), Shapley (probe) and its true
            effect (Shapley on the held-out test samples nobody sees), and under the mitigation (DICE measured on
            that held-out set, ``dice value eval=heldout``).

    .venv/bin/python scripts/contrib_study.py                        # every study, seeds 0 1 2
    .venv/bin/python scripts/contrib_study.py --study gaming --seeds 0
    .venv/bin/python scripts/contrib_study.py --smoke                # tiny (tests)

Results: ``outputs/contrib_study/<study>/`` (results.csv, nodes.csv, <table>.md, log.txt with the equivalent CLI
commands, one run directory per setting). See docs/contributions.md.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pandas as pd
from scipy import stats

from study_harness import Study, in_process, main_parser, parse, run_studies, save_table, train_run

import dice_cli.commands.value  # noqa: F401  (registers value_schema for the in-process composition)
from dice_cli.config import ATTACKS
from dice_cli.config import ValueConfig
from dice_cli.contrib import accounting, attack_auc, gini, node_matrix
from dice_cli.influence.run_value import value as dice_value
from dice_cli.influence.table import read_table
from dice_cli.replay import open_replay
from dice_cli.shapley import CoalitionGame, all_coalitions, exact_shapley, mc_values

SMOKE = {"nodes": 4, "rounds": 6, "seeds": [0], "large_nodes": 5, "budget": 30}
METHODS = [("gt", []), ("exact", []), ("first_order", []), ("cascade_sum", ["hops=3"])]
INFLATE = "inflate" in ATTACKS


def value_tables(study: Study, run: Path, heldout: bool = False) -> Dict[str, dict]:
    """``dice value`` node units of every method on ``run`` (and exact on the held-out set): {label: {V, seconds}}."""
    out = {}
    todo = [(m, extra, "") for m, extra in METHODS] + ([("exact", ["eval=heldout"], "@heldout")] if heldout else [])
    for method, extra, tag in todo:
        d = run / f"value_{method}{tag.replace('@', '_')}"
        args = [f"run={run}", f"method={method}", *extra, f"out={d}", "progress=false"]
        in_process(study, "value", args, ValueConfig, lambda typed, plain, d=d: dice_value(typed, d, plain))
        summ = pd.read_json(d / "summary.json", typ="series")
        out[method + tag] = {"V": node_matrix(read_table(d / "influence.csv"), int(summ["nodes"])),
                             "seconds": float(summ["seconds"]["compute"])}
    return out


def shapley_all(rp, player: str, chunk: int, honest: np.ndarray) -> dict:
    """Exact Shapley and LOO for every (utility, eval) from one training of all 2^n coalitions."""
    n = rp.n
    game = CoalitionGame(rp.dyn, rp.state_at(0), rp.rounds, player, rp.probe, rp.q("one"), rp.setup.plan,
                         rp.setup.nodes.parts, chunk=chunk, extra_probes={"heldout": rp.heldout()})
    S = all_coalitions(n)
    game.losses(S)
    full = 2 ** n - 1
    out = {"seconds": game.seconds, "coalitions": game.trained, "values": {}}
    for utility, K in (("all", np.ones(n, dtype=bool)), ("honest", honest)):
        for ev in ("probe", "heldout"):
            U = game.utility(S, weights=K.astype(float), on="eval" if ev == "probe" else "heldout")
            out["values"][("shapley", utility, ev)] = exact_shapley(U)
            out["values"][("loo", utility, ev)] = np.array([U[full] - U[full & ~(1 << j)] for j in range(n)])
    return out


def analyse(study: Study, name: str, overrides: List[str], args, players=("data", "participant"),
            heldout_dice: bool = False, mc: Optional[dict] = None) -> dict:
    """Train one setting, its value tables and valuations; per-run rows (results) and per-node rows (nodes)."""
    run, t_train = train_run(study, study.dir / name, [f"rounds={args.rounds}", "dtype=float64", f"lr={args.lr}",
                                                       *overrides])
    tables = value_tables(study, run, heldout_dice)
    rp = open_replay(run, "float64")
    n = rp.n
    attack = rp.run.manifest().get("attack") or {}
    attackers = sorted(int(a) for a in attack.get("nodes", []))
    honest = np.ones(n, dtype=bool)
    honest[attackers] = False
    sizes = np.array([len(p) for p in rp.setup.nodes.parts])
    W = rp.setup.schedule.at(0)
    degree = ((W > 0) & ~np.eye(n, dtype=bool)).sum(1)
    refs, costs = {}, {}
    for player in players:
        if mc is None:
            res = shapley_all(rp, player, args.chunk, honest)
            for (kind, utility, ev), v in res["values"].items():
                refs[(kind, player, utility, ev)] = v
            costs[player] = (res["seconds"], res["coalitions"])
            for utility in ("all", "honest"):
                for ev in ("probe", "heldout"):
                    study.log(f"# equivalent: dice contrib run={run} value={run}/value_exact valuation=shapley_exact "
                              f"player={player} utility={utility} eval={ev}")
        else:
            utility = "honest" if attackers else "all"
            game = CoalitionGame(rp.dyn, rp.state_at(0), rp.rounds, player, rp.probe, rp.q("one"), rp.setup.plan,
                                 rp.setup.nodes.parts, honest=honest if utility == "honest" else None, chunk=args.chunk)
            res = mc_values(game, mc["tolerance"], mc["budget"], mc["truncation"], seed=0)
            refs[("shapley_mc", player, utility, "probe")] = res["values"]
            refs[("stderr", player, utility, "probe")] = res["stderr"]
            costs[player] = (game.seconds, game.trained)
            study.log(f"# equivalent: dice contrib run={run} value={run}/value_exact valuation=shapley_mc "
                      f"player={player} utility={utility} budget={mc['budget']} tolerance={mc['tolerance']} "
                      f"truncation={mc['truncation']}  -> {res['permutations']} permutations, stopped by "
                      f"{res['stopped']}, max stderr {np.nanmax(res['stderr']):.3g}")
            mc["result"] = res
    rows, nodes = [], []
    for (kind, player, utility, ev), v in refs.items():
        if kind == "stderr":
            continue
        K = honest if utility == "honest" else np.ones(n, dtype=bool)
        for label, t in tables.items():
            d = t["V"] @ K.astype(float)
            ok = np.std(d) > 0 and np.std(v) > 0
            rows.append({"run": name, "player": player, "utility": utility, "eval": ev, "reference": kind,
                         "dice": label, "spearman": stats.spearmanr(d, v)[0] if ok else np.nan,
                         "kendall": stats.kendalltau(d, v)[0] if ok else np.nan,
                         "dice_auc": attack_auc(d, attackers), "ref_auc": attack_auc(v, attackers),
                         "dice_size_spearman": stats.spearmanr(d, sizes)[0] if np.std(sizes) > 0 else np.nan,
                         "ref_size_spearman": stats.spearmanr(v, sizes)[0] if np.std(sizes) > 0 else np.nan,
                         "dice_seconds": t["seconds"], "ref_seconds": costs[player][0],
                         "ref_coalitions": costs[player][1], "cost_ratio": t["seconds"] / costs[player][0]})
    for j in range(n):
        row = {"run": name, "node": j, "attacker": j in attackers, "size": int(sizes[j]), "degree": int(degree[j])}
        for label, t in tables.items():
            acc = accounting(t["V"])
            for col in ("given", "received", "self", "reciprocity"):
                row[f"{label}:{col}"] = float(acc[col][j])
            row[f"{label}:total"] = float(t["V"][j].sum())
        for key, v in refs.items():
            row[":".join(key)] = float(v[j])
        nodes.append(row)
    gin = {f"gini_given_{label}": gini(accounting(t["V"]).given.to_numpy()) for label, t in tables.items()}
    for key, v in refs.items():
        if key[0] != "stderr":
            gin["gini_" + "_".join(key)] = gini(v)
    return {"rows": rows, "nodes": nodes, "gini": {"run": name, **gin}, "attackers": attackers,
            "train_seconds": t_train}


def _mean_sd(df: pd.DataFrame, by: List[str], cols: List[str]) -> pd.DataFrame:
    g = df.groupby(by, sort=False)[cols]
    m, s = g.mean(), g.std()
    out = m.copy()
    for c in cols:
        out[c] = [f"{a:.3f} ± {b:.3f}" if np.isfinite(b) else f"{a:.3f}" for a, b in zip(m[c], s[c])]
    return out.reset_index()


# ----------------------------------------------------------------------------------------------- studies
def bad(args, root: Path) -> dict:
    study = Study(root, "bad")
    scen = [("free_rider", ["attack=free_rider", "attack.count=2"]),
            ("label_flip", ["attack=label_flip", "attack.count=2"]),
            ("label_noise", ["attack=label_noise", "attack.count=2", "attack.flip_fraction=1.0"])]
    scen += [(f"dirichlet_{a:g}", ["partition=dirichlet", f"partition.alpha={a}"]) for a in args.alphas]
    rows, nodes, ginis = [], [], []
    for name, ov in scen:
        for seed in args.seeds:
            r = analyse(study, f"{name}_s{seed}", [f"nodes={args.nodes}", f"seed={seed}", *ov], args)
            for x in r["rows"]:
                x.update(scenario=name, seed=seed)
            rows += r["rows"]
            nodes += [{**x, "scenario": name, "seed": seed} for x in r["nodes"]]
            ginis.append({**r["gini"], "scenario": name, "seed": seed})
    res = pd.DataFrame(rows)
    res.to_csv(study.dir / "results.csv", index=False)
    pd.DataFrame(nodes).to_csv(study.dir / "nodes.csv", index=False)
    pd.DataFrame(ginis).to_csv(study.dir / "gini.csv", index=False)
    att = res[res.scenario.isin(["free_rider", "label_flip", "label_noise"])]
    for player in ("data", "participant"):
        sel = att[(att.player == player) & (att.utility == "honest") & (att["eval"] == "probe")
                  & (att.reference == "shapley")]
        tab = _mean_sd(sel, ["scenario", "dice"], ["spearman", "kendall", "dice_auc", "ref_auc", "cost_ratio"])
        save_table(study, tab, f"attacks, player={player}, utility=honest, probe: DICE vs exact Shapley "
                               f"(mean ± sd over seeds {args.seeds})", name=f"attacks_{player}", sci=False)
    sel = att[(att.player == "data") & (att.utility == "honest") & (att["eval"] == "probe") & (att.reference == "loo")]
    save_table(study, _mean_sd(sel, ["scenario", "dice"], ["spearman", "ref_auc"]),
               "attacks, player=data, utility=honest: DICE vs LOO", name="attacks_loo", sci=False)
    sel = att[(att.player == "data") & (att.utility == "all") & (att["eval"] == "probe") & (att.reference == "shapley")]
    save_table(study, _mean_sd(sel, ["scenario", "dice"], ["spearman", "dice_auc", "ref_auc"]),
               "attacks, player=data, utility=all (the attackers' own losses count)", name="attacks_all", sci=False)
    rich = res[res.scenario.str.startswith("dirichlet")]
    for player in ("data", "participant"):
        sel = rich[(rich.player == player) & (rich.utility == "all") & (rich["eval"] == "probe")
                   & (rich.reference == "shapley")]
        save_table(study, _mean_sd(sel, ["scenario", "dice"], ["spearman", "kendall", "dice_size_spearman",
                                                               "ref_size_spearman", "cost_ratio"]),
                   f"Dirichlet splits, player={player}: DICE vs exact Shapley and both vs data size",
                   name=f"dirichlet_{player}", sci=False)
    g = pd.DataFrame(ginis)
    cols = [c for c in ("gini_given_gt", "gini_given_exact", "gini_shapley_data_all_probe",
                        "gini_shapley_participant_all_probe") if c in g]
    save_table(study, _mean_sd(g, ["scenario"], cols), "Gini coefficients (mean ± sd over seeds)", name="gini",
               sci=False)
    return study.finish(f"; {len(scen) * len(args.seeds)} runs")


def position(args, root: Path) -> dict:
    study = Study(root, "position")
    rows, nodes, ginis = [], [], []
    for topo in args.topologies:
        for seed in args.seeds:
            r = analyse(study, f"{topo}_s{seed}", [f"nodes={args.nodes}", f"seed={seed}", f"topology={topo}"], args)
            rows += [{**x, "topology": topo, "seed": seed} for x in r["rows"]]
            nodes += [{**x, "topology": topo, "seed": seed} for x in r["nodes"]]
            ginis.append({**r["gini"], "topology": topo, "seed": seed})
    res, nd = pd.DataFrame(rows), pd.DataFrame(nodes)
    res.to_csv(study.dir / "results.csv", index=False)
    nd.to_csv(study.dir / "nodes.csv", index=False)
    cols = ["gt:given", "gt:received", "gt:self", "exact:given", "first_order:given", "cascade_sum:given",
            "cascade_sum:received", "shapley:data:all:probe", "loo:data:all:probe", "shapley:participant:all:probe",
            "loo:participant:all:probe"]
    out = []
    for topo in args.topologies:
        for seed in args.seeds:
            d = nd[(nd.topology == topo) & (nd.seed == seed)]
            hub = d.degree == d.degree.max()
            rec = {"topology": topo, "seed": seed}
            for c in cols:
                v = d[c].to_numpy()
                if hub.all():                                    # every node has the same degree
                    rec[c] = np.std(v) / abs(np.mean(v)) if np.mean(v) else np.nan
                else:
                    rec[c] = v[hub.to_numpy()].mean() / v[~hub.to_numpy()].mean()
            out.append(rec)
    tab = _mean_sd(pd.DataFrame(out), ["topology"], cols)
    save_table(study, tab, "value by position, identical (iid) data: star = hub / mean leaf; ring and exponential "
                           "(all positions alike) = coefficient of variation over nodes", name="position", sci=False)
    sel = res[(res.player.isin(["data", "participant"])) & (res.utility == "all") & (res["eval"] == "probe")
              & (res.reference == "shapley")]
    save_table(study, _mean_sd(sel, ["topology", "player", "dice"], ["spearman", "cost_ratio"]),
               "position: DICE vs exact Shapley", name="position_spearman", sci=False)
    g = pd.DataFrame(ginis)
    gc = [c for c in ("gini_given_gt", "gini_given_exact", "gini_shapley_data_all_probe",
                      "gini_shapley_participant_all_probe") if c in g]
    nd["recip_rel"] = nd["gt:reciprocity"] / nd["gt:given"].abs().mean()
    recip = nd.groupby("topology")["recip_rel"].agg(lambda x: float(np.mean(np.abs(x))))
    gt_ = _mean_sd(g, ["topology"], gc)
    gt_["mean |reciprocity| / mean |given| (gt)"] = [f"{recip[t]:.3f}" for t in gt_.topology]
    save_table(study, gt_, "Gini and reciprocity by topology", name="gini", sci=False)
    return study.finish(f"; {len(args.topologies) * len(args.seeds)} runs")


def large(args, root: Path) -> dict:
    study = Study(root, "large")
    rows, mcs = [], []
    for name, ov in [("label_flip", ["attack=label_flip", "attack.count=3"]),
                     ("dirichlet_0.3", ["partition=dirichlet", "partition.alpha=0.3"])]:
        mc = {"tolerance": args.tolerance, "budget": args.budget, "truncation": args.truncation}
        r = analyse(study, f"{name}_n{args.large_nodes}", [f"nodes={args.large_nodes}", "seed=0", *ov], args,
                    players=("data",), mc=mc)
        rows += [{**x, "scenario": name} for x in r["rows"]]
        res = mc["result"]
        mcs.append({"scenario": name, "nodes": args.large_nodes, "permutations": res["permutations"],
                    "stopped": res["stopped"], "truncated": res["truncated"],
                    "max_stderr_over_span": float(np.nanmax(res["stderr"]) / abs(res["utility_all"] - res["utility_empty"])),
                    "mean_abs_value_over_span": float(np.mean(np.abs(res["values"])) / abs(res["utility_all"] - res["utility_empty"]))})
    res = pd.DataFrame(rows)
    res.to_csv(study.dir / "results.csv", index=False)
    save_table(study, pd.DataFrame(mcs), f"TMC Shapley at n={args.large_nodes} (budget {args.budget}, tolerance "
                                         f"{args.tolerance}, truncation {args.truncation})", name="mc", sci=False)
    save_table(study, res[["scenario", "dice", "spearman", "kendall", "dice_auc", "ref_auc", "dice_size_spearman",
                           "ref_size_spearman", "dice_seconds", "ref_seconds", "ref_coalitions", "cost_ratio"]],
               f"n={args.large_nodes}: DICE vs TMC Shapley (player=data)", name="results", sci=False)
    return study.finish()


def gaming(args, root: Path) -> dict:
    study = Study(root, "gaming")
    if not INFLATE:
        print("[gaming] attack=inflate is not in this dice-cli (dice_cli.config.ATTACKS); skipped")
        return study.finish("; skipped: no attack=inflate")
    out = []
    for seed in args.seeds:
        r_att = analyse(study, f"inflate_s{seed}", [f"nodes={args.nodes}", f"seed={seed}", "attack=inflate",
                                                    "attack.count=1"], args, players=("data",), heldout_dice=True)
        j = r_att["attackers"][0]
        r_hon = analyse(study, f"honest_s{seed}", [f"nodes={args.nodes}", f"seed={seed}"], args, players=("data",),
                        heldout_dice=True)
        for label, r in (("inflate", r_att), ("honest", r_hon)):
            nd = pd.DataFrame(r["nodes"])
            rec = {"seed": seed, "node": j, "run": label}
            for col, what in [("exact:total", "DICE exact (probe)"), ("gt:total", "DICE gt (probe)"),
                              ("exact@heldout:total", "DICE exact (heldout) [mitigation]"),
                              ("shapley:data:all:probe", "Shapley (probe)"),
                              ("shapley:data:all:heldout", "Shapley (heldout) = true effect"),
                              ("loo:data:all:heldout", "LOO (heldout)")]:
                v = nd[col].to_numpy()
                rec[f"{what}: share"] = v[j] / np.sum(np.abs(v))
                rec[f"{what}: rank"] = int(stats.rankdata(-v, method="min")[j])
            out.append(rec)
    df = pd.DataFrame(out)
    df.to_csv(study.dir / "results.csv", index=False)
    shares = [c for c in df.columns if c.endswith(": share")]
    wide = []
    for c in shares:
        a = df[df.run == "inflate"][c].to_numpy()
        h = df[df.run == "honest"][c].to_numpy()
        ra = df[df.run == "inflate"][c.replace("share", "rank")].to_numpy()
        wide.append({"valuation": c.replace(": share", ""), "attacker's share (inflate)": f"{a.mean():.3f} ± {a.std():.3f}",
                     "same node honest": f"{h.mean():.3f} ± {h.std():.3f}", "inflation (×)": f"{np.mean(a / h):.2f}",
                     "attacker's rank (inflate)": " ".join(str(int(x)) for x in ra)})
    save_table(study, pd.DataFrame(wide), f"gaming: one inflate attacker among {args.nodes} (share of Σ|value|, "
                                          f"seeds {args.seeds}; rank 1 = most valuable)", name="gaming", sci=False)
    gaming_figure(df, study.dir / "gaming.png", args.nodes, args.seeds)
    return study.finish(f"; {2 * len(args.seeds)} runs")


def gaming_figure(df: pd.DataFrame, path: Path, nodes: int, seeds: List[int]) -> None:
    """Bars: the attacker's share of Σ|value| under every valuation, inflating vs the same node honest (mean, sd
    over seeds as error bars)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = [c for c in df.columns if c.endswith(": share")]
    names = [c.replace(": share", "").replace(" [mitigation]", "\n[mitigation]").replace(" = true effect",
                                                                                          "\n= true effect")
             for c in shares]
    x = np.arange(len(shares))
    fig, ax = plt.subplots(figsize=(8.5, 3.6), dpi=100)
    for off, run, colour in ((-0.2, "honest", "#4c72b0"), (0.2, "inflate", "#c44e52")):
        d = df[df.run == run]
        label = "the same node honest" if run == "honest" else "the attacker trains on the probe (inflate)"
        ax.bar(x + off, [d[c].mean() for c in shares], 0.4, yerr=[d[c].std(ddof=0) for c in shares], capsize=3,
               color=colour, label=label)
    ax.axhline(1 / nodes, color="grey", lw=0.8, ls="--", label=f"equal share 1/{nodes}")
    ax.set_xticks(x)
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("attacker's share of Σ|value|")
    ax.set_title(f"gaming: one inflate attacker among {nodes} nodes (digits, ring; seeds {' '.join(map(str, seeds))})",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


STUDIES = {"bad": bad, "position": position, "large": large, "gaming": gaming}


def main(argv=None) -> int:
    ap = main_parser(__doc__, STUDIES, "outputs/contrib_study", {"nodes": 8, "lr": 0.05,
                                                                  "topologies": ["star", "ring", "exponential"]},
                     {"nodes": "nodes of the exact studies (2^n coalitions; default 8)",
                      "rounds": "training rounds (default 200)", "lr": "learning rate (default 0.05)",
                      "topologies": "graphs of the position study", "smoke": "tiny sizes (the test)"})
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.1, 1.0, 10.0])
    ap.add_argument("--large-nodes", type=int, default=16)
    ap.add_argument("--budget", type=int, default=1000, help="large: coalition trainings of shapley_mc")
    ap.add_argument("--tolerance", type=float, default=0.005)
    ap.add_argument("--truncation", type=float, default=0.01)
    ap.add_argument("--chunk", type=int, default=32)
    args = parse(ap, argv, SMOKE)
    args.rounds = args.rounds or (SMOKE["rounds"] if args.smoke else 200)
    t0 = time.perf_counter()
    code = run_studies("contrib_study", STUDIES, args)
    print(f"(wall {time.perf_counter() - t0:.1f} s)")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
