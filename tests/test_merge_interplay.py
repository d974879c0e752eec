"""Seams of the merged branches (issues 11-14): combinations each branch's own tests did not meet.
Tiny float64 problems on CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from robust_setup import BAD, CNN, MOM, make
from test_estimate import batch_units, finite_difference

from dice_cli.influence.estimate import exact


def test_exact_through_an_orthogonal_attacker_with_batchnorm_is_the_derivative():
    """orthogonal (issue 13) reads its probe gradient in eval mode; exact's unrolled rounds hand it BatchNorm
    statistics that carry a graph (issue 9's tracked BN), which PyTorch's native batch_norm refuses (it
    raised 'native_batch_norm is not differentiable with respect to running_mean' at hops >= 2)."""
    dyn, fm, state, atk, _ = make("orthogonal", model=CNN, optim=MOM, span=(0, 6))
    with torch.no_grad():
        state = dyn.round(dyn.round(state)[0])[0]
    probe = (*atk.probe, torch.linspace(0.5, 1.5, dyn.n, dtype=torch.float64))
    units = batch_units(dyn, state.round, sources=[0, 1, 2])
    df = exact(dyn, state, units, 2, *probe)
    far = (df.hop > 0).to_numpy()     # the oracle takes hop 0 with the buffers before the step, exact after it
    est, fd = df.influence.to_numpy()[far], finite_difference(dyn, state, units, 2, probe)[far]
    scale = np.abs(fd).max()
    np.testing.assert_allclose(est, fd, rtol=1e-5, atol=1e-7 * scale)


def test_value_reverse_step_through_an_orthogonal_attacker_with_batchnorm():
    """dice value method=exact's reverse sweep (Dynamics.round_vjp) at an orthogonal attack round on a BatchNorm
    model: the running statistics are inputs of the differentiated round (the same crash as above), and the
    loss-weight cotangent equals central finite differences of ⟨λ, State^{t+1}⟩ (Θ and the buffers)."""
    dyn, fm, state, atk, _ = make("orthogonal", model=CNN, optim=MOM, span=(0, 6))
    with torch.no_grad():
        state = dyn.round(state)[0]
    g = torch.Generator().manual_seed(5)
    lt = torch.randn(1, dyn.n, state.theta.shape[1], generator=g, dtype=torch.float64)
    lb = {k: torch.randn((1,) + tuple(v.shape), generator=g, dtype=torch.float64)
          for k, v in state.buffers.items() if v.is_floating_point()}
    _, _, _, gw = dyn.round_vjp(state, lt, None, lb)

    def inner(w):
        with torch.no_grad():
            nxt = dyn.round(state, w)[0]
        return float((lt[0] * nxt.theta).sum() + sum((lb[k][0] * nxt.buffers[k]).sum() for k in lb))

    eps = 1e-6
    for j in (BAD[0], 0):                    # an attacker's weight and an honest node's
        w = torch.ones(dyn.n, dyn.batch_size, dtype=torch.float64)
        w[j, 2] += eps
        up = inner(w)
        w[j, 2] -= 2 * eps
        fd = (up - inner(w)) / (2 * eps)
        assert float(gw[0, j, 2]) == pytest.approx(fd, rel=1e-6, abs=1e-9)
