"""``dice show RUN``: what a run (or a result) is, in a few lines — fast, reading only small files.

For a train run: the key config, status, rounds done, final accuracy, checkpoints, and every result found
under it by its manifest (gt, estimate, detect, value, any custom ``out=`` folder inside the run) with its
headline numbers from summary.json / alignment.json. For a result directory: the same line for it, and
its run's line. ``--json`` prints the same facts as one JSON object. Reads manifest.json, config.yaml and
summaries only: no torch, numpy or pandas import, so it answers in a fraction of a second.

    dice show outputs/latest
    dice show outputs/my_run/gt --json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import USAGE_EXIT_CODE, UserError

# folders below a run that never hold results (many files: do not walk them)
SKIP_DIRS = {"checkpoints", "shards", ".git"}
RUN_KINDS = {"train", "pipeline"}


def _json(path: Path) -> Optional[dict]:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return d if isinstance(d, dict) else None


def _config(path: Path) -> dict:
    import yaml

    for name in ("pipeline.yaml", "config.yaml"):
        try:
            d = yaml.safe_load((path / name).read_text())
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            continue
        if isinstance(d, dict):
            return d
    return {}


def _num(v: Any, digits: int = 3) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}f}" if 1e-2 <= abs(v) < 1e4 or v == 0 else f"{v:.{digits - 1}e}"


# ------------------------------------------------------------------------------------------------ facts


def open_dice_dir(path: Path) -> dict:
    """The manifest of the dice directory at ``path``; UserError (with the fix) when it is not one."""
    if not path.exists():
        raise UserError(f"{str(path)!r} does not exist. Give a run directory (the out= of `dice train`, "
                        f"default outputs/latest) or a result directory under it, e.g. dice show outputs/latest")
    if not path.is_dir():
        raise UserError(f"{str(path)!r} is a file, not a dice run directory; give the folder that holds "
                        f"manifest.json")
    m = _json(path / "manifest.json")
    if m is None or not m.get("kind"):
        inside = sorted(p.parent for p in path.glob("*/manifest.json"))[:3]
        hint = (f" It holds dice directories, e.g. {', '.join(str(p) for p in inside)}: `dice show` one of "
                f"them, or `dice report {path}` for a table over all of them." if inside else
                " Point it at a folder written by `dice train` (or gt/estimate/detect/value).")
        what = "has no readable manifest.json" if m is None else "has a manifest.json without a kind"
        raise UserError(f"{str(path)!r} is not a dice directory (it {what}).{hint}")
    return m


def find_results(run: Path) -> List[Path]:
    """Result directories below ``run`` (any depth; checkpoints/ and shards/ skipped), by their manifests."""
    found = []
    for root, dirs, files in os.walk(run):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        if Path(root) != run and "manifest.json" in files:
            m = _json(Path(root) / "manifest.json")
            if m and m.get("kind") and m.get("kind") not in RUN_KINDS:
                found.append(Path(root))
    return found


def checkpoint_rounds(run: Path) -> List[int]:
    try:
        names = os.listdir(run / "checkpoints")
    except OSError:
        return []
    out = []
    for n in names:
        if n.startswith("round_") and n.endswith(".pt"):
            try:
                out.append(int(n[6:-3]))
            except ValueError:
                pass
    return sorted(out)


def headline(path: Path, m: dict) -> Dict[str, Any]:
    """The numbers that say what a result found (from its summary.json / alignment.json)."""
    kind = m.get("kind")
    s = _json(path / "summary.json") or {}
    h: Dict[str, Any] = {}
    if kind in ("gt", "estimate"):
        for k in ("unit", "units", "rounds", "hops", "method"):
            if k in s:
                h[k] = s[k]
        if "mean_abs_influence_per_hop_reachable" in s:
            h["mean_abs_influence_per_hop"] = s["mean_abs_influence_per_hop_reachable"]
        a = _json(path / "alignment.json")
        if a and isinstance(a.get("overall"), dict):
            o = a["overall"]
            h["alignment"] = {k: o.get(k) for k in ("spearman", "pearson", "sign_agreement", "n")}
    elif kind == "detect":
        for k in ("roc_auc", "average_precision", "score", "window", "flagged", "anomalous"):
            if k in s:
                h[k] = s[k]
    elif kind == "value":
        for k in ("method", "unit", "units", "window", "total_abs_influence"):
            if k in s:
                h[k] = s[k]
        lds = s.get("lds")
        if isinstance(lds, dict):
            h["lds"] = {meth: (v.get("lds") if isinstance(v, dict) else v) for meth, v in lds.items()}
        elif isinstance(lds, (int, float)):
            h["lds"] = lds
        al = s.get("alignment")
        if isinstance(al, dict) and isinstance(al.get("overall"), dict):
            h["alignment"] = {k: al["overall"].get(k) for k in ("spearman", "pearson", "n")}
    else:                                      # a kind this dice-cli does not know: its scalar numbers
        h = {k: v for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return h


def run_facts(run: Path, m: dict, with_results: bool = True) -> Dict[str, Any]:
    cfg = _config(run)
    ckpts = checkpoint_rounds(run)
    rounds = m.get("rounds", cfg.get("rounds"))
    status = m.get("status")
    done = rounds if status == "complete" else (ckpts[-1] if ckpts else 0)
    g = lambda *keys: _get(cfg, *keys)          # noqa: E731
    attack = m.get("attack") or None
    facts: Dict[str, Any] = {
        "path": str(run), "kind": m.get("kind"), "status": status, "rounds": rounds, "rounds_done": done,
        "config": {"dataset": g("dataset", "name"), "model": g("model", "name"), "topology": g("topology", "name"),
                   "nodes": m.get("nodes", cfg.get("nodes")), "partition": g("partition", "name"),
                   "lr": cfg.get("lr"), "batch_size": cfg.get("batch_size"), "seed": cfg.get("seed"),
                   "dtype": m.get("dtype", cfg.get("dtype")), "engine": m.get("engine", cfg.get("engine")),
                   "attack": None if not attack else {"name": attack.get("name"), "nodes": attack.get("nodes")},
                   "defense": (m.get("defense") or {}).get("name") or g("defense", "name")},
        "final": m.get("final"), "checkpoints": {"count": len(ckpts), "every": m.get("record_every")},
        "created": m.get("created"), "finished": m.get("finished"),
    }
    for k in ("extended", "interrupted", "error"):
        if m.get(k):
            facts[k] = m[k]
    if with_results:
        facts["results"] = [result_facts(d, _json(d / "manifest.json") or {}, run) for d in find_results(run)]
    return facts


def result_facts(path: Path, m: dict, base: Optional[Path] = None) -> Dict[str, Any]:
    rel = os.path.relpath(path, base) if base is not None else str(path)
    return {"path": rel, "kind": m.get("kind"), "method": m.get("method"), "status": m.get("status"),
            "run": m.get("run"), "headline": headline(path, m) if m.get("status") == "complete" else {}}


def _get(d: dict, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def facts(path: Path) -> Dict[str, Any]:
    """Everything ``dice show`` says about ``path`` (a run or a result directory), as plain data."""
    m = open_dice_dir(path)
    if m.get("kind") in RUN_KINDS:
        return run_facts(path, m)
    out = result_facts(path, m)
    out["path"] = str(path)
    run = Path(str(m.get("run"))) if m.get("run") else None
    rm = _json(run / "manifest.json") if run is not None else None
    out["of_run"] = run_facts(run, rm, with_results=False) if rm else None
    return out


# ------------------------------------------------------------------------------------------------ text


def _hops(per_hop: dict) -> str:
    return ", ".join(f"hop {h} {_num(v)}" for h, v in per_hop.items())


def result_line(r: Dict[str, Any]) -> str:
    kind, h = r["kind"], r.get("headline") or {}
    what = kind + (f" {r['method']}" if r.get("method") and r["method"] != kind else "")
    parts = [f"{what}, {r.get('status')}"]
    if kind in ("gt", "estimate"):
        sel = [f"{h['units']} {h.get('unit', '')} units" if "units" in h else None,
               f"round(s) {_short_list(h['rounds'])}" if "rounds" in h else None,
               f"{h['hops']} hop(s)" if "hops" in h else None]
        parts.append(", ".join(x for x in sel if x))
        if h.get("mean_abs_influence_per_hop"):
            parts.append("mean |influence| (reachable) " + _hops(h["mean_abs_influence_per_hop"]))
        if h.get("alignment"):
            a = h["alignment"]
            parts.append(f"vs gt: spearman {_num(a.get('spearman'))}, pearson {_num(a.get('pearson'))} "
                         f"(n={a.get('n')})")
    elif kind == "detect":
        if h.get("roc_auc") is not None:
            parts.append(f"ROC AUC {_num(h['roc_auc'])}, AP {_num(h.get('average_precision'))}")
        parts.append(f"flagged {h.get('flagged')} (attackers {h.get('anomalous') or 'none recorded'})")
    elif kind == "value":
        if isinstance(h.get("lds"), dict):
            parts.append("LDS " + ", ".join(f"{k} {_num(v)}" for k, v in h["lds"].items()))
        elif h.get("lds") is not None:
            parts.append(f"LDS {_num(h['lds'])}")
        if h.get("alignment"):
            parts.append(f"vs gt: spearman {_num(h['alignment'].get('spearman'))}")
        if "total_abs_influence" in h:
            parts.append(f"total |influence| {_num(h['total_abs_influence'])}")
    else:
        parts += [f"{k} {_num(v)}" for k, v in list(h.items())[:4]]
    return "; ".join(p for p in parts if p)


def _short_list(v) -> str:
    if isinstance(v, list) and len(v) > 6:
        return f"[{v[0]}, {v[1]}, ..., {v[-1]}] ({len(v)})"
    return str(v)


def run_lines(f: Dict[str, Any]) -> List[str]:
    c = f["config"]
    status = f["status"]
    rounds = f"{f['rounds_done']}/{f['rounds']} rounds"
    lines = [f"{f['path']}: dice {f['kind']} run, {status} ({rounds})"
             + (f", extended from {f['extended'][0]['from']} rounds" if f.get("extended") else "")]
    attack = c.get("attack")
    model = ", ".join(str(x) for x in [c["dataset"], c["model"]] if x)
    lines.append(f"  {model}; {c['topology']} n={c['nodes']}; {c['partition']} partition; lr {c['lr']}, batch "
                 f"{c['batch_size']}, seed {c['seed']}, {c['dtype']}, engine {c['engine']}"
                 + (f"; attack {attack['name']} on {attack['nodes']}" if attack else "")
                 + (f"; defense {c['defense']}" if c.get("defense") not in (None, "none") else ""))
    fin = f.get("final") or {}
    if fin:
        acc = f"  final probe acc {_num(fin.get('probe_acc'))}, loss {_num(fin.get('probe_loss'))}, consensus " \
              f"{_num(fin.get('consensus_distance'))}"
        if isinstance(fin.get("honest"), dict):
            acc += f" (honest nodes: acc {_num(fin['honest'].get('probe_acc'))})"
        lines.append(acc)
    elif status != "complete":
        why = f.get("interrupted") or f.get("error")
        lines.append(f"  not finished{': ' + str(why) if why else ''}; `dice train out={f['path']}` with the same "
                     f"config resumes it")
    ck = f["checkpoints"]
    lines.append(f"  {ck['count']} checkpoints (every {ck['every']} round(s))")
    results = f.get("results")
    if results is not None:
        if not results:
            lines.append("  no results yet: dice gt / estimate / detect / value run=" + f["path"])
        for r in results:
            lines.append(f"  {r['path']}/: {result_line(r)}")
    return lines


def text(f: Dict[str, Any]) -> str:
    if "config" in f:
        return "\n".join(run_lines(f))
    lines = [f"{f['path']}: {result_line(f)}"]
    if f.get("of_run"):
        lines += ["  of run " + "\n  ".join(run_lines(f["of_run"]))]
    elif f.get("run"):
        lines.append(f"  of run {f['run']} (not found)")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="dice show", description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?", default="outputs/latest", type=Path,
                    help="a run directory or a result directory under it (default: outputs/latest)")
    ap.add_argument("--json", action="store_true", help="print the same facts as one JSON object")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        f = facts(args.run)
    except UserError as e:
        print(f"dice show: error: {e}", file=sys.stderr)
        sys.exit(USAGE_EXIT_CODE)
    print(json.dumps(f, indent=2, default=str) if args.json else text(f))


if __name__ == "__main__":
    main()
