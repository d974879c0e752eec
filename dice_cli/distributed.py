"""``engine=distributed``: the same decentralized SGD, spread over processes with ``torch.distributed``.

Each rank (process) owns a contiguous block of the simulated nodes and runs their local step vectorised,
with ``engine.Dynamics`` restricted to its block (the plan rows of its nodes; attacks keep selecting by the
global node id). Gossip moves only what W^t couples: for round t every rank derives from W^t's sparsity
which rows θ_l^{t+½} its receivers need from which rank and which of its own rows the others need, swaps
exactly those rows point to point (``batch_isend_irecv``), and forms its receivers' rows

    Θ^{t+1}[block] = W^t[block, senders] · Θ^{t+½}[senders]

(the float BatchNorm buffers ride along when ``model.gossip_buffers``). The plan is recomputed every round
for time-varying W^t and once for a static W. Only the order of the additions differs from the
single-process engine, so float64 runs agree with ``engine=vmap`` to round-off (the tests: 1e-10).

Launch (torchrun or SLURM; world size 1 without a launcher also works)::

    torchrun --nproc_per_node=4 -m dice_cli.cli train engine=distributed out=outputs/d4
    dice train -m hydra/launcher=slurm hydra.launcher.tasks_per_node=4 engine=distributed ...

The rank layout comes from RANK / WORLD_SIZE / LOCAL_RANK (torchrun) or SLURM_PROCID / SLURM_NTASKS /
SLURM_LOCALID (srun, hydra-submitit-launcher), the rendezvous from MASTER_ADDR / MASTER_PORT (derived from
the SLURM job when unset). Backend: gloo on CPU; on GPU NCCL for tensors (one rank per GPU, cuda:LOCAL_RANK)
with gloo for the small control messages.

One run directory: rank 0 decides it (``out=`` or its own Hydra directory) and broadcasts it, checks and
claims it, writes the static files, the manifest and metrics.csv, and at checkpoint rounds gathers Θ,
buffers, momentum and Δ from every rank into exactly the checkpoint ``engine=vmap`` writes, so
``dice gt / estimate / detect`` read the run whatever engine wrote it. Only rank 0 touches the directory:
on resume it reads the last checkpoint and scatters each rank its block (the rank count may differ from
the interrupted session's).

Every check that can stop a run is collective (a decision taken on rank 0 and broadcast, or an outcome
gathered from all ranks), so all ranks stop together; rank 0 alone prints the message and every rank exits
with code 2.
"""
from __future__ import annotations

import copy
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .attacks import Attack
from .config import TrainConfig
from .engine import Dynamics, State
from .errors import USAGE_EXIT_CODE, UserError
from .lock import scoped

# ---------------------------------------------------------------------------------------------------------
# ranks and the process group


def _env_int(*names: str) -> Optional[int]:
    for name in names:
        v = os.environ.get(name)
        if v not in (None, ""):
            return int(v)
    return None


def rank_layout() -> Tuple[int, int, int, str]:
    """(rank, world size, local rank, source) from torchrun's or SLURM's environment; (0, 1, 0, 'none')."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return (_env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0,
                "torchrun")
    ntasks = _env_int("SLURM_NTASKS", "SLURM_NPROCS")
    if ntasks is not None and ntasks > 1 and "SLURM_PROCID" in os.environ:
        return _env_int("SLURM_PROCID"), ntasks, _env_int("SLURM_LOCALID") or 0, "slurm"
    return 0, 1, 0, "none"


def first_host(nodelist: str) -> Optional[str]:
    """The first host of a SLURM node list: 'gpu[07-08,11],cpu01' -> 'gpu07'."""
    m = re.match(r"\s*([^\[,\s]+)(?:\[([^\]]+)\])?", nodelist or "")
    if not m:
        return None
    if not m.group(2):
        return m.group(1)
    return m.group(1) + re.split(r"[-,]", m.group(2))[0]


def _slurm_rendezvous() -> None:
    """MASTER_ADDR / MASTER_PORT for a SLURM job when the launcher did not set them: the job's first host
    (submitit's view of the job, else ``scontrol show hostnames``, else the node list itself) and a port
    derived from the job id, so every task of the job computes the same pair."""
    if "MASTER_ADDR" not in os.environ:
        host = None
        nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST") or ""
        if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            try:
                import submitit

                host = submitit.JobEnvironment().hostnames[0]
            except Exception:
                host = None
        if host is None and nodelist:
            try:
                out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                     text=True, timeout=30).stdout.split()
                host = out[0] if out else None
            except (OSError, subprocess.SubprocessError):
                host = None
        host = host or first_host(nodelist)
        if host is None:
            raise UserError("engine=distributed under SLURM could not find the job's first host; "
                            "export MASTER_ADDR (and MASTER_PORT) before launching")
        os.environ["MASTER_ADDR"] = host
    if "MASTER_PORT" not in os.environ:
        job = _env_int("SLURM_JOB_ID", "SLURM_JOBID") or 0
        os.environ["MASTER_PORT"] = str(20000 + job % 40000)


@dataclass
class Comm:
    """This rank's place in the group, and the few communication patterns the engine uses.

    World size 1 needs no process group: every operation is then local.
    """
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str
    owns_group: bool = False

    @property
    def active(self) -> bool:
        return self.world > 1

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

    # ---- control messages (Python objects) ----------------------------------------------------------------
    def broadcast_obj(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_obj(self, obj: Any) -> List[Any]:
        if not self.active:
            return [obj]
        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def scatter_obj(self, objs: Optional[List[Any]]) -> Any:
        """objs[r] (given on rank 0) to rank r."""
        if not self.active:
            return objs[0]
        box: List[Any] = [None]
        dist.scatter_object_list(box, objs if self.rank == 0 else None, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    # ---- tensors ----------------------------------------------------------------------------------------
    def all_gather(self, t: Tensor) -> List[Tensor]:
        if not self.active:
            return [t]
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t.contiguous())
        return out

    def gather0(self, t: Tensor) -> Optional[List[Tensor]]:
        """Every rank's ``t`` (same shape) on rank 0; None elsewhere."""
        if not self.active:
            return [t]
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(t, out, dst=0)
        return out

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        if self.active:
            t = t.contiguous()
            dist.all_reduce(t)
        return t

    def exchange(self, sends: Dict[int, Tensor], recvs: Dict[int, Tensor]) -> None:
        """Point-to-point: send sends[q] to rank q and fill recvs[q] from rank q, all at once."""
        ops = [dist.P2POp(dist.isend, t.contiguous(), q) for q, t in sorted(sends.items())]
        ops += [dist.P2POp(dist.irecv, t, q) for q, t in sorted(recvs.items())]
        if not ops:
            return
        for req in dist.batch_isend_irecv(ops):
            req.wait()


def connect(cfg: TrainConfig) -> Comm:
    """Join (or create) the process group for this rank. The device is chosen later (``place``), so
    that every check that can fail is taken by all ranks together."""
    from .simulation import resolve_device

    rank, world, local, source = rank_layout()
    cuda = resolve_device(cfg.device).type == "cuda"
    # NCCL moves the tensors between GPUs; gloo carries the control messages (objects on the CPU)
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    if dist.is_initialized():          # a caller (a test, a notebook) already made the group
        return Comm(dist.get_rank(), dist.get_world_size(), local, torch.device("cpu"), backend, False)
    if world > 1:
        if source == "slurm":
            _slurm_rendezvous()
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timedelta(minutes=30))
    return Comm(rank, world, local, torch.device("cpu"), backend, world > 1)


def place(comm: Comm, cfg: TrainConfig) -> None:
    """Check the rank layout and give this rank its device: UserError on every rank alike for more
    ranks than nodes, a LOCAL_RANK without a GPU, or two ranks on one GPU."""
    from .simulation import resolve_device

    if comm.world > cfg.nodes:
        raise UserError(f"engine=distributed was started with {comm.world} ranks but the run has only nodes="
                        f"{cfg.nodes}; every rank needs at least one node: start at most {cfg.nodes} ranks "
                        f"(torchrun --nproc_per_node / SLURM tasks), or raise nodes")
    if resolve_device(cfg.device).type != "cuda":
        comm.device = torch.device("cpu")
        return

    def pick() -> Tuple[str, str]:
        count = torch.cuda.device_count()
        # one GPU visible per task (SLURM's --gpus-per-task binding) -> cuda:0, else cuda:LOCAL_RANK
        index = 0 if count == 1 else comm.local_rank
        if index >= count:
            raise UserError(f"rank {comm.rank} has LOCAL_RANK={comm.local_rank} but its host shows only {count} "
                            f"GPU(s): start one rank per GPU (torchrun --nproc_per_node={count}, or SLURM "
                            f"tasks_per_node={count}), or use device=cpu (gloo)")
        comm.device = torch.device("cuda", index)
        torch.cuda.set_device(comm.device)
        return socket.gethostname(), str(getattr(torch.cuda.get_device_properties(index), "uuid", index))

    key = _everyone(comm, pick)
    seen: Dict[Tuple[str, str], int] = {}
    for r, k in enumerate(comm.all_gather_obj(key)):
        if k in seen:
            raise UserError(f"ranks {seen[k]} and {r} share GPU {k[1]} on host {k[0]}: NCCL needs one rank "
                            f"per GPU. Start at most as many ranks per host as it has GPUs (torchrun "
                            f"--nproc_per_node, SLURM tasks_per_node = gpus_per_node), and do not pin several "
                            f"tasks to one GPU with CUDA_VISIBLE_DEVICES")
        seen[k] = r


# ---------------------------------------------------------------------------------------------------------
# blocks of nodes and the gossip plan


def block_bounds(n: int, world: int) -> List[int]:
    """Rank r owns nodes bounds[r] … bounds[r+1]−1: contiguous, sizes differing by at most one."""
    return [(n * r) // world for r in range(world + 1)]


@dataclass
class GossipPlan:
    """Who needs which rows under one W: for ``rank`` with nodes [lo, hi).

    cols: the senders of this block's receivers (sorted global ids); weights: W[lo:hi, cols];
    recv[q]: global ids this rank receives from rank q; send[q]: local rows it sends to rank q;
    own: local rows of its own that its receivers use.
    """
    cols: np.ndarray
    weights: np.ndarray
    recv: Dict[int, np.ndarray] = field(default_factory=dict)
    send: Dict[int, np.ndarray] = field(default_factory=dict)
    own: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @staticmethod
    def build(W: np.ndarray, bounds: Sequence[int], rank: int) -> "GossipPlan":
        lo, hi = bounds[rank], bounds[rank + 1]
        rows = W[lo:hi]
        cols = np.flatnonzero((rows != 0).any(axis=0))
        plan = GossipPlan(cols, rows[:, cols])
        for q in range(len(bounds) - 1):
            qlo, qhi = bounds[q], bounds[q + 1]
            mine = cols[(cols >= qlo) & (cols < qhi)]
            if q == rank:
                plan.own = mine - lo
                continue
            if len(mine):
                plan.recv[q] = mine
            need = np.flatnonzero((W[qlo:qhi, lo:hi] != 0).any(axis=0))
            if len(need):
                plan.send[q] = need
        return plan


class BlockGossip:
    """Θ^{t+1}[block] = W^t[block, :] Θ^{t+½} with only the coupled rows crossing ranks."""

    def __init__(self, comm: Comm, schedule, bounds: Sequence[int], dtype: torch.dtype):
        self.comm, self.schedule, self.bounds, self.dtype = comm, schedule, list(bounds), dtype
        self._plan: Optional[Tuple[int, GossipPlan, Tensor, Dict[int, Tensor], Tensor]] = None
        self.rows_moved = 0

    def _plan_at(self, t: int):
        key = t if self.schedule.time_varying else 0
        if self._plan is None or self._plan[0] != key:
            plan = GossipPlan.build(self.schedule.at(t), self.bounds, self.comm.rank)
            dev = self.comm.device
            weights = torch.as_tensor(plan.weights, dtype=self.dtype, device=dev)
            send = {q: torch.as_tensor(v, dtype=torch.long, device=dev) for q, v in plan.send.items()}
            b = self.bounds[self.comm.rank + 1] - self.bounds[self.comm.rank]
            # None: the block's own rows are used whole and in order (no copy needed)
            own = None if np.array_equal(plan.own, np.arange(b)) else torch.as_tensor(plan.own, dtype=torch.long,
                                                                                         device=dev)
            self._plan = (key, plan, weights, send, own)
        return self._plan[1:]

    def mix(self, t: int, z: Tensor) -> Tensor:
        """z: this block's rows [b, F] (θ^{t+½} and gossiped buffers, flattened). Returns W^t[block] z_all."""
        plan, weights, send, own = self._plan_at(t)
        sends = {q: z.index_select(0, idx) for q, idx in send.items()}
        recvs = {q: torch.empty((len(ids), z.shape[1]), dtype=z.dtype, device=z.device)
                 for q, ids in plan.recv.items()}
        self.comm.exchange(sends, recvs)
        self.rows_moved += sum(len(v) for v in plan.recv.values())
        parts = []
        for q in range(self.comm.world):   # blocks are contiguous and in rank order: cols stay sorted
            if q == self.comm.rank:
                if own is None:
                    parts.append(z)
                elif len(own):
                    parts.append(z.index_select(0, own))
            elif q in recvs:
                parts.append(recvs[q])
        return weights @ (parts[0] if len(parts) == 1 else torch.cat(parts, dim=0))


# ---------------------------------------------------------------------------------------------------------
# the block view of the dynamics


class _BlockAttack(Attack):
    """An attack seen from one block: attackers are the block's (global ids, so every per-node random
    stream is the same as in the single-process engine), rows are their positions inside the block."""

    def __init__(self, attack: Attack, lo: int, hi: int):  # super().__init__ not called: a view
        self.__dict__.update(copy.copy(attack.__dict__))
        self.nodes = [k for k in attack.nodes if lo <= k < hi]
        self.offset = lo
        self._rows, self._dev, self._noise = {}, {}, {}

    def rows(self, device: torch.device) -> Tensor:
        r = self._rows.get(device)
        if r is None:
            r = self._rows[device] = torch.as_tensor([k - self.offset for k in self.nodes], dtype=torch.long,
                                                     device=device)
        return r


def block_dynamics(dyn: Dynamics, lo: int, hi: int, device: torch.device) -> Dynamics:
    """``dyn`` restricted to nodes [lo, hi) on ``device``: their plan rows, the whole data set, the block's
    view of the attack (None when the block holds no attacker: its nodes behave honestly)."""
    attack = dyn.attack
    if attack is not None:
        attack = _BlockAttack(attack, lo, hi) if any(lo <= k < hi for k in attack.nodes) else None
    extra = {"chunk_nodes": dyn.chunk_nodes} if getattr(dyn, "chunk_nodes", 0) else {}
    dt = dyn.x.dtype
    return Dynamics(dyn.fm, dyn.x.to(device=device, dtype=dt), dyn.y.to(device), dyn.plan[:, lo:hi].to(device),
                    dyn.mixing, dyn.optim, dyn.base_lr, dyn.rounds, dyn.gossip_buffers, attack=attack, **extra)


def _block_state(payload: dict, lo: int, hi: int) -> dict:
    """The rows [lo, hi) of a checkpoint payload (CPU tensors)."""
    return {"round": payload["round"], "theta": payload["theta"][lo:hi].clone(),
            "buffers": {k: v[lo:hi].clone() for k, v in payload["buffers"].items()},
            "momentum": None if payload["momentum"] is None else payload["momentum"][lo:hi].clone()}


class _Packer:
    """Rows of several [b, ...] tensors side by side in one [b, F] tensor of one dtype, and back."""

    def __init__(self, like: Dict[str, Tensor]):
        self.spec = [(k, tuple(v.shape[1:]), v.dtype, int(np.prod(v.shape[1:], dtype=np.int64)))
                     for k, v in like.items()]

    def pack(self, tensors: Dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        cols = [tensors[k].reshape(tensors[k].shape[0], -1).to(dtype) for k, _, _, _ in self.spec]
        return torch.cat(cols, dim=1)

    def unpack(self, z: Tensor) -> Dict[str, Tensor]:
        out, o = {}, 0
        for k, shape, dt, size in self.spec:
            out[k] = z[:, o:o + size].reshape(z.shape[0], *shape).to(dt)
            o += size
        return out


# ---------------------------------------------------------------------------------------------------------
# collective decisions


def _rank0(comm: Comm, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only; its result, or its UserError, reaches every rank."""
    if not comm.active:
        return fn()
    outcome: Tuple[str, Any] = ("ok", None)
    if comm.rank == 0:
        try:
            outcome = ("ok", fn())
        except UserError as e:
            outcome = ("error", str(e))
            comm.broadcast_obj(outcome)
            raise
        except BaseException as e:
            comm.broadcast_obj(("bug", f"{type(e).__name__}: {e}"))
            raise
    outcome = comm.broadcast_obj(outcome)
    if outcome[0] == "error":
        raise UserError(outcome[1])
    if outcome[0] == "bug":
        raise RuntimeError(f"rank 0 failed: {outcome[1]}")
    return outcome[1]


def _everyone(comm: Comm, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on every rank; if any rank raised a UserError, every rank raises the first one."""
    try:
        result, err = fn(), None
    except UserError as e:
        result, err = None, str(e)
    errors = comm.all_gather_obj(err)
    for r, e in enumerate(errors):
        if e is not None:
            raise UserError(e if r == comm.rank or r == 0 else f"(rank {r}) {e}")
    return result


# ---------------------------------------------------------------------------------------------------------
# training: this rank's stepper in the one training loop (training.run_rounds)


class BlockStepper:
    """One rank's block of nodes [lo, hi): the vectorised local step, the block gossip, and the collectives
    that give every rank every node's round numbers (so the guard stops all ranks alike) and rank 0 the
    full checkpoint payload (exactly what engine=vmap writes)."""

    def __init__(self, comm: Comm, s, dyn: Dynamics, gossip: "BlockGossip", bounds: List[int], xp: Tensor,
                 yp: Tensor, float_bufs: List[str]):
        self.comm, self.s, self.dyn, self.gossip, self.bounds = comm, s, dyn, gossip, bounds
        self.lo, self.hi = bounds[comm.rank], bounds[comm.rank + 1]
        self.sizes = [bounds[r + 1] - bounds[r] for r in range(comm.world)]
        self.bmax = max(self.sizes)
        self.xp, self.yp, self.float_bufs = xp, yp, float_bufs
        self.lead = comm.rank == 0

    def divergence_guard(self, run, start: int):
        """Rank 0 reads/records the round-0 reference; every rank gets it, so all stop at the same round."""
        from .divergence import divergence_guard

        guard = divergence_guard(run, self.s, start, write=self.lead, read=self.lead)
        guard.loss0 = self.comm.broadcast_obj(guard.loss0)
        return guard

    def step(self, state: State) -> Tuple[State, Tensor, Tensor]:
        t = state.round
        delta, mom, bufs, losses = self.dyn.local_step(state)
        half = state.theta + delta
        if self.float_bufs:
            packer = _Packer({"theta": half, **{k: bufs[k] for k in self.float_bufs}})
            mixed = packer.unpack(self.gossip.mix(t, packer.pack({"theta": half, **bufs}, half.dtype)))
            theta = mixed.pop("theta")
            bufs = {**bufs, **mixed}
        else:
            theta = self.gossip.mix(t, half)
        return State(t + 1, theta, bufs, mom), delta, losses

    def record(self, t: int, losses: Tensor, state: State, evaluate: bool):
        """One gathered row per rank: batch losses, parameter norms and (eval rounds) probe metrics."""
        from .training import RoundRecord

        b, bmax, n = self.hi - self.lo, self.bmax, self.s.cfg.nodes
        cols = 5 if evaluate else 2
        row = torch.zeros(cols * bmax, dtype=state.theta.dtype, device=state.theta.device)
        with torch.no_grad():
            row[:b] = losses.detach()
            row[bmax:bmax + b] = torch.linalg.vector_norm(state.theta, dim=-1)
            if evaluate:
                pl, pa = self.dyn.probe_losses(state.theta, state.buffers, self.xp, self.yp, self.s.shared_probe)
                mean = self.comm.all_reduce_sum(state.theta.sum(0)) / n
                cd = ((state.theta - mean) ** 2).sum(-1)
                row[2 * bmax:2 * bmax + b], row[3 * bmax:3 * bmax + b], row[4 * bmax:4 * bmax + b] = pl, pa, cd
        rows = [r.cpu().numpy() for r in self.comm.all_gather(row)]

        def column(j: int) -> np.ndarray:
            return np.concatenate([r[j * bmax:j * bmax + m] for r, m in zip(rows, self.sizes)])

        rec = RoundRecord(t, self.dyn.lr(t), column(0), column(1))
        if evaluate:
            rec.probe_loss, rec.probe_acc, rec.consensus = column(2), column(3), column(4)
        return rec

    def payload(self, state: State, delta: Optional[Tensor]) -> Optional[dict]:
        """Rank 0 gets the checkpoint payload engine=vmap would write, from every rank's rows; None elsewhere."""
        parts: Dict[str, Tensor] = {"theta": state.theta}
        if state.momentum is not None:
            parts["momentum"] = state.momentum
        if delta is not None:
            parts["delta"] = delta
        for k, v in state.buffers.items():
            parts["buffer:" + k] = v
        packer = _Packer(parts)
        z = packer.pack(parts, state.theta.dtype)
        if z.shape[0] < self.bmax:
            z = torch.cat([z, z.new_zeros(self.bmax - z.shape[0], z.shape[1])])
        got = self.comm.gather0(z)
        if got is None:
            return None
        full = packer.unpack(torch.cat([g[:m] for g, m in zip(got, self.sizes)]).cpu())
        payload = {"round": state.round, "theta": full["theta"],
                   "buffers": {k[len("buffer:"):]: v for k, v in full.items() if k.startswith("buffer:")},
                   "momentum": full.get("momentum")}
        if delta is not None:
            payload["delta"] = full["delta"]
        return payload


@scoped
def train_distributed(cfg: TrainConfig, out: Path, config_dict: dict) -> Path:
    """``dice train engine=distributed``: this rank's share of the run; rank 0 writes ``out``."""
    comm = connect(cfg)
    try:
        place(comm, cfg)
        return _train(comm, cfg, Path(out), dict(config_dict))
    except UserError as e:
        if not comm.active:
            raise                       # one process: the dice dispatcher prints it and exits 2
        if comm.rank == 0:
            print(f"dice train: error: {e}", file=sys.stderr, flush=True)
        _discard_job_dir()
        comm.barrier()                  # nobody leaves before rank 0 has printed: the launcher stops the
        comm.close()                    # other workers as soon as one exits
        raise SystemExit(USAGE_EXIT_CODE)
    finally:
        comm.close()


def _discard_job_dir() -> None:
    try:
        from .commands import _discard_empty_job_dir

        _discard_empty_job_dir()
    except Exception:
        pass


def _train(comm: Comm, cfg: TrainConfig, out: Path, config_dict: dict) -> Path:
    from .run import RunDir, point_latest
    from .simulation import build_setup, resolve_dtype
    from .training import checkpoint_every, claim_run, prepare_run, run_rounds

    lead = comm.rank == 0
    # one directory for all ranks: rank 0's (timestamps in Hydra's default directory may differ)
    chosen = Path(comm.broadcast_obj(str(out)))
    if chosen != out:
        RunDir(out).discard_if_empty()
    out = chosen
    config_dict["out"] = str(out)
    run = RunDir(out, "train")
    mode = _rank0(comm, lambda: claim_run(run, cfg, config_dict))
    if mode == "complete":
        if lead:
            print(f"dice train: {out} is already complete with this config; nothing to do.")
            point_latest(run.path)
        return run.path

    def setup():
        return build_setup(cfg, device=torch.device("cpu"), dtype=resolve_dtype(cfg.dtype))

    try:
        s = _everyone(comm, setup)   # every user mistake in data/graph/model surfaces here, before any write
    except BaseException:
        if lead:
            run.discard_if_empty()
        raise
    n, dtype, device = cfg.nodes, s.dtype, comm.device
    bounds = block_bounds(n, comm.world)
    lo, hi = bounds[comm.rank], bounds[comm.rank + 1]
    every = checkpoint_every(run, cfg, s.fm.num_params, mode)
    held: Dict[str, Any] = {}

    def prepare():
        held["payload"] = prepare_run(run, s, config_dict, mode, every, device=str(device), distributed={
            "world_size": comm.world, "backend": comm.backend if comm.active else "none",
            "blocks": [[bounds[q], bounds[q + 1]] for q in range(comm.world)]})
        return held["payload"] is not None

    if _rank0(comm, prepare):   # resume: rank 0 reads the checkpoint and hands every rank its rows
        blocks = None
        if lead:
            blocks = [_block_state(held["payload"], bounds[q], bounds[q + 1]) for q in range(comm.world)]
        state = State.from_payload(comm.scatter_obj(blocks), device, dtype)
    else:
        init = s.init
        state = State(init.round, init.theta[lo:hi].to(device),
                      {k: v[lo:hi].to(device) for k, v in init.buffers.items()}, None)
    held.clear()
    dyn = block_dynamics(s.dyn, lo, hi, device)
    gossip = BlockGossip(comm, s.schedule, bounds, dtype)
    xp, yp = s.x_probe.to(device), s.y_probe.to(device)
    if not s.shared_probe:
        xp, yp = xp[lo:hi], yp[lo:hi]
    float_bufs = [k for k, v in state.buffers.items() if v.is_floating_point()] if dyn.gossip_buffers else []
    stepper = BlockStepper(comm, s, dyn, gossip, bounds, xp, yp, float_bufs)
    run_rounds(cfg, run, stepper, state, every, desc=f"dice train ({comm.world} ranks)")
    if lead:
        run.update_manifest(distributed={**run.manifest().get("distributed", {}),
                                         "gossip_rows_received_rank0": gossip.rows_moved})
    comm.barrier()    # the run is complete on disk before any rank returns
    return run.path
