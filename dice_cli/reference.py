"""The slow, obvious twin of the engine: one ``nn.Module`` and one ``torch.optim.SGD`` per node, a Python
loop over nodes, and gossip over explicit neighbour lists, as in the paper's code.

It shares nothing with ``engine.Dynamics`` except the data, the batch plan, W^t and the lr schedule, so the
tests that compare the two (1e-10 in float64 after many rounds) check the vectorised path for real.

Attacks (``dyn.attack``): the batches come from ``dyn.batch(t)`` (the attackers' corrupted ones at data-attack
rounds); at update-attack rounds an attacker's Δ = θ_after_step − θ_before goes through the attack's
transform and the node's parameters are set to θ_before + Δ_sent (its optimiser momentum stays honest).
Stealth's flipped update is formed here from the raw gradients: Δ_flip − Δ = −η (g_flip − g).

    dice train engine=loop
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .engine import Dynamics, State
from .models import FunctionalModel, node_module


class LoopEngine:
    """engine=loop: per-node modules and optimisers; the state converts to/from the flat layout."""

    def __init__(self, model_cfg: ModelConfig, fm: FunctionalModel, input_shape: Sequence[int],
                 num_classes: int, dyn: Dynamics, state: State):
        self.fm, self.dyn = fm, dyn
        self.modules: List[nn.Module] = [
            node_module(model_cfg, fm, input_shape, num_classes, state.theta[k], {b: v[k] for b, v in state.buffers.items()})
            for k in range(dyn.n)]
        o = dyn.optim
        self.opts = [torch.optim.SGD(m.parameters(), lr=dyn.lr(state.round), momentum=o.momentum,
                                     weight_decay=o.weight_decay) for m in self.modules]
        if state.momentum is not None:
            for k, (m, opt) in enumerate(zip(self.modules, self.opts)):
                for p, buf in zip(m.parameters(), fm.unflatten(state.momentum[k]).values()):
                    opt.state[p]["momentum_buffer"] = buf.clone()
        self.round_index = state.round

    def round(self, w: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """One round: every node's local step in turn, then gossip. Returns (losses [n], Δ [n, P])."""
        t, dyn = self.round_index, self.dyn
        attack = dyn.attack
        xb, yb = dyn.batch(t)
        losses, deltas = [], []
        for k, (m, opt) in enumerate(zip(self.modules, self.opts)):
            x, y = xb[k], yb[k]
            wk = torch.ones(len(y), dtype=x.dtype, device=x.device) if w is None else w[k]
            for group in opt.param_groups:
                group["lr"] = dyn.lr(t)
            m.train()
            opt.zero_grad(set_to_none=True)
            loss = (wk * F.cross_entropy(m(x), y, reduction="none")).sum() / len(y)
            loss.backward()
            attacked = attack is not None and attack.update_at(t) and k in attack.nodes
            flip_diff = None
            if attacked and attack.name == "stealth":
                flip_diff = self._flip_diff(m, x, y, wk, dyn.lr(t))
            before = self.fm.flatten_module(m)
            opt.step()
            delta = self.fm.flatten_module(m) - before
            if attacked:
                d_flip = None if flip_diff is None else (delta + flip_diff)[None]
                sent = attack.transform(t, delta[None], d_flip, which=[attack.nodes.index(k)])[0]
                with torch.no_grad():
                    for p, v in zip(m.parameters(), self.fm.unflatten(before + sent).values()):
                        p.copy_(v)
                delta = sent
            deltas.append(delta)
            losses.append(loss.detach())
        self._gossip(t)
        self.round_index += 1
        return torch.stack(losses), torch.stack(deltas)

    def _flip_diff(self, m: nn.Module, x: Tensor, y: Tensor, wk: Tensor, lr: float) -> Tensor:
        """Δ_flip − Δ = −η (∇L(θ; labels c → c+1 mod C) − ∇L(θ; labels)) for one node (before its step),
        leaving its BatchNorm statistics as the honest pass left them."""
        saved = [b.detach().clone() for b in m.buffers()]
        honest = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
        loss = (wk * F.cross_entropy(m(x), self.dyn.attack.stealth_labels(y), reduction="none")).sum() / len(y)
        flipped = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(m.parameters()))])
        with torch.no_grad():
            for b, v in zip(m.buffers(), saved):
                b.copy_(v)
        return -lr * (flipped - honest)

    def _gossip(self, t: int) -> None:
        """θ_k ← Σ_{l: W_kl > 0} W_kl θ_l, neighbour by neighbour, parameter by parameter."""
        w = self.dyn.mixing.numpy(t)
        senders = [[(l, float(w[k, l])) for l in range(len(w)) if w[k, l] > 0] for k in range(len(w))]
        with torch.no_grad():
            old = [[p.detach().clone() for p in m.parameters()] for m in self.modules]
            if self.dyn.gossip_buffers:
                old_b = [[b.detach().clone() for b in m.buffers()] for m in self.modules]
            for k, m in enumerate(self.modules):
                for i, p in enumerate(m.parameters()):
                    p.copy_(sum(wkl * old[l][i] for l, wkl in senders[k]))
                if self.dyn.gossip_buffers:
                    for i, b in enumerate(m.buffers()):
                        if b.is_floating_point():
                            b.copy_(sum(wkl * old_b[l][i] for l, wkl in senders[k]))

    def state(self) -> State:
        """The current system state in the engine's flat layout."""
        theta = torch.stack([self.fm.flatten_module(m) for m in self.modules])
        names = self.fm.buffer_names
        buffers = {b: torch.stack([dict(m.named_buffers())[b].detach().clone() for m in self.modules])
                   for b in names}
        momentum = None
        if self.dyn.optim.momentum and all(p in opt.state for m, opt in zip(self.modules, self.opts)
                                           for p in m.parameters()):
            momentum = torch.stack([torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in m.parameters()])
                                    for m, opt in zip(self.modules, self.opts)])
        return State(self.round_index, theta, buffers, momentum)
