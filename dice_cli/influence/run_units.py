"""Whole-run removal units (VALUE.md §1): what ``dice value`` takes out of a window [a, b) of a run.

A run unit u is a set of loss-weight positions (node j, round t, batch position i) removed together
(weight 0, or 1 − c with ``scale=c``; the batch divisor |B| stays), or for ``participant`` a node that
leaves the network for the window:

- ``node``: every position of node j in every round of the window (its data; j still gossips);
- ``batch``: the positions of one (node j, round t) batch, t in the window;
- ``sample``: every position where the batch plan puts dataset sample i of node j in the window;
- ``participant``: node j is offline in every round of the window (``Dynamics.round(online=...)``): it
  neither trains, sends nor receives, and its receivers move its weight onto their self-weight.

Units are data: ``index_at(t)`` maps round t's plan positions [n, B] to unit ids (−1 = none), from which
``weights_at`` / ``online_at`` build the w [C, n, B] / a [C, n] of C counterfactual copies that each remove
a set of units (a membership matrix [C, U]), and the reverse sweep sums per-position derivatives into units.

    units = select_run_units(plan, parts, "sample", (0, 200), sources=[3], samples=5, seed=0)
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError
from .units import _sources

KINDS = ["node", "batch", "sample", "participant"]


@dataclass
class RunUnits:
    """Removal units over the window [a, b) of a run with batch plan ``plan`` [T, n, B]."""
    kind: str                   # node | batch | sample | participant
    window: Tuple[int, int]     # [a, b)
    source: np.ndarray          # [U] node j owning the unit
    round: np.ndarray           # [U] round t of a batch unit, −1 otherwise
    sample: np.ndarray          # [U] dataset index of a sample unit, −1 otherwise
    plan: np.ndarray            # [T, n, B] dataset indices (the run's batch plan)

    def __len__(self) -> int:
        return int(self.source.shape[0])

    @property
    def n(self) -> int:
        return int(self.plan.shape[1])

    def subset(self, idx: Union[slice, Sequence[int], np.ndarray]) -> "RunUnits":
        """The units ``idx`` (a slice or index list), same kind, window and plan."""
        if not isinstance(idx, slice):
            idx = np.asarray(idx, dtype=np.int64)
        return RunUnits(self.kind, self.window, self.source[idx], self.round[idx], self.sample[idx], self.plan)

    def in_window(self, t: int) -> bool:
        return self.window[0] <= t < self.window[1]

    def index_at(self, t: int) -> np.ndarray:
        """Unit id of every position of round t's plan [n, B] (−1: no selected unit; always −1 outside the
        window and for participant units, which remove no loss weight)."""
        n, B = self.plan.shape[1:]
        idx = np.full((n, B), -1, dtype=np.int64)
        if not self.in_window(t) or self.kind == "participant" or not len(self):
            return idx
        if self.kind == "node":
            idx[self.source] = np.arange(len(self))[:, None]
        elif self.kind == "batch":
            hit = np.flatnonzero(self.round == t)
            idx[self.source[hit]] = hit[:, None]
        else:
            lut = self._lut()
            plan_t = self.plan[t]
            cand = lut[np.clip(plan_t, 0, len(lut) - 1)]
            cand[plan_t >= len(lut)] = -1
            ok = cand >= 0
            ok[ok] = self.source[cand[ok]] == np.nonzero(ok)[0]     # a sample unit only covers its own node
            idx[ok] = cand[ok]
        return idx

    def _lut(self) -> np.ndarray:
        if getattr(self, "_lut_cache", None) is None:
            lut = np.full(int(max(self.sample.max(), self.plan.max())) + 1, -1, dtype=np.int64)
            lut[self.sample] = np.arange(len(self))
            self._lut_cache = lut
        return self._lut_cache

    def unit_of_node(self) -> np.ndarray:
        """[n]: the unit id of each node for node/participant units (−1 = not selected)."""
        out = np.full(self.n, -1, dtype=np.int64)
        out[self.source] = np.arange(len(self))
        return out

    def weights_at(self, t: int, member: Tensor, scale: float = 1.0) -> Optional[Tensor]:
        """w [C, n, B] of round t for C copies, copy c removing the units with member[c, u] = 1:
        w = 1 − scale · member[c, unit(position)] (1 where no unit). None outside the window (all ones) and
        for participant units."""
        if not self.in_window(t) or self.kind == "participant":
            return None
        idx = torch.as_tensor(self.index_at(t), device=member.device)
        ext = torch.cat([member, member.new_zeros(member.shape[0], 1)], dim=1)       # column U: "no unit"
        idx = torch.where(idx < 0, torch.full_like(idx, len(self)), idx)
        return 1.0 - scale * ext[:, idx]

    def online_at(self, t: int, member: Tensor, scale: float = 1.0) -> Optional[Tensor]:
        """a [C, n] of round t for participant units: a_j = 1 − scale · member[c, unit of j] (1 = online).
        None outside the window and for the other kinds."""
        if not self.in_window(t) or self.kind != "participant":
            return None
        idx = torch.as_tensor(self.unit_of_node(), device=member.device)
        ext = torch.cat([member, member.new_zeros(member.shape[0], 1)], dim=1)
        idx = torch.where(idx < 0, torch.full_like(idx, len(self)), idx)
        return 1.0 - scale * ext[:, idx]

    def frame(self) -> dict:
        """The unit columns of the long table: source, unit, round, sample ([U] each)."""
        return {"source": self.source, "unit": np.full(len(self), self.kind, dtype=object),
                "round": self.round, "sample": self.sample}


def _check_window(window: Tuple[int, int], T: int) -> Tuple[int, int]:
    a, b = int(window[0]), int(window[1])
    if not 0 <= a < b <= T:
        raise UserError(f"window={a}:{b} is not valid; the run has rounds 0..{T - 1}, so use a:b with "
                        f"0 <= a < b <= {T}")
    return a, b


def select_run_units(plan: np.ndarray, parts: Sequence[np.ndarray], kind: str, window: Tuple[int, int],
                     sources="all", samples="all", seed: int = 0) -> RunUnits:
    """The run units of ``kind`` over ``window`` for the selected ``sources`` (``all`` or node ids).

    Order: node/participant units by source; batch units by round, then source; sample units by source,
    then dataset index. ``samples`` (sample units only): ``all`` (every sample of the source drawn at least
    once in the window), an int m (a seeded subset of m of those per source, all when fewer), or a list of
    dataset indices, each held by a selected source (one never drawn in the window has influence 0).
    """
    plan = np.asarray(plan)
    T, n, B = plan.shape
    if kind not in KINDS:
        raise UserError(f"unit={kind!r} is not valid; choose one of: {', '.join(KINDS)}")
    a, b = _check_window(window, T)
    srcs = _sources(sources, n)
    is_all = samples is None or (isinstance(samples, str) and samples == "all")
    if kind != "sample" and not is_all:
        raise UserError(f"samples={samples!r} only applies to unit=sample; unit={kind} removes "
                        f"{'a whole batch' if kind == 'batch' else 'all of a node'} (use unit=sample to pick samples)")
    none = lambda m: np.full(m, -1, dtype=np.int64)  # noqa: E731
    if kind in ("node", "participant"):
        src = np.asarray(srcs, dtype=np.int64)
        return RunUnits(kind, (a, b), src, none(len(src)), none(len(src)), plan)
    if kind == "batch":
        rounds = np.repeat(np.arange(a, b, dtype=np.int64), len(srcs))
        src = np.tile(np.asarray(srcs, dtype=np.int64), b - a)
        return RunUnits(kind, (a, b), src, rounds, none(len(src)), plan)
    drawn = {j: np.unique(plan[a:b, j]) for j in srcs}
    chosen: List[Tuple[int, int]] = []
    if is_all:
        chosen = [(j, int(i)) for j in srcs for i in drawn[j]]
    elif isinstance(samples, str):
        raise UserError(f"samples={samples!r} is not valid; choose 'all', a count m >= 1, or a list of dataset "
                        f"indices")
    elif isinstance(samples, (int, np.integer)) and not isinstance(samples, bool):
        m = int(samples)
        if m < 1:
            raise UserError(f"samples={m} is not valid; a count of samples per source must be >= 1")
        for j in srcs:
            pool = drawn[j]
            pick = pool if m >= len(pool) else np.sort(np.random.default_rng([int(seed), 11, j]).choice(
                pool, size=m, replace=False))
            chosen += [(j, int(i)) for i in pick]
    else:
        if isinstance(samples, (bytes, float, bool)) or not hasattr(samples, "__iter__"):
            raise UserError(f"samples={samples!r} is not valid; choose one of: all, an int m (a seeded subset of "
                            f"m samples per source), a list of dataset indices [i1,i2,...]")
        owner = {}
        for j in srcs:
            for i in np.asarray(parts[j]):
                owner[int(i)] = j
        wanted = []
        for i in samples:
            try:
                wanted.append(operator.index(i))
            except TypeError:
                raise UserError(f"samples entry {i!r} must be an integer dataset index") from None
        if not wanted:
            raise UserError("samples is an empty list; choose 'all', a count m >= 1, or dataset indices")
        for i in dict.fromkeys(wanted):
            if i not in owner:
                shown = ", ".join(f"node {j}: {int(np.min(parts[j]))}..{int(np.max(parts[j]))} "
                                  f"({len(parts[j])} samples)" for j in srcs[:6])
                raise UserError(f"samples: dataset index {i} is not held by "
                                f"{'node ' + str(srcs[0]) if len(srcs) == 1 else 'any selected source'} "
                                f"(sources={sources}); their data: {shown}{' ...' if len(srcs) > 6 else ''}")
            chosen.append((owner[i], i))
        order = {j: r for r, j in enumerate(srcs)}
        chosen.sort(key=lambda ji: (order[ji[0]], ji[1]))
    src = np.array([j for j, _ in chosen], dtype=np.int64)
    smp = np.array([i for _, i in chosen], dtype=np.int64)
    return RunUnits(kind, (a, b), src, none(len(src)), smp, plan)
