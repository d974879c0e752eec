"""``dice train``: simulate decentralized SGD and write a replayable run directory.

Data flows one way: config -> dataset, partition, probe sets, batch plan, W^t -> engine rounds ->
checkpoints / metrics / plots. Everything random is drawn up front from the seed (the plan, the graph,
the initialisation), so any round can be replayed exactly and a killed run resumes bit-identically.

    dice train                                   # digits, MLP, 16-node ring
    dice train nodes=32 topology=exponential lr=0.1 rounds=300
    dice train attack=label_flip attack.count=2     # known bad nodes, recorded in manifest.json
"""
from __future__ import annotations

import io
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import atomic
from .attacks import Attack, build_attack
from .config import TrainConfig
from .data import Dataset, NodeData, batch_plan, load_dataset, sample_owner, split_nodes
from .divergence import divergence_guard
from .engine import Dynamics, Mixing, State, configure_numerics, consensus_distance
from .errors import DivergenceError, UserError, note_where
from .graph import MixingSchedule, build_checked_schedule, describe_schedule, plot_topology
from .lock import scoped
from .models import FunctionalModel, init_nodes
from .reference import LoopEngine
from .run import RunDir, environment, point_latest

METRIC_COLUMNS = ["round", "node", "lr", "train_loss", "probe_loss", "probe_acc", "consensus_distance"]
# Version of the run-directory state format (checkpoint payload, metrics, manifest fields) that the engines
# write; recorded as manifest ``engine_version``. A run is only resumed by the version that wrote it (a
# manifest without the key predates it and is version 1, the same format).
ENGINE_VERSION = 1


def check_engine_version(run: RunDir) -> None:
    """Refuse to resume a run directory written by an incompatible engine version (exit 2)."""
    found = run.manifest().get("engine_version", 1)
    if found != ENGINE_VERSION:
        raise UserError(f"{run.path} was written by engine version {found!r}, but this dice-cli writes engine "
                        f"version {ENGINE_VERSION}; it cannot resume that run. Finish it with the dice-cli "
                        f"that started it, or start a new run (a new out=<dir>, or overwrite=true).")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device='cuda' but no CUDA device is visible to torch; use device=cpu or device=auto")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


@dataclass
class Setup:
    """Everything a recorded run needs to replay rounds: rebuilt identically by gt/estimate/detect."""
    cfg: TrainConfig
    device: torch.device
    dtype: torch.dtype
    data: Dataset
    nodes: NodeData
    plan: np.ndarray            # [T, n, B]
    schedule: MixingSchedule
    fm: FunctionalModel
    init: State
    dyn: Dynamics
    x_probe: torch.Tensor       # [m, ...] shared or [n, m, ...]
    y_probe: torch.Tensor
    shared_probe: bool
    attack: Optional[Attack] = None   # also dyn.attack; None for attack=none


def build_setup(cfg: TrainConfig, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                schedule: Optional[MixingSchedule] = None) -> Setup:
    """Deterministically rebuild data, plan, graph, initial state, attack and dynamics from the config.

    The attack (``attacks.build_attack``) is part of the dynamics, so every replay (gt, estimate, detect)
    re-applies it exactly."""
    configure_numerics()
    device = device or resolve_device(cfg.device)
    dtype = dtype or resolve_dtype(cfg.dtype)
    data = load_dataset(cfg.dataset, cfg.data_dir, cfg.download, seed=cfg.seed)
    nodes = split_nodes(data.y_train.numpy(), data.y_test.numpy(), cfg.nodes, cfg.partition, cfg.probe,
                        cfg.seed, cfg.batch_size)
    plan = batch_plan(nodes.parts, cfg.rounds, cfg.batch_size, cfg.seed)
    attack = build_attack(cfg.attack, cfg.nodes, cfg.rounds, cfg.seed, data.num_classes,
                          data.y_train.numpy(), nodes.parts)
    schedule = schedule or build_checked_schedule(cfg)
    fm, theta, buffers = init_nodes(cfg.model, data.input_shape, data.num_classes, cfg.nodes, cfg.seed,
                                    dtype, device)
    configure_threads(cfg.threads, device, fm.num_params * cfg.nodes)
    x = data.x_train.to(device=device, dtype=dtype)
    y = data.y_train.to(device)
    dyn = Dynamics(fm, x, y, torch.as_tensor(plan, device=device), Mixing(schedule, device, dtype),
                   cfg.optim, cfg.lr, cfg.rounds, cfg.model.gossip_buffers, attack=attack, chunk_nodes=cfg.chunk_nodes)
    shared = nodes.probe_split == "test"
    src_x, src_y = (data.x_test, data.y_test) if shared else (data.x_train, data.y_train)
    idx = torch.as_tensor(nodes.probe[0] if shared else nodes.probe)
    return Setup(cfg, device, dtype, data, nodes, plan, schedule, fm, State(0, theta, buffers, None), dyn,
                 src_x[idx].to(device=device, dtype=dtype), src_y[idx].to(device), shared, attack)


# Below this many parameters in all nodes together, extra intra-op threads cannot pay for themselves and,
# on a machine shared with other work, their spin-waiting collapses throughput (measured on 2 cores with
# one other busy process: default digits run 332 rounds/s with 1 thread, 7.7 with 2).
SMALL_PROBLEM_PARAMS = 10_000_000
_TORCH_DEFAULT_THREADS = torch.get_num_threads()


def configure_threads(threads: int, device: torch.device, total_params: int) -> int:
    """Set torch's CPU intra-op threads: ``threads`` if > 0; auto (0): 1 for small problems on CPU, else
    torch's default. Returns the count in use."""
    if threads > 0:
        torch.set_num_threads(threads)
    elif device.type == "cpu" and total_params <= SMALL_PROBLEM_PARAMS:
        torch.set_num_threads(1)
    else:  # a sweep's earlier small job may have lowered it in this process
        torch.set_num_threads(_TORCH_DEFAULT_THREADS)
    return torch.get_num_threads()


def record_every(cfg: TrainConfig, num_params: int) -> int:
    """Checkpoint stride: record.every, or (auto) every round if all checkpoints fit record.max_mb."""
    if cfg.record.every:
        return cfg.record.every
    bytes_per = cfg.nodes * num_params * (4 if cfg.dtype == "float32" else 8)
    per_round = bytes_per * ((2 if cfg.record.deltas else 1) + (1 if cfg.optim.momentum else 0))
    total_mb = per_round * (cfg.rounds + 1) / 2**20
    return max(1, math.ceil(total_mb / cfg.record.max_mb))


def _write_static(run: RunDir, s: Setup) -> None:
    """Artifacts fixed by the config: plan, partition, probe indices, mixing, graph picture."""
    cfg = s.cfg
    atomic.save_npy(run / "plan.npy", s.plan)
    owner = sample_owner(s.nodes.parts, len(s.data.y_train))
    held = np.nonzero(owner >= 0)[0]
    atomic.write_text(run / "partition.csv", pd.DataFrame(
        {"index": held, "node": owner[held], "label": s.data.y_train.numpy()[held]}).to_csv(index=False))
    atomic.save_npy(run / "probe.npy", s.nodes.probe)
    s.schedule.save(run.path, cfg.rounds)
    info = describe_schedule(s.schedule, cfg.rounds)
    atomic.write_json(run / "graph.json", info)
    plot_topology(s.schedule.at(0), run / "topology.png",
                  title=f"{cfg.topology.name}, n={cfg.nodes}" + (" (round 0)" if s.schedule.time_varying else ""))


def _plot_metrics(run: RunDir, metrics: pd.DataFrame) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = metrics.groupby("round")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, col, title in zip(axes, ["probe_loss", "probe_acc", "consensus_distance"],
                              ["probe loss", "probe accuracy", "consensus distance ‖θ_k − θ̄‖²"]):
        mean, lo, hi = g[col].mean(), g[col].min(), g[col].max()
        ax.plot(mean.index, mean.values, label="mean over nodes")
        ax.fill_between(mean.index, lo.values, hi.values, alpha=0.25, label="min–max")
        ax.set_title(title)
        ax.set_xlabel("round")
        if col == "consensus_distance" and (mean > 0).all():
            ax.set_yscale("log")
    tl = g["train_loss"].mean()
    axes[0].plot(tl.index, tl.values, alpha=0.6, label="train batch loss")
    axes[0].legend(fontsize=8)
    atomic.save_figure(run / "metrics.png", fig)


class _MetricsLog:
    """Append-only metrics.csv: one flush per evaluated round; truncated to a checkpoint on resume."""

    def __init__(self, path: Path, resume_round: int):
        self.path = path
        if resume_round > 0 and path.exists():
            lines = path.read_text().splitlines(keepends=True)
            if lines and not lines[-1].endswith("\n"):
                lines = lines[:-1]                      # a row cut off by the kill
            try:
                df = pd.read_csv(io.StringIO("".join(lines)))
                df = df[df["round"] < resume_round]
            except (pd.errors.EmptyDataError, KeyError, ValueError):
                df = pd.DataFrame(columns=METRIC_COLUMNS)
            atomic.write_text(path, df.to_csv(index=False))
        else:
            atomic.write_text(path, ",".join(METRIC_COLUMNS) + "\n")
        self.f = open(path, "a")

    def write(self, rows: Dict[str, np.ndarray]) -> None:
        pd.DataFrame(rows, columns=METRIC_COLUMNS).to_csv(self.f, header=False, index=False)
        self.f.flush()

    def close(self) -> None:
        self.f.close()


@scoped
def train(cfg: TrainConfig, out: Path, config_dict: dict) -> Path:
    """Run (or resume) ``dice train`` into ``out``. Returns the run directory."""
    if cfg.engine == "distributed":   # every rank computes its block; rank 0 writes this same directory
        from .distributed import train_distributed

        return train_distributed(cfg, out, config_dict)
    run = RunDir(out, "train")
    mode = run.check(config_dict, cfg.overwrite)
    if mode == "resume":
        check_engine_version(run)
    if mode == "complete":
        print(f"dice train: {out} is already complete with this config; nothing to do.")
        point_latest(run.path)
        return run.path
    try:
        s = build_setup(cfg)  # every user mistake in data/graph/model surfaces here, before any write
    except BaseException:
        run.discard_if_empty()
        raise
    every = record_every(cfg, s.fm.num_params)
    run.claim(config_dict, mode)
    if mode in ("fresh", "replace") or not run.static_intact(s.plan):
        _write_static(run, s)
    state = s.init
    r = run.resume_round(cfg.nodes, cfg.rounds, cfg.eval_every) if mode == "resume" else None
    if r is not None:
        state = State.from_payload(run.load_checkpoint(r), s.device, s.dtype)
        print(f"dice train: resuming {out} from round {r}")
    start = state.round
    start_manifest(run, s, every)
    guard = divergence_guard(run, s, start)

    loop = LoopEngine(cfg.model, s.fm, s.data.input_shape, s.data.num_classes, s.dyn, state) \
        if cfg.engine == "loop" else None
    log = _MetricsLog(run / "metrics.csv", start)
    log_every = cfg.log_every or max(1, cfg.rounds // 10)
    bar = tqdm(total=cfg.rounds, initial=start, desc="dice train", unit="round", dynamic_ncols=True,
               disable=None if cfg.progress else True, file=sys.stderr)
    t0 = time.perf_counter()
    t = start
    try:
        for t in range(start, cfg.rounds):
            if loop is None:
                new_state, delta, losses = s.dyn.round(state)
            else:
                losses, delta = loop.round()
                new_state = loop.state()
            _check_finite(losses, new_state.theta, t)
            guard.check(t, losses, new_state.theta)
            if t % every == 0:
                payload = state.to_payload()
                if cfg.record.deltas:
                    payload["delta"] = delta.detach().cpu()
                run.save_checkpoint(t, payload)
            state = new_state
            last = t == cfg.rounds - 1
            if (t + 1) % cfg.eval_every == 0 or last:
                with torch.no_grad():
                    pl, pa = s.dyn.probe_losses(state.theta, state.buffers, s.x_probe, s.y_probe, s.shared_probe)
                    cd = consensus_distance(state.theta)
                log.write({"round": np.full(cfg.nodes, t), "node": np.arange(cfg.nodes),
                           "lr": np.full(cfg.nodes, s.dyn.lr(t)), "train_loss": losses.detach().cpu().numpy(),
                           "probe_loss": pl.cpu().numpy(), "probe_acc": pa.cpu().numpy(),
                           "consensus_distance": cd.cpu().numpy()})
                if (t + 1) % log_every == 0 or last:
                    rate = (t + 1 - start) / max(time.perf_counter() - t0, 1e-9)
                    bar.write(f"round {t + 1}/{cfg.rounds} | train loss {losses.mean():.4f} | probe loss "
                              f"{pl.mean():.4f} acc {pa.mean():.3f} | consensus {cd.mean():.2e} | "
                              f"{rate:.1f} rounds/s")
            bar.update(1)
    except KeyboardInterrupt as e:
        note_where(e, f"at round {t}")
        run.update_manifest(status="interrupted")
        log.close()
        raise
    except BaseException as e:
        run.update_manifest(status="failed", error=str(e))
        log.close()
        raise
    finally:
        bar.close()
    log.close()
    run.save_checkpoint(cfg.rounds, state.to_payload())
    finish_run(run, cfg, start, time.perf_counter() - t0)
    return run.path


def start_manifest(run: RunDir, s: Setup, every: int, **extra) -> None:
    """Manifest fields written when a (resumed) training session starts; status 'running'."""
    cfg = s.cfg
    fields = dict(
        kind="train", status="running", command="dice train", seed=cfg.seed, device=str(s.device), threads=torch.get_num_threads(),
        dtype=cfg.dtype, engine=cfg.engine, engine_version=ENGINE_VERSION, nodes=cfg.nodes, rounds=cfg.rounds,
        num_params=s.fm.num_params, record_every=every, record_deltas=cfg.record.deltas,
        probe_split=s.nodes.probe_split,
        dataset={"name": s.data.name, "train": len(s.data.y_train), "test": len(s.data.y_test),
                 "input_shape": list(s.data.input_shape), "classes": s.data.num_classes},
        attack=s.attack.manifest() if s.attack is not None else None,
        environment=environment(),
        started=run.manifest().get("started", time.strftime("%Y-%m-%dT%H:%M:%S%z")))
    fields.update(extra)
    run.update_manifest(**fields)


def finish_run(run: RunDir, cfg: TrainConfig, start: int, seconds: float) -> None:
    """After the final checkpoint: metrics plot, manifest 'complete' with timings, outputs/latest."""
    _plot_metrics(run, pd.read_csv(run / "metrics.csv"))
    final = pd.read_csv(run / "metrics.csv").query("round == @cfg.rounds - 1")
    run.update_manifest(status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        timings={"train_seconds_this_session": round(seconds, 3),
                                 "rounds_this_session": cfg.rounds - start,
                                 "rounds_per_s": round((cfg.rounds - start) / max(seconds, 1e-9), 2)},
                        final={"probe_loss": float(final.probe_loss.mean()),
                               "probe_acc": float(final.probe_acc.mean()),
                               "consensus_distance": float(final.consensus_distance.mean())})
    point_latest(run.path)
    print(f"dice train: wrote {run.path} (final probe acc {final.probe_acc.mean():.3f}, "
          f"{(cfg.rounds - start) / max(seconds, 1e-9):.1f} rounds/s)")


def _check_finite(losses: torch.Tensor, theta: torch.Tensor, t: int) -> None:
    bad = ~torch.isfinite(losses)
    if bool(bad.any()):
        k = int(bad.nonzero()[0])
        raise DivergenceError(f"training diverged at round {t} on node {k} (batch loss {float(losses[k])}); "
                              f"lower lr (now in the config) or use optim.schedule=cosine", round=t, node=k,
                              quantity="loss", value=float(losses[k]))
    if not bool(torch.isfinite(theta).all()):
        k = int((~torch.isfinite(theta)).any(-1).nonzero()[0])
        raise DivergenceError(f"training diverged at round {t}: node {k}'s parameters are not finite; lower lr",
                              round=t, node=k, quantity="parameter_norm")
