"""Cost of ``dice value``, measured side by side in one run against the training compute it explains.

On the default run (digits, MLP [64-32-10], 16-node ring, batch 16, 200 rounds) it times, in the analysis
dtype (float64 unless --dtype):

  - training: the 200 rounds of ``Dynamics.round`` (the unit of cost; also in the run's float32);
  - exact, targets=network, every weight position (all 16 × 200 × 16 positions; sample units):
    the forward replay that fills the state tape, the reverse sweep, and both together (target: ≤ 4× training);
  - exact, targets=all (16 targets in one sweep, and one target at a time) against n;
  - first_order and cascade_sum (hops 1, 3), for reference;
  - gt unit=node: all n node units + factual + null in one vectorised pass against a one-unit-at-a-time
    loop (each unit alone with its own factual and null copies, as a chunk=1 pass), and against a lean loop
    (one counterfactual copy per unit, the factual computed once) (target: ≥ 3× units/s);
  - the whole command (``dice value`` in-process on a trained run directory: replay, selection, compute,
    files and plots) for exact targets=network and for gt.

    .venv/bin/python scripts/bench_value.py                       # the default run, median of 3
    .venv/bin/python scripts/bench_value.py --rounds 50 --reps 1  # quick
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dice_cli.config import ModelConfig, TopologyConfig, TrainConfig  # noqa: E402
from dice_cli.influence.retrain import gt_values  # noqa: E402
from dice_cli.influence.run_units import select_run_units  # noqa: E402
from dice_cli.influence.sweep import exact_values  # noqa: E402
from dice_cli.influence.value import cascade_values, first_order_values  # noqa: E402
from dice_cli.replay import StateTape, rollout  # noqa: E402
from dice_cli.simulation import build_setup  # noqa: E402


def timed(fn, reps: int) -> float:
    """Median wall time of fn() over ``reps`` runs after one warm-up (seconds)."""
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--topology", default="ring")
    ap.add_argument("--hidden", type=int, nargs="*", default=[32])
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-command", action="store_true", help="skip the whole-command timings")
    args = ap.parse_args()

    cfg = TrainConfig(nodes=args.nodes, rounds=args.rounds, topology=TopologyConfig(name=args.topology),
                      model=ModelConfig(name="mlp", hidden=args.hidden), device="cpu", dtype=args.dtype)
    s = build_setup(cfg)
    s32 = build_setup(TrainConfig(**{**cfg.__dict__, "dtype": "float32"}))
    dyn, T, n = s.dyn, args.rounds, args.nodes
    probe = (s.x_probe, s.y_probe, s.shared_probe)
    q = torch.ones(n, dtype=s.dtype)
    print(f"# {T} rounds, {n} nodes, {args.topology}, MLP {args.hidden}, P={s.fm.num_params}, batch "
          f"{cfg.batch_size}, dtype={args.dtype}, threads={torch.get_num_threads()}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")

    train = timed(lambda: rollout(dyn, s.init, T), args.reps)
    train32 = timed(lambda: rollout(s32.dyn, s32.init, T), args.reps)
    units = select_run_units(s.plan, s.nodes.parts, "sample", (0, T))
    nodes = select_run_units(s.plan, s.nodes.parts, "node", (0, T))
    tape_t = timed(lambda: StateTape(dyn, s.init, T), args.reps)
    tape = StateTape(dyn, s.init, T)
    net = timed(lambda: exact_values(dyn, tape, units, probe, q, "network"), args.reps)
    both = timed(lambda: exact_values(dyn, StateTape(dyn, s.init, T), units, probe, q, "network"), args.reps)
    all_t = timed(lambda: exact_values(dyn, tape, units, probe, q, "all", chunk=n), args.reps)
    all1 = timed(lambda: exact_values(dyn, tape, units, probe, q, "all", chunk=1), max(1, args.reps // 2))
    fo = timed(lambda: first_order_values(dyn, tape, nodes, probe, q, "all", chunk=n), args.reps)
    cs = {r: timed(lambda: cascade_values(dyn, tape, nodes, probe, q, hops=r, chunk=n), args.reps) for r in (1, 3)}

    rows = [("training, float64 (the unit)" if args.dtype == "float64" else "training", train, 1.0, ""),
            ("training, float32", train32, train32 / train, ""),
            ("state tape (forward replay)", tape_t, tape_t / train, ""),
            ("exact network: reverse sweep only", net, net / train, ""),
            ("exact network: tape + sweep", both, both / train, "≤ 4"),
            (f"exact all {n} targets, one sweep", all_t + tape_t, (all_t + tape_t) / train, f"vs n = {n}"),
            (f"exact all {n} targets, chunk=1", all1 + tape_t, (all1 + tape_t) / train, ""),
            ("first_order node units, all targets", fo + tape_t, (fo + tape_t) / train, ""),
            ("cascade_sum hops=1, all targets", cs[1] + tape_t, (cs[1] + tape_t) / train, ""),
            ("cascade_sum hops=3, all targets", cs[3] + tape_t, (cs[3] + tape_t) / train, "")]
    print(f"\n{'computation (kernel)':<42}{'seconds':>10}{'× training':>12}  target")
    for what, sec, ratio, target in rows:
        print(f"{what:<42}{sec:>10.3f}{ratio:>12.2f}  {target}")
    print(f"exact targets=all: {(all_t + tape_t) / (both):.1f}× the network sweep for n = {n} targets "
          f"(reverse part alone: {all_t / net:.1f}×)")

    # gt: vectorised vs one at a time
    vec = timed(lambda: gt_values(dyn, s.init, T, nodes, probe, q, chunk=n), max(1, args.reps // 2))
    one = timed(lambda: [gt_values(dyn, s.init, T, nodes.subset([u]), probe, q, chunk=1) for u in range(n)], 1)

    def lean():
        rollout(dyn, s.init, T)                     # factual once
        for u in range(n):
            member = torch.zeros(1, n, dtype=s.dtype)
            member[0, u] = 1
            rollout(dyn, s.init.copies(1), T, lambda t: nodes.weights_at(t, member))
    lean_t = timed(lean, 1)
    print(f"\n{'gt unit=node (all ' + str(n) + ' units + null)':<42}{'seconds':>10}{'units/s':>10}{'speed-up':>10}")
    for what, sec in [("vectorised, one pass", vec), ("one at a time (chunk=1 passes)", one),
                      ("one at a time, lean (1 copy, factual once)", lean_t)]:
        print(f"{what:<42}{sec:>10.3f}{n / sec:>10.1f}{one / sec:>9.2f}x")
    print(f"vectorised vs lean loop: {lean_t / vec:.2f}x")

    if args.skip_command:
        return
    from dice_cli import cli

    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            def dice(*a):
                t0 = time.perf_counter()
                try:
                    cli.main(list(a))
                except SystemExit as e:
                    assert not e.code, e.code
                return time.perf_counter() - t0
            t_train = dice("train", f"nodes={n}", f"rounds={T}", f"topology={args.topology}", "progress=false",
                           "out=run", f"model.hidden=[{','.join(map(str, args.hidden))}]")
            t_net = dice("value", "run=run", "targets=network", "unit=sample", "progress=false", "out=v_net")
            t_all = dice("value", "run=run", "unit=node", "progress=false", "out=v_all")
            t_gt = dice("value", "run=run", "method=gt", "progress=false", "out=v_gt")
        finally:
            os.chdir(cwd)
    print(f"\n{'whole command (in-process)':<42}{'seconds':>10}{'× dice train':>14}")
    for what, sec in [("dice train (float32 run, 200 rounds)", t_train),
                      ("dice value targets=network unit=sample", t_net),
                      ("dice value unit=node (exact, all targets)", t_all),
                      ("dice value method=gt unit=node", t_gt)]:
        print(f"{what:<42}{sec:>10.2f}{sec / t_train:>14.2f}")


if __name__ == "__main__":
    main()
