"""Any round's state of a recorded run: the nearest checkpoint at or before t, then exact replay.

Checkpoint r holds the state at the START of round r (spec: run.py); rounds r..t-1 are re-run with the
run's own ``Dynamics`` (same batches, W^t, lr, momentum), which is deterministic, so the replayed state
is the state training had (bit-identical when dtype and device match the run's).

    state = state_at(run, setup, t=40)
"""
from __future__ import annotations

import os
from typing import Union

import torch

from ..engine import State
from ..errors import UserError
from ..run import RunDir


def state_at(run: Union[RunDir, str, os.PathLike], setup, t: int) -> State:
    """State at the start of round ``t`` (0 <= t <= T), cast to ``setup.dtype`` / ``setup.device``."""
    if not isinstance(run, RunDir):
        run = RunDir(run)
    T = int(setup.dyn.rounds)
    given = t
    try:
        t = int(t) if int(t) == t else None
    except (TypeError, ValueError):
        t = None
    if t is None or not 0 <= t <= T:
        raise UserError(f"round t={given!r} is outside the run: valid rounds are 0..{T} (state at the start of "
                        f"round t; {T} is the final state)")
    have = run.checkpoint_rounds()
    earlier = [r for r in have if r <= t]
    if not earlier:
        raise UserError(f"no checkpoint at or before round {t} in {run.path}: checkpoints exist for rounds "
                        f"{have if have else 'none'}; valid rounds are {have[0] if have else '-'}..{T}")
    r = earlier[-1]
    state = State.from_payload(run.load_checkpoint(r), setup.device, setup.dtype)
    if state.round != r:
        raise UserError(f"checkpoint {run.checkpoint_path(r)} says round {state.round}, not {r}; "
                        f"the run directory is inconsistent (re-run dice train)")
    with torch.no_grad():
        while state.round < t:
            state, _, _ = setup.dyn.round(state)
    return state.detached()
