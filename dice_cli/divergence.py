"""Stop a run that is blowing up before it writes hundreds of rounds of garbage that ends "complete".

A node diverges when, at some round t, its batch loss or its parameter norm |θ_k^{t+1}| exceeds

    divergence × max(its round-0 value, 1)          (``divergence`` in TrainConfig, default 1000; 0 = off)

The floor of 1 keeps a tiny round-0 value (a near-zero loss, parameters initialised near 0) from making the
bound meaninglessly tight. NaN/inf are caught separately (training._check_finite). The round-0 losses are
kept in the manifest (``divergence_reference``) so a resumed run compares against the same values; a run
resumed without them (made by an older dice-cli) recomputes them by replaying round 0.

    guard = divergence_guard(run, setup, start)
    guard.check(t, losses, new_state.theta)     # DivergenceError (exit 2, status "diverged")
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from .errors import DivergenceError

FLOOR = 1.0


class DivergenceGuard:
    """Per-node bounds on the batch loss and on |θ_k|, from round-0 values (see the module docstring)."""

    def __init__(self, factor: float, norm0: np.ndarray, loss0: Optional[np.ndarray] = None,
                 on_reference: Optional[Callable[[np.ndarray], None]] = None):
        self.factor = float(factor)
        self.norm0 = np.asarray(norm0, dtype=np.float64)
        self.loss0 = None if loss0 is None else np.asarray(loss0, dtype=np.float64)
        self.on_reference = on_reference
        self._bounds: dict = {}

    def check(self, t: int, losses, theta: Optional[torch.Tensor] = None, norms=None) -> None:
        """Raise DivergenceError naming the round and node when a loss or a parameter norm is past its bound.
        ``theta`` [n, P] is the state after round t; or ``norms`` [n] of it, or a function returning them
        (called only when the bound is on: ``engine=distributed`` gathers them from every rank). One
        comparison on the device per quantity and round; the details are worked out only when one fails."""
        if self.factor <= 0:
            return
        if self.loss0 is None:
            self.loss0 = _numpy(losses).copy()
            if self.on_reference is not None:
                self.on_reference(self.loss0)
        if self._over(losses, self.loss0):
            loss = _numpy(losses)
            bound = self.factor * np.maximum(self.loss0, FLOOR)
            k = int(np.flatnonzero(loss > bound)[0])
            raise DivergenceError(
                f"training diverged at round {t} on node {k}: its batch loss {loss[k]:.4g} is more than "
                f"divergence={self.factor:g} x its round-0 value {self.loss0[k]:.4g} (bound {bound[k]:.4g}); "
                f"lower lr (now in the config) or use optim.schedule=cosine, or raise divergence= if this "
                f"growth is expected", round=int(t), node=k, quantity="loss", value=float(loss[k]),
                bound=float(bound[k]))
        if callable(norms):
            norms = norms()
        if norms is None and theta is not None:
            with torch.no_grad():
                norms = torch.linalg.vector_norm(theta.detach(), dim=-1)
        if norms is None or not self._over(norms, self.norm0):
            return
        norms = _numpy(norms)
        nbound = self.factor * np.maximum(self.norm0, FLOOR)
        k = int(np.flatnonzero(norms > nbound)[0])
        raise DivergenceError(
            f"training diverged at round {t} on node {k}: its parameter norm |theta| = {norms[k]:.4g} is "
            f"more than divergence={self.factor:g} x its round-0 value {self.norm0[k]:.4g} (bound "
            f"{nbound[k]:.4g}); lower lr (now in the config), or raise divergence= if this growth is "
            f"expected", round=int(t), node=k, quantity="parameter_norm", value=float(norms[k]),
            bound=float(nbound[k]))

    def _over(self, values, reference: np.ndarray) -> bool:
        """Whether any value exceeds factor x max(reference, 1) (bounds cached per device and dtype)."""
        if not isinstance(values, torch.Tensor):
            return bool((np.asarray(values, dtype=np.float64) > self.factor * np.maximum(reference, FLOOR)).any())
        key = (id(reference), values.device, values.dtype)
        bound = self._bounds.get(key)
        if bound is None:
            bound = self._bounds[key] = torch.as_tensor(self.factor * np.maximum(reference, FLOOR),
                                                        dtype=values.dtype, device=values.device)
        return bool((values.detach() > bound).any())


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def divergence_guard(run, setup, start: int, write: bool = True, read: bool = True) -> DivergenceGuard:
    """The guard of a (resumed) training session: |θ_k^0| from the rebuilt initial state, round-0 losses
    from the manifest (``read``) or, at round 0, from the first round (``write``: then recorded in the
    manifest; only the process that writes the manifest reads and writes it)."""
    cfg = setup.cfg
    with torch.no_grad():
        norm0 = setup.init.theta.detach().double().norm(dim=-1).cpu().numpy()
    loss0 = None
    if start > 0 and cfg.divergence > 0 and read:
        ref = run.manifest().get("divergence_reference") or {}
        if len(ref.get("loss") or []) == cfg.nodes:
            loss0 = np.asarray(ref["loss"], dtype=np.float64)
        else:                                  # an older run: replay round 0 for its losses
            _, _, losses = setup.dyn.round(setup.init)
            loss0 = _numpy(losses)

    def record(loss: np.ndarray) -> None:
        run.update_manifest(divergence_reference={"loss": [float(v) for v in loss],
                                                  "norm": [float(v) for v in norm0]})

    return DivergenceGuard(cfg.divergence, norm0, loss0, record if write else None)


def gathered_norms(comm, theta: torch.Tensor, bmax: int, sizes) -> np.ndarray:
    """|θ_k| of every node on every rank (``engine=distributed``: each rank holds a block of ``theta``)."""
    with torch.no_grad():
        local = theta.detach().double().norm(dim=-1)
        if local.shape[0] < bmax:
            local = torch.cat([local, local.new_zeros(bmax - local.shape[0])])
        parts = comm.all_gather(local.to(theta.dtype))
    return np.concatenate([p.double().cpu().numpy()[:m] for p, m in zip(parts, sizes)])
