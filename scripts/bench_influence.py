"""Cost of DICE ground truth and estimates, in training rounds, measured side by side in one run.

For one round t of a digits run (all source batches, all targets) it times:
  - one training round (the unit of cost),
  - one-hop GT and first-order E for every source batch            (target: ≤ 2 rounds each),
  - exact r-hop E for all units of the round, batch and sample     (target: ≤ 3r rounds),
  - r-hop GT vectorised over units against a one-unit-at-a-time re-simulation loop (units/s);
  - scaling (``--scale 16 64``): per selected round (all batch units of the round, every target, ring),
    gt with its cost following the cascade (restrict=True, the default on sparse graphs) against the full
    copies, exact hops=1 against first_order hops=1, and exact hops=3 from the small to the large
    network, each as a ratio measured in this run (targets: gt 16 -> 64 <= 5x per selected round; exact
    hops=1 <= 1.3x first_order hops=1; exact hops=3 at 64 nodes <= 6x 16 nodes).

    .venv/bin/python scripts/bench_influence.py                       # 16-node ring, MLP, float64
    .venv/bin/python scripts/bench_influence.py --nodes 16 --topology exponential --hops 1 2 3 --device cuda
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # this checkout, not an installed copy

from dice_cli.config import DatasetConfig, ModelConfig, TopologyConfig, TrainConfig  # noqa: E402
from dice_cli.influence.estimate import exact, first_order  # noqa: E402
from dice_cli.influence.gt import ground_truth  # noqa: E402
from dice_cli.influence.units import select_units  # noqa: E402
from dice_cli.simulation import build_setup  # noqa: E402


def timeit(fn, reps: int, device: torch.device) -> float:
    """Median wall time of fn() over reps runs after one warm-up (seconds)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def scaling(args) -> None:
    """Per selected round costs against the network size (all batch units of round ``--round``, ring)."""
    rows, t = {}, args.round
    H = args.scale_hops
    for n in args.scale:
        cfg = TrainConfig(dataset=DatasetConfig(name="digits"), model=ModelConfig(name=args.model, hidden=args.hidden),
                          topology=TopologyConfig(name="ring"), nodes=n, batch_size=args.batch_size,
                          rounds=t + H + 1, lr=0.05, dtype=args.dtype, device=args.device)
        s = build_setup(cfg)
        state = s.init
        with torch.no_grad():
            for _ in range(t):
                state, _, _ = s.dyn.round(state)
        q = torch.ones(n, dtype=s.dtype, device=s.device)
        probe = (s.x_probe, s.y_probe, s.shared_probe)
        units = select_units(s.plan[t], "batch", "all", "all", 0, t)
        reps = max(1, args.reps // 2)
        r = {}
        for h in range(1, H + 1):
            r[f"gt {h} hop(s), cascade"] = timeit(lambda: ground_truth(s.dyn, state, units, h, *probe, q,
                                                                       restrict=True), reps, s.device)
            r[f"gt {h} hop(s), full copies"] = timeit(lambda: ground_truth(s.dyn, state, units, h, *probe, q,
                                                                           restrict=False), 1, s.device)
        r["first_order 1 hop"] = timeit(lambda: first_order(s.dyn, state, units, 1, *probe, q), args.reps, s.device)
        r["exact 1 hop"] = timeit(lambda: exact(s.dyn, state, units, 1, *probe, q), args.reps, s.device)
        r[f"exact {H} hops"] = timeit(lambda: exact(s.dyn, state, units, H, *probe, q), reps, s.device)
        r[f"exact {H} hops, unrolled"] = timeit(lambda: exact(s.dyn, state, units, H, *probe, q, path="unrolled"),
                                                1, s.device)
        rows[n] = r
    a, b = args.scale[0], args.scale[-1]
    print(f"\n# scaling, ring, all batch units of round {t}, per selected round (ms, median)")
    print(f"{'computation':<28}" + "".join(f"{f'n={n}':>12}" for n in args.scale) + f"{f'{b}/{a}':>9}")
    for key in rows[a]:
        print(f"{key:<28}" + "".join(f"{rows[n][key] * 1e3:>12.1f}" for n in args.scale)
              + f"{rows[b][key] / rows[a][key]:>8.1f}x")

    def verdict(r, limit):
        return f"{r:.2f}x (target <= {limit}x: " + ("met)" if r <= limit else f"missed by {r / limit:.2f}x)")
    for h in range(1, H + 1):
        print(f"# TARGET gt {a} -> {b} nodes, {h} hop(s): "
              + verdict(rows[b][f"gt {h} hop(s), cascade"] / rows[a][f"gt {h} hop(s), cascade"], 5))
    for n in args.scale:
        print(f"# TARGET n={n}: exact hops=1 / first_order hops=1 = "
              + verdict(rows[n]["exact 1 hop"] / rows[n]["first_order 1 hop"], 1.3))
    print(f"# TARGET exact hops={H}, {b} / {a} nodes: " + verdict(rows[b][f"exact {H} hops"] / rows[a][f"exact {H} hops"], 6))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--topology", default="ring")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--hidden", type=int, nargs="*", default=[32])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--round", type=int, default=20, help="the round whose units are measured")
    ap.add_argument("--hops", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--loop-units", type=int, default=16, help="units timed in the one-at-a-time GT loop")
    ap.add_argument("--scale", type=int, nargs="*", default=[16, 64],
                    help="node counts of the scaling section (ring; empty: skip it)")
    ap.add_argument("--scale-hops", type=int, default=3)
    args = ap.parse_args()

    cfg = TrainConfig(dataset=DatasetConfig(name="digits"), model=ModelConfig(name=args.model, hidden=args.hidden),
                      topology=TopologyConfig(name=args.topology), nodes=args.nodes, batch_size=args.batch_size,
                      rounds=args.round + max(args.hops) + 1, lr=0.05, dtype=args.dtype, device=args.device)
    s = build_setup(cfg)
    dev = s.device
    state = s.init
    with torch.no_grad():
        for _ in range(args.round):
            state, _, _ = s.dyn.round(state)
    q = torch.ones(args.nodes, dtype=s.dtype, device=dev)
    probe = (s.x_probe, s.y_probe, s.shared_probe)
    plan_t = s.plan[args.round]
    batch_units = select_units(plan_t, "batch", "all", "all", 0, args.round)
    sample_units = select_units(plan_t, "sample", "all", "all", 0, args.round)

    t_round = timeit(lambda: s.dyn.round(state), args.reps * 4, dev)
    print(f"# device={dev} dtype={args.dtype} nodes={args.nodes} topology={args.topology} model={args.model}"
          f"{args.hidden if args.model == 'mlp' else ''} P={s.fm.num_params} batch={args.batch_size} "
          f"threads={torch.get_num_threads()}")
    print(f"# one training round: {t_round * 1e3:.3f} ms")
    rows = []

    def add(what, units, hops, seconds, target):
        rows.append((what, len(units), hops, seconds * 1e3, seconds / t_round, target))

    for name, fn, target in [("gt (1 hop)", ground_truth, "≤ 2"), ("first_order (1 hop)", first_order, "≤ 2")]:
        sec = timeit(lambda: fn(s.dyn, state, batch_units, 1, *probe, q), args.reps, dev)
        add(name, batch_units, 1, sec, target)
    for r in args.hops:
        for kind, units in [("batch", batch_units), ("sample", sample_units)]:
            sec = timeit(lambda: exact(s.dyn, state, units, r, *probe, q), args.reps, dev)
            add(f"exact ({kind} units)", units, r, sec, f"≤ {3 * r}")
    print(f"\n{'what':<26}{'units':>7}{'hops':>6}{'ms':>11}{'rounds':>9}  target (rounds)")
    for what, u, h, ms, ratio, target in rows:
        print(f"{what:<26}{u:>7}{h:>6}{ms:>11.2f}{ratio:>9.1f}  {target}")

    if args.scale:
        scaling(args)

    print(f"\n{'r-hop GT, sample units':<26}{'hops':>6}{'vectorised u/s':>16}{'one-at-a-time u/s':>19}{'speed-up':>10}")
    loop_units = sample_units.subset(list(range(min(args.loop_units, len(sample_units)))))
    for r in args.hops:
        vec = timeit(lambda: ground_truth(s.dyn, state, sample_units, r, *probe, q), max(1, args.reps // 2), dev)
        one = timeit(lambda: [ground_truth(s.dyn, state, loop_units.subset([i]), r, *probe, q)
                              for i in range(len(loop_units))], 1, dev)
        v_rate, o_rate = len(sample_units) / vec, len(loop_units) / one
        print(f"{'':<26}{r:>6}{v_rate:>16.1f}{o_rate:>19.1f}{v_rate / o_rate:>9.1f}x")


if __name__ == "__main__":
    main()
