"""The simulated world of a run, rebuilt deterministically from its config.

``build_setup(cfg)`` turns a ``TrainConfig`` into everything a round needs: the dataset on the device, the
node partition and probe sets, the batch plan [T, n, B], the mixing schedule W^t, the initial state, the
attack and the ``engine.Dynamics`` that advances the state. ``dice train`` builds it to train; every later
command (gt, estimate, detect, value, contrib) rebuilds the *same* world through ``replay.open_replay`` to
re-simulate or differentiate recorded rounds. Nothing here writes files.

    setup = build_setup(TrainConfig(nodes=8), dtype=torch.float64)
    state, delta, losses = setup.dyn.round(setup.init)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .attacks import Attack, build_attack
from .config import TrainConfig
from .defenses import Defense, build_defense
from .data import Dataset, NodeData, batch_plan, load_dataset, split_nodes
from .engine import Dynamics, Mixing, State, configure_numerics
from .errors import UserError
from .graph import MixingSchedule, build_checked_schedule
from .models import FunctionalModel, init_nodes
from .network import NetworkRecord, NetworkRuntime, draw


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when visible, else cpu; ``cuda`` without a GPU is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device='cuda' but no CUDA device is visible to torch; use device=cpu or device=auto")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


@dataclass
class Setup:
    """Everything a recorded run needs to replay rounds: rebuilt identically by every command."""
    cfg: TrainConfig
    device: torch.device
    dtype: torch.dtype
    data: Dataset
    nodes: NodeData
    plan: np.ndarray            # [T, n, B] dataset indices
    schedule: MixingSchedule
    fm: FunctionalModel
    init: State
    dyn: Dynamics
    x_probe: torch.Tensor       # [m, ...] shared or [n, m, ...]
    y_probe: torch.Tensor
    shared_probe: bool
    attack: Optional[Attack] = None   # also dyn.attack; None for attack=none
    defense: Optional[Defense] = None  # also dyn.defense; None for defense=none
    network: Optional[NetworkRecord] = None   # the run's unreliable network (None: a plain network)
    effective: Optional[MixingSchedule] = None  # M^t (churn and drops applied; = schedule without them)


def effective_schedule(base: MixingSchedule, rec: Optional[NetworkRecord]) -> MixingSchedule:
    """The schedule of the effective matrices M^t (NETWORKS.md §1-2); ``base`` itself without churn/drops."""
    if rec is None or not rec.reshapes_mixing:
        return base
    return EffectiveSchedule(base, rec)


class EffectiveSchedule(MixingSchedule):
    """M^t of every round, computed once (``NetworkRecord.effective_all``, checked row-stochastic once) and
    served by ``at(t)`` without per-round work; the same numbers as ``rec.effective(base.at(t), t)``."""

    def __init__(self, base: MixingSchedule, rec: NetworkRecord):
        self.base, self.record = base, rec
        self._all = rec.effective_all(base)
        if (self._all < 0).any() or not np.allclose(self._all.sum(2), 1.0, rtol=0, atol=1e-9):
            raise UserError("the effective mixing matrices are not row-stochastic (a bug: please report it)")
        super().__init__(base.n, lambda t: self._all[t], time_varying=True, name=f"effective {base.name}",
                         rounds=rec.rounds)

    def at(self, t: int) -> np.ndarray:
        return self._all[self._check_round(t)].copy()


def initial_network_state(rec: Optional[NetworkRecord], theta) -> dict:
    """The network part of State.gossip at round 0: ``net.public`` θ̂^0 = 0 [n, P] (compression) and
    ``net.sent`` [D, n, P] = the round-0 value every node is taken to have sent before round 0 (Θ^0, or θ̂^0)."""
    out = {}
    if rec is None:
        return out
    if rec.compressed:
        out["net.public"] = torch.zeros_like(theta)
    if rec.delayed:
        x0 = out["net.public"] if rec.compressed else theta
        out["net.sent"] = x0.detach().unsqueeze(0).expand(rec.max_delay, *x0.shape).clone()
    return out


def build_setup(cfg: TrainConfig, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                schedule: Optional[MixingSchedule] = None, network: Optional[NetworkRecord] = None) -> Setup:
    """Deterministically rebuild data, plan, graph, initial state, attack and dynamics from the config.

    The attack (``attacks.build_attack``) and the defense (``defenses.build_defense``) are part of the
    dynamics, so every replay re-applies them exactly; both get the probe sets they need.
    ``schedule``: a recorded schedule (a run directory's mixing files) instead of one built from the config.
    ``network``: a recorded network (network.npz) instead of drawing it from the config (``network.draw``);
    either way the dynamics mix with its effective matrices.
    """
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
    defense = build_defense(cfg.defense, schedule, cfg.rounds, attack.nodes if attack is not None else ())
    fm, theta, buffers = init_nodes(cfg.model, data.input_shape, data.num_classes, cfg.nodes, cfg.seed,
                                    dtype, device)
    configure_threads(cfg.threads, device, fm.num_params * cfg.nodes)
    if network is None:
        network = draw(cfg.network, cfg.nodes, cfg.rounds, fm.num_params, cfg.seed, schedule)
    effective = effective_schedule(schedule, network)
    x = data.x_train.to(device=device, dtype=dtype)
    y = data.y_train.to(device)
    dyn = Dynamics(fm, x, y, torch.as_tensor(plan, device=device), Mixing(effective, device, dtype),
                   cfg.optim, cfg.lr, cfg.rounds, cfg.model.gossip_buffers, attack=attack, chunk_nodes=cfg.chunk_nodes,
                   defense=defense, network=None if network is None else NetworkRuntime(network, device, dtype))
    if network is not None and network.stateful:
        dyn.network.precompute(effective)
    shared = nodes.probe_split == "test"
    src_x, src_y = (data.x_test, data.y_test) if shared else (data.x_train, data.y_train)
    idx = torch.as_tensor(nodes.probe[0] if shared else nodes.probe)
    x_probe, y_probe = src_x[idx].to(device=device, dtype=dtype), src_y[idx].to(device)
    for part in (attack, defense):
        if part is not None:
            part.set_probe(x_probe, y_probe, shared)
    gossip = defense.init_state(cfg.nodes, dtype, device) if defense is not None else {}
    gossip.update(initial_network_state(network, theta))
    return Setup(cfg, device, dtype, data, nodes, plan, schedule, fm, State(0, theta, buffers, None, gossip), dyn,
                 x_probe, y_probe, shared, attack, defense, network, effective)


# Below this many parameters in all nodes together, extra intra-op threads cannot pay for themselves and,
# on a machine shared with other work, their spin-waiting collapses throughput (measured on 2 cores with
# one other busy process: default digits run 332 rounds/s with 1 thread, 7.7 with 2).
SMALL_PROBLEM_PARAMS = 10_000_000
_TORCH_DEFAULT_THREADS = torch.get_num_threads()


def configure_threads(threads: int, device: torch.device, total_params: int) -> int:
    """Set torch's CPU intra-op threads: ``threads`` if > 0; auto (0): 1 for small problems on CPU, else
    torch's default. numpy's BLAS follows when torch gets one thread (the same spin-waiting hits it: the
    spectral gap of a 1,024-node ring, describe() in every dice train, took 9.9 s with OpenBLAS's two
    threads next to other work and 0.15 s with one). Returns the count in use."""
    small = device.type == "cpu" and total_params <= SMALL_PROBLEM_PARAMS
    # numpy first: restoring threadpoolctl's limits also resets the OpenMP pool torch uses
    _limit_numpy_blas(threads == 1 or (threads == 0 and small))
    if threads > 0:
        torch.set_num_threads(threads)
    elif small:
        torch.set_num_threads(1)
    else:  # a sweep's earlier small job may have lowered it in this process
        torch.set_num_threads(_TORCH_DEFAULT_THREADS)
    return torch.get_num_threads()


_blas_limit = []     # the active threadpoolctl limit (at most one), restored when a later job needs more


def _limit_numpy_blas(one: bool) -> None:
    """numpy's BLAS to one thread (``one``) or back to its default, through threadpoolctl when present."""
    if one and not _blas_limit:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:           # not installed: leave numpy's BLAS as it is
            return
        _blas_limit.append(threadpool_limits(limits=1, user_api="blas"))
    elif not one and _blas_limit:
        _blas_limit.pop().restore_original_limits()
