"""``dice gt`` and ``dice estimate``: select units, replay the run to each round, measure, write tables.

Both commands read a finished ``dice train`` run, rebuild its data, plan and W^t exactly, replay it in the
analysis dtype (float64 by default) from the nearest checkpoint, and write one long table:

    influence.csv  round, source, unit, sample, target, hop, distance, influence [, loss_with, loss_without | method]

plus summary.json, manifest.json, config.yaml and plots (decay.png, heatmap.png; for estimates, when a
ground truth of the same selection exists, alignment.json, alignment.png and compare.csv / compare.png with
gt and every estimate method of that selection found next to it side by side). ``distance`` and which rows
are structural zeros: influence/reach.py; ``reachable_only=true`` leaves those rows out.

    dice gt hops=3 rounds=every:10
    dice estimate hops=3 rounds=every:10 method=exact

Shards (``shard=i/n``): the selection's units, in table order (rounds ascending, then the units of a round),
are cut into n near-equal contiguous parts; a shard job computes part i only and writes
``<out>/shards/shard_<i>_of_<n>.csv`` and ``.json`` (its manifest), atomically. Every shard job and a plain
rerun share ``<out>`` (without out=, ``<run>/<kind>`` even under -m) and its config identity (``shard``
excluded). Whichever job finds all n parts done merges them into ``influence.csv`` (the rows of an unsharded
run, in its order) and the usual summary, plots and manifest; a rerun skips parts already done, and a plain
run (no ``shard=``) in a directory holding parts computes the missing parts, then merges.

    dice gt -m shard=0/4,1/4,2/4,3/4 run=outputs/ring hops=3 rounds=all out=outputs/ring/gt
"""
from __future__ import annotations

import functools
import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import yaml

from .. import atomic
from ..config import EstimateConfig, InfluenceConfig, TrainConfig
from ..errors import UserError, bad_value, note_where
from ..lock import scoped
from ..rerun import already_complete
from ..run import RunDir, environment, measuring_where, open_run, read_result

if TYPE_CHECKING:      # the heavy modules (torch, pandas) load only once there is work to do
    import pandas as pd

    from ..replay import Replay
    from .reach import Reach
    from .units import Units

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
            return [t for t in range(0, last + 1, k)]   # replay reaches any round, recorded or not
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


SHARD_FORM = "shard=i/n with integers 0 <= i < n (e.g. shard=0/4 ... shard=3/4; 0-based)"
SHARDS = "shards"


def parse_shard(spec) -> Optional[Tuple[int, int]]:
    """``"i/n"`` -> (i, n) with 0 <= i < n; None -> None. Anything else is a UserError naming the form."""
    if spec is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise UserError(f"shard={spec!r} is not valid; use {SHARD_FORM}")
    return int(m.group(1)), int(m.group(2))


def shard_bounds(total: int, i: int, n: int) -> Tuple[int, int]:
    """Part i of n of ``total`` units in table order: [lo, hi), sizes differing by at most one."""
    return i * total // n, (i + 1) * total // n


def _shard_path(out: Path, i: int, n: int, suffix: str) -> Path:
    return out / SHARDS / f"shard_{i}_of_{n}.{suffix}"


def _shards_present(out: Path) -> Dict[int, List[int]]:
    """{n: [i, ...]} of the shard manifests in ``out/shards`` (done or not)."""
    found: Dict[int, List[int]] = {}
    for p in sorted((out / SHARDS).glob("shard_*_of_*.json")):
        m = re.fullmatch(r"shard_(\d+)_of_(\d+)\.json", p.name)
        if m:
            found.setdefault(int(m.group(2)), []).append(int(m.group(1)))
    return found


def _shard_done(out: Path, i: int, n: int, run_path: str) -> bool:
    """Part i of n is done: its CSV exists and its manifest says complete (for this run)."""
    meta, csv = _shard_path(out, i, n, "json"), _shard_path(out, i, n, "csv")
    if not (meta.exists() and csv.exists()):
        return False
    m = json.loads(meta.read_text())
    if m.get("status") != "complete":
        return False
    if m.get("run") != run_path:
        raise UserError(f"{meta} was computed from run={m.get('run')!r}, not {run_path!r}; shards of one out= "
                        f"must come from one run. Choose another out=<dir>, or overwrite=true after removing "
                        f"{out / SHARDS}")
    return True


def _is_sweep_job_dir(out) -> bool:
    from ..commands import sweep_job_dir

    job = sweep_job_dir()
    return job is not None and Path(out).resolve() == Path(job).resolve()


@scoped
def measure(cfg: InfluenceConfig, kind: str, out: Optional[Path], config_dict: dict) -> Path:
    """Run ``dice gt`` (kind='gt') or ``dice estimate`` (kind='estimate') and write its directory.

    With ``cfg.shard = "i/n"`` only part i of the units is computed (see the module docstring); the job that
    completes the last part merges all parts into the same files an unsharded run writes.
    """
    shard = parse_shard(getattr(cfg, "shard", None))
    paths = bool(getattr(cfg, "paths", False))
    if paths and getattr(cfg, "method", None) != "first_order":
        raise UserError(f"paths=true is a per-path breakdown of method=first_order, not of method={cfg.method!r}; "
                        f"run it with method=first_order")
    if paths and shard is not None:
        raise UserError("paths=true cannot be combined with shard=; run the per-path breakdown unsharded")
    run = open_run(cfg.run)                  # torch-free: a finished measurement returns before the replay
    if shard is not None and not cfg.out and out and _is_sweep_job_dir(out):
        RunDir(out).discard_if_empty()      # the -m job's own directory: the parts must meet in one place
        out = None
    out = Path(out) if out else run.path / kind
    identity = {k: v for k, v in config_dict.items() if k != "shard"}
    identity["run"] = str(run.path)          # resolved: outputs/latest may move, the measured run may not
    if already_complete(kind, out, identity, cfg.overwrite, "selection", wait=shard is not None,
                        hold="whole" if shard is None else "short"):
        return out
    import pandas as pd

    from ..replay import open_replay
    from .table import read_table, write_table
    from .units import select_units

    rd = RunDir(out, kind)
    rd.lock(wait=shard is not None, hold="whole" if shard is None else "short")  # shard jobs: only to claim
    mode = rd.check(identity, cfg.overwrite)
    rp = open_replay(cfg.run, cfg.dtype, cfg.device)
    train_cfg, setup = rp.cfg, rp.setup
    if kind == "estimate" and cfg.method == "first_order":
        from .estimate import check_linear

        check_linear(setup.dyn)              # before any write: a defended run needs method=exact
    rounds = parse_rounds(cfg.rounds, train_cfg.rounds, cfg.hops, run.checkpoint_rounds())
    q = rp.q(cfg.q)
    fn, method = _method(cfg, kind)
    # validate the selection for every round before any work or write
    selections = {t: select_units(setup.plan[t], cfg.unit, cfg.sources, cfg.samples, cfg.seed, t) for t in rounds}
    total = int(sum(len(s) for s in selections.values()))
    present = {} if mode == "replace" else _shards_present(out)
    if shard is not None:
        i, n = shard
        if n > total:
            raise UserError(f"shard={cfg.shard} asks for {n} parts but the selection has only {total} units; "
                            f"use at most {total} parts ({SHARD_FORM})")
        other = sorted(m for m in present if m != n)
        if other:
            raise UserError(f"{out} already holds shards of n={other[0]} for this selection; use shard=i/{other[0]} "
                            f"(or no shard= to finish and merge them), or another out=<dir>")
    elif len(present) > 1:
        raise UserError(f"{out / SHARDS} holds shards cut in several ways (n = {sorted(present)}); remove the "
                        f"ones not wanted, or choose another out=<dir>")
    rd.claim(identity, "fresh" if mode == "resume" else mode)
    rd.update_manifest(kind=kind, status="running", run=str(run.path), method=method, rounds=rounds,
                       environment=environment(), started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if shard is not None:
        rd.unlock()                                # the parts run side by side; each holds its own lock
    part = _Part(cfg, kind, rp, selections, fn, q)
    if shard is None and not present:              # plain run: everything in memory, no shard files
        table, attrs, seconds = part.compute(rd, 0, total)
        if paths:
            write_table(out / "paths.csv", part.paths())
        _finish(cfg, kind, run, out, rd, train_cfg, method, rounds, total, table, attrs, seconds, {},
                schedule=setup.schedule)
        return out
    n = shard[1] if shard is not None else next(iter(present))
    todo = [shard[0]] if shard is not None else list(range(n))
    for i in todo:
        rd.lock_part(f"shard_{i}_of_{n}", wait=shard is None)
        if _shard_done(out, i, n, str(run.path)):
            print(f"dice {kind}: shard {i}/{n} is already done in {out / SHARDS}; skipped.")
            continue
        lo, hi = shard_bounds(total, i, n)
        meta = {"shard": f"{i}/{n}", "units": [lo, hi], "run": str(run.path), "kind": kind, "method": method,
                "environment": environment(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic.write_json(_shard_path(out, i, n, "json"), {**meta, "status": "running"})
        try:
            table, attrs, seconds = part.compute(rd, lo, hi)
        except BaseException as e:
            atomic.write_json(_shard_path(out, i, n, "json"), {**meta, "status": "failed", "error": str(e)})
            raise
        write_table(_shard_path(out, i, n, "csv"), table)
        atomic.write_json(_shard_path(out, i, n, "json"), {
            **meta, "status": "complete", "rows": len(table), "seconds": round(seconds, 3), **attrs,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        print(f"dice {kind}: wrote shard {i}/{n} ({hi - lo} units, {len(table)} rows, {seconds:.2f} s)")
    done = [i for i in range(n) if _shard_done(out, i, n, str(run.path))]
    if len(done) < n:
        missing = [i for i in range(n) if i not in done]
        print(f"dice {kind}: {len(done)} of {n} shards done in {out / SHARDS}; the job that finishes the last "
              f"one merges them (missing: {', '.join(f'{i}/{n}' for i in missing[:8])}"
              f"{' ...' if len(missing) > 8 else ''})")
        return out
    if shard is not None and not rd.relock_for_merge(identity):
        return out
    # merge: every part, in order; read back exactly (round_trip) so the table equals the unsharded one
    tables, attrs, seconds, parts = [], {"noise_floor": 0.0, "roundoff": 0.0}, 0.0, {}
    for i in range(n):
        rd.verify(f"{SHARDS}/shard_{i}_of_{n}.csv", f"{SHARDS}/shard_{i}_of_{n}.json")
        meta = json.loads(_shard_path(out, i, n, "json").read_text())
        tables.append(read_table(_shard_path(out, i, n, "csv")))
        for key in attrs:
            attrs[key] = max(attrs[key], float(meta.get(key, 0.0)))
        seconds += float(meta.get("seconds", 0.0))
        parts[meta["shard"]] = {"units": meta["units"], "seconds": meta.get("seconds")}
    table = pd.concat(tables, ignore_index=True)
    _finish(cfg, kind, run, out, rd, train_cfg, method, rounds, total, table, attrs, seconds, parts,
            schedule=setup.schedule)
    return out


class _Part:
    """Computes units [lo, hi) of the selection (table order) round by round."""

    def __init__(self, cfg, kind, rp: Replay, selections: Dict[int, Units], fn, q):
        self.cfg, self.kind, self.rp, self.setup, self.selections, self.fn, self.q = \
            cfg, kind, rp, rp.setup, selections, fn, q

    def compute(self, rd: RunDir, lo: int, hi: int) -> Tuple[pd.DataFrame, dict, float]:
        import pandas as pd

        from ..progress import bar

        cfg, setup = self.cfg, self.setup
        work, start = [], 0
        for t, units in self.selections.items():        # rounds ascending (parse_rounds sorts them)
            a, b = max(lo, start), min(hi, start + len(units))
            if a < b:
                work.append((t, units if (a, b) == (start, start + len(units)) else
                             units.subset(slice(a - start, b - start))))
            start += len(units)
        t0 = time.perf_counter()
        tables, attrs = [], {"noise_floor": 0.0, "roundoff": 0.0}
        b = bar(cfg.progress, sum(len(u) for _, u in work), f"dice {self.kind}", unit="unit")
        try:
            for i, (t, units) in enumerate(work):
                b.set_postfix_str(f"round {t} ({i + 1}/{len(work)})", refresh=False)
                state = self.rp.state_at(t)
                before = b.n
                kw = {"progress": b.update} if self.kind == "gt" else {}        # gt ticks per pass of copies
                df = self.fn(setup.dyn, state, units, cfg.hops, setup.x_probe, setup.y_probe,
                             setup.shared_probe, self.q, **kw)
                b.update(before + len(units) - b.n)
                for key in attrs:
                    attrs[key] = max(attrs[key], float(df.attrs.get(key, 0.0)))
                tables.append(df)
        except BaseException as e:
            note_where(e, measuring_where([w[0] for w in work], len(tables)))
            rd.update_manifest(status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                               error=str(e))
            raise
        finally:
            b.close()
        table = pd.concat(tables, ignore_index=True)
        self.work = work
        for c in table.columns:     # −0.0 -> 0.0: a zero's sign may depend on which units share a pass
            if table[c].dtype.kind == "f":
                table[c] = table[c] + 0.0
        return table, attrs, time.perf_counter() - t0


    def paths(self) -> pd.DataFrame:
        """Per-path first-order terms of every computed unit (``paths=true``; a visualisation extra):
        round, source, unit, sample, path "j>k1>…>ks", hop, target, weight, value. Summing value over the
        paths ending at (target, hop) gives the influence table's first_order value."""
        import pandas as pd

        from .estimate import first_order_paths, unit_deltas

        setup, frames = self.setup, []
        for t, units in self.work:
            state = self.rp.state_at(t)
            deltas = unit_deltas(setup.dyn, state, units.mask)
            for u in range(len(units)):
                try:
                    df = first_order_paths(setup.dyn, state, int(units.source[u]), deltas[u], self.cfg.hops,
                                           setup.x_probe, setup.y_probe, setup.shared_probe, self.q)
                except ValueError as e:
                    raise UserError(f"paths=true: {e}")
                df.insert(0, "sample", int(units.sample[u]))
                df.insert(0, "unit", units.kind)
                df.insert(0, "source", int(units.source[u]))
                df.insert(0, "round", t)
                frames.append(df)
        return pd.concat(frames, ignore_index=True)


def _finish(cfg, kind: str, run: RunDir, out: Path, rd: RunDir, train_cfg: TrainConfig, method: str,
            rounds: List[int], n_units: int, table: pd.DataFrame, attrs: dict, seconds: float,
            shards: dict, schedule=None) -> None:
    """influence.csv (with ``distance``), summary.json, plots, alignment and compare (estimates), manifest."""
    from .. import plots
    from ..graph import MixingSchedule
    from .reach import Reach, add_distance, decay_stats
    from .table import write_table

    reach = Reach(schedule if schedule is not None else MixingSchedule.load(run.path), cfg.hops,
                  train_cfg.rounds)
    table = add_distance(table, reach)
    ok = reach.reachable(table)
    structural = int((~ok).sum())
    if getattr(cfg, "reachable_only", False):
        table, ok = table[ok].reset_index(drop=True), ok[ok]
    write_table(out / "influence.csv", table)
    decay = decay_stats(table, ok)
    ph, pdist = decay["per_hop"], decay["per_distance"]
    summary = {"rows": len(table), "units": n_units, "rounds": rounds, "hops": cfg.hops, "unit": cfg.unit,
               "method": method, "seconds": round(seconds, 3), "units_per_s": round(n_units / max(seconds, 1e-9), 2),
               "reachable_only": bool(getattr(cfg, "reachable_only", False)),
               "structural_zero_rows": structural,
               "mean_abs_influence_per_hop_reachable": {str(int(h)): float(v) for h, v in
                                                         zip(ph["hop"], ph["mean_abs"])},
               "reachable_rows_per_hop": {str(int(h)): int(v) for h, v in zip(ph["hop"], ph["rows"])},
               "mean_abs_influence_per_distance": {str(int(d)): float(v) for d, v in
                                                   zip(pdist["distance"], pdist["mean_abs"])},
               "distance_curve_hop": decay["horizon"],
               "note": "means over reachable (unit, target) rows only: structural_zero_rows are the rows of "
                       "targets a unit cannot reach by that hop (exactly 0); mean_abs_influence_per_distance "
                       "is taken at hop distance_curve_hop"}
    if shards:
        summary["shards"] = len(shards)
    if not train_cfg.network.plain:
        from ..network import derivative_note

        summary["network"] = derivative_note(train_cfg.network, kind, method)
    if kind == "gt":
        live = table.loc[ok, "influence"].abs()
        nonzero = live[live > 0]
        summary["noise_floor"] = {
            "null_unit_max_abs_gt": attrs["noise_floor"],
            "float_roundoff_of_losses": attrs["roundoff"],
            "smallest_nonzero_abs_gt": float(nonzero.min()) if len(nonzero) else None,
            "rows_below_roundoff": int((live < attrs["roundoff"]).sum()),
            "note": "a removal that changes nothing must give exactly 0 (null_unit_max_abs_gt); |GT| values "
                    "below float_roundoff_of_losses are indistinguishable from round-off (rows_below_roundoff "
                    "counts reachable rows only)"}
    atomic.write_json(out / "summary.json", summary)
    name = "gt" if kind == "gt" else method
    decays = {name: decay}
    if kind == "estimate":
        aligned = _align(cfg, run, out, table, method, reach)
        if aligned is not None:                   # gt, then every estimate of this selection (compare.csv)
            decays = {m: decay if m == method else decay_stats(t, reach.reachable(t)) for m, t in aligned.items()}
    plots.hop_decay(decays, out / "decay.png")
    plots.node_heatmap(table, train_cfg.nodes, out / "heatmap.png",
                       title=f"{'ground truth' if kind == 'gt' else method}: influence of source on target")
    plots.wait()                    # every figure is on disk before the result is marked complete
    extra = {"shards": shards} if shards else {}
    rd.update_manifest(status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       timings={"seconds": round(seconds, 3), "units_per_s": summary["units_per_s"]}, **extra)
    merged = f" merged from {len(shards)} shards," if shards else ""
    dropped = f", {structural} structural-zero rows left out" if summary["reachable_only"] else ""
    print(f"dice {kind}: wrote {out / 'influence.csv'} ({len(table)} rows,{merged} {n_units} units, "
          f"{seconds:.2f} s{dropped})")


def _method(cfg: InfluenceConfig, kind: str) -> tuple:
    if kind == "gt":
        from .gt import ground_truth

        return functools.partial(ground_truth, chunk=cfg.chunk), "gt"
    from . import estimate

    assert isinstance(cfg, EstimateConfig)
    fn = estimate.exact if cfg.method == "exact" else estimate.first_order
    return functools.partial(fn, chunk=cfg.chunk), cfg.method   # chunk: directions per batched backward


def _same_selection(cfg: EstimateConfig, run: RunDir, other: dict) -> dict:
    """{key: (theirs, mine)} of the selection keys (and run) where ``other`` (a config.yaml) differs."""
    mine = {k: getattr(cfg, k) for k in SELECTION_KEYS}
    theirs = {k: other.get(k) for k in SELECTION_KEYS}
    mine["run"], theirs["run"] = str(run.path), other.get("run")
    return {k: (theirs[k], mine[k]) for k in mine if str(mine[k]) != str(theirs[k])}


def _align(cfg: EstimateConfig, run: RunDir, out: Path, table: pd.DataFrame, method: str,
           reach: Reach) -> Optional[Dict[str, pd.DataFrame]]:
    """alignment.json, alignment.png, compare.csv and compare.png when a ground truth for the same selection
    exists; returns {"gt": gt table, method: table, other methods: their tables} (None without a gt)."""
    from .. import plots
    from .alignment import KEYS, alignment_report, merge
    from .table import read_table, write_table

    gt_dir = Path(cfg.gt) if cfg.gt else run.path / "gt"
    gt_csv = gt_dir / "influence.csv"
    if not gt_csv.exists():
        print(f"dice estimate: no ground truth at {gt_dir} — run `dice gt` with the same selection for "
              f"alignment.json")
        return None
    try:
        gt_cfg = read_result(gt_dir, "gt", "influence.csv")   # its files checked against its manifest
    except UserError as e:
        print(f"dice estimate: no alignment written: {e}")
        return None
    diff = _same_selection(cfg, run, gt_cfg)
    if diff:
        print(f"dice estimate: the ground truth at {gt_dir} has another selection {diff}; no alignment written")
        return None
    gt = read_table(gt_csv)
    merged = merge(gt, table)
    others = _other_estimates(cfg, run, out, gt_dir, method)
    report = {"method": method, "gt": str(gt_dir), **alignment_report(merged),
              "compare": {method: str(out), **{m: str(d) for m, d in others.items()}}}
    atomic.write_json(out / "alignment.json", report)
    plots.alignment_scatter(merged, out / "alignment.png", report, method)
    per_hop = ", ".join(f"hop {h}: {v['spearman']:.3f}" for h, v in report["per_hop"].items())
    print(f"dice estimate: alignment with ground truth (Spearman) overall {report['overall']['spearman']:.3f}; "
          f"{per_hop}")
    tables = {method: table, **{m: read_table(d / "influence.csv") for m, d in others.items()}}
    compare = compare_table(gt, tables, reach)
    methods = [m for m in compare.columns if m not in KEYS + ["distance", "gt"]]
    write_table(out / "compare.csv", compare)
    plots.compare_plot(compare, methods, out / "compare.png", reach.reachable(compare))
    print(f"dice estimate: wrote {out / 'compare.csv'} (gt, {', '.join(methods)} side by side; {len(compare)} rows)")
    return {"gt": gt, **{m: tables[m] for m in methods}}


METHOD_ORDER = ["exact", "first_order"]


def compare_table(gt: pd.DataFrame, estimates: Dict[str, pd.DataFrame], reach: Reach) -> pd.DataFrame:
    """One row per row key (gt's rows first, in its order; then rows only an estimate has), with ``distance``
    and the columns gt, exact, first_order, … (empty where a table lacks the row)."""
    import pandas as pd

    from .alignment import KEYS
    from .reach import add_distance

    names = sorted(estimates, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m))
    keys = pd.concat([gt[KEYS]] + [estimates[m][KEYS] for m in names], ignore_index=True).drop_duplicates()
    out = keys.merge(gt[KEYS + ["influence"]].rename(columns={"influence": "gt"}), on=KEYS, how="left")
    for m in names:
        out = out.merge(estimates[m][KEYS + ["influence"]].rename(columns={"influence": m}), on=KEYS, how="left")
    out = out.reset_index(drop=True)
    return add_distance(out, reach)


def _other_estimates(cfg: EstimateConfig, run: RunDir, out: Path, gt_dir: Path, method: str) -> Dict[str, Path]:
    """Complete estimates of other methods with the same selection of the same run, found next to this one,
    inside the run and next to the gt: {method: directory} (the first one found per method)."""
    found: Dict[str, Path] = {}
    seen = {out.resolve()}
    for parent in (out.parent, run.path, gt_dir.parent):
        if not parent.is_dir():
            continue
        for d in sorted(p for p in parent.iterdir() if p.is_dir()):
            if d.resolve() in seen or not (d / "influence.csv").exists():
                continue
            seen.add(d.resolve())
            try:
                manifest = json.loads((d / "manifest.json").read_text())
                other = yaml.safe_load((d / "config.yaml").read_text()) or {}
            except (OSError, ValueError, yaml.YAMLError):
                continue
            m = manifest.get("method") or other.get("method")
            if manifest.get("kind") != "estimate" or manifest.get("status") != "complete" or m == method \
                    or m in found or _same_selection(cfg, run, other):
                continue
            found[m] = d
    return found
