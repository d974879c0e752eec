#!/usr/bin/env python
"""Training-speed benchmark: the vectorised engine (engine=vmap, ``Dynamics.round``) against the per-node
loop engine (engine=loop, ``reference.LoopEngine.round``) and a "paper style" baseline (one ``nn.Module`` and
one ``torch.optim.SGD`` per node, gossip by a Python loop over all (k, l) pairs with W[k, l] > 0 summing
parameter tensors, as in the DICE paper's code), measured in one process on the same setup.

Every engine gets warm-up rounds, then ``--reps`` timed repetitions (interleaved across engines so background
load hits all of them alike; ``torch.cuda.synchronize`` around each on GPU); the table shows the median.
Peak memory comes from a separate, untimed pass: CUDA ``max_memory_allocated`` growth on GPU, peak RSS
growth (sampled from /proc/self/statm; approximate, the allocator may reuse freed memory) on CPU.

    python scripts/bench_train.py                                  # digits MLP [32], ring, 16 and 256 nodes
    python scripts/bench_train.py --nodes 16 64 256 --rounds 300 --reps 7
    python scripts/bench_train.py --model logreg --dtype float64 --threads 1
    python scripts/bench_train.py --preset resnet18-gpu --device cuda           # 16 x ResNet-18, CIFAR-shaped
    python scripts/bench_train.py --preset resnet18-gpu --device cpu --nodes 2 --rounds 1 --loop-rounds 1 \\
        --reps 1 --warmup 0                                        # smoke check of the GPU preset on CPU

When the dataset is too small for ``nodes x batch_size`` (digits has 1437 training images, so 256 nodes x 16
does not fit), the benchmark falls back to digits-shaped synthetic data (64 features, 10 classes, enough
samples) and says so in the ``data`` column: the model and the per-round work are the same.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dice_cli.config import DatasetConfig, ModelConfig, TopologyConfig, TrainConfig  # noqa: E402
from dice_cli.engine import Dynamics, Mixing, State, configure_numerics  # noqa: E402
from dice_cli.errors import UserError  # noqa: E402
from dice_cli.graph import build_schedule  # noqa: E402
from dice_cli.models import build_module, init_nodes, node_module  # noqa: E402
from dice_cli.reference import LoopEngine  # noqa: E402


# ------------------------------------------------------------------------------------------- setup

@dataclass
class Bench:
    """What every engine needs: the model config, the dynamics (data, plan, W, lr) and the initial state."""
    model: ModelConfig
    fm: object
    dyn: Dynamics
    init: State
    input_shape: Tuple[int, ...]
    num_classes: int
    data: str
    setup: object = None        # the simulation.Setup (None for the random-image preset)


def setup_from_config(args, n: int, total_rounds: int, device: torch.device, dtype: str) -> Bench:
    """The real ``dice train`` setup via ``training.build_setup`` (digits → synthetic if it is too small)."""
    from dice_cli.simulation import build_setup

    model = ModelConfig(name=args.model, hidden=list(args.hidden))
    common = dict(model=model, topology=TopologyConfig(name=args.topology), nodes=n, rounds=total_rounds,
                  batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=device.type, dtype=dtype,
                  progress=False)
    data = args.dataset
    try:
        s = build_setup(TrainConfig(dataset=DatasetConfig(name=args.dataset), **common), device=device)
    except UserError:
        if args.dataset != "digits":
            raise
        samples = max(2000, math.ceil(n * args.batch_size * 1.5 / 0.8))
        ds = DatasetConfig(name="synthetic", synthetic_features=64, synthetic_classes=10, synthetic_samples=samples)
        s = build_setup(TrainConfig(dataset=ds, **common), device=device)
        data = f"synthetic64x{samples}"
    return Bench(model, s.fm, s.dyn, s.init, tuple(s.data.input_shape), s.data.num_classes, data, s)


def setup_random_images(args, n: int, total_rounds: int, device: torch.device, dtype: torch.dtype) -> Bench:
    """--preset resnet18-gpu: ResNet-18 nodes on random CIFAR-shaped inputs [3, 32, 32], 10 classes."""
    from dice_cli.config import OptimConfig

    shape, classes, b = (3, 32, 32), 10, args.batch_size
    g = torch.Generator().manual_seed(args.seed)
    per_node = 4 * b
    x = torch.randn(n * per_node, *shape, generator=g).to(device=device, dtype=dtype)
    y = torch.randint(0, classes, (n * per_node,), generator=g).to(device)
    plan = torch.stack([torch.stack([k * per_node + torch.randperm(per_node, generator=g)[:b] for k in range(n)])
                        for _ in range(total_rounds)]).to(device)
    model = ModelConfig(name="resnet18")
    fm, theta, bufs = init_nodes(model, shape, classes, n, args.seed, dtype, device)
    sched = build_schedule(TopologyConfig(name=args.topology), n, args.seed)
    dyn = Dynamics(fm, x, y, plan, Mixing(sched, device, dtype), OptimConfig(), args.lr, total_rounds, True)
    return Bench(model, fm, dyn, State(0, theta, bufs, None), shape, classes, "random 3x32x32")


# ------------------------------------------------------------------------------------------- engines

class VmapRunner:
    """engine=vmap: ``Dynamics.round`` on the stacked state."""

    def __init__(self, b: Bench):
        self.dyn, self.state = b.dyn, b.init.clone()

    def run(self, rounds: int, start: int) -> None:
        s = State(start, self.state.theta, self.state.buffers, self.state.momentum)
        for _ in range(rounds):
            s, _, _ = self.dyn.round(s)
        self.state = s


class LoopRunner:
    """engine=loop: ``reference.LoopEngine.round`` (per-node modules and optimisers)."""

    def __init__(self, b: Bench):
        self.eng = LoopEngine(b.model, b.fm, b.input_shape, b.num_classes, b.dyn, b.init.clone())

    def run(self, rounds: int, start: int) -> None:
        self.eng.round_index = start
        for _ in range(rounds):
            self.eng.round()


class PaperRunner:
    """The paper's style: per-node nn.Module + torch.optim.SGD, node by node; then gossip by a Python loop over
    all (k, l) pairs checking W[k, l] > 0 (W held as a torch tensor, as that code does) and summing the
    neighbours' parameter tensors from their state_dicts into fresh ``param.data`` tensors."""

    def __init__(self, b: Bench):
        self.dyn = b.dyn
        th, bufs = b.init.theta, b.init.buffers
        self.models = [node_module(b.model, b.fm, b.input_shape, b.num_classes, th[k],
                                   {name: v[k] for name, v in bufs.items()}) for k in range(b.dyn.n)]
        self.opts = [torch.optim.SGD(m.parameters(), lr=b.dyn.lr(0)) for m in self.models]

    def run(self, rounds: int, start: int) -> None:
        dyn, n = self.dyn, self.dyn.n
        for t in range(start, start + rounds):
            for k in range(n):                                   # local steps, node by node
                idx = dyn.plan[t, k]
                m, opt = self.models[k], self.opts[k]
                m.train()
                opt.zero_grad()
                loss = F.cross_entropy(m(dyn.x[idx]), dyn.y[idx])
                loss.backward()
                opt.step()
            W = torch.as_tensor(dyn.mixing.numpy(t))              # gossip over all (k, l) pairs
            sds = [m.state_dict() for m in self.models]          # the old tensors stay referenced
            for k, m in enumerate(self.models):
                for name, param in m.named_parameters():
                    acc = torch.zeros_like(param.data)
                    for l in range(n):
                        if W[k, l] > 0:
                            acc += sds[l][name].data * W[k, l].item()
                    param.data = acc


class RecordedRunner:
    """``dice train``'s loop at its default recording (training.run_rounds with engine=vmap): every round
    evaluated (probe loss/accuracy, consensus), its checkpoint written (Θ^t and Δ^t, atomically), its
    metrics rows buffered and appended, the divergence guard; into a fresh run directory per call. The
    closing metrics plot and manifest update are left out (``finish=False``): this is the per-round cost."""

    def __init__(self, b: Bench, root: Path):
        from dice_cli.training import LocalStepper

        self.s, self.root, self.calls = b.setup, root, 0
        self.stepper = LocalStepper(self.s, b.init, "vmap")
        self.state = b.init.clone()

    def run(self, rounds: int, start: int) -> None:
        from dataclasses import replace

        from dice_cli.run import RunDir
        from dice_cli.training import run_rounds

        self.calls += 1
        run = RunDir(self.root / f"run_{self.calls}", "train")
        run.path.mkdir(parents=True)
        cfg = replace(self.s.cfg, rounds=start + rounds, progress=False, log_every=10 ** 9)
        st = State(start, self.state.theta, self.state.buffers, self.state.momentum)
        with contextlib.redirect_stdout(io.StringIO()):          # the loop's closing summary line
            self.state = run_rounds(cfg, run, self.stepper, st, every=1, finish=False)


class PaperLoaderRunner:
    """scripts/paper_style_train.py's loop on the same data and partition: per-node modules, optimisers and
    shuffled drop-last DataLoaders (a new iterator every epoch), the paper's merge_model gossip over every
    (node, parameter, sender) with the torch mixing matrix, no per-round evaluation."""

    def __init__(self, b: Bench):
        from torch.utils.data import DataLoader, TensorDataset

        paper = _paper_style()
        self.merge = paper.merge_model
        s, dyn = b.setup, b.dyn
        th, bufs = b.init.theta, b.init.buffers
        self.models = [node_module(b.model, b.fm, b.input_shape, b.num_classes, th[k],
                                   {name: v[k] for name, v in bufs.items()}) for k in range(dyn.n)]
        self.opts = [torch.optim.SGD(m.parameters(), lr=dyn.lr(0)) for m in self.models]
        g = torch.Generator().manual_seed(0)
        self.loaders = [DataLoader(TensorDataset(dyn.x[torch.as_tensor(p)], dyn.y[torch.as_tensor(p)]),
                                   batch_size=dyn.batch_size, shuffle=True, drop_last=True, generator=g)
                        for p in s.nodes.parts]
        self.iters = [iter(dl) for dl in self.loaders]
        self.P = torch.as_tensor(dyn.mixing.numpy(0), dtype=torch.float32)
        self.criterion = torch.nn.CrossEntropyLoss()

    def run(self, rounds: int, start: int) -> None:
        for iteration in range(start, start + rounds):
            for k, (m, opt) in enumerate(zip(self.models, self.opts)):
                if iteration % len(self.loaders[k]) == 0:
                    self.iters[k] = iter(self.loaders[k])
                try:
                    data, target = next(self.iters[k])
                except StopIteration:
                    self.iters[k] = iter(self.loaders[k])
                    data, target = next(self.iters[k])
                m.train()
                loss = self.criterion(m(data), target)
                opt.zero_grad()
                loss.backward()
                opt.step()
            self.merge(self.models, self.P)


def _paper_style():
    """scripts/paper_style_train.py as a module (its merge_model is the paper's gossip loop)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("paper_style_train", Path(__file__).with_name("paper_style_train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class SingleRunner:
    """One model at batch ``nodes x batch_size`` (the GPU preset's reference throughput)."""

    def __init__(self, b: Bench, batch: int):
        torch.manual_seed(0)
        dt = b.init.theta.dtype
        self.m = build_module(b.model, b.input_shape, b.num_classes).to(device=b.init.theta.device, dtype=dt)
        self.opt = torch.optim.SGD(self.m.parameters(), lr=b.dyn.lr(0))
        dyn = b.dyn
        self.x, self.y, self.plan = dyn.x, dyn.y, dyn.plan
        self.batch = batch

    def run(self, rounds: int, start: int) -> None:
        for t in range(start, start + rounds):
            idx = self.plan[t].reshape(-1)[:self.batch]
            self.m.train()
            self.opt.zero_grad(set_to_none=True)
            F.cross_entropy(self.m(self.x[idx]), self.y[idx]).backward()
            self.opt.step()


# ------------------------------------------------------------------------------------------- measuring

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn: Callable[[], None], device: torch.device) -> Optional[float]:
    """Extra memory (MiB) while ``fn`` runs: CUDA peak allocated growth, or sampled peak RSS growth on CPU."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if not os.path.exists("/proc/self/statm"):
        return None
    base, peak, stop = rss_bytes(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.0005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        stop.set()
        th.join()
    peak[0] = max(peak[0], rss_bytes())
    return max(peak[0] - base, 0) / 2**20


def bench_engines(runners: Dict[str, Tuple[object, int]], start: int, warmup: int, reps: int,
                  device: torch.device) -> Dict[str, dict]:
    """Median seconds per round of every runner ({name: (runner, rounds per rep)}), reps interleaved."""
    for name, (r, _) in runners.items():
        if warmup:
            r.run(warmup, 0)
        sync(device)
    times: Dict[str, List[float]] = {name: [] for name in runners}
    for _ in range(reps):
        for name, (r, rounds) in runners.items():
            sync(device)
            t0 = time.perf_counter()
            r.run(rounds, start)
            sync(device)
            times[name].append((time.perf_counter() - t0) / rounds)
    out = {}
    for name, (r, rounds) in runners.items():
        mem = peak_memory(lambda: r.run(min(rounds, 2), start), device)
        ts = times[name]
        out[name] = {"s_per_round": statistics.median(ts), "min": min(ts), "max": max(ts), "mem_mib": mem}
    return out


# ------------------------------------------------------------------------------------------- main

def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["none", "resnet18-gpu"], default="none",
                    help="resnet18-gpu: 16 x ResNet-18, random CIFAR-shaped data, batch 50, float32, TF32 off, "
                         "vs loop and vs one ResNet-18 at batch nodes*50 (samples/s)")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--model", default="mlp", choices=["logreg", "mlp", "cnn", "resnet18"])
    ap.add_argument("--hidden", type=int, nargs="+", default=[32], help="mlp hidden widths")
    ap.add_argument("--topology", default="ring")
    ap.add_argument("--nodes", type=int, nargs="+", default=None, help="node counts (default 16 256; preset: 16)")
    ap.add_argument("--batch-size", type=int, default=None, help="per-node batch (default 16; preset: 50)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--rounds", type=int, default=None, help="rounds per timed rep of engine=vmap (default 200; preset 10)")
    ap.add_argument("--loop-rounds", type=int, default=None,
                    help="rounds per timed rep of loop/paper/single (default rounds/10, at least 3; preset 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds per engine first (default 5; preset 2)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions; the median is reported")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--no-paper", action="store_true", help="skip the paper-style baselines")
    ap.add_argument("--no-recorded", action="store_true", help="skip the recorded dice train loop")
    args = ap.parse_args(argv)

    preset = args.preset == "resnet18-gpu"
    nodes = args.nodes or ([16] if preset else [16, 256])
    args.batch_size = args.batch_size or (50 if preset else 16)
    rounds = args.rounds or (10 if preset else 200)
    loop_rounds = args.loop_rounds or (3 if preset else max(3, rounds // 10))
    warmup = args.warmup if args.warmup is not None else (2 if preset else 5)
    if preset:
        args.model, args.dtype = "resnet18", "float32"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    configure_numerics()   # TF32 off
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{os.cpu_count()}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# torch {torch.__version__} | {dev_name} | threads {torch.get_num_threads()} | {args.dtype} | "
          f"model {args.model}{args.hidden if args.model == 'mlp' else ''} | topology {args.topology} | "
          f"batch {args.batch_size} | load avg {load:.2f}")
    print(f"# vmap: {rounds} rounds/rep; loop, paper{', single' if preset else ''}: {loop_rounds} rounds/rep; "
          f"{args.reps} reps (median), warm-up {warmup}")
    hdr = (f"{'nodes':>5} {'data':>18} {'engine':>7} {'ms/round':>10} {'rounds/s':>9} {'node-steps/s':>13} "
           f"{'samples/s':>11} {'peak MiB':>9} {'vs loop':>8} {'vs paper':>8}")
    print(hdr)
    print("-" * len(hdr))
    for n in nodes:
        total = warmup + max(rounds, loop_rounds) + 2
        b = (setup_random_images(args, n, total, device, dtype) if preset
             else setup_from_config(args, n, total, device, args.dtype))
        runners: Dict[str, Tuple[object, int]] = {"vmap": (VmapRunner(b), rounds), "loop": (LoopRunner(b), loop_rounds)}
        tmp = None
        if b.setup is not None and not args.no_recorded:
            tmp = tempfile.TemporaryDirectory(prefix="bench_train_")
            runners["recorded"] = (RecordedRunner(b, Path(tmp.name)), rounds)
        if not args.no_paper:
            runners["paper"] = (PaperRunner(b), loop_rounds)
            if b.setup is not None:
                runners["paper-dl"] = (PaperLoaderRunner(b), loop_rounds)
        if preset:
            runners["single"] = (SingleRunner(b, n * args.batch_size), loop_rounds)
        res = bench_engines(runners, warmup, warmup, args.reps, device)
        for name, r in res.items():
            s = r["s_per_round"]
            steps = 1 if name == "single" else n
            samples = (n * args.batch_size)
            vs_loop = res["loop"]["s_per_round"] / s
            vs_paper = res["paper"]["s_per_round"] / s if "paper" in res else float("nan")
            mem = "n/a" if r["mem_mib"] is None else f"{r['mem_mib']:.1f}"
            print(f"{n:>5} {b.data:>18} {name:>7} {s * 1e3:>10.3f} {1 / s:>9.1f} {steps / s:>13.1f} "
                  f"{samples / s:>11.1f} {mem:>9} {vs_loop:>7.1f}x {vs_paper:>7.1f}x")
        if "paper" in res and res["loop"]["s_per_round"] > res["paper"]["s_per_round"]:
            print(f"# note: n={n}: the loop engine is slower than the paper-style baseline "
                  f"({res['loop']['s_per_round'] * 1e3:.2f} vs {res['paper']['s_per_round'] * 1e3:.2f} ms/round)")
        if "recorded" in res and "paper-dl" in res:
            ratio = res["paper-dl"]["s_per_round"] / res["recorded"]["s_per_round"]
            print(f"# n={n}: TARGET per round at default recording: recorded dice loop "
                  f"{res['recorded']['s_per_round'] * 1e3:.3f} ms vs paper style with DataLoaders "
                  f"{res['paper-dl']['s_per_round'] * 1e3:.3f} ms = {ratio:.1f}x (target >= 15x: "
                  f"{'met' if ratio >= 15 else f'missed by {15 / ratio:.2f}x'})")
        print(f"# n={n}: vmap/loop = {res['loop']['s_per_round'] / res['vmap']['s_per_round']:.1f}x"
              + (f", vmap/paper = {res['paper']['s_per_round'] / res['vmap']['s_per_round']:.1f}x" if "paper" in res else "")
              + (f", vmap/single = {res['single']['s_per_round'] / res['vmap']['s_per_round']:.2f}x (samples/s)"
                 if "single" in res else "")
              + f" (spread vmap {res['vmap']['min'] * 1e3:.3f}-{res['vmap']['max'] * 1e3:.3f} ms, "
                f"loop {res['loop']['min'] * 1e3:.2f}-{res['loop']['max'] * 1e3:.2f} ms)")
        del runners, b
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
