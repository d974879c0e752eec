#!/usr/bin/env python
"""What a user waits for: whole processes, timed side by side in one run, repetitions interleaved.

    python scripts/bench_whole.py                        # startup and the default dice train (16 nodes)
    python scripts/bench_whole.py --nodes 256 --rounds 20 --reps 3
    python scripts/bench_whole.py --nodes 1024 --rounds 20 --reps 1 --no-paper     # rounds/s and memory
    python scripts/bench_whole.py --importtime          # where dice train rounds=1 spends its imports

Every command runs as its own process (``sys.executable``, this checkout on PYTHONPATH, a fresh output
directory each time), in the order: all commands of repetition 1, then of repetition 2, ...; the table shows
the median wall time, the spread, and the load average before and after (the machine is shared).

- startup: ``python -c "import torch"`` against ``dice train rounds=1`` (target: at most 1.5x);
- default: ``scripts/paper_style_train.py`` (per-node modules, optimisers and DataLoaders, the paper's gossip
  loop, one thread, sklearn to load digits, as such a script would) against ``dice train`` with its
  defaults: 200 rounds, every round evaluated and checkpointed, plots (target: dice at least 3x faster);
- ``--nodes N`` (N > 16): both on digits-shaped synthetic data (64 features, 10 classes) for ``--rounds``
  rounds; dice train's own rounds/s (manifest) and the paper script's ms/round are printed too;
  ``--no-paper`` leaves the paper script out (1,024 nodes: its n^2 gossip loop takes minutes per round).
Peak memory is the child's maximum resident set (``wait4``'s ru_maxrss).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "scripts" / "paper_style_train.py"


def run(cmd: List[str], cwd: Path) -> Tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process; raises on a non-zero exit."""
    import time

    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    out, err = p.stdout.read(), p.stderr.read()
    p.stdout.close()
    p.stderr.close()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{out.decode()[-2000:]}\n{err.decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def synthetic(n: int, batch: int) -> List[str]:
    samples = max(2000, math.ceil(n * batch * 1.5 / 0.8))
    return ["dataset=synthetic", "dataset.synthetic_features=64", "dataset.synthetic_classes=10",
            f"dataset.synthetic_samples={samples}"]


def importtime(cwd: Path) -> None:
    """Top imports (cumulative) of ``dice train rounds=1``, from python -X importtime."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "dice_cli.cli", "train", "rounds=1",
                        "progress=false", "out=importtime"], cwd=cwd, env=env, capture_output=True, text=True,
                       check=True)
    rows = []
    for line in r.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cum, name = line.split("|")
            if not name.startswith("  ") and cum.strip().isdigit():       # top-level imports only
                rows.append((int(cum) / 1e6, name.strip()))
    print("\n# dice train rounds=1: top-level imports by cumulative time (s, -X importtime)")
    for sec, name in sorted(rows, reverse=True)[:12]:
        print(f"#   {sec:6.3f}  {name}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=None, help="rounds of both trainings (default 200 at 16 nodes)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--no-paper", action="store_true", help="skip the paper-style script")
    ap.add_argument("--no-startup", action="store_true", help="skip the import torch / rounds=1 pair")
    ap.add_argument("--importtime", action="store_true", help="print dice train rounds=1's top imports")
    args = ap.parse_args(argv)

    n, b = args.nodes, args.batch_size
    rounds = args.rounds or 200
    py = sys.executable
    dice = [py, "-m", "dice_cli.cli", "train", f"nodes={n}", f"batch_size={b}", f"rounds={rounds}", "progress=false"]
    paper = [py, str(PAPER), "--nodes", str(n), "--batch-size", str(b), "--rounds", str(rounds)]
    if n > 16:
        dice += synthetic(n, b)
        paper += ["--data", "synthetic"]
    cmds: Dict[str, List[str]] = {}
    if not args.no_startup:
        cmds["import torch"] = [py, "-c", "import torch"]
        cmds["dice train rounds=1"] = [py, "-m", "dice_cli.cli", "train", "rounds=1", "progress=false"]
    if not args.no_paper:
        cmds["paper-style script"] = paper
    cmds[f"dice train ({n} nodes)"] = dice

    load0 = os.getloadavg()[0]
    times: Dict[str, List[float]] = {k: [] for k in cmds}
    mem: Dict[str, float] = {k: 0.0 for k in cmds}
    extra: Dict[str, List[float]] = {"dice rounds/s": [], "paper ms/round": []}
    with tempfile.TemporaryDirectory(prefix="bench_whole_") as tmp:
        cwd = Path(tmp)
        for rep in range(args.reps):
            for name, cmd in cmds.items():
                out = f"run_{rep}_{len(times[name])}_{abs(hash(name)) % 10**6}"
                c = list(cmd)
                if name.startswith("dice"):
                    c.append(f"out={out}")
                elif name == "paper-style script":
                    c += ["--out", str(cwd / f"{out}.json")]
                wall, rss = run(c, cwd)
                times[name].append(wall)
                mem[name] = max(mem[name], rss)
                if name.startswith("dice train (") :
                    m = json.loads((cwd / out / "manifest.json").read_text())
                    extra["dice rounds/s"].append(m["timings"]["rounds_per_s"])
                elif name == "paper-style script":
                    extra["paper ms/round"].append(json.loads((cwd / f"{out}.json").read_text())["ms_per_round"])
        if args.importtime:
            importtime(cwd)
    load1 = os.getloadavg()[0]

    print(f"# {os.cpu_count()} CPUs | python {sys.version.split()[0]} | {args.reps} interleaved reps (median) | "
          f"load avg {load0:.2f} before, {load1:.2f} after")
    print(f"{'command':<28}{'median s':>10}{'min':>8}{'max':>8}{'peak MiB':>10}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:<28}{med[k]:>10.2f}{min(v):>8.2f}{max(v):>8.2f}{mem[k]:>10.0f}")
    if extra["dice rounds/s"]:
        print(f"# dice train: {statistics.median(extra['dice rounds/s']):.1f} rounds/s inside the process "
              f"(manifest timings; {n} nodes, every round evaluated and checkpointed)")
    if extra["paper ms/round"]:
        print(f"# paper-style script: {statistics.median(extra['paper ms/round']):.2f} ms/round inside the process")
    def paired(a: str, b: str) -> str:
        """The ratio within each repetition (adjacent runs see similar load), median and range."""
        rs = [x / y for x, y in zip(times[a], times[b])]
        return f"per-rep median {statistics.median(rs):.2f}x, range {min(rs):.2f}-{max(rs):.2f}x"

    if "import torch" in med:
        r = med["dice train rounds=1"] / med["import torch"]
        print(f"# TARGET startup: dice train rounds=1 / import torch = {r:.2f}x (target <= 1.5x: "
              f"{'met' if r <= 1.5 else f'missed by {r / 1.5:.2f}x'}; "
              f"{paired('dice train rounds=1', 'import torch')})")
    if "paper-style script" in med:
        r = med["paper-style script"] / med[f"dice train ({n} nodes)"]
        target = " (target >= 3x: " + ("met" if r >= 3 else f"missed by {3 / r:.2f}x") + "; " if n == 16 else " ("
        print(f"# TARGET whole process, {n} nodes, {rounds} rounds: paper-style / dice train = {r:.2f}x{target}"
              f"{paired('paper-style script', f'dice train ({n} nodes)')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
