"""``dice report``: one table over many runs — the swept config keys against the results, mean ± std over seeds.

It finds every ``dice train`` / ``dice pipeline`` run under the given directories (a sweep directory, single
runs, or both) and every gt / estimate / value / detect result under them, wherever its ``out=`` put it: a
result belongs to the run its manifest's ``run`` field names. From each run it reads the final probe
accuracy; from the results the alignment per method and hop (estimate ``alignment.json``), the mean
|influence| per hop (gt), LDS (value) and ROC AUC / AP / precision / recall (detect). The config keys that
every run has and that differ between runs are the swept ones; runs are grouped by them with ``seed``
averaged out. Nothing is dropped silently: every cell carries its n, a cell computed from fewer runs than its
row says so, a std needs at least two runs, and keys only some runs have are listed, not swept.

    dice report outputs/multirun/pipeline/2026-11-28_07-00-00
    dice report outputs/run_a outputs/run_b --out outputs/report_ab
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pandas as pd
import yaml

from . import atomic
from .errors import UserError
from .run import VOLATILE_KEYS, _flatten

RUN_KINDS = {"train", "pipeline"}
RESULT_KINDS = {"gt", "estimate", "value", "detect"}
IGNORED_KEYS = VOLATILE_KEYS | {"device", "data_dir", "download", "eval_every", "record.every", "record.max_mb"}
DETECT_METRICS = ("roc_auc", "average_precision", "precision", "recall")


def _manifests(paths: List[Path]) -> List[Tuple[Path, dict]]:
    found = []
    for p in paths:
        if not p.exists():
            raise UserError(f"{str(p)!r} does not exist; give sweep or run directories made by dice train/pipeline")
        for m in sorted(p.rglob("manifest.json")) if p.is_dir() else []:
            try:
                found.append((m.parent, json.loads(m.read_text())))
            except (OSError, json.JSONDecodeError):
                continue
    return found


def find_runs(paths: List[Path]) -> List[Path]:
    """Run directories (config.yaml + manifest.json of kind train/pipeline) at or below each path."""
    runs = [d for d, m in _manifests(paths) if m.get("kind") in RUN_KINDS and (d / "config.yaml").exists()]
    if not runs:
        raise UserError(f"no dice train/pipeline runs under {', '.join(map(str, paths))} "
                        f"(looked for manifest.json with kind train or pipeline)")
    return sorted(set(runs))


def find_results(paths: List[Path], runs: List[Path]) -> Tuple[Dict[Path, List[Tuple[Path, dict]]], List[str]]:
    """{run: [(result dir, manifest), ...]} for every gt/estimate/value/detect result below ``paths``, matched
    to its run by the manifest's ``run`` (not by folder names), and notes on results that matched no run."""
    by_path = {r.resolve(): r for r in runs}
    out: Dict[Path, List[Tuple[Path, dict]]] = {r: [] for r in runs}
    notes = []
    seen = set()
    for d, m in _manifests(paths):
        if m.get("kind") not in RESULT_KINDS or d.resolve() in seen:
            continue
        seen.add(d.resolve())
        run = by_path.get(Path(str(m.get("run", ""))).resolve()) if m.get("run") else None
        if run is None:
            notes.append(f"{d}: a {m.get('kind')} result of run {m.get('run')!r}, which is not in this report")
            continue
        out[run].append((d, m))
    return out, notes


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _result_values(d: Path, m: dict) -> Tuple[Dict[str, object], Optional[str]]:
    """(metric -> value, note) of one complete result directory."""
    kind = m.get("kind")
    if kind == "estimate":
        rep = _read_json(d / "alignment.json")
        if rep is None:
            return {}, f"{d}: estimate without alignment.json (no gt of the same selection), nothing to report"
        method = rep.get("method") or m.get("method") or d.name
        vals = {f"spearman_{method}": rep["overall"]["spearman"]}
        for hop, v in rep.get("per_hop", {}).items():
            vals[f"spearman_{method}_hop{hop}"] = v["spearman"]
        return vals, None
    summary = _read_json(d / "summary.json") or {}
    if kind == "detect":
        return {k: summary.get(k) for k in DETECT_METRICS}, None
    if kind == "gt":
        per_hop = summary.get("mean_abs_influence_per_hop_reachable")
        if per_hop is None:
            return {}, f"{d}: gt summary without mean_abs_influence_per_hop_reachable (an older result)"
        return {f"gt_mean_abs_hop{h}": v for h, v in per_hop.items()}, None
    lds = summary.get("lds")                     # value: a number, or {method: number | {mean: ...}}
    if isinstance(lds, (int, float)):
        return {f"lds_{summary.get('method', m.get('method', 'value'))}": lds}, None
    if isinstance(lds, dict):
        vals = {}
        for method, v in lds.items():
            v = v.get("mean", v.get("lds")) if isinstance(v, dict) else v
            if isinstance(v, (int, float)):
                vals[f"lds_{method}"] = v
        return vals, None
    return {}, f"{d}: value result without an LDS in summary.json, nothing to report"


def run_results(run: Path, results: Optional[List[Tuple[Path, dict]]] = None, notes: Optional[List[str]] = None
                ) -> Dict[str, object]:
    """One row: status, final accuracy, and the metrics of every result of this run.

    Two results of one kind and method (say two estimates of different selections) would share column names:
    the first (by path) keeps them, later ones get ``@<folder>`` appended.
    """
    manifest = json.loads((run / "manifest.json").read_text())
    row: Dict[str, object] = {"run": str(run), "status": manifest.get("status")}
    final = manifest.get("final", {})
    if "probe_acc" in final:
        row["final_acc"] = final["probe_acc"]
    if results is None:
        results = find_results([run], [run])[0][run]
    notes = notes if notes is not None else []
    for d, m in sorted(results, key=lambda x: str(x[0])):
        if m.get("status") != "complete":
            notes.append(f"{d}: {m.get('kind')} result is {m.get('status')!r}, not complete; left out")
            continue
        vals, note = _result_values(d, m)
        if note:
            notes.append(note)
        for k, v in vals.items():
            key = k if k not in row else f"{k}@{d.name}"
            row[key] = v
    return row


def _metric_order(m: str) -> tuple:
    base = m.split("@")[0]
    for i, prefix in enumerate(["final_acc", "roc_auc", "average_precision", "precision", "recall",
                                "spearman_", "gt_mean_abs", "lds_"]):
        if base.startswith(prefix):
            return (i, m)
    return (99, m)


def _cell_value(v):
    return json.dumps(v) if isinstance(v, (list, dict)) else v


def build_tables(runs: List[Path], results: Optional[Dict[Path, list]] = None, notes: Optional[List[str]] = None):
    """(per-run table, grouped table, swept keys, metric columns, keys only some runs have)."""
    notes = notes if notes is not None else []
    configs = [_flatten(yaml.safe_load(_config_file(r).read_text()) or {}) for r in runs]
    everywhere = set.intersection(*(set(c) for c in configs)) - IGNORED_KEYS if configs else set()
    partial = sorted({k for c in configs for k in c} - everywhere - IGNORED_KEYS)
    swept = [k for k in sorted(everywhere)
             if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]
    rows = []
    for r, c in zip(runs, configs):
        row = {k: _cell_value(c.get(k)) for k in swept}
        row.update({k: _cell_value(c[k]) for k in partial if k in c})
        row.update(run_results(r, None if results is None else results.get(r, []), notes))
        rows.append(row)
    per_run = pd.DataFrame(rows)
    metrics = sorted((c for c in per_run.columns if c not in swept and c not in partial and c not in ("run", "status")
                      and per_run[c].notna().any()), key=_metric_order)
    group = [k for k in swept if k != "seed"]
    numeric = per_run[metrics].apply(pd.to_numeric, errors="coerce") if metrics else pd.DataFrame(index=per_run.index)
    frame = pd.concat([per_run[group], numeric], axis=1) if group else numeric.assign(_all="all")
    by = group or ["_all"]
    g = frame.groupby(by, dropna=False, sort=True)
    parts = [g.size().rename("n_runs")]
    for m in metrics:
        parts += [g[m].mean().rename(f"{m}_mean"), g[m].std(ddof=1).rename(f"{m}_std"),
                  g[m].count().rename(f"{m}_n")]
    grouped = pd.concat(parts, axis=1).reset_index()
    for m in metrics:                              # a std needs two values: NaN, not 0, for one
        grouped.loc[grouped[f"{m}_n"] < 2, f"{m}_std"] = np.nan
    if not group:
        grouped = grouped.drop(columns=["_all"])
    return per_run, grouped, swept, metrics, partial


def _config_file(run: Path) -> Path:
    """A pipeline run's full config (pipeline.yaml) when present, else the train config."""
    return run / "pipeline.yaml" if (run / "pipeline.yaml").exists() else run / "config.yaml"


def _fmt(mean: float):
    """Three decimals for scores near 1; three significant digits for small magnitudes (|influence|)."""
    if mean != 0 and abs(mean) < 0.05:
        return lambda v: f"{v:.3g}"
    return lambda v: f"{v:.3f}"


def cell(mean, std, n: int, total: int) -> str:
    """'0.912 ± 0.010', '0.912' (one run), '— (0 of 3 runs)'; '(n=2 of 3)' where runs lack the value."""
    if n == 0 or mean is None or pd.isna(mean):
        return f"— (0 of {total} runs)"
    fmt = _fmt(mean)
    text = f"{fmt(mean)} ± {fmt(std)}" if n >= 2 and std is not None and not pd.isna(std) else fmt(mean)
    return text + (f" (n={n} of {total})" if n < total else "")


def markdown(grouped: pd.DataFrame, swept: List[str], metrics: List[str]) -> str:
    group = [k for k in swept if k != "seed" and k in grouped.columns]
    head = group + ["runs"] + metrics
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in grouped.iterrows():
        total = int(r["n_runs"])
        cells = [str(r[k]) for k in group] + [str(total)]
        cells += [cell(r.get(f"{m}_mean"), r.get(f"{m}_std"), int(r.get(f"{m}_n", 0)), total) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _short(key: str) -> str:
    return key[: -len(".name")] if key.endswith(".name") else key


def labels(grouped: pd.DataFrame, swept: List[str]) -> List[str]:
    group = [k for k in swept if k != "seed" and k in grouped.columns]
    return [" ".join(f"{_short(k)}={r[k]}" for k in group) or "all runs" for _, r in grouped.iterrows()]


BOUNDS = {"final_acc": (0.0, 1.0), "roc_auc": (0.0, 1.0), "average_precision": (0.0, 1.0)}


def plot_panels(metrics: List[str]) -> List[tuple]:
    """What report.png shows: final accuracy, ROC AUC, AP, each value method's LDS — one panel each — and
    one alignment panel per estimate method (overall and per hop). The table has every metric."""
    panels = [(m, [(m, m)], BOUNDS[m]) for m in ("final_acc", "roc_auc", "average_precision") if m in metrics]
    for m in metrics:
        if m.startswith("spearman_") and "_hop" not in m and "@" not in m:
            hops = sorted((x for x in metrics if x.startswith(f"{m}_hop") and "@" not in x),
                          key=lambda x: int(x.rsplit("_hop", 1)[1]))
            series = [(m, "all hops")] + [(h, f"hop {h.rsplit('_hop', 1)[1]}") for h in hops]
            panels.append((f"alignment of {m[len('spearman_'):]} with gt (Spearman)", series, (-1.0, 1.0)))
    panels += [(m, [(m, m)], (-1.0, 1.0)) for m in metrics if m.startswith("lds_") and "@" not in m]
    return panels


def plot(grouped: pd.DataFrame, swept: List[str], metrics: List[str], path: Path):
    from .plots import report_plot

    return report_plot(grouped, labels(grouped, swept), plot_panels(metrics), path)


def report(paths: List[Path], out: Optional[Path], overwrite: bool) -> Path:
    runs = find_runs(paths)
    results, notes = find_results(paths, runs)
    out = out or (paths[0] / "report" if len(paths) == 1 else Path("outputs/report") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    if (out / "report.csv").exists() and not overwrite:
        raise UserError(f"{out} already holds a report; pass --overwrite to replace it or --out <dir>")
    per_run, grouped, swept, metrics, partial = build_tables(runs, results, notes)
    atomic.write_text(out / "runs.csv", per_run.to_csv(index=False))
    atomic.write_text(out / "report.csv", grouped.to_csv(index=False))
    several = "seed" in swept
    n_results = sum(len(v) for v in results.values())
    md = [f"# dice report\n\n{len(runs)} runs, {n_results} results; swept keys: {', '.join(swept) or 'none'}.\n",
          f"Each cell: mean ± std over the runs of its row ({'seeds' if several else 'runs'}; a std only where "
          f"at least two runs have the value); '(n=k of N)' where only k of the row's N runs have it.\n",
          markdown(grouped, swept, metrics)]
    incomplete = per_run[per_run["status"] != "complete"]
    if partial or notes or len(incomplete):
        md.append("\n## Notes\n")
        if partial:
            md.append(f"- keys only some runs have (not swept, not grouped by; see runs.csv): {', '.join(partial)}")
        for _, r in incomplete.iterrows():
            md.append(f"- run {r['run']} is {r['status']!r}, not complete")
        md += [f"- {n}" for n in notes]
        md.append("")
    text = "\n".join(md)
    atomic.write_text(out / "report.md", text)
    drawn = plot(grouped, swept, metrics, out / "report.png") is not None
    print(text)
    print(f"dice report: wrote {out}/report.csv, report.md, runs.csv{', report.png' if drawn else ''} "
          f"({len(runs)} runs)")
    return out


def main(argv: Optional[List[str]] = None) -> None:
    from .errors import USAGE_EXIT_CODE

    ap = argparse.ArgumentParser(prog="dice report", description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="sweep or run directories")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: <dir>/report)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing report")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        report(args.dirs, args.out, args.overwrite)
    except UserError as e:
        print(f"dice report: error: {e}", file=sys.stderr)
        sys.exit(USAGE_EXIT_CODE)
