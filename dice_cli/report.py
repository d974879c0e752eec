"""``dice report``: one table over many runs — the swept config keys against the results, mean ± std over seeds.

It finds every ``dice train`` / ``dice pipeline`` run under the given directories (a sweep directory, single
runs, or both), reads each run's config and results (final probe accuracy; alignment per hop from
``estimate*/alignment.json``; ROC AUC / AP from ``detect/summary.json``), keeps the config keys that differ
between runs (the swept ones), and groups by them with ``seed`` averaged out.

    dice report outputs/multirun/pipeline/2026-11-28_07-00-00
    dice report outputs/run_a outputs/run_b --out outputs/report_ab
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pandas as pd
import yaml

from . import atomic
from .errors import UserError
from .run import VOLATILE_KEYS, _flatten

RUN_KINDS = {"train", "pipeline"}
IGNORED_KEYS = VOLATILE_KEYS | {"device", "data_dir", "download", "eval_every", "record.every", "record.max_mb"}


def find_runs(paths: List[Path]) -> List[Path]:
    """Run directories (config.yaml + manifest.json of kind train/pipeline) at or below each path."""
    runs = []
    for p in paths:
        if not p.exists():
            raise UserError(f"{str(p)!r} does not exist; give sweep or run directories made by dice train/pipeline")
        for m in sorted(p.rglob("manifest.json")) if p.is_dir() else []:
            try:
                kind = json.loads(m.read_text()).get("kind")
            except (OSError, json.JSONDecodeError):
                continue
            if kind in RUN_KINDS and (m.parent / "config.yaml").exists():
                runs.append(m.parent)
    if not runs:
        raise UserError(f"no dice train/pipeline runs under {', '.join(map(str, paths))} "
                        f"(looked for manifest.json with kind train or pipeline)")
    return sorted(set(runs))


def _config_file(run: Path) -> Path:
    """A pipeline run's full config (pipeline.yaml) when present, else the train config."""
    return run / "pipeline.yaml" if (run / "pipeline.yaml").exists() else run / "config.yaml"


def run_results(run: Path) -> Dict[str, object]:
    """One row: status, final accuracy, alignment per method and hop, detection metrics."""
    manifest = json.loads((run / "manifest.json").read_text())
    row: Dict[str, object] = {"run": str(run), "status": manifest.get("status")}
    final = manifest.get("final", {})
    if "probe_acc" in final:
        row["final_acc"] = final["probe_acc"]
    for f in sorted(run.glob("estimate*/alignment.json")):
        rep = json.loads(f.read_text())
        method = rep.get("method", f.parent.name)
        row[f"spearman_{method}"] = rep["overall"]["spearman"]
        for hop, v in rep.get("per_hop", {}).items():
            row[f"spearman_{method}_hop{hop}"] = v["spearman"]
    det = run / "detect" / "summary.json"
    if det.exists():
        d = json.loads(det.read_text())
        for k in ("roc_auc", "average_precision", "precision", "recall"):
            row[k] = d.get(k)
    return row


def build_tables(runs: List[Path]):
    """(per-run table, grouped table, swept keys, metric columns)."""
    configs = [_flatten(yaml.safe_load(_config_file(r).read_text()) or {}) for r in runs]
    keys = sorted({k for c in configs for k in c} - IGNORED_KEYS)
    swept = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]
    rows = []
    for r, c in zip(runs, configs):
        row = {k: (json.dumps(c.get(k)) if isinstance(c.get(k), (list, dict)) else c.get(k)) for k in swept}
        row.update(run_results(r))
        rows.append(row)
    per_run = pd.DataFrame(rows).dropna(axis=1, how="all")  # e.g. no AUC columns when no run was attacked
    metrics = [c for c in per_run.columns if c not in swept and c not in ("run", "status")]
    group = [k for k in swept if k != "seed"]
    if not metrics:
        grouped = per_run[group].drop_duplicates() if group else pd.DataFrame()
        return per_run, grouped, swept, metrics
    numeric = per_run[metrics].apply(pd.to_numeric, errors="coerce")
    frame = pd.concat([per_run[group], numeric], axis=1) if group else numeric.assign(_all="all")
    by = group or ["_all"]
    g = frame.groupby(by, dropna=False)
    grouped = g[metrics].mean().add_suffix("_mean").join(g[metrics].std(ddof=1).fillna(0.0).add_suffix("_std"))
    grouped.insert(0, "n_runs", g.size())
    grouped = grouped.reset_index()
    return per_run, grouped, swept, metrics


def markdown(grouped: pd.DataFrame, swept: List[str], metrics: List[str]) -> str:
    group = [k for k in swept if k != "seed" and k in grouped.columns]
    head = group + ["runs"] + metrics
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in grouped.iterrows():
        cells = [str(r[k]) for k in group] + [str(int(r["n_runs"]))]
        for m in metrics:
            mean, std = r.get(f"{m}_mean"), r.get(f"{m}_std")
            cells.append("—" if mean is None or pd.isna(mean) else f"{mean:.3f} ± {std:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(grouped: pd.DataFrame, swept: List[str], metrics: List[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    group = [k for k in swept if k != "seed" and k in grouped.columns]
    def short(key: str) -> str:
        return key[: -len(".name")] if key.endswith(".name") else key

    labels = [" ".join(f"{short(k)}={r[k]}" for k in group) or "all" for _, r in grouped.iterrows()]
    families = [("final_acc", ["final_acc"]), ("detection", [m for m in ("roc_auc", "average_precision") if m in metrics]),
                ("alignment (Spearman)", [m for m in metrics if m.startswith("spearman_") and "_hop" in m])]
    families = [(name, ms) for name, ms in families if ms and all(m in metrics for m in ms)]
    if not families:
        return
    fig, axes = plt.subplots(1, len(families), figsize=(7.5 * len(families), 0.45 * len(labels) + 2.5), squeeze=False)
    y = np.arange(len(labels))
    for ax, (name, ms) in zip(axes[0], families):
        h = 0.8 / len(ms)
        for i, m in enumerate(ms):
            ax.barh(y + i * h, grouped[f"{m}_mean"], h, xerr=grouped[f"{m}_std"], label=m, alpha=0.85)
        ax.set_yticks(y + 0.4 - h / 2, labels, fontsize=8)
        ax.set_title(name)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    atomic.save_figure(path, fig)


def report(paths: List[Path], out: Optional[Path], overwrite: bool) -> Path:
    runs = find_runs(paths)
    out = out or (paths[0] / "report" if len(paths) == 1 else Path("outputs/report") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    if (out / "report.csv").exists() and not overwrite:
        raise UserError(f"{out} already holds a report; pass --overwrite to replace it or --out <dir>")
    per_run, grouped, swept, metrics = build_tables(runs)
    atomic.write_text(out / "runs.csv", per_run.to_csv(index=False))
    atomic.write_text(out / "report.csv", grouped.to_csv(index=False))
    md = (f"# dice report\n\n{len(runs)} runs; swept keys: {', '.join(swept) or 'none'}; "
          f"mean ± std over {'seeds' if 'seed' in swept else 'runs'}.\n\n" + markdown(grouped, swept, metrics))
    atomic.write_text(out / "report.md", md)
    plot(grouped, swept, metrics, out / "report.png")
    print(md)
    print(f"dice report: wrote {out}/report.csv, report.md, runs.csv, report.png ({len(runs)} runs)")
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
