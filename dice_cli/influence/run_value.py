"""``dice value``: whole-run influence of every unit on every node's final model (VALUE.md), end to end.

Reads a finished ``dice train`` run, rebuilds its world in the analysis dtype (``replay.open_replay``),
starts from the state at the window start a, and computes one long table

    influence.csv   source, unit, round, sample, target, influence [, loss_with, loss_without]   (gt)

one row per (unit, target): ``round`` is the batch unit's round (−1 for node/sample/participant units),
``sample`` the sample unit's dataset index (−1 otherwise), ``target`` the node k (−1 for targets=network,
the q-weighted network loss Σ_k q_k L_k). Plus summary.json (timings, counts, noise floor, LDS with a
bootstrap interval, alignment with a gt table of the same selection), config.yaml, manifest.json, plots
(heatmap.png, sources.png, alignment.png, lds.png) and, with lds=M, lds.csv and lds_subsets.npy.

Methods: ``gt`` (``retrain.gt_values``), ``exact`` (``sweep.exact_values``), ``first_order`` and
``cascade_sum`` (``value``). Shards (``shard=i/n``) cut the work into n contiguous parts — gt: the units
(table order); estimates: the targets (one reverse sweep covers every unit) — written to
``<out>/shards/shard_<i>_of_<n>.csv``; the job that completes the last part merges them into the rows of
an unsharded run, in its order, and then runs LDS, alignment and plots.

    dice value run=outputs/ring unit=node method=exact lds=50
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import pandas as pd
import torch
import yaml

from .. import atomic, plots
from ..config import ValueConfig
from ..errors import UserError
from ..replay import Replay, StateTape, open_replay
from ..run import RunDir, environment
from .alignment import agreement
from .lds import DEFAULT_ALPHA, draw_subsets, lds_score
from .measure import SHARD_FORM, _is_sweep_job_dir, _shard_done, _shard_path, _shards_present, parse_shard, \
    shard_bounds
from .retrain import gt_values
from .run_units import RunUnits, select_run_units
from .sweep import exact_values
from .table import read_table, write_table
from .value import cascade_values, first_order_values

COLUMNS = ["source", "unit", "round", "sample", "target", "influence"]
GT_COLUMNS = COLUMNS + ["loss_with", "loss_without"]
KEYS = ["source", "unit", "round", "sample", "target"]
KIND = "value"


# ------------------------------------------------------------------------------------------ window, horizon
def parse_window(spec, T: int) -> Tuple[int, int]:
    """``window=a:b`` -> (a, b) with 0 <= a < b <= T (rounds a … b−1; an empty side means 0 / T)."""
    fix = (f"use window=a:b with 0 <= a < b <= {T} (removal in rounds a … b−1; an empty side means 0 or {T}), "
           f"e.g. window=0:{T} for the whole run; the run has rounds 0..{T - 1}")
    s = str(spec).strip()
    if s == "all":
        return 0, T
    if s.count(":") != 1:
        raise UserError(f"window={spec!r} is not valid; {fix}")
    try:
        a, b = (int(p) if p.strip() else None for p in s.split(":"))
    except ValueError:
        raise UserError(f"window={spec!r} is not valid; {fix}") from None
    a = 0 if a is None else a
    b = T if b is None else b
    if not 0 <= a < b <= T:
        raise UserError(f"window={spec!r} lies outside the run or is empty; {fix}")
    return a, b


def parse_horizon(spec, b: int, T: int) -> int:
    """``horizon=T_e`` (None = T) with b <= T_e <= T: removal ends at round b, the effect is measured at T_e."""
    if spec is None or str(spec).strip().lower() in ("", "none", "null", "last"):
        return T
    try:
        e = int(spec)
        assert e == float(spec)
    except (ValueError, TypeError, AssertionError):
        raise UserError(f"horizon={spec!r} is not valid; use an integer round in {b}..{T} (default {T}, the final "
                        f"models)") from None
    if e > T or e < 0:
        raise UserError(f"horizon={e} is outside the run: its states are rounds 0..{T}; use horizon= in {b}..{T} "
                        f"(default {T}, the final models)")
    if e < b:
        raise UserError(f"horizon={e} is before the window ends (window ends at round {b}): the effect of removing "
                        f"rounds up to {b - 1} can only be measured at T_e >= {b}; use horizon= in {b}..{T}, or a "
                        f"window that ends by {e} (window=a:{e})")
    return e


def check_checkpoints(rp: Replay, a: int) -> None:
    """The sweep and the retraining start from the state at the window start: it needs a checkpoint <= a."""
    have = rp.run.checkpoint_rounds()
    if any(r <= a for r in have):
        return
    every = (rp.cfg.record.every, rp.cfg.record.max_mb)
    raise UserError(
        f"run={str(rp.run.path)!r} has no checkpoint at or before the window start a={a}, and dice value needs "
        f"the state there: the reverse sweep and the retraining replay rounds a … T_e−1 from it. The run's "
        f"checkpoints/ holds {'rounds ' + str(have[:10]) + (' ...' if len(have) > 10 else '') if have else 'nothing'}. "
        f"dice train writes one every record.every rounds (now {every[0]}; 0 = auto: every round while all of "
        f"them fit record.max_mb={every[1]}) and always rounds 0 and T. Fix: re-train with record.every=1 (or a "
        f"stride with a checkpoint at or before {a}), restore the missing checkpoint files, or choose "
        f"window=c:b with c >= {have[0] if have else 0}.")


# ------------------------------------------------------------------------------------------ the table
def frame(units: RunUnits, targets: List[int], vals: np.ndarray, unit_ids: np.ndarray,
          loss_with: Optional[np.ndarray] = None, loss_without: Optional[np.ndarray] = None) -> pd.DataFrame:
    """Rows unit-major, targets inner. vals [U, D] (D = len(targets)); unit_ids [U]: positions in the full
    selection (kept in column ``_u`` for merging shards; not written to influence.csv)."""
    U, D = vals.shape
    cols = units.frame()
    df = pd.DataFrame({
        "source": np.repeat(cols["source"].astype(np.int64), D),
        "unit": np.repeat(cols["unit"], D),
        "round": np.repeat(cols["round"].astype(np.int64), D),
        "sample": np.repeat(cols["sample"].astype(np.int64), D),
        "target": np.tile(np.asarray(targets, dtype=np.int64), U),
        "influence": vals.reshape(-1).astype(np.float64) + 0.0,
    })
    if loss_with is not None:
        df["loss_with"] = loss_with.reshape(-1).astype(np.float64)
        df["loss_without"] = loss_without.reshape(-1).astype(np.float64)
    df["_u"] = np.repeat(np.asarray(unit_ids, dtype=np.int64), D)
    return df


class _Job:
    """One ``dice value`` computation: replay, selection and the method, over parts of the work."""

    def __init__(self, cfg: ValueConfig, rp: Replay, units: RunUnits, window, horizon: int):
        self.cfg, self.rp, self.units, self.window, self.horizon = cfg, rp, units, window, horizon
        self.dyn = rp.dyn
        self.q = rp.q(cfg.q)
        self.probe = rp.evaluation(cfg.eval)          # eval=heldout: the test samples no probe set holds
        self._start = None
        self._tape = None

    @property
    def start(self):
        if self._start is None:
            self._start = self.rp.state_at(self.window[0])
        return self._start

    def tape(self) -> StateTape:
        """The factual states a … T_e (one forward replay, with a progress bar)."""
        if self._tape is None:
            bar = None
            if self.cfg.progress:
                from tqdm.auto import tqdm
                bar = tqdm(total=self.horizon - self.window[0] + 1, desc="dice value: replaying the factual run",
                           unit="round", dynamic_ncols=True, file=sys.stderr, disable=None)
            try:
                self._tape = StateTape(self.dyn, self.start, self.horizon,
                                       on_state=None if bar is None else lambda t, s: bar.update(1))
            finally:
                if bar is not None:
                    bar.close()
        return self._tape

    def targets(self) -> List[int]:
        return [-1] if self.cfg.targets == "network" else list(range(self.dyn.n))

    def items(self) -> int:
        """What shards split: units for gt, targets for the estimates."""
        return len(self.units) if self.cfg.method == "gt" else len(self.targets())

    def compute(self, lo: int, hi: int) -> Tuple[pd.DataFrame, dict]:
        cfg, U = self.cfg, len(self.units)
        progress = bool(cfg.progress)
        if cfg.method == "gt":
            sub = self.units.subset(slice(lo, hi))
            res = gt_values(self.dyn, self.start, self.horizon, sub, self.probe, self.q, cfg.targets, cfg.scale,
                            cfg.chunk, progress="dice value gt (retraining)" if progress else None)
            df = frame(sub, self.targets(), res["influence"].cpu().numpy(), np.arange(lo, hi),
                       res["loss_with"].cpu().numpy(), res["loss_without"].cpu().numpy())
            return df, {"noise_floor": res["noise_floor"], "roundoff": res["roundoff"]}
        targets = self.targets()[lo:hi]
        if cfg.targets == "network":
            blocks = [None]
        else:
            blocks = [np.asarray(targets[i:i + cfg.chunk]) for i in range(0, len(targets), cfg.chunk)]
        args = (self.dyn, self.tape(), self.units, self.probe, self.q)
        kw = dict(targets=cfg.targets, chunk=cfg.chunk, blocks=blocks, progress=progress)
        if cfg.method == "exact":
            vals = exact_values(*args, **kw)
        elif cfg.method == "first_order":
            vals = first_order_values(*args, **kw)
        else:
            vals = cascade_values(*args, hops=cfg.hops, **kw)
        return frame(self.units, targets, vals.T.cpu().numpy(), np.arange(U)), {}


# ------------------------------------------------------------------------------------------ the command
def value(cfg: ValueConfig, out: Optional[Path], config_dict: dict) -> Path:
    """Run ``dice value`` and write its directory (see the module docstring); returns the directory."""
    t_begin = time.perf_counter()
    shard = parse_shard(cfg.shard)
    rp = open_replay(cfg.run, cfg.dtype, cfg.device)
    T = int(rp.rounds)
    a, b = parse_window(cfg.window, T)
    e = parse_horizon(cfg.horizon, b, T)
    check_checkpoints(rp, a)
    units = select_run_units(rp.setup.plan, rp.setup.nodes.parts, cfg.unit, (a, b), cfg.sources, cfg.samples,
                             cfg.seed)
    if not len(units):
        raise UserError(f"unit={cfg.unit} sources={cfg.sources} samples={cfg.samples} selects no unit in window "
                        f"{a}:{b}; choose other sources= or samples=")
    if cfg.lds and len(units) < 2:
        raise UserError(f"lds={cfg.lds} needs at least 2 units to draw subsets from, but unit={cfg.unit} "
                        f"sources={cfg.sources} samples={cfg.samples} selects {len(units)}; select more units "
                        f"(sources=all, samples=all) or set lds=0")
    run = rp.run
    if shard is not None and not cfg.out and out and _is_sweep_job_dir(out):
        RunDir(out).discard_if_empty()          # -m shard jobs must meet in one directory
        out = None
    out = Path(out) if out else run.path / KIND
    identity = {k: v for k, v in config_dict.items() if k != "shard"}
    if identity.get("eval") == "probe":        # the default: left out, so results made before the key stay valid
        identity.pop("eval")
    identity["run"] = str(run.path)
    rd = RunDir(out, KIND)
    mode = rd.check(identity, cfg.overwrite)
    if mode == "complete":
        print(f"dice value: {out} is already complete with this selection; nothing to do.")
        return out
    job = _Job(cfg, rp, units, (a, b), e)
    total = job.items()
    present = {} if mode == "replace" else _shards_present(out)
    if shard is not None:
        i, n = shard
        if n > total:
            what = "units" if cfg.method == "gt" else "targets"
            raise UserError(f"shard={cfg.shard} asks for {n} parts but method={cfg.method} splits over its {what}, and "
                            f"there are only {total}; use at most {total} parts ({SHARD_FORM})")
        other = sorted(m for m in present if m != n)
        if other:
            raise UserError(f"{out} already holds shards of n={other[0]} for this selection; use shard=i/{other[0]} "
                            f"(or no shard= to finish and merge them), or another out=<dir>")
    elif len(present) > 1:
        raise UserError(f"{out / 'shards'} holds shards cut in several ways (n = {sorted(present)}); remove the ones "
                        f"not wanted, or choose another out=<dir>")
    rd.claim(identity, "fresh" if mode == "resume" else mode)
    rd.update_manifest(kind=KIND, status="running", run=str(run.path), method=cfg.method, unit=cfg.unit,
                       window=[a, b], horizon=e, environment=environment(),
                       started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    try:
        if shard is None and not present:
            t0 = time.perf_counter()
            table, attrs = job.compute(0, total)
            seconds = time.perf_counter() - t0
            _finish(cfg, job, out, rd, table, attrs, seconds, {}, t_begin)
            return out
        n = shard[1] if shard is not None else next(iter(present))
        todo = [shard[0]] if shard is not None else list(range(n))
        for i in todo:
            if _shard_done(out, i, n, str(run.path)):
                print(f"dice value: shard {i}/{n} is already done in {out / 'shards'}; skipped.")
                continue
            lo, hi = shard_bounds(total, i, n)
            meta = {"shard": f"{i}/{n}", "items": [lo, hi], "run": str(run.path), "kind": KIND,
                    "method": cfg.method, "environment": environment(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            atomic.write_json(_shard_path(out, i, n, "json"), {**meta, "status": "running"})
            t0 = time.perf_counter()
            try:
                table, attrs = job.compute(lo, hi)
            except BaseException as err:
                atomic.write_json(_shard_path(out, i, n, "json"), {**meta, "status": "failed", "error": str(err)})
                raise
            seconds = time.perf_counter() - t0
            write_table(_shard_path(out, i, n, "csv"), table)
            atomic.write_json(_shard_path(out, i, n, "json"), {
                **meta, "status": "complete", "rows": len(table), "seconds": round(seconds, 3), **attrs,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            print(f"dice value: wrote shard {i}/{n} ({hi - lo} {'units' if cfg.method == 'gt' else 'targets'}, "
                  f"{len(table)} rows, {seconds:.2f} s)")
        done = [i for i in range(n) if _shard_done(out, i, n, str(run.path))]
        if len(done) < n:
            missing = [f"{i}/{n}" for i in range(n) if i not in done]
            print(f"dice value: {len(done)} of {n} shards done in {out / 'shards'}; the job that finishes the last "
                  f"one merges them (missing: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''})")
            rd.update_manifest(status="running", shards_done=len(done))
            return out
        tables, attrs, seconds, parts = [], {}, 0.0, {}
        for i in range(n):
            meta = json.loads(_shard_path(out, i, n, "json").read_text())
            tables.append(read_table(_shard_path(out, i, n, "csv")))
            for key in ("noise_floor", "roundoff"):
                if key in meta:
                    attrs[key] = max(attrs.get(key, 0.0), float(meta[key]))
            seconds += float(meta.get("seconds", 0.0))
            parts[meta["shard"]] = {"items": meta["items"], "seconds": meta.get("seconds")}
        table = pd.concat(tables, ignore_index=True)
        table = table.sort_values(["_u", "target"], kind="stable").reset_index(drop=True)
        if cfg.targets == "all":       # shards of an estimate hold target ranges: restore table order
            order = {k: r for r, k in enumerate(job.targets())}
            table = table.iloc[np.lexsort((table["target"].map(order).to_numpy(), table["_u"].to_numpy()))]
            table = table.reset_index(drop=True)
        _finish(cfg, job, out, rd, table, attrs, seconds, parts, t_begin)
        return out
    except KeyboardInterrupt:
        rd.update_manifest(status="interrupted")
        raise
    except UserError:
        raise
    except BaseException as err:
        rd.update_manifest(status="failed", error=str(err))
        raise


def _values(table: pd.DataFrame, U: int, targets: List[int]) -> np.ndarray:
    """The table's influence as [U, D] (units in selection order, targets in ``targets`` order)."""
    col = {k: i for i, k in enumerate(targets)}
    V = np.zeros((U, len(targets)))
    V[table["_u"].to_numpy(), table["target"].map(col).to_numpy()] = table["influence"].to_numpy()
    return V


def _find_gt(cfg: ValueConfig, job: _Job, out: Path) -> Tuple[Optional[pd.DataFrame], str]:
    """A ``dice value method=gt`` table of the same selection (or None, with the reason)."""
    run = job.rp.run
    cands = [Path(cfg.gt)] if cfg.gt else [run.path / "value_gt", run.path / KIND]
    notes = []
    for d in cands:
        if d.resolve() == out.resolve() or not (d / "influence.csv").exists():
            notes.append(f"{d}: no finished result")
            continue
        other = yaml.safe_load((d / "config.yaml").read_text()) if (d / "config.yaml").exists() else {}
        summ = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
        mine = {"method": "gt", "run": str(run.path), "unit": cfg.unit, "targets": cfg.targets, "q": cfg.q,
                "scale": 1.0, "window": list(job.window), "horizon": job.horizon, "eval": cfg.eval}
        theirs = {"method": other.get("method"), "run": other.get("run"), "unit": other.get("unit"),
                  "targets": other.get("targets"), "q": other.get("q"), "scale": float(other.get("scale", 1.0)),
                  "window": summ.get("window"), "horizon": summ.get("horizon"), "eval": other.get("eval", "probe")}
        diff = {k: (theirs[k], mine[k]) for k in mine if theirs[k] != mine[k]}
        if diff:
            notes.append(f"{d}: another selection {diff}")
            continue
        return read_table(d / "influence.csv"), str(d)
    return None, "; ".join(notes)


def _finish(cfg: ValueConfig, job: _Job, out: Path, rd: RunDir, table: pd.DataFrame, attrs: dict,
            seconds: float, shards: dict, t_begin: float) -> None:
    """LDS, alignment, influence.csv, summary.json, plots and the complete manifest."""
    units, n = job.units, job.dyn.n
    targets = job.targets()
    U = len(units)
    V = _values(table, U, targets)
    summary = {"method": cfg.method, "unit": cfg.unit, "targets": cfg.targets, "window": list(job.window),
               "horizon": job.horizon, "rows": int(len(table)), "units": U, "target_count": len(targets),
               "nodes": n, "dtype": cfg.dtype, "q": cfg.q, "eval": cfg.eval,
               "hops": cfg.hops if cfg.method == "cascade_sum" else None,
               "scale": cfg.scale if cfg.method == "gt" else None,
               "seconds": {"compute": round(seconds, 3)},
               "units_per_s": round(U / max(seconds, 1e-9), 2),
               "rounds": {"window": job.window[1] - job.window[0], "swept": job.horizon - job.window[0]},
               "total_abs_influence": float(np.abs(V).sum())}
    if shards:
        summary["shards"] = len(shards)
    if cfg.method == "gt":
        nz = np.abs(V[V != 0])
        summary["noise_floor"] = {
            "null_unit_max_abs_gt": attrs.get("noise_floor", 0.0),
            "float_roundoff_of_losses": attrs.get("roundoff", 0.0),
            "smallest_nonzero_abs_gt": float(nz.min()) if nz.size else None,
            "note": "a removal that changes nothing must give exactly 0 (null_unit_max_abs_gt)"}
    gt_table, gt_note = (table, "this table") if cfg.method == "gt" else _find_gt(cfg, job, out)
    merged = None
    if cfg.method != "gt":
        if gt_table is not None:
            merged = table[KEYS + ["influence", "_u"]].merge(
                gt_table[KEYS + ["influence"]].rename(columns={"influence": "gt"}), on=KEYS, how="inner")
            if len(merged) != len(table):
                gt_note, merged = f"{gt_note}: covers {len(merged)} of {len(table)} rows", None
        if merged is not None:
            summary["alignment"] = {"gt": gt_note, **agreement(merged["gt"], merged["influence"])}
            per_target = [agreement(d["gt"], d["influence"])["spearman"] for _, d in merged.groupby("target")]
            summary["alignment"]["mean_spearman_over_targets"] = float(np.nanmean(per_target)) \
                if np.isfinite(per_target).any() else None
        else:
            summary["alignment"] = {"gt": None, "note": f"no gt table of the same selection ({gt_note}); run dice "
                                                        f"value method=gt out=<run>/value_gt with the same keys"}
    lds_plot = {}
    if cfg.lds:
        t0 = time.perf_counter()
        alpha = cfg.lds_alpha if cfg.lds_alpha is not None else DEFAULT_ALPHA[cfg.unit]
        subsets = draw_subsets(U, cfg.lds, alpha, cfg.seed)
        c = cfg.scale if cfg.method == "gt" else 1.0
        member = torch.as_tensor(subsets, dtype=job.start.theta.dtype)
        res = gt_values(job.dyn, job.start, job.horizon, units, job.probe, job.q, cfg.targets, c, cfg.chunk,
                        member=member, progress="dice value lds (retraining subsets)" if cfg.progress else None)
        actual = res["influence"].cpu().numpy()
        preds = {cfg.method: subsets @ V}
        if cfg.method != "gt" and merged is not None:
            Vg = _values(merged.assign(influence=merged["gt"]), U, targets)
            preds["gt"] = subsets @ Vg
        summary["lds"] = {}
        rows = []
        for name, pred in preds.items():
            rep = lds_score(pred, actual, seed=cfg.seed)
            summary["lds"][name] = {k: v for k, v in rep.items() if k != "per_target"}
            summary["lds"][name]["per_target"] = rep["per_target"]
            lds_plot[name] = (pred, rep)
            for m in range(cfg.lds):
                for d, k in enumerate(targets):
                    rows.append((m, int(k), name, float(pred[m, d]), float(actual[m, d])))
        summary["lds_setup"] = {"subsets": cfg.lds, "alpha": alpha, "seed": cfg.seed, "scale": c,
                                "mean_units_removed": float(subsets.sum(1).mean()),
                                "null_copy_max_abs": res["noise_floor"],
                                "seconds": round(time.perf_counter() - t0, 3)}
        summary.setdefault("noise_floor", {"null_unit_max_abs_gt": res["noise_floor"],
                                           "float_roundoff_of_losses": res["roundoff"],
                                           "note": "from the LDS retraining's null copy"})
        write_table(out / "lds.csv", pd.DataFrame(rows, columns=["subset", "target", "method", "predicted", "actual"]))
        atomic.save_npy(out / "lds_subsets.npy", subsets)
        summary["seconds"]["lds"] = summary["lds_setup"]["seconds"]
    elif cfg.method != "gt":
        summary.setdefault("noise_floor", None)
    write_table(out / "influence.csv", table[GT_COLUMNS if cfg.method == "gt" else COLUMNS])
    what = f"{cfg.method} ({cfg.unit} units, window {job.window[0]}:{job.window[1]}, horizon {job.horizon})"
    if cfg.targets == "all":
        plots.value_heatmap(table, n, out / "heatmap.png", title=f"{what}: Σ influence of source j's units on k")
    plots.value_sources(table, n, out / "sources.png", network=cfg.targets == "network",
                        title=f"{what}: per-source total" + ("" if cfg.targets == "network" else " and spread over targets"))
    if merged is not None:
        al = summary["alignment"]
        plots.value_scatter(merged["gt"].to_numpy(), merged["influence"].to_numpy(), out / "alignment.png",
                            xlabel="GT_run (loss with − loss without)", ylabel=cfg.method,
                            title=f"{cfg.method} vs GT_run ({cfg.unit} units): Spearman {al['spearman']:.3f}, "
                                  f"Pearson {al['pearson']:.3f}, n={al['n']}")
    if lds_plot:
        plots.lds_scatter(lds_plot, actual, out / "lds.png", unit=cfg.unit)
    summary["seconds"]["total"] = round(time.perf_counter() - t_begin, 3)
    atomic.write_json(out / "summary.json", summary)
    extra = {"shards": shards} if shards else {}
    rd.update_manifest(status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       timings=summary["seconds"], **extra)
    lds_msg = "".join(f"; LDS[{k}] {v['lds']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]"
                      for k, v in summary.get("lds", {}).items())
    al_msg = ""
    if summary.get("alignment", {}).get("gt"):
        al_msg = f"; vs gt: Spearman {summary['alignment']['spearman']:.3f}"
    print(f"dice value: wrote {out / 'influence.csv'} ({len(table)} rows, {U} {cfg.unit} units, {cfg.method}, "
          f"{seconds:.2f} s){al_msg}{lds_msg}", file=sys.stdout)

