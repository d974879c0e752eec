#!/usr/bin/env python
"""Cost of an unreliable network, side by side: a churned / dropped round, delayed rounds (D = 1, 2, 4) and
compressed rounds (top_k, random_k, qsgd) against a plain training round (NETWORKS.md; issue 14 targets:
churn/drops ≤ 1.5×, delays ≤ 1 + D/4 ×; compression reports its overhead and bytes sent).

Rounds: ``engine.Dynamics.round`` on the digits MLP (the ``dice train`` defaults: 16 nodes, batch 16), every
case interleaved with the plain round over ``--reps`` repetitions of ``--rounds`` rounds (background load
hits all alike); medians and the ratio to the plain round.

    python scripts/bench_network.py                       # 16 nodes, exponential, float32
    python scripts/bench_network.py --nodes 64 --topology ring --reps 9
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dice_cli.config import ModelConfig, NetworkConfig, TopologyConfig, TrainConfig  # noqa: E402
from dice_cli.simulation import build_setup  # noqa: E402

CASES = [
    ("plain", {}, None),
    ("churn bernoulli p=0.8", {"churn": "bernoulli", "churn_p": 0.8}, 1.5),
    ("churn markov", {"churn": "markov"}, 1.5),
    ("drop 0.2", {"drop": 0.2}, 1.5),
    ("churn + drop", {"churn": "bernoulli", "churn_p": 0.8, "drop": 0.2}, 1.5),
    ("delay uniform D=1", {"delay": "uniform", "max_delay": 1}, 1 + 1 / 4),
    ("delay uniform D=2", {"delay": "uniform", "max_delay": 2}, 1 + 2 / 4),
    ("delay uniform D=4", {"delay": "uniform", "max_delay": 4}, 1 + 4 / 4),
    ("top_k 0.1", {"compression": "top_k", "ratio": 0.1}, None),
    ("random_k 0.1", {"compression": "random_k", "ratio": 0.1}, None),
    ("qsgd s=16", {"compression": "qsgd", "levels": 16}, None),
    ("all four (markov, drop 0.2, D=2, top_k)", {"churn": "markov", "drop": 0.2, "delay": "uniform",
                                                 "max_delay": 2, "compression": "top_k"}, None),
]


def setup(args, net: dict):
    cfg = TrainConfig(nodes=args.nodes, rounds=args.rounds * (args.reps + 1) + 3, device="cpu", dtype=args.dtype,
                      seed=0, topology=TopologyConfig(name=args.topology), model=ModelConfig(init="shared"),
                      network=NetworkConfig(**net))
    s = build_setup(cfg)
    st = s.init
    for _ in range(3):
        st, _, _ = s.dyn.round(st)
    return s, st


def bytes_per_round(s) -> float:
    """Mean bytes sent per round over the recorded rounds (all nodes)."""
    elem = torch.finfo(s.dtype).bits // 8
    if s.network is None:
        W = s.schedule.at(0)
        return float(((W > 0) & ~np.eye(len(W), dtype=bool)).sum() * s.fm.num_params * elem)
    eff = s.effective or s.schedule
    T = min(s.cfg.rounds, 200)
    return float(np.mean([s.network.bytes_sent(eff.at(t), elem).sum() for t in range(T)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--topology", default="exponential")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cases = {label: setup(args, net) for label, net, _ in CASES}
    targets = {label: tgt for label, _, tgt in CASES}
    times = {k: [] for k in cases}
    pos = {k: 0 for k in cases}
    for _ in range(args.reps):
        for label, (s, st) in cases.items():
            t0 = time.perf_counter()
            for _ in range(args.rounds):
                st, _, _ = s.dyn.round(st)
            times[label].append((time.perf_counter() - t0) / args.rounds)
            cases[label] = (s, st)
            pos[label] += args.rounds
    base = statistics.median(times["plain"])
    plain_bytes = bytes_per_round(cases["plain"][0])
    print(f"## training round with an unreliable network, {args.nodes} nodes, {args.topology}, {args.dtype}, "
          f"digits MLP ({cases['plain'][0].fm.num_params} params/node); median of {args.reps} × {args.rounds} "
          f"rounds, torch {torch.__version__}, 1 thread\n")
    print("| case | ms / round | × plain | target | MB sent / round | × plain bytes |\n|---|---|---|---|---|---|")
    for label, ts in times.items():
        m = statistics.median(ts)
        r = m / base
        tgt = targets[label]
        verdict = "-" if tgt is None else f"≤ {tgt:g}× {'met' if r <= tgt else 'MISSED'}"
        b = bytes_per_round(cases[label][0])
        print(f"| {label} | {m * 1e3:.3f} | {r:.2f} | {verdict} | {b / 2**20:.3f} | {b / plain_bytes:.3f} |")


if __name__ == "__main__":
    main()
