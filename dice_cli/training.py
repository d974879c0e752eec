"""``dice train``: simulate decentralized SGD and write a replayable run directory.

Data flows one way: config -> world (``simulation.build_setup``: dataset, partition, probe sets, batch plan,
W^t, initial state) -> rounds -> checkpoints / metrics / plots. Everything random is drawn up front from the
seed, so any round can be replayed exactly and a killed run resumes bit-identically.

There is ONE training loop (``run_rounds``) for every engine. What differs is the *stepper* that computes a
round — ``LocalStepper`` (engine=vmap: ``engine.Dynamics``; engine=loop: the per-node twin in
``reference.py``) or ``distributed.BlockStepper`` (one rank's block of nodes) — and whether this process is
the one that writes (the *recorder*: metrics, checkpoints, manifest; rank 0 only when distributed). The
checks that can stop a run (``Guard``: NaN/inf, divergence) see every node's numbers on every process, so
all ranks stop at the same round.

    dice train                                   # digits, MLP, 16-node ring
    dice train nodes=32 topology=exponential lr=0.1 rounds=300
    dice train attack=label_flip attack.count=2     # known bad nodes, recorded in manifest.json
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from . import atomic
from .config import TrainConfig
from .data import sample_owner
from .divergence import divergence_guard
from .engine import State, consensus_distance
from .errors import DivergenceError, UserError, note_where
from .lock import scoped
from .run import RunDir, environment, point_latest
from .simulation import Setup, build_setup

# attacker: the node is one of the run's attackers (honest-only numbers: rows with attacker False);
# in_degree / out_degree: in-neighbours node k mixes with nonzero weight in that round (itself excluded)
# and receivers that mix node k's model — the effective weights of a reweighting defense (dice,
# dice_select), W^t's support otherwise.
METRIC_COLUMNS = ["round", "node", "lr", "train_loss", "probe_loss", "probe_acc", "consensus_distance",
                  "attacker", "in_degree", "out_degree"]
# Version of the run-directory state format (checkpoint payload, metrics, manifest fields) that the engines
# write; recorded as manifest ``engine_version``. A run is only resumed by the version that wrote it (a
# manifest without the key predates it and is version 1, the same format).
ENGINE_VERSION = 1
# Metrics rows are buffered in memory and appended to metrics.csv at most this often (and at the end, on
# an interrupt or an error): one small file append instead of a pandas write per round.
FLUSH_SECONDS = 2.0


def check_engine_version(run: RunDir) -> None:
    """Refuse to resume a run directory written by an incompatible engine version (exit 2)."""
    found = run.manifest().get("engine_version", 1)
    if found != ENGINE_VERSION:
        raise UserError(f"{run.path} was written by engine version {found!r}, but this dice-cli writes engine "
                        f"version {ENGINE_VERSION}; it cannot resume that run. Finish it with the dice-cli "
                        f"that started it, or start a new run (a new out=<dir>, or overwrite=true).")


def record_every(cfg: TrainConfig, num_params: int) -> int:
    """Checkpoint stride: record.every, or (auto) every round if all checkpoints fit record.max_mb."""
    if cfg.record.every:
        return cfg.record.every
    bytes_per = cfg.nodes * num_params * (4 if cfg.dtype == "float32" else 8)
    per_round = bytes_per * ((2 if cfg.record.deltas else 1) + (1 if cfg.optim.momentum else 0))
    total_mb = per_round * (cfg.rounds + 1) / 2**20
    return max(1, math.ceil(total_mb / cfg.record.max_mb))


def evaluated(cfg: TrainConfig, t: int) -> bool:
    """Round t's metrics row is written (probe metrics every ``eval_every`` rounds and at the last round)."""
    return (t + 1) % cfg.eval_every == 0 or t == cfg.rounds - 1


# --------------------------------------------------------------------------------------------- round records


@dataclass
class RoundRecord:
    """Every node's numbers of one round, on every process: batch losses at θ^t and parameter norms ‖θ^{t+1}‖
    [n]; the probe metrics at θ^{t+1} [n] when the round is evaluated."""
    round: int
    lr: float
    losses: np.ndarray
    norms: np.ndarray
    probe_loss: Optional[np.ndarray] = None
    probe_acc: Optional[np.ndarray] = None
    consensus: Optional[np.ndarray] = None
    in_degree: Optional[np.ndarray] = None      # None: W^t's (MetricsLog fills them in)
    out_degree: Optional[np.ndarray] = None


def degrees(mix: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(in-degree, out-degree) [n] of a mixing matrix's support, self-loops excluded (row k = receiver k)."""
    on = (np.asarray(mix) > 0) & ~np.eye(len(mix), dtype=bool)
    return on.sum(1), on.sum(0)


class Guard:
    """Stops a run that has gone numerically wrong, naming the round and the node: a non-finite batch loss or
    non-finite parameters, then the ``divergence`` bound (``divergence.DivergenceGuard``), of an honest node
    (an attacker whose own model diverges is part of the attack: a defense that cut it keeps the honest nodes
    finite, and they are what the run is about). It sees every node's numbers on every process, so all
    ranks stop at the same round."""

    def __init__(self, bound=None, attackers=()):
        self.bound = bound
        self.attackers = sorted(int(a) for a in attackers)

    def check(self, rec: RoundRecord) -> None:
        t = rec.round
        honest = np.ones(len(rec.losses), dtype=bool)
        honest[self.attackers] = False
        bad = np.flatnonzero(~np.isfinite(rec.losses) & honest)
        if len(bad):
            k = int(bad[0])
            raise DivergenceError(f"training diverged at round {t} on node {k} (batch loss {float(rec.losses[k])}); "
                                  f"lower lr (now in the config) or use optim.schedule=cosine", round=t, node=k,
                                  quantity="loss", value=float(rec.losses[k]))
        bad = np.flatnonzero(~np.isfinite(rec.norms) & honest)
        if len(bad):
            k = int(bad[0])
            raise DivergenceError(f"training diverged at round {t}: node {k}'s parameters are not finite; lower lr",
                                  round=t, node=k, quantity="parameter_norm")
        if self.bound is not None:
            self.bound.check(t, np.where(honest, rec.losses, 0.0), norms=np.where(honest, rec.norms, 0.0))


# --------------------------------------------------------------------------------------------- steppers


class LocalStepper:
    """All nodes in this process: ``engine.Dynamics`` (engine=vmap) or the per-node loop twin (engine=loop)."""

    lead = True

    def __init__(self, s: Setup, state: State, engine: str):
        self.s = s
        self.loop = None
        if engine == "loop":
            from .reference import LoopEngine

            self.loop = LoopEngine(s.cfg.model, s.fm, s.data.input_shape, s.data.num_classes, s.dyn, state)

    def divergence_guard(self, run: RunDir, start: int):
        return divergence_guard(run, self.s, start)

    def step(self, state: State) -> Tuple[State, Tensor, Tensor]:
        """State^t -> (State^{t+1}, Δ^t [n, P], batch losses [n])."""
        if self.loop is None:
            return self.s.dyn.round(state)
        losses, delta = self.loop.round()
        return self.loop.state(), delta, losses

    def record(self, t: int, losses: Tensor, state: State, evaluate: bool) -> RoundRecord:
        s = self.s
        with torch.no_grad():
            rec = RoundRecord(t, s.dyn.lr(t), losses.detach().cpu().numpy(),
                              torch.linalg.vector_norm(state.theta, dim=-1).cpu().numpy())
            if evaluate:
                pl, pa = s.dyn.probe_losses(state.theta, state.buffers, s.x_probe, s.y_probe, s.shared_probe)
                rec.probe_loss, rec.probe_acc = pl.cpu().numpy(), pa.cpu().numpy()
                rec.consensus = consensus_distance(state.theta).cpu().numpy()
                if "mix" in state.gossip:                 # a reweighting defense: its effective W'
                    rec.in_degree, rec.out_degree = degrees(state.gossip["mix"].cpu().numpy())
        return rec

    def payload(self, state: State, delta: Optional[Tensor]) -> Optional[dict]:
        """The checkpoint payload (state at the start of its round, and that round's Δ when recorded)."""
        p = state.to_payload()
        if delta is not None:
            p["delta"] = delta.detach().cpu()
        return p


# --------------------------------------------------------------------------------------------- recorder


class MetricsLog:
    """metrics.csv: rows buffered in memory and appended at most every ``FLUSH_SECONDS`` (and on close).

    On resume the file is cut back to the rounds before the resume round (a row cut off by a kill is
    dropped). ``RunDir.resume_round`` picks the checkpoint whose earlier rounds all have their rows on disk.
    """

    def __init__(self, path: Path, resume_round: int, attackers=(), schedule=None):
        self.path = path
        self.attackers, self.schedule = set(int(a) for a in attackers), schedule
        self.rows: List[str] = []
        self.last_flush = time.monotonic()
        if resume_round > 0 and path.exists():
            kept = self._rows_before(path, resume_round)
            atomic.write_text(path, ",".join(METRIC_COLUMNS) + "\n" + "".join(kept))
        else:
            atomic.write_text(path, ",".join(METRIC_COLUMNS) + "\n")
        self.f = open(path, "a")

    @staticmethod
    def _rows_before(path: Path, t: int) -> List[str]:
        lines = path.read_text().splitlines(keepends=True)[1:]
        if lines and not lines[-1].endswith("\n"):
            lines = lines[:-1]                          # a row cut off by the kill
        kept = []
        for line in lines:
            try:
                r = int(line.split(",", 1)[0])
            except ValueError:
                continue
            if r < t:
                kept.append(line)
        return kept

    def write(self, rec: RoundRecord) -> None:
        n = len(rec.losses)
        t, lr = rec.round, repr(float(rec.lr))
        cols = [rec.losses, rec.probe_loss, rec.probe_acc, rec.consensus]
        vals = np.stack([c.astype(np.float64) for c in cols], axis=1)
        din, dout = rec.in_degree, rec.out_degree
        if din is None:
            din, dout = degrees(self.schedule.at(t)) if self.schedule is not None else (np.zeros(n, int),) * 2
        self.rows += [f"{t},{k},{lr},{','.join(map(repr, map(float, vals[k])))},{k in self.attackers},"
                      f"{int(din[k])},{int(dout[k])}\n" for k in range(n)]
        if time.monotonic() - self.last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.f.write("".join(self.rows))
            self.f.flush()
            self.rows = []
        self.last_flush = time.monotonic()

    def close(self) -> None:
        if not self.f.closed:
            self.flush()
            self.f.close()


def write_static(run: RunDir, s: Setup) -> None:
    """Artifacts fixed by the config: plan, partition, probe indices, mixing, graph description and picture."""
    from .graph import describe_schedule
    from .plots import topology_plot

    cfg = s.cfg
    atomic.save_npy(run / "plan.npy", s.plan)
    owner = sample_owner(s.nodes.parts, len(s.data.y_train))
    held = np.nonzero(owner >= 0)[0]
    labels = s.data.y_train.numpy()[held]
    atomic.write_text(run / "partition.csv", "index,node,label\n" + "".join(
        f"{i},{k},{c}\n" for i, k, c in zip(held.tolist(), owner[held].tolist(), labels.tolist())))
    atomic.save_npy(run / "probe.npy", s.nodes.probe)
    s.schedule.save(run.path, cfg.rounds)
    atomic.write_json(run / "graph.json", describe_schedule(s.schedule, cfg.rounds))
    topology_plot(s.schedule.at(0), run / "topology.png",
                  title=f"{cfg.topology.name}, n={cfg.nodes}" + (" (round 0)" if s.schedule.time_varying else ""),
                  anomalous=list(s.attack.nodes) if s.attack is not None else ())


def start_manifest(run: RunDir, s: Setup, every: int, **extra) -> None:
    """Manifest fields written when a (resumed) training session starts; status 'running'."""
    cfg = s.cfg
    fields = dict(
        kind="train", status="running", command="dice train", seed=cfg.seed, device=str(s.device),
        threads=torch.get_num_threads(), dtype=cfg.dtype, engine=cfg.engine, engine_version=ENGINE_VERSION,
        nodes=cfg.nodes, rounds=cfg.rounds, num_params=s.fm.num_params, record_every=every,
        record_deltas=cfg.record.deltas, probe_split=s.nodes.probe_split,
        dataset={"name": s.data.name, "train": len(s.data.y_train), "test": len(s.data.y_test),
                 "input_shape": list(s.data.input_shape), "classes": s.data.num_classes},
        attack=s.attack.manifest() if s.attack is not None else None,
        defense=s.defense.manifest() if getattr(s, "defense", None) is not None else None,
        environment=environment(),
        started=run.manifest().get("started", time.strftime("%Y-%m-%dT%H:%M:%S%z")))
    fields.update(extra)
    run.update_manifest(**fields)


def finish_run(run: RunDir, cfg: TrainConfig, start: int, seconds: float) -> None:
    """After the final checkpoint: metrics plot, manifest 'complete' with timings, outputs/latest."""
    import pandas as pd

    from .plots import metrics_plot

    metrics = pd.read_csv(run / "metrics.csv")
    attackers = (run.manifest().get("attack") or {}).get("nodes", [])
    metrics_plot(metrics, run / "metrics.png", attackers=attackers)
    final = metrics[metrics["round"] == cfg.rounds - 1]

    def block(rows) -> dict:
        return {"probe_loss": float(rows.probe_loss.mean()), "probe_acc": float(rows.probe_acc.mean()),
                "consensus_distance": float(rows.consensus_distance.mean())}

    summary = block(final)
    honest = final[~final["node"].isin(attackers)]
    if attackers:               # the honest nodes' numbers are what a robustness study reports
        summary["honest"] = block(honest)
        summary["attackers"] = block(final[final["node"].isin(attackers)])
    run.update_manifest(status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        timings={"train_seconds_this_session": round(seconds, 3),
                                 "rounds_this_session": cfg.rounds - start,
                                 "rounds_per_s": round((cfg.rounds - start) / max(seconds, 1e-9), 2)},
                        final=summary)
    point_latest(run.path)
    acc = f"final probe acc {final.probe_acc.mean():.3f}"
    if attackers:
        acc += f", honest nodes {honest.probe_acc.mean():.3f}"
    print(f"dice train: wrote {run.path} ({acc}, {(cfg.rounds - start) / max(seconds, 1e-9):.1f} rounds/s)")


# --------------------------------------------------------------------------------------------- the loop


def run_rounds(cfg: TrainConfig, run: RunDir, stepper, state: State, every: int, desc: str = "dice train"
               ) -> State:
    """Rounds state.round … T−1 with any stepper; the lead process records metrics, checkpoints and the
    manifest. Checkpoint t holds the state at the START of round t (and Δ^t); the final state is
    checkpoint T. Returns the final state (this process's rows)."""
    from tqdm.auto import tqdm

    lead = stepper.lead
    start = state.round
    s = stepper.s
    guard = Guard(stepper.divergence_guard(run, start), s.attack.nodes if s.attack is not None else ())
    log = MetricsLog(run / "metrics.csv", start, attackers=s.attack.nodes if s.attack is not None else (),
                     schedule=s.schedule) if lead else None
    log_every = cfg.log_every or max(1, cfg.rounds // 10)
    bar = tqdm(total=cfg.rounds, initial=start, desc=desc, unit="round", dynamic_ncols=True,
               disable=None if (cfg.progress and lead) else True, file=sys.stderr)
    t0 = time.perf_counter()
    t = start
    try:
        for t in range(start, cfg.rounds):
            new_state, delta, losses = stepper.step(state)
            evaluate = evaluated(cfg, t)
            rec = stepper.record(t, losses, new_state, evaluate)
            guard.check(rec)
            if t % every == 0:
                payload = stepper.payload(state, delta if cfg.record.deltas else None)
                if lead:
                    run.save_checkpoint(t, payload)
            state = new_state
            if lead and evaluate:
                log.write(rec)
                if (t + 1) % log_every == 0 or t == cfg.rounds - 1:
                    rate = (t + 1 - start) / max(time.perf_counter() - t0, 1e-9)
                    bar.write(f"round {t + 1}/{cfg.rounds} | train loss {rec.losses.mean():.4f} | probe loss "
                              f"{rec.probe_loss.mean():.4f} acc {rec.probe_acc.mean():.3f} | consensus "
                              f"{rec.consensus.mean():.2e} | {rate:.1f} rounds/s")
            bar.update(1)
        payload = stepper.payload(state, None)
        if lead:
            log.close()
            run.save_checkpoint(cfg.rounds, payload)
    except BaseException as e:     # the run directory's scope (lock.scoped) records the status
        note_where(e, f"at round {t}")
        if lead:
            log.close()
        raise
    finally:
        bar.close()
    if lead:
        finish_run(run, cfg, start, time.perf_counter() - t0)
    return state


def claim_run(run: RunDir, cfg: TrainConfig, config_dict: dict) -> str:
    """What training into ``run`` means: 'fresh' / 'replace' / 'resume' / 'complete' (see RunDir.check)."""
    mode = run.check(config_dict, cfg.overwrite)
    if mode == "resume":
        check_engine_version(run)
    return mode


def prepare_run(run: RunDir, s: Setup, config_dict: dict, mode: str, every: int, **manifest_extra
                ) -> Optional[dict]:
    """Claim the directory, write the static files of a new run, start the manifest; on resume return the
    checkpoint payload to resume from (None: start at round 0)."""
    run.claim(config_dict, mode)
    if mode in ("fresh", "replace") or not run.static_intact(s.plan):
        write_static(run, s)
    payload = None
    cfg = s.cfg
    r = run.resume_round(cfg.nodes, cfg.rounds, cfg.eval_every) if mode == "resume" else None
    if r is not None:
        payload = run.load_checkpoint(r)
        print(f"dice train: resuming {run.path} from round {r}")
    start_manifest(run, s, every, **manifest_extra)
    return payload


@scoped
def train(cfg: TrainConfig, out: Path, config_dict: dict) -> Path:
    """Run (or resume) ``dice train`` into ``out`` with engine=vmap or engine=loop. Returns the run directory.
    (engine=distributed: ``distributed.train_distributed``, which drives the same loop per rank.)"""
    if cfg.engine == "distributed":
        raise ValueError("engine=distributed runs through dice_cli.distributed.train_distributed")
    run = RunDir(out, "train")
    mode = claim_run(run, cfg, config_dict)
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
    payload = prepare_run(run, s, config_dict, mode, every)
    state = s.init if payload is None else State.from_payload(payload, s.device, s.dtype)
    run_rounds(cfg, run, LocalStepper(s, state, cfg.engine), state, every)
    return run.path
