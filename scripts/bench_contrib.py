"""Cost of exact Shapley on the copies axis against training every coalition on its own, from one run.

On the default digits run with 8 nodes (MLP 64-32-10, i.e. hidden [32]; ring, batch 16, 200 rounds) it times exact data
Shapley over all 2^8 = 256 coalitions:

  - vectorised: every coalition on the copies axis of one ``retrain_pass`` (chunk = 256: one pass), and in
    chunks of 32 (dice contrib's default, which keeps a pass in the CPU's caches);
  - the slow twins: the same coalitions one at a time without a copies axis (``rollout`` of one system,
    k of them timed, ×256/k), and 256 separate ``dice train`` runs of the same config (each a fresh
    process, as a user would launch them; k timed, ×256/k unless --all);
  - the whole command: ``dice contrib valuation=shapley_exact`` in-process on the trained run (replay, the
    256 retrainings, the comparison, files and plots).

It checks that the vectorised utilities equal the one-at-a-time ones (max relative difference printed).

    .venv/bin/python scripts/bench_contrib.py                     # k = 8 separate runs
    .venv/bin/python scripts/bench_contrib.py --all               # all 256 dice train runs (~30 min)
    .venv/bin/python scripts/bench_contrib.py --nodes 4 --rounds 5 --single 2 --separate 1   # quick
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dice_cli import cli  # noqa: E402
from dice_cli.replay import open_replay, rollout  # noqa: E402
from dice_cli.shapley import CoalitionGame, all_coalitions, exact_shapley  # noqa: E402


def dice(cwd: Path, *args: str) -> float:
    """`dice ...` in this process; returns its wall time."""
    old, argv = os.getcwd(), list(sys.argv)
    os.chdir(cwd)
    t0 = time.perf_counter()
    try:
        cli.main(list(args))
    except SystemExit as e:
        if e.code:
            raise RuntimeError(f"dice {' '.join(args)} exited {e.code}")
    finally:
        os.chdir(old)
        sys.argv = argv
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--single", type=int, default=16, help="coalitions timed one at a time (×2^n/k)")
    ap.add_argument("--separate", type=int, default=8, help="separate `dice train` runs timed (×2^n/k)")
    ap.add_argument("--all", action="store_true", help="run all 2^n separate dice train runs")
    args = ap.parse_args()
    n, C = args.nodes, 2 ** args.nodes
    torch.set_num_threads(1)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DICE_LATEST": ""}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["DICE_LATEST"] = ""
        train = ["train", f"nodes={n}", f"rounds={args.rounds}", "progress=false"]
        t_train = dice(tmp, *train, "out=run")
        rp = open_replay(tmp / "run", "float64")
        s0 = rp.state_at(0)
        S = all_coalitions(n)
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__}, 1 thread, "
              f"float64 analysis; load average {os.getloadavg()[0]:.1f}")
        print(f"run: digits, MLP [32], {n}-node ring, batch 16, {args.rounds} rounds; exact data Shapley over "
              f"{C} coalitions\n")

        def game(chunk):
            return CoalitionGame(rp.dyn, s0, rp.rounds, "data", rp.probe, rp.q("one"), rp.setup.plan,
                                 rp.setup.nodes.parts, chunk=chunk)

        g1 = game(C)
        U1 = g1.utility(S)
        t_one = g1.seconds
        g32 = game(32)
        U32 = g32.utility(S)
        t_32 = g32.seconds
        k = min(args.single, C)
        idx = np.linspace(0, C - 1, k).round().astype(int)
        t0 = time.perf_counter()
        Us = []
        for m in idx:
            w = torch.ones(n, rp.dyn.batch_size, dtype=torch.float64)
            w[~torch.as_tensor(S[m])] = 0.0
            st = rollout(rp.dyn, s0, rp.rounds, weights=lambda t: w)
            Us.append(-float(rp.dyn.probe_losses(st.theta, st.buffers, *rp.probe)[0].sum()))
        t_single = (time.perf_counter() - t0) * C / k
        diff = max(np.max(np.abs(U1[idx] - np.array(Us)) / np.abs(U1[idx])), np.max(np.abs(U1 - U32) / np.abs(U1)))
        runs = C if args.all else min(args.separate, C)
        t0 = time.perf_counter()
        for i in range(runs):
            subprocess.run([sys.executable, "-m", "dice_cli.cli", *train, f"seed={0}", f"out=sep_{i}"], cwd=tmp,
                           env=env, check=True, capture_output=True)
        t_sep = (time.perf_counter() - t0) * C / runs
        dice(tmp, "value", "run=run", "progress=false")
        t_cmd = dice(tmp, "contrib", "run=run", "progress=false", "valuation=shapley_exact")
        phi = exact_shapley(U1)
        rows = [
            ("vectorised: one pass of %d copies" % C, t_one),
            ("vectorised: passes of 32 copies (default chunk)", t_32),
            (f"one coalition at a time, no copies axis (k={k}, ×{C}/k)", t_single),
            (f"separate `dice train` runs, fresh processes ({runs}{'' if runs == C else f', ×{C}/{runs}'})", t_sep),
            ("whole command: dice contrib valuation=shapley_exact", t_cmd),
        ]
        print(f"{'exact Shapley, ' + str(C) + ' coalitions':<70} {'seconds':>9} {'vs one pass':>12} {'vs chunk 32':>12}")
        for name, t in rows:
            print(f"{name:<70} {t:9.2f} {t / t_one:11.1f}× {t / t_32:11.1f}×")
        print(f"\nspeed-up of the vectorised pass over {C} separate dice train runs: {t_sep / t_one:.1f}× (one pass), "
              f"{t_sep / t_32:.1f}× (chunk 32); over one-at-a-time retraining: {t_single / t_one:.1f}× / "
              f"{t_single / t_32:.1f}×")
        print(f"one `dice train` of this run in-process: {t_train:.2f} s; max relative difference of the utilities "
              f"(one pass vs chunk 32 vs one at a time): {diff:.1e}; Σφ = {phi.sum():.6f} = U(all) − U(∅) = "
              f"{U1[-1] - U1[0]:.6f}")


if __name__ == "__main__":
    main()
