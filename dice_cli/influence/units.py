"""Removal units (spec §2): what ``dice gt`` / ``dice estimate`` take out of one round's batch plan.

A unit u of round t belongs to a source node j and removes positions ``mask[u]`` of the plan [n, B]
(weight 0, the batch divisor |B| stays): the whole batch B_j^t ("batch" unit) or one sample of it
("sample" unit). Units are data, not code: ``weights()`` turns them into the w [U, n, B] that
``Dynamics.round`` takes on its copies axis.

    units = select_units(setup.plan[t], "sample", sources=[3], samples=4, seed=0, round=t)
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from collections.abc import Iterable
from typing import List, Sequence, Union

import numpy as np
import torch

from ..errors import UserError

KINDS = ["batch", "sample"]


@dataclass
class Units:
    """Removal units of ONE round t. Unit u removes positions mask[u] (True = weight 0) of the batch plan."""
    round: int
    kind: str                 # "batch" | "sample"
    source: np.ndarray        # [U] node j owning the unit
    sample: np.ndarray        # [U] dataset index of the removed sample, -1 for a batch unit
    mask: torch.Tensor        # [U, n, B] bool

    def __len__(self) -> int:
        return int(self.source.shape[0])

    def weights(self, dtype: torch.dtype, device, scale: float = 0.0) -> torch.Tensor:
        """[U, n, B]: 1 where not masked, ``scale`` where masked (0 removes; 1 ± ε for finite differences)."""
        mask = self.mask.to(device)
        w = torch.ones(mask.shape, dtype=dtype, device=device)
        return w.masked_fill(mask, float(scale))

    def subset(self, idx: Union[slice, Sequence[int], np.ndarray]) -> "Units":
        """The units ``idx`` (a slice or index list), same round and kind."""
        if isinstance(idx, slice):
            return Units(self.round, self.kind, self.source[idx], self.sample[idx], self.mask[idx])
        idx = np.asarray(idx, dtype=np.int64)
        return Units(self.round, self.kind, self.source[idx], self.sample[idx],
                     self.mask[torch.as_tensor(idx)])


def _as_int(value, what: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise UserError(f"{what}={value!r} must be an integer") from None


def _sources(sources, n: int) -> List[int]:
    valid = f"'all' or node ids in 0..{n - 1}"
    if sources is None or (isinstance(sources, str) and sources == "all"):
        return list(range(n))
    if isinstance(sources, str):
        raise UserError(f"sources={sources!r} is not valid; choose {valid}")
    if not isinstance(sources, Iterable):
        sources = [sources]
    out: List[int] = []
    for s in sources:
        try:
            j = operator.index(s)
        except TypeError:
            raise UserError(f"sources: {s!r} is not a node id; choose {valid}") from None
        if not 0 <= j < n:
            raise UserError(f"sources: node {j} does not exist; choose {valid}")
        if j not in out:
            out.append(j)
    if not out:
        raise UserError(f"sources is empty; choose {valid}")
    return out


def select_units(plan_t: np.ndarray, kind: str, sources, samples, seed: int, round: int) -> Units:
    """The units of round ``round`` whose batch plan is ``plan_t`` [n, B] (dataset indices).

    kind: "batch" (one unit per source: its whole batch) or "sample" (one unit per removed sample).
    sources: "all" or a list of node ids. samples (sample units only): "all" positions of each source's
    batch; an int m: a seeded subset of m positions per source batch (all of them when m >= B); or a list
    of dataset indices, each of which must lie in the round's batch of a selected source.
    Units are ordered by source, then by position in the batch.
    """
    plan_t = np.asarray(plan_t)
    if plan_t.ndim != 2:
        raise UserError(f"plan_t must be the [n, B] batch plan of one round; got shape {plan_t.shape}")
    n, B = plan_t.shape
    if kind not in KINDS:
        raise UserError(f"kind={kind!r} is not valid; choose one of: {', '.join(KINDS)}")
    srcs = _sources(sources, n)
    round = _as_int(round, "round")
    pos: List[tuple] = []          # (source, position or -1)
    if kind == "batch":
        if not (samples is None or (isinstance(samples, str) and samples == "all")):
            raise UserError(f"samples={samples!r} only applies to kind=sample; batch units remove a whole "
                            f"batch (use kind=sample to pick samples)")
        pos = [(j, -1) for j in srcs]
    elif samples is None or (isinstance(samples, str) and samples == "all"):
        pos = [(j, p) for j in srcs for p in range(B)]
    elif isinstance(samples, str):
        raise UserError(f"samples={samples!r} is not valid; choose 'all', a count m >= 1, "
                        f"or a list of dataset indices")
    elif isinstance(samples, (int, np.integer)) and not isinstance(samples, bool):
        m = int(samples)
        if m < 1:
            raise UserError(f"samples={m} is not valid; a count of samples per source batch must be >= 1")
        for j in srcs:
            if m >= B:
                chosen = range(B)
            else:
                rng = np.random.default_rng([int(seed), round, j])
                chosen = np.sort(rng.choice(B, size=m, replace=False))
            pos += [(j, int(p)) for p in chosen]
    else:
        if isinstance(samples, (str, bytes, float, bool)) or not hasattr(samples, "__iter__"):
            raise UserError(f"samples={samples!r} is not valid; choose one of: all, an int m (a seeded subset "
                            f"of m samples per batch), a list of dataset indices [i1,i2,...]")
        wanted = [_as_int(i, "samples entry") for i in samples]
        if not wanted:
            raise UserError("samples is an empty list; choose 'all', a count m >= 1, or dataset indices")
        for i in dict.fromkeys(wanted):          # keep order, drop repeats
            hits = [(j, int(p)) for j in srcs for p in np.nonzero(plan_t[j] == i)[0][:1]]
            if not hits:
                shown = "; ".join(f"node {j}: {plan_t[j].tolist()}" for j in srcs[:8])
                more = f" (and {len(srcs) - 8} more sources)" if len(srcs) > 8 else ""
                raise UserError(f"sample {i} is not in round {round}'s batch of "
                                f"{'node ' + str(srcs[0]) if len(srcs) == 1 else 'the selected sources'}; "
                                f"the batches hold {shown}{more}")
            pos += hits
        order = {j: r for r, j in enumerate(srcs)}
        pos.sort(key=lambda jp: (order[jp[0]], jp[1]))
    U = len(pos)
    mask = torch.zeros(U, n, B, dtype=torch.bool)
    source = np.array([j for j, _ in pos], dtype=np.int64)
    sample = np.full(U, -1, dtype=np.int64)
    for u, (j, p) in enumerate(pos):
        if p < 0:
            mask[u, j, :] = True
        else:
            mask[u, j, p] = True
            sample[u] = int(plan_t[j, p])
    return Units(round, kind, source, sample, mask)
