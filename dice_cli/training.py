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
from typing import Dict, List, Optional, Tuple

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
from .rerun import already_complete
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
# Extra metrics columns of a run with an unreliable network (network.*): whether the node was online in the
# round, and the bytes it sent (message size × receivers that mixed its message; NetworkRecord.bytes_sent).
NETWORK_COLUMNS = ["online", "bytes_sent"]
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


def checkpoint_every(run: RunDir, cfg: TrainConfig, num_params: int, mode: str) -> int:
    """The stride of this session: a resumed or extended run keeps the one it recorded (so its checkpoint
    schedule goes on as it was, even where auto mode would pick another one for the new length)."""
    if mode in ("resume", "extend"):
        recorded = run.manifest().get("record_every")
        if isinstance(recorded, int) and recorded >= 1:
            return recorded
    return record_every(cfg, num_params)


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

            self.loop = LoopEngine(s.cfg.model, s.fm, s.data.input_shape, s.data.num_classes, s.dyn, state,
                                   network=getattr(s, "network", None), base=s.schedule)

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
    dropped), keeping only rounds ``keep(t)`` accepts (an extended run no longer evaluates its old last
    round unless eval_every does). ``RunDir.resume_round`` picks the checkpoint whose earlier rounds all have their rows on disk.
    """

    def __init__(self, path: Path, resume_round: int, attackers=(), schedule=None, keep=None, network=None,
                 elem: int = 4):
        self.path = path
        self.attackers, self.schedule = set(int(a) for a in attackers), schedule
        self._static_degrees = None
        self.network, self.elem = network, elem
        columns = METRIC_COLUMNS + (NETWORK_COLUMNS if network is not None else [])
        self.rows: List[str] = []
        self.last_flush = time.monotonic()
        if resume_round > 0 and path.exists():
            kept = self._rows_before(path, resume_round, keep)
            atomic.write_text(path, ",".join(columns) + "\n" + "".join(kept))
        else:
            atomic.write_text(path, ",".join(columns) + "\n")
        self.f = open(path, "a")

    @staticmethod
    def _rows_before(path: Path, t: int, keep=None) -> List[str]:
        lines = path.read_text().splitlines(keepends=True)[1:]
        if lines and not lines[-1].endswith("\n"):
            lines = lines[:-1]                          # a row cut off by the kill
        kept = []
        for line in lines:
            try:
                r = int(line.split(",", 1)[0])
            except ValueError:
                continue
            if r < t and (keep is None or keep(r)):
                kept.append(line)
        return kept

    def _degrees(self, t: int, n: int):
        """In- and out-degrees [n] of round t's W (computed once for a static schedule)."""
        if self.schedule is None:
            return (np.zeros(n, int),) * 2
        if self.schedule.time_varying:
            return degrees(self.schedule.at(t))
        if self._static_degrees is None:
            self._static_degrees = degrees(self.schedule.at(0))
        return self._static_degrees

    def write(self, rec: RoundRecord) -> None:
        t, lr = rec.round, repr(float(rec.lr))
        cols = [rec.losses, rec.probe_loss, rec.probe_acc, rec.consensus]
        vals = np.stack(cols, axis=1).astype(np.float64).tolist()      # Python floats: repr round-trips
        n = len(vals)
        din, dout = (rec.in_degree, rec.out_degree) if rec.in_degree is not None else self._degrees(t, n)
        din, dout = np.asarray(din).tolist(), np.asarray(dout).tolist()
        att = self.attackers
        extra = [""] * n
        if self.network is not None:         # online flag and bytes sent (network runs only)
            M = self.schedule.at(t) if self.schedule is not None else None
            on = self.network.online_at(t)
            on = np.ones(n, dtype=bool) if on is None else on
            sent = self.network.bytes_sent(M, self.elem)
            extra = [f",{int(on[k])},{int(sent[k])}" for k in range(n)]
        self.rows += [f"{t},{k},{lr},{a!r},{b!r},{c!r},{d!r},{k in att},{din[k]},{dout[k]}{extra[k]}\n"
                      for k, (a, b, c, d) in enumerate(vals)]
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
    write_network(run, s)


def write_network(run: RunDir, s: Setup) -> None:
    """network.npz (the recorded draws; listed in the manifest with its sha256) and availability.png."""
    from .network import FILE
    from .plots import availability_plot

    if s.network is None:
        return
    atomic.write_bytes(run / FILE, s.network.to_bytes())
    eff = s.effective or s.schedule
    T = s.cfg.rounds
    availability_plot(s.network, [eff.at(t) for t in range(T)], [s.schedule.at(t) for t in range(T)],
                      run / "availability.png",
                      title=f"{s.cfg.topology.name}, n={s.cfg.nodes}: {describe_network(s.cfg)}")


def describe_network(cfg: TrainConfig) -> str:
    """A one-line summary of the network knobs that are not neutral."""
    net = cfg.network
    parts = []
    if net.churn != "none":
        parts.append(f"churn={net.churn}" + {"bernoulli": f" p={net.churn_p}",
                                               "markov": f" p_on={net.p_on} p_off={net.p_off}"}.get(net.churn, ""))
    if net.drop:
        parts.append(f"drop={net.drop}")
    if net.delay != "none" and net.max_delay:
        parts.append(f"delay={net.delay} D={net.max_delay}")
    if net.compression != "none":
        parts.append(f"{net.compression} " + (f"s={net.levels}" if net.compression == "qsgd" else f"ratio={net.ratio}")
                     + f" γ={net.gamma}")
    return ", ".join(parts) or "plain"


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
        network=s.network.summary() if getattr(s, "network", None) is not None else None,
        environment=environment(),
        started=run.manifest().get("started", time.strftime("%Y-%m-%dT%H:%M:%S%z")))
    fields.update(extra)
    run.update_manifest(**fields)


def read_metrics(path: Path) -> Dict[str, np.ndarray]:
    """metrics.csv as {column: array [rows]}, without pandas: ``attacker`` as bool, the rest as float64."""
    with open(path) as f:
        header = f.readline().strip().split(",")
        rows = [line.rstrip("\n").split(",") for line in f if line.strip()]
    cols = list(zip(*rows)) if rows else [()] * len(header)
    return {c: (np.array([v == "True" for v in col], dtype=bool) if c == "attacker"
                else np.array(col, dtype=np.float64)) for c, col in zip(header, cols)}


def finish_run(run: RunDir, cfg: TrainConfig, start: int, seconds: float) -> None:
    """After the final checkpoint: metrics plot, manifest 'complete' with timings, outputs/latest."""
    from . import plots

    metrics = read_metrics(run / "metrics.csv")
    attackers = (run.manifest().get("attack") or {}).get("nodes", [])
    plots.metrics_plot(metrics, run / "metrics.png", attackers=attackers)
    last = metrics["round"] == cfg.rounds - 1
    bad = np.isin(metrics["node"], np.asarray(attackers, dtype=np.float64))

    def block(rows) -> dict:
        return {k: float(metrics[k][rows].mean()) for k in ("probe_loss", "probe_acc", "consensus_distance")}

    summary = block(last)
    if attackers:               # the honest nodes' numbers are what a robustness study reports
        summary["honest"] = block(last & ~bad)
        summary["attackers"] = block(last & bad)
    plots.wait()                    # every figure is on disk before the run is marked complete
    run.update_manifest(status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        timings={"train_seconds_this_session": round(seconds, 3),
                                 "rounds_this_session": cfg.rounds - start,
                                 "rounds_per_s": round((cfg.rounds - start) / max(seconds, 1e-9), 2)},
                        final=summary)
    point_latest(run.path)
    acc = f"final probe acc {summary['probe_acc']:.3f}"
    if attackers:
        acc += f", honest nodes {summary['honest']['probe_acc']:.3f}"
    print(f"dice train: wrote {run.path} ({acc}, {(cfg.rounds - start) / max(seconds, 1e-9):.1f} rounds/s)")


# --------------------------------------------------------------------------------------------- the loop


class _NoBar:
    """What the loop needs of a tqdm bar when none is shown (tqdm is then not even imported)."""

    def update(self, n: int = 1) -> None:
        pass

    def write(self, s: str) -> None:
        print(s)                    # where tqdm.write puts it: stdout

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, **kw):
    """A tqdm bar on stderr when ``enabled`` and stderr is a terminal (tqdm's ``disable=None`` rule),
    else a stand-in with the same methods."""
    if not (enabled and sys.stderr.isatty()):
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(dynamic_ncols=True, file=sys.stderr, **kw)


def run_rounds(cfg: TrainConfig, run: RunDir, stepper, state: State, every: int, desc: str = "dice train",
               finish: bool = True) -> State:
    """Rounds state.round … T−1 with any stepper; the lead process records metrics, checkpoints and the
    manifest. Checkpoint t holds the state at the START of round t (and Δ^t); the final state is
    checkpoint T. Returns the final state (this process's rows). ``finish=False`` skips the closing
    plot and manifest update (``scripts/bench_train.py`` times the recorded rounds alone)."""
    lead = stepper.lead
    start = state.round
    s = stepper.s
    guard = Guard(stepper.divergence_guard(run, start), s.attack.nodes if s.attack is not None else ())
    log = MetricsLog(run / "metrics.csv", start, attackers=s.attack.nodes if s.attack is not None else (),
                     schedule=getattr(s, "effective", None) or s.schedule, keep=lambda r: evaluated(cfg, r),
                     network=getattr(s, "network", None), elem=torch.finfo(s.dtype).bits // 8) if lead else None
    from .tblog import open_log

    tb = open_log(cfg.logger, run.path, start, s.attack.nodes if s.attack is not None else ()) if lead else None
    log_every = cfg.log_every or max(1, cfg.rounds // 10)
    bar = progress_bar(cfg.progress and lead, total=cfg.rounds, initial=start, desc=desc, unit="round")
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
                if tb is not None:
                    tb.round(rec)
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
            if tb is not None:
                tb.close()
        raise
    finally:
        bar.close()
    if lead and finish:
        finish_run(run, cfg, start, time.perf_counter() - t0)
        if tb is not None:
            tb.figures([run / "metrics.png", run / "topology.png"], cfg.rounds)
            tb.close()
            run.update_manifest()          # list the closed event files with their hashes
    return state


def claim_run(run: RunDir, cfg: TrainConfig, config_dict: dict) -> str:
    """What training into ``run`` means: 'fresh' / 'replace' / 'resume' / 'complete' (see RunDir.check), or
    'extend': the run there differs only in fewer ``rounds`` (``dice_cli.extend``)."""
    from .extend import extension_base

    run.lock()
    try:
        before = extension_base(run, config_dict)
    except UserError:
        if not cfg.overwrite:
            raise
        before = None                       # a shorter run asked with overwrite=true: replace it
    if before is not None:
        run.check({**config_dict, "rounds": before}, False)    # the usual refusals (kind, foreign files)
        check_engine_version(run)
        return "extend"
    mode = run.check(config_dict, cfg.overwrite)
    if mode == "resume":
        check_engine_version(run)
    return mode


def prepare_run(run: RunDir, s: Setup, config_dict: dict, mode: str, every: int, **manifest_extra
                ) -> Optional[dict]:
    """Claim the directory, write the static files of a new run, start the manifest; on resume return the
    checkpoint payload to resume from (None: start at round 0)."""
    cfg = s.cfg
    if mode == "extend":
        from .extend import check_extendable, results_under

        before = int(run.config()["rounds"])
        check_extendable(s, before, run)
        history = list(run.manifest().get("extended") or [])
        run.update_manifest(status="running", rounds=cfg.rounds, extended=history + [
            {"from": before, "to": cfg.rounds, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}])
        write_static(run, s)
        stale = results_under(run)
        print(f"dice train: extending {run.path} from {before} to {cfg.rounds} rounds (only rounds changed: "
              f"training goes on from round {before}, as if it had been a {cfg.rounds}-round run from the start)"
              + (f"; {', '.join(stale)} under it describe the {before}-round run (rerun with overwrite=true)"
                 if stale else ""))
    run.claim(config_dict, mode)
    if mode in ("fresh", "replace") or (mode != "extend" and not run.static_intact(s.plan)):
        write_static(run, s)
    elif s.network is not None and not run.network_intact():
        write_network(run, s)
    payload = None
    r = run.resume_round(cfg.nodes, cfg.rounds, cfg.eval_every) if mode in ("resume", "extend") else None
    if r is not None:
        payload = run.load_checkpoint(r)
        if mode == "resume":
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
    if already_complete("train", out, config_dict, cfg.overwrite):
        point_latest(run.path)
        return run.path
    mode = claim_run(run, cfg, config_dict)
    try:
        # a resumed run keeps the network it recorded (a trace file edited since cannot change it)
        s = build_setup(cfg, network=run.recorded_network() if mode == "resume" else None)
        # every user mistake in data/graph/model/network surfaces here, before any write
    except BaseException:
        run.discard_if_empty()
        raise
    every = checkpoint_every(run, cfg, s.fm.num_params, mode)
    payload = prepare_run(run, s, config_dict, mode, every)
    state = s.init if payload is None else State.from_payload(payload, s.device, s.dtype)
    run_rounds(cfg, run, LocalStepper(s, state, cfg.engine), state, every)
    return run.path
