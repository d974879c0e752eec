"""``dice gt`` and ``dice estimate``: select units, replay the run to each round, measure, write tables.

Both commands read a finished ``dice train`` run, rebuild its data, plan and W^t exactly, replay it in the
analysis dtype (float64 by default) from the nearest checkpoint, and write one long table:

    influence.csv  round, source, unit, sample, target, hop, influence [, loss_with, loss_without | method]

plus summary.json, manifest.json, config.yaml and plots (decay.png, heatmap.png; alignment.json and
alignment.png for estimates when a matching ground truth exists).

    dice gt hops=3 rounds=every:10
    dice estimate hops=3 rounds=every:10 method=exact
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import pandas as pd
import torch
import yaml
from tqdm.auto import tqdm

from .. import atomic, plots
from ..config import EstimateConfig, InfluenceConfig, TrainConfig, to_dataclass
from ..errors import UserError, bad_value
from ..graph import MixingSchedule
from ..run import RunDir, environment, open_run
from ..training import Setup, build_setup, resolve_device, resolve_dtype
from .alignment import alignment_report, merge
from .replay import state_at
from .units import select_units

# Keys of a selection: an estimate aligns with a gt result only when all of these agree.
SELECTION_KEYS = ["unit", "rounds", "sources", "samples", "hops", "q", "seed"]


def parse_rounds(spec, total: int, hops: int, recorded: Optional[List[int]] = None) -> List[int]:
    """Rounds t to measure; each needs t + hops ≤ total (the horizon's state must exist)."""
    last = total - hops
    if last < 0:
        raise UserError(f"hops={hops} is more than the run's {total} rounds; choose hops ≤ {total}")
    valid = f"rounds must lie in [0, {last}] for hops={hops} (the run has {total} rounds)"
    if isinstance(spec, str):
        s = spec.strip()
        if s == "last":
            return [last]
        if s == "all":
            return list(range(0, last + 1))
        if s.startswith("every:"):
            try:
                k = int(s.split(":", 1)[1])
                assert k >= 1
            except (ValueError, AssertionError):
                raise bad_value("rounds", spec, fix="Use every:<k> with k ≥ 1.")
            base = recorded if recorded else range(total + 1)
            return [t for t in base if t % k == 0 and t <= last]
        if ":" in s:
            try:
                parts = [int(p) if p else None for p in s.split(":")]
                out = list(range(total + 1))[slice(*parts)]
            except (ValueError, TypeError):
                raise bad_value("rounds", spec, fix="Use a:b or a:b:k (a Python slice, end excluded).")
            rounds = out
        else:
            try:
                rounds = [int(p) for p in s.replace("[", "").replace("]", "").split(",") if p.strip()]
            except ValueError:
                raise bad_value("rounds", spec, ["last", "all", "every:k", "a:b[:k]", "t", "[t1,t2,...]"])
    elif isinstance(spec, int):
        rounds = [spec]
    else:
        try:
            rounds = [int(t) for t in spec]
        except (TypeError, ValueError):
            raise bad_value("rounds", spec, ["last", "all", "every:k", "a:b[:k]", "t", "[t1,t2,...]"])
    bad = [t for t in rounds if t < 0 or t > last]
    if bad:
        raise UserError(f"rounds={spec!r} includes {bad[:5]}; {valid}")
    if not rounds:
        raise UserError(f"rounds={spec!r} selects no round; {valid}")
    return sorted(set(rounds))


def node_weights(kind: str, setup: Setup) -> torch.Tensor:
    """q [n]: one (q_k = 1), uniform (1/n) or data (|D_k| / Σ_l |D_l|)."""
    n = setup.cfg.nodes
    if kind == "uniform":
        q = torch.full((n,), 1.0 / n)
    elif kind == "data":
        sizes = torch.tensor([len(p) for p in setup.nodes.parts], dtype=torch.float64)
        q = sizes / sizes.sum()
    else:
        q = torch.ones(n)
    return q.to(device=setup.device, dtype=setup.dtype)


def load_run(cfg: InfluenceConfig):
    """Open the run, rebuild its setup in the analysis dtype with the recorded plan and W^t."""
    run = open_run(cfg.run)
    train_cfg = to_dataclass(run.config(), TrainConfig)
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    setup = build_setup(train_cfg, device, dtype, schedule=MixingSchedule.load(run.path))
    recorded = np.load(run / "plan.npy")
    if not np.array_equal(recorded, setup.plan):
        raise UserError(f"run={cfg.run!r}: the batch plan rebuilt from its config differs from the recorded "
                        f"plan.npy (was it made by another dice-cli version or with other data files?)")
    return run, train_cfg, setup


def measure(cfg: InfluenceConfig, kind: str, out: Optional[Path], config_dict: dict) -> Path:
    """Run ``dice gt`` (kind='gt') or ``dice estimate`` (kind='estimate') and write its directory."""
    run, train_cfg, setup = load_run(cfg)
    out = Path(out) if out else run.path / kind
    rd = RunDir(out, kind)
    mode = rd.check(config_dict, cfg.overwrite)
    if mode == "complete":
        print(f"dice {kind}: {out} is already complete with this selection; nothing to do.")
        return out
    rounds = parse_rounds(cfg.rounds, train_cfg.rounds, cfg.hops, run.checkpoint_rounds())
    q = node_weights(cfg.q, setup)
    fn, method = _method(cfg, kind)
    # validate the selection for every round before any work or write
    selections = {t: select_units(setup.plan[t], cfg.unit, cfg.sources, cfg.samples, cfg.seed, t) for t in rounds}
    rd.claim(config_dict, "fresh" if mode == "resume" else mode)
    rd.update_manifest(kind=kind, status="running", run=str(run.path), method=method, rounds=rounds,
                       environment=environment(), started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    t0 = time.perf_counter()
    tables, attrs = [], {"noise_floor": 0.0, "roundoff": 0.0}
    bar = tqdm(rounds, desc=f"dice {kind}", unit="round", disable=None if cfg.progress else True, file=sys.stderr)
    try:
        for t in bar:
            state = state_at(run, setup, t)
            df = fn(setup.dyn, state, selections[t], cfg.hops, setup.x_probe, setup.y_probe,
                    setup.shared_probe, q)
            for key in attrs:
                attrs[key] = max(attrs[key], float(df.attrs.get(key, 0.0)))
            tables.append(df)
    except BaseException as e:
        rd.update_manifest(status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed", error=str(e))
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    table = pd.concat(tables, ignore_index=True)
    atomic.write_text(out / "influence.csv", table.to_csv(index=False, float_format="%.17g"))
    n_units = int(sum(len(s.source) for s in selections.values()))
    summary = {"rows": len(table), "units": n_units, "rounds": rounds, "hops": cfg.hops, "unit": cfg.unit,
               "method": method, "seconds": round(seconds, 3), "units_per_s": round(n_units / max(seconds, 1e-9), 2),
               "mean_abs_influence_per_hop": {str(int(h)): float(v) for h, v in
                                               table.groupby("hop")["influence"].apply(lambda s: s.abs().mean()).items()}}
    if kind == "gt":
        nonzero = table["influence"].abs()
        nonzero = nonzero[nonzero > 0]
        summary["noise_floor"] = {
            "null_unit_max_abs_gt": attrs["noise_floor"],
            "float_roundoff_of_losses": attrs["roundoff"],
            "smallest_nonzero_abs_gt": float(nonzero.min()) if len(nonzero) else None,
            "rows_below_roundoff": int((table["influence"].abs() < attrs["roundoff"]).sum()),
            "note": "a removal that changes nothing must give exactly 0 (null_unit_max_abs_gt); |GT| values "
                    "below float_roundoff_of_losses are indistinguishable from round-off"}
    atomic.write_json(out / "summary.json", summary)
    plots.hop_decay({kind if kind == "gt" else method: table}, out / "decay.png")
    plots.node_heatmap(table, train_cfg.nodes, out / "heatmap.png",
                       title=f"{'ground truth' if kind == 'gt' else method}: source → target (hops ≥ 1)")
    if kind == "estimate":
        _align(cfg, run, out, table, method)
    rd.update_manifest(status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       timings={"seconds": round(seconds, 3), "units_per_s": summary["units_per_s"]})
    print(f"dice {kind}: wrote {out / 'influence.csv'} ({len(table)} rows, {n_units} units, {seconds:.2f} s)")
    return out


def _method(cfg: InfluenceConfig, kind: str) -> tuple:
    if kind == "gt":
        from .gt import ground_truth

        return ground_truth, "gt"
    from . import estimate

    assert isinstance(cfg, EstimateConfig)
    return (estimate.exact if cfg.method == "exact" else estimate.first_order), cfg.method


def _align(cfg: EstimateConfig, run: RunDir, out: Path, table: pd.DataFrame, method: str) -> None:
    """alignment.json + alignment.png when a ground truth for the same selection exists."""
    gt_dir = Path(cfg.gt) if cfg.gt else run.path / "gt"
    gt_csv = gt_dir / "influence.csv"
    if not gt_csv.exists():
        print(f"dice estimate: no ground truth at {gt_dir} — run `dice gt` with the same selection for "
              f"alignment.json")
        return
    gt_cfg = yaml.safe_load((gt_dir / "config.yaml").read_text()) if (gt_dir / "config.yaml").exists() else {}
    mine = {k: getattr(cfg, k) for k in SELECTION_KEYS}
    theirs = {k: gt_cfg.get(k) for k in SELECTION_KEYS}
    if any(str(mine[k]) != str(theirs[k]) for k in SELECTION_KEYS):
        diff = {k: (theirs[k], mine[k]) for k in SELECTION_KEYS if str(mine[k]) != str(theirs[k])}
        print(f"dice estimate: the ground truth at {gt_dir} has another selection {diff}; no alignment written")
        return
    gt = pd.read_csv(gt_csv)
    merged = merge(gt, table)
    report = {"method": method, "gt": str(gt_dir), **alignment_report(merged)}
    atomic.write_json(out / "alignment.json", report)
    plots.alignment_scatter(merged, out / "alignment.png",
                            title=f"{method}: Spearman {report['overall']['spearman']:.3f} (n={len(merged)})")
    plots.hop_decay({"gt": gt, method: table}, out / "decay.png")
    per_hop = ", ".join(f"hop {h}: {v['spearman']:.3f}" for h, v in report["per_hop"].items())
    print(f"dice estimate: alignment with ground truth (Spearman) overall {report['overall']['spearman']:.3f}; "
          f"{per_hop}")
