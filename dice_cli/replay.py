"""The one contract every analysis uses: open a recorded run, get its state at any round, roll rounds out.

``open_replay(path)`` opens a finished ``dice train`` run, rebuilds its world (``simulation.build_setup``)
in the analysis dtype with the *recorded* mixing schedule and network draws (network.npz, never redrawn), and checks that the batch plan rebuilt from the
config equals the recorded ``plan.npy``. Then

- ``state_at(t)``: the state at the START of round t (0 <= t <= T): the nearest checkpoint at or before t,
  then exact replay of the rounds in between with the run's own ``Dynamics`` (deterministic, so the state
  is the one training had; bit-identical when dtype and device match the run's);
- ``rollout(state, until, weights=..., online=...)``: advance ``state`` to round ``until`` with given loss
  weights per round (w [.., n, B]; a leading copies axis [C, n, B] advances C counterfactual systems at
  once, as ``dice gt`` and ``dice value`` do) and optionally given node availability (a [.., n]: 0 = the
  node has left that round, ``Dynamics.round``), optionally keeping the autograd graph;
- ``tape(a, e)`` / ``StateTape``: the states of rounds a … e−1 served in any order (reverse sweeps), with
  memory bounded by keeping every k-th state and replaying a segment on demand;
- ``q(kind)``: the node weights q_k; ``probe``: the probe sets; ``probe_losses(state)``.

gt, estimate, detect and value import this module, never ``training``.

    rp = open_replay("outputs/latest", dtype="float64")
    s40 = rp.state_at(40)
    s50 = rp.rollout(s40, 50)
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .config import TrainConfig, to_dataclass
from .engine import State
from .errors import UserError
from .graph import MixingSchedule
from .run import RunDir, open_run
from .simulation import Setup, build_setup, resolve_device, resolve_dtype

WeightsFn = Callable[[int], Optional[Tensor]]
OnlineFn = Callable[[int], Optional[Tensor]]

# Memory a StateTape may spend on stored states before it switches to √L checkpointing.
TAPE_BUDGET_MB = 1024.0


@dataclass
class Replay:
    """A recorded run opened for analysis: its directory, its config and its rebuilt world."""
    run: RunDir
    cfg: TrainConfig
    setup: Setup

    # ---- shorthands -----------------------------------------------------------------------------------
    @property
    def dyn(self):
        return self.setup.dyn

    @property
    def n(self) -> int:
        return self.cfg.nodes

    @property
    def rounds(self) -> int:
        return self.cfg.rounds

    @property
    def probe(self) -> Tuple[Tensor, Tensor, bool]:
        """(x_probe [m, ...] or [n, m, ...], y_probe, shared)."""
        s = self.setup
        return s.x_probe, s.y_probe, s.shared_probe

    def heldout(self) -> Tuple[Tensor, Tensor, bool]:
        """(x, y, True): the test samples no node's probe set holds, shared by every node (a shared probe
        takes test[:probe.size], so test[probe.size:]; per-node probes come from the train split, so the whole
        test set). The nodes never train or measure on it: value measured there cannot be gamed by
        training on the probe set (docs/contributions.md)."""
        s = self.setup
        used = np.unique(s.nodes.probe) if s.nodes.probe_split == "test" else np.zeros(0, dtype=np.int64)
        keep = np.setdiff1d(np.arange(len(s.data.y_test)), used)
        if not len(keep):
            raise UserError(f"eval=heldout needs test samples that no probe set holds, but the run's shared probe "
                            f"(probe.size={self.cfg.probe.size}) uses all {len(s.data.y_test)} test samples. Use "
                            f"eval=probe, or train with a smaller probe.size")
        idx = torch.as_tensor(keep)
        return s.data.x_test[idx].to(device=s.device, dtype=s.dtype), s.data.y_test[idx].to(s.device), True

    def evaluation(self, kind: str = "probe") -> Tuple[Tensor, Tensor, bool]:
        """The losses' data: ``probe`` (the run's probe sets) or ``heldout`` (``heldout()``)."""
        return self.heldout() if kind == "heldout" else self.probe

    def probe_losses(self, state: State) -> Tensor:
        """L_k(θ_k) for every node (eval mode): [.., n]."""
        return self.dyn.probe_losses(state.theta, state.buffers, *self.probe)[0]

    def q(self, kind: str) -> Tensor:
        """q [n]: ``one`` (q_k = 1), ``uniform`` (1/n) or ``data`` (|D_k| / Σ_l |D_l|)."""
        return node_weights(kind, self.setup)

    # ---- states ---------------------------------------------------------------------------------------
    def state_at(self, t: int) -> State:
        """State at the start of round ``t`` (0 <= t <= T), in the replay's dtype and device, detached."""
        T = int(self.rounds)
        given = t
        try:
            t = int(t) if int(t) == t else None
        except (TypeError, ValueError):
            t = None
        if t is None or not 0 <= t <= T:
            raise UserError(f"round t={given!r} is outside the run: valid rounds are 0..{T} (state at the start "
                            f"of round t; {T} is the final state)")
        have = self.run.checkpoint_rounds()
        earlier = [r for r in have if r <= t]
        if not earlier:
            raise UserError(f"no checkpoint at or before round {t} in {self.run.path}: checkpoints exist for "
                            f"rounds {have if have else 'none'}; valid rounds are {have[0] if have else '-'}..{T}")
        r = earlier[-1]
        state = State.from_payload(self.run.load_checkpoint(r), self.setup.device, self.setup.dtype)
        if state.round != r:
            raise UserError(f"checkpoint {self.run.checkpoint_path(r)} says round {state.round}, not {r}; "
                            f"the run directory is inconsistent (re-run dice train)")
        with torch.no_grad():
            state = self.rollout(state, t)
        return state.detached()

    def rollout(self, state: State, until: int, weights: Optional[WeightsFn] = None,
                create_graph: bool = False, online: Optional[OnlineFn] = None) -> State:
        """Advance ``state`` round by round to the start of round ``until``.

        weights(t) -> w [.., n, B] for round t (or None = all ones); w's leading axes must match θ's
        (a copies axis [C, n, P] takes w [C, n, B]). online(t) -> a [.., n] (or None = everyone takes
        part): nodes with a_k = 0 have left for round t (``Dynamics.round``). With ``create_graph`` the
        rounds stay differentiable (curvature, momentum and attacks included).
        """
        return rollout(self.dyn, state, until, weights, create_graph, online)

    def tape(self, a: int, end: int, budget_mb: float = TAPE_BUDGET_MB) -> "StateTape":
        """The factual states of rounds a … end−1 (and the final state at ``end``), replayed from round a
        in the replay's dtype, served in any order (``StateTape``)."""
        return StateTape(self.dyn, self.state_at(a), end, budget_mb)


def rollout(dyn, state: State, until: int, weights: Optional[WeightsFn] = None, create_graph: bool = False,
            online: Optional[OnlineFn] = None) -> State:
    """``Replay.rollout`` for any ``Dynamics`` (also without a run directory, e.g. in tests)."""
    if until < state.round or until > dyn.rounds:
        raise ValueError(f"rollout to round {until} from round {state.round}: needs "
                         f"{state.round} <= until <= {dyn.rounds}")
    while state.round < until:
        w = None if weights is None else weights(state.round)
        if online is None:
            state, _, _ = dyn.round(state, w, create_graph=create_graph)
        else:
            state, _, _ = dyn.round(state, w, create_graph=create_graph, online=online(state.round))
    return state


def state_bytes(state: State) -> int:
    """Bytes held by a state's tensors (Θ, momentum, buffers)."""
    ts = [state.theta] + ([state.momentum] if state.momentum is not None else []) + list(state.buffers.values())
    return sum(t.numel() * t.element_size() for t in ts)


class StateTape:
    """The factual states s^t, t = a … end−1, of a trajectory started at ``start`` (round a), in any order.

    One forward replay from ``start`` (``Dynamics.round``, no graph) fills the tape. When all L = end − a
    states fit ``budget_mb`` they are all kept; otherwise every k-th state (k = ⌈√L⌉) is kept and ``get(t)``
    replays t's segment of k rounds from its stored state once, caching that segment, so a reverse sweep
    (descending t) costs one extra forward pass and holds about 2√L states instead of L. The replayed
    states are bit-identical to the first pass (same operations, same inputs). ``final`` is s^end.

    ``on_state(t, s)`` (optional) sees every state of the first pass in order, t = a … end.
    """

    def __init__(self, dyn, start: State, end: int, budget_mb: float = TAPE_BUDGET_MB,
                 on_state: Optional[Callable[[int, State], None]] = None):
        self.dyn, self.start, self.end = dyn, int(start.round), int(end)
        if not self.start <= self.end <= dyn.rounds:
            raise ValueError(f"tape from round {self.start} to {end}: needs {self.start} <= end <= {dyn.rounds}")
        L = self.end - self.start
        per = state_bytes(start)
        self.stride = 1 if L * per <= budget_mb * 2**20 else max(1, math.ceil(math.sqrt(L)))
        self._kept: Dict[int, State] = {}
        self._segment: Dict[int, State] = {}
        self._segment_base: Optional[int] = None
        s = start.detached()
        with torch.no_grad():
            for t in range(self.start, self.end):
                if (t - self.start) % self.stride == 0:
                    self._kept[t] = s
                if on_state is not None:
                    on_state(t, s)
                s, _, _ = dyn.round(s)
        if on_state is not None:
            on_state(self.end, s)
        self.final = s
        self.replayed_rounds = 0

    def get(self, t: int) -> State:
        """s^t for start <= t <= end."""
        if t == self.end:
            return self.final
        if not self.start <= t < self.end:
            raise ValueError(f"round {t} is not on the tape ({self.start}..{self.end})")
        if t in self._kept:
            return self._kept[t]
        base = self.start + (t - self.start) // self.stride * self.stride
        if self._segment_base != base:
            self._segment = {}
            s = self._kept[base]
            with torch.no_grad():
                for r in range(base, min(base + self.stride, self.end)):
                    self._segment[r] = s
                    if r + 1 < min(base + self.stride, self.end):
                        s, _, _ = self.dyn.round(s)
                        self.replayed_rounds += 1
            self._segment_base = base
        return self._segment[t]


def node_weights(kind: str, setup: Setup) -> Tensor:
    """q [n]: one (q_k = 1), uniform (1/n) or data (|D_k| / Σ_l |D_l|)."""
    n = setup.cfg.nodes
    if kind == "uniform":
        q = torch.full((n,), 1.0 / n)
    elif kind == "data":
        sizes = torch.tensor([len(p) for p in setup.nodes.parts], dtype=torch.float64)
        q = sizes / sizes.sum()
    else:
        q = torch.ones(n)
    return q.to(device=setup.device, dtype=setup.dtype)


def open_replay(path: Union[str, os.PathLike], dtype: str = "float64", device: str = "auto") -> Replay:
    """Open a finished run for analysis, rebuilding its world in ``dtype`` with the recorded W^t and
    checking the rebuilt batch plan against ``plan.npy`` (exit 2 when they differ)."""
    run = open_run(path)
    train_cfg = to_dataclass(run.config(), TrainConfig)
    network = None
    if not train_cfg.network.plain:
        from .network import FILE, NetworkRecord

        if not (run / FILE).exists():
            raise UserError(f"run={str(path)!r} has network.* set in its config but no {FILE} (the recorded churn, "
                            f"drops, delays and compression draws); run the same `dice train` again to rewrite it")
        network = NetworkRecord.load(run.path)
        if (network.n, network.rounds) != (train_cfg.nodes, train_cfg.rounds):
            raise UserError(f"{run / FILE} is for n={network.n}, T={network.rounds}, but the run has "
                            f"nodes={train_cfg.nodes}, rounds={train_cfg.rounds}; restore the run's own file")
    setup = build_setup(train_cfg, resolve_device(device), resolve_dtype(dtype),
                        schedule=MixingSchedule.load(run.path), network=network)
    recorded = np.load(run / "plan.npy")
    if not np.array_equal(recorded, setup.plan):
        raise UserError(f"run={str(path)!r}: the batch plan rebuilt from its config differs from the recorded "
                        f"plan.npy (was it made by another dice-cli version or with other data files?)")
    return Replay(run, train_cfg, setup)
