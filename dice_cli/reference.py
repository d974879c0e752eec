"""The slow, obvious twin of the engine: one ``nn.Module`` and one ``torch.optim.SGD`` per node, a Python
loop over nodes, and gossip over explicit neighbour lists, as in the paper's code.

It shares nothing with ``engine.Dynamics`` except the data, the batch plan, W^t and the lr schedule, so the
tests that compare the two (1e-10 in float64 after many rounds) check the vectorised path for real.

Attacks (``dyn.attack``): the batches come from ``dyn.batch(t)`` (the attackers' corrupted ones at data-attack
rounds); at update-attack rounds an attacker's Δ = θ_after_step − θ_before goes through the attack's
transform and the node's parameters are set to θ_before + Δ_sent (its optimiser momentum stays honest).
Stealth's and orthogonal's flipped update is formed here from the raw gradients: Δ_flip − Δ = −η (g_flip − g);
orthogonal's probe gradient comes from the attacker's module on its probe copy (eval mode) before its step.

Per-edge messages and defenses (ROBUST.md §1, §4) are written receiver by receiver: each honest receiver's
Byzantine messages from the honest models it sees (``_messages``), then each receiver's inbox, a list of
(sender, W_kl, message) with itself first, goes through the rule (``_aggregate``) on flattened models. The
dice rules keep their running scores in [n, n] tensors updated one (k, l) pair at a time.

Unreliable networks (NETWORKS.md; ``network``: the run's ``network.NetworkRecord`` and ``base``: the plain
schedule W^t) are written here from the raw record, not from the engine's effective matrices: an offline node
skips its optimiser step (its momentum untouched, its BatchNorm statistics restored), and each online receiver
walks its in-neighbours of W^t, keeping a sender only when it is online and the edge did not fail (the rest goes
to its self-weight), reading the sender's value of d rounds ago from per-node history lists and, with
compression, running CHOCO's update with its own per-node Q (``_q``).

    dice train engine=loop
"""
from __future__ import annotations

import math
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .engine import Dynamics, State
from .models import FunctionalModel, node_module


class LoopEngine:
    """engine=loop: per-node modules and optimisers; the state converts to/from the flat layout."""

    def __init__(self, model_cfg: ModelConfig, fm: FunctionalModel, input_shape: Sequence[int],
                 num_classes: int, dyn: Dynamics, state: State, network=None, base=None):
        self.fm, self.dyn = fm, dyn
        self.net, self.base = network, base
        if network is not None and base is None:
            raise ValueError("LoopEngine with a network needs base= (the plain schedule W^t)")
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
        self.gstate: Dict[str, Tensor] = {k: v.detach().clone() for k, v in state.gossip.items()
                                          if not k.startswith("net.")}
        # the network's state as per-node lists: public copies θ̂_k and sent values X_k of d = 1..D rounds ago
        n = dyn.n
        self.public = ([state.gossip["net.public"][k].detach().clone() for k in range(n)]
                       if "net.public" in state.gossip else None)
        self.sent = ([[state.gossip["net.sent"][d, k].detach().clone() for k in range(n)]
                      for d in range(state.gossip["net.sent"].shape[0])] if "net.sent" in state.gossip else [])

    def round(self, w: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """One round: every node's local step in turn, then gossip. Returns (losses [n], Δ [n, P])."""
        t, dyn = self.round_index, self.dyn
        attack = dyn.attack
        xb, yb = dyn.batch(t)
        losses, deltas, befores = [], [], []
        online = self._online(t)
        for k, (m, opt) in enumerate(zip(self.modules, self.opts)):
            x, y = xb[k], yb[k]
            if not online[k]:                 # offline: the loss at θ^t, no step, statistics restored
                with torch.no_grad():
                    saved = [b.detach().clone() for b in m.buffers()]
                    m.train()
                    loss = (F.cross_entropy(m(x), y, reduction="none")
                            * (torch.ones(len(y), dtype=x.dtype) if w is None else w[k])).sum() / len(y)
                    for b, v in zip(m.buffers(), saved):
                        b.copy_(v)
                before = self.fm.flatten_module(m)
                deltas.append(torch.zeros_like(before))
                befores.append(before)
                losses.append(loss.detach())
                continue
            wk = torch.ones(len(y), dtype=x.dtype, device=x.device) if w is None else w[k]
            for group in opt.param_groups:
                group["lr"] = dyn.lr(t)
            attacked = attack is not None and attack.update_at(t) and k in attack.nodes
            flip_diff = g_probe = None
            if attacked and attack.name == "orthogonal":     # at θ^t with the round's starting statistics
                xp, yp, shared = attack.probe
                g_probe = self._probe_grad(m, xp if shared else xp[k], yp if shared else yp[k])[None]
            m.train()
            opt.zero_grad(set_to_none=True)
            loss = (wk * F.cross_entropy(m(x), y, reduction="none")).sum() / len(y)
            loss.backward()
            if attacked and attack.name in ("stealth", "orthogonal"):
                flip_diff = self._flip_diff(m, x, y, wk, dyn.lr(t))
            before = self.fm.flatten_module(m)
            opt.step()
            delta = self.fm.flatten_module(m) - before
            if attacked:
                d_flip = None if flip_diff is None else (delta + flip_diff)[None]
                sent = attack.transform(t, delta[None], d_flip, which=[attack.nodes.index(k)], g=g_probe)[0]
                with torch.no_grad():
                    for p, v in zip(m.parameters(), self.fm.unflatten(before + sent).values()):
                        p.copy_(v)
                delta = sent
            deltas.append(delta)
            befores.append(before)
            losses.append(loss.detach())
        if self.net is not None:
            self._network_gossip(t, online)
        elif dyn.defense is None and not (attack is not None and attack.message_at(t)):
            self._gossip(t)
        else:
            self._robust_gossip(t, befores)
        self.round_index += 1
        return torch.stack(losses), torch.stack(deltas)

    # ---- unreliable networks ---------------------------------------------------------------------------
    def _online(self, t: int) -> List[bool]:
        n = self.dyn.n
        if self.net is None or self.net.online is None:
            return [True] * n
        return [bool(v) for v in self.net.online[t]]

    def _q(self, t: int, k: int, v: Tensor) -> Tensor:
        """Q(v) for node k's flattened difference v [P] in round t."""
        rec = self.net
        P = v.numel()
        if rec.compression == "top_k":
            keep = max(1, min(P, int(round(rec.ratio * P))))
            order = torch.argsort(v.abs(), descending=True)[:keep]
            out = torch.zeros_like(v)
            out[order] = v[order]
            return out
        if rec.compression == "random_k":
            return torch.where(torch.as_tensor(rec.mask[t, k]), v, torch.zeros_like(v))
        s = rec.levels
        tau = 1.0 + min(P / s ** 2, math.sqrt(P) / s)
        norm = float(torch.sqrt((v * v).sum()))
        if norm == 0.0:
            return torch.zeros_like(v)
        u = (torch.as_tensor(rec.noise[t, k]).to(v.dtype) + 0.5) / 256
        x = v.abs() * s / norm
        level = torch.floor(x)
        level = level + (u < x - level).to(v.dtype)
        return norm * torch.sign(v) * level / (s * tau)

    def _network_gossip(self, t: int, online: List[bool]) -> None:
        """Churn, drops, delays and CHOCO compression, receiver by receiver from the raw record."""
        rec, n = self.net, self.dyn.n
        W = self.base.at(t)
        with torch.no_grad():
            half = [self.fm.flatten_module(m).detach().clone() for m in self.modules]
            if rec.compression != "none":
                for k in range(n):
                    if online[k]:
                        self.public[k] = self.public[k] + self._q(t, k, half[k] - self.public[k])
                x = list(self.public)
            else:
                x = half
            rows = []
            for k in range(n):
                if not online[k]:
                    rows.append(None)
                    continue
                self_w, terms = float(W[k, k]), []
                for l in range(n):
                    if l == k or W[k, l] <= 0:
                        continue
                    failed = rec.drop is not None and bool(rec.drop[t, k, l])
                    if online[l] and not failed:
                        d = int(rec.delay[t, k, l]) if (rec.delay is not None and rec.max_delay > 0) else 0
                        terms.append((l, float(W[k, l]), d))
                    else:
                        self_w += float(W[k, l])
                rows.append((self_w, terms))
            new = []
            for k in range(n):
                if rows[k] is None:
                    new.append(half[k])
                    continue
                self_w, terms = rows[k]
                mix = self_w * x[k]
                for l, wkl, d in terms:
                    mix = mix + wkl * (x[l] if d == 0 else self.sent[d - 1][l])
                new.append(half[k] + rec.gamma * (mix - x[k]) if rec.compression != "none" else mix)
            if self.sent:
                self.sent = [list(x)] + self.sent[:-1]
            old_b = [[b.detach().clone() for b in m.buffers()] for m in self.modules]
            for k, m in enumerate(self.modules):
                for p, v in zip(m.parameters(), self.fm.unflatten(new[k]).values()):
                    p.copy_(v)
                if self.dyn.gossip_buffers and rows[k] is not None:
                    self_w, terms = rows[k]
                    for i, b in enumerate(m.buffers()):
                        if b.is_floating_point():
                            b.copy_(self_w * old_b[k][i] + sum(wkl * old_b[l][i] for l, wkl, _ in terms))

    def _probe_grad(self, m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """∇ of the mean probe cross-entropy at the module's current parameters (eval mode), flattened."""
        m.eval()
        try:
            loss = F.cross_entropy(m(x), y)
        finally:
            m.train()
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(m.parameters()))])

    # ---- per-edge messages and defenses --------------------------------------------------------------
    def _messages(self, t: int, before: List[Tensor], half: List[Tensor]) -> Dict[Tuple[int, int], Tensor]:
        """{(l, k): m_{l→k}} for every attacker l → honest receiver k (W_kl > 0) at a message-attack round."""
        attack, W = self.dyn.attack, self.dyn.mixing.numpy(t)
        if attack is None or not attack.message_at(t):
            return {}
        bad, n, out = set(attack.nodes), len(W), {}
        for k in range(n):
            byz = [l for l in range(n) if l in bad and l != k and W[k, l] > 0]
            if k in bad or not byz:
                continue
            honest = [k] + [j for j in range(n) if j != k and j not in bad and W[k, j] > 0]
            X = torch.stack([half[j] for j in honest])
            if attack.name == "alie":
                sigma = X.std(0, unbiased=True) if len(honest) > 1 else torch.zeros_like(X[0])
                msg = X.mean(0) - attack.z * sigma
            elif attack.name == "ipm":
                msg = before[k] - attack.epsilon * (X.mean(0) - before[k])
            else:   # dissensus
                pull = sum(float(W[k, j]) * (half[j] - half[k]) for j in honest)
                msg = half[k] - attack.epsilon * pull / sum(float(W[k, b]) for b in byz)
            for l in byz:
                out[(l, k)] = msg
        return out

    def _robust_gossip(self, t: int, before: List[Tensor]) -> None:
        """Gossip with Byzantine messages and/or a defense, receiver by receiver on flattened models."""
        dyn, W = self.dyn, self.dyn.mixing.numpy(t)
        n = len(W)
        with torch.no_grad():
            half = [self.fm.flatten_module(m).detach().clone() for m in self.modules]
        msgs = self._messages(t, before, half)
        inbox = [[(k, float(W[k, k]), half[k])] +
                 [(l, float(W[k, l]), msgs.get((l, k), half[l])) for l in range(n) if l != k and W[k, l] > 0]
                 for k in range(n)]
        d = dyn.defense
        if d is None:
            new = [sum(w * m for _, w, m in box) for box in inbox]
        elif d.name in ("dice", "dice_select"):
            new = self._scored(t, d, inbox, before, half)
        else:
            new = [self._rule(t, d, box, half[k]) for k, box in enumerate(inbox)]
        with torch.no_grad():
            old_b = [[b.detach().clone() for b in m.buffers()] for m in self.modules]
            for k, m in enumerate(self.modules):
                for p, v in zip(m.parameters(), self.fm.unflatten(new[k]).values()):
                    p.copy_(v)
                if dyn.gossip_buffers:
                    for i, b in enumerate(m.buffers()):
                        if b.is_floating_point():
                            b.copy_(sum(float(W[k, l]) * old_b[l][i] for l in range(n) if W[k, l] > 0))

    def _rule(self, t: int, d, box: List[Tuple[int, float, Tensor]], own: Tensor) -> Tensor:
        """clipped_gossip / trimmed_mean / median / balance for one receiver (inbox with itself first)."""
        cfg = d.cfg
        nbrs = box[1:]
        if d.name == "clipped_gossip":
            dist = [float(torch.linalg.vector_norm(m - own)) for _, _, m in nbrs]
            if cfg.tau is not None:
                tau = float(cfg.tau)
            elif dist:
                tau = sorted(dist, reverse=True)[min(cfg.b, len(dist) - 1)]
            out = own.clone()
            for (_, w, m), r in zip(nbrs, dist):
                out = out + w * (m - own) * (min(1.0, tau / r) if r > 0 else 1.0)
            return out
        V = torch.stack([m for _, _, m in box])
        if d.name == "trimmed_mean":
            c = len(box)
            return V.sort(dim=0).values[cfg.b:c - cfg.b].mean(0)
        if d.name == "median":
            return torch.quantile(V, 0.5, dim=0, interpolation="midpoint")
        # balance
        radius = cfg.gamma * math.exp(-cfg.kappa * t / max(d.rounds, 1)) * float(torch.linalg.vector_norm(own))
        acc = [m for _, _, m in nbrs if float(torch.linalg.vector_norm(m - own)) <= radius]
        return cfg.alpha * own + (1 - cfg.alpha) * torch.stack(acc).mean(0) if acc else own.clone()

    def _scored(self, t: int, d, inbox, before: List[Tensor], half: List[Tensor]) -> List[Tensor]:
        """dice / dice_select: every receiver's round score, running score, and mixing weights."""
        cfg, g = d.cfg, self.gstate
        rho = float(cfg.decay)
        if d.name == "dice" or cfg.select_by == "influence":
            xp, yp, shared = d.probe_for(t)
            grads = [self._probe_grad(m, xp if shared else xp[k], yp if shared else yp[k])
                     for k, m in enumerate(self.modules)]
        out = []
        for k, box in enumerate(inbox):
            if d.name == "dice_select" and cfg.select_by == "similarity":
                p = [float(torch.linalg.vector_norm(m - half[k])) for _, _, m in box]
            elif cfg.score == "update":
                p = [float(torch.dot(grads[k], m - before[l])) for l, _, m in box]
            else:
                p = [float(torch.dot(grads[k], m - half[k])) for l, _, m in box]
            p = [math.inf if math.isnan(v) else v for v in p]
            scale = statistics.median([abs(v) for v in p])
            s_hat = {}
            for (l, _, _), v in zip(box, p):
                u = v / scale if scale > 0 else 0.0
                g["score"][k, l] = rho * float(g["score"][k, l]) + (1 - rho) * u
                g["count"][k, l] = float(g["count"][k, l]) + 1
                s_hat[l] = float(g["score"][k, l]) / (1 - rho ** float(g["count"][k, l]))
            weights = {l: w for l, w, _ in box}
            if d.name == "dice":
                med = statistics.median(s_hat.values())
                spread = max(1.4826 * statistics.median(abs(v - med) for v in s_hat.values()), cfg.min_spread)
                if t >= cfg.warmup:
                    g["flagged"][k, k] = 0.0
                for l, _, _ in box[1:]:
                    if t < cfg.warmup:
                        continue
                    z = (s_hat[l] - med) / spread
                    caught = cfg.action == "cut" and cfg.sticky and float(g["flagged"][k, l]) > 0
                    act = z > cfg.threshold or caught
                    g["flagged"][k, l] = 1.0 if act else 0.0
                    if act:
                        new_w = 0.0 if cfg.action == "cut" else weights[l] * cfg.threshold / z
                        weights[k] += weights[l] - new_w
                        weights[l] = new_w
            else:
                R = int(cfg.every)
                if t >= R and t % R == 0:
                    cands = sorted((s_hat[l], l) for l, _, _ in box[1:])
                    g["kept"][k] = 0.0
                    for _, l in cands[:cfg.keep]:
                        g["kept"][k, l] = 1.0
                if t >= R:
                    on = [k] + [l for l, _, _ in box[1:] if float(g["kept"][k, l]) == 1.0]
                    weights = {l: (1.0 / len(on) if l in on else 0.0) for l, _, _ in box}
            g["mix"][k] = 0.0
            for l, w in weights.items():
                g["mix"][k, l] = w
            out.append(sum(weights[l] * m for l, _, m in box if weights[l] != 0))
        return out

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
        has = [all(p in opt.state for p in m.parameters()) for m, opt in zip(self.modules, self.opts)]
        if self.dyn.optim.momentum and any(has):
            # a node that has been offline since the start has no buffer yet: its momentum counts as 0
            momentum = torch.stack([torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in m.parameters()])
                                    if h else torch.zeros_like(theta[k])
                                    for k, (m, opt, h) in enumerate(zip(self.modules, self.opts, has))])
        gossip = {k: v.clone() for k, v in self.gstate.items()}
        if self.public is not None:
            gossip["net.public"] = torch.stack(self.public)
        if self.sent:
            gossip["net.sent"] = torch.stack([torch.stack(row) for row in self.sent])
        return State(self.round_index, theta, buffers, momentum, gossip)
