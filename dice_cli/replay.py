"""The one contract every analysis uses: open a recorded run, get its state at any round, roll rounds out.

``open_replay(path)`` opens a finished ``dice train`` run, rebuilds its world (``simulation.build_setup``)
in the analysis dtype with the *recorded* mixing schedule, and checks that the batch plan rebuilt from the
config equals the recorded ``plan.npy``. Then

- ``state_at(t)``: the state at the START of round t (0 <= t <= T): the nearest checkpoint at or before t,
  then exact replay of the rounds in between with the run's own ``Dynamics`` (deterministic, so the state
  is the one training had; bit-identical when dtype and device match the run's);
- ``rollout(state, until, weights=...)``: advance ``state`` to round ``until`` with given loss weights per
  round (w [.., n, B]; a leading copies axis [C, n, B] advances C counterfactual systems at once, as
  ``dice gt`` and ``dice value`` do), optionally keeping the autograd graph;
- ``q(kind)``: the node weights q_k; ``probe``: the probe sets; ``probe_losses(state)``.

gt, estimate, detect and value import this module, never ``training``.

    rp = open_replay("outputs/latest", dtype="float64")
    s40 = rp.state_at(40)
    s50 = rp.rollout(s40, 50)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

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
                create_graph: bool = False) -> State:
        """Advance ``state`` round by round to the start of round ``until``.

        weights(t) -> w [.., n, B] for round t (or None = all ones); w's leading axes must match θ's
        (a copies axis [C, n, P] takes w [C, n, B]). With ``create_graph`` the rounds stay differentiable
        (curvature, momentum and attacks included).
        """
        if until < state.round or until > self.rounds:
            raise ValueError(f"rollout to round {until} from round {state.round}: needs "
                             f"{state.round} <= until <= {self.rounds}")
        while state.round < until:
            w = None if weights is None else weights(state.round)
            state, _, _ = self.dyn.round(state, w, create_graph=create_graph)
        return state


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
    setup = build_setup(train_cfg, resolve_device(device), resolve_dtype(dtype),
                        schedule=MixingSchedule.load(run.path))
    recorded = np.load(run / "plan.npy")
    if not np.array_equal(recorded, setup.plan):
        raise UserError(f"run={str(path)!r}: the batch plan rebuilt from its config differs from the recorded "
                        f"plan.npy (was it made by another dice-cli version or with other data files?)")
    return Replay(run, train_cfg, setup)
