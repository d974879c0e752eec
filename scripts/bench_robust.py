#!/usr/bin/env python
"""Cost of Byzantine robustness, side by side: a defended training round against an undefended one, and all
detector scores of ``dice detect`` against proximal influence alone (ROBUST.md; issue targets ≤ 3× and ≤ 2×).

Rounds: ``engine.Dynamics.round`` on the digits MLP (the ``dice train`` defaults: 16 nodes, batch 16, probe
set of 100), every rule interleaved with the undefended round over ``--reps`` repetitions of ``--rounds``
rounds (background load hits all alike); the table shows medians and the ratio to ``none``. The dice rules
are also timed with ``defense.probe_batch=16`` (a 16-sample probe gradient per round).
Detection: ``detect.proximal_scores`` over a ``--window``-round window with scores=[proximal_influence] vs
every score, interleaved the same way.

    python scripts/bench_robust.py                         # ring and exponential, 16 nodes, float32
    python scripts/bench_robust.py --nodes 32 --topologies exponential random_regular --reps 9
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dice_cli.config import AttackConfig, DefenseConfig, ModelConfig, TopologyConfig, TrainConfig  # noqa: E402
from dice_cli.detect import SCORES, proximal_scores  # noqa: E402
from dice_cli.simulation import build_setup  # noqa: E402

RULES = [("none", {}), ("clipped_gossip", {}), ("trimmed_mean", {}), ("median", {}), ("balance", {}),
         ("dice", {}), ("dice_select", {}), ("dice", {"probe_batch": 16}), ("dice_select", {"probe_batch": 16})]


def setup(args, topology, defense="none", attack="none", **kw):
    cfg = TrainConfig(nodes=args.nodes, rounds=100_000, device="cpu", dtype=args.dtype, seed=0,
                      topology=TopologyConfig(name=topology, degree=args.degree), model=ModelConfig(init="shared"),
                      attack=AttackConfig(name=attack, count=0 if attack == "none" else 1),
                      defense=DefenseConfig(name=defense, **kw))
    s = build_setup(cfg)
    st = s.init
    for _ in range(3):
        st, _, _ = s.dyn.round(st)
    return s, st


def bench_rounds(args, topology):
    cases = {}
    for name, kw in RULES:
        label = name + "".join(f" {k}={v}" for k, v in kw.items())
        cases[label] = setup(args, topology, name, **kw)
    times = {k: [] for k in cases}
    for _ in range(args.reps):
        for label, (s, st) in cases.items():
            t0 = time.perf_counter()
            for _ in range(args.rounds):
                st, _, _ = s.dyn.round(st)
            times[label].append((time.perf_counter() - t0) / args.rounds)
            cases[label] = (s, st)
    base = statistics.median(times["none"])
    print(f"\n## training round, {args.nodes} nodes, {topology}, {args.dtype} (median of {args.reps} × "
          f"{args.rounds} rounds)\n\n| defense | ms / round | × undefended | target ≤ 3× |\n|---|---|---|---|")
    for label, ts in times.items():
        m = statistics.median(ts)
        print(f"| {label} | {m * 1e3:.3f} | {m / base:.2f} | {'met' if m / base <= 3 else 'MISSED'} |")


def bench_detect(args, topology):
    s, st = setup(args, topology, attack="alie")
    q = torch.ones(args.nodes, dtype=s.dtype)
    st = st.detached()
    variants = {"proximal_influence alone": ["proximal_influence"], "all scores": SCORES}
    times = {k: [] for k in variants}
    for _ in range(args.reps):
        for label, scores in variants.items():
            t0 = time.perf_counter()
            proximal_scores(s.dyn, st, args.window, s.x_probe, s.y_probe, s.shared_probe, q, scores=scores, krum_f=1)
            times[label].append((time.perf_counter() - t0) / args.window)
    base = statistics.median(times["proximal_influence alone"])
    print(f"\n## dice detect, {args.nodes} nodes, {topology}, attack=alie (1 attacker), window {args.window} "
          f"(median of {args.reps})\n\n| scores | ms / round | × proximal influence | target ≤ 2× |\n|---|---|---|---|")
    for label, ts in times.items():
        m = statistics.median(ts)
        print(f"| {label} | {m * 1e3:.3f} | {m / base:.2f} | {'met' if m / base <= 2 else 'MISSED'} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--topologies", nargs="+", default=["ring", "exponential"])
    ap.add_argument("--degree", type=int, default=6, help="random_regular degree")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import os
    import platform

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.2f}")
    for topo in args.topologies:
        bench_rounds(args, topo)
        bench_detect(args, topo)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
