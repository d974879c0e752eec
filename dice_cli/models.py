"""Models and their functional view on stacked, flat parameters.

All n nodes share one architecture. The engine keeps every node's parameters in ONE flat tensor
Θ ∈ R^{n×P} (row k = node k), so gossip is a single product W^t Θ and an SGD step a single fused update;
``FunctionalModel`` maps a row θ ∈ R^P to named parameter views and evaluates the network with
``torch.func.functional_call`` (vmapped over nodes by the engine). BatchNorm running statistics are kept
per node as stacked buffers ``{name: [n, ...]}``.

    dice train model=mlp model.hidden=[128,64]      # the paper's MLP shape
    dice train model=resnet18 dataset=cifar10       # CIFAR-style ResNet-18 (3x3 stem, no max-pool)
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .config import ModelConfig
from .errors import UserError, check_choice


class _TrackedStats:
    """Mixin for BatchNorm: running statistics as differentiable functions of the weights, when asked.

    PyTorch updates ``running_mean``/``running_var`` inside the batch-norm kernel, outside autograd, and
    treats them as constants in eval mode. While ``tracking`` is on (``FunctionalModel.tracking``, which
    the engine turns on for rounds it differentiates through, ``create_graph=True``), this forward instead

    - train mode: normalises with the batch statistics (``F.batch_norm(training=True)`` without running
      stats: the same output) and writes, with tracked out-of-place math,
          running_mean ← (1 − m) running_mean + m · mean_B(x)
          running_var  ← (1 − m) running_var  + m · var_B(x)   (unbiased, as PyTorch)
      into the buffer tensors (``copy_``; the engine passes clones), so they carry the graph to θ;
    - eval mode: (x − running_mean) / sqrt(running_var + eps) · weight + bias, written out so the probe
      loss is differentiable in the running statistics too.

    With ``tracking`` off (the default: training, replay, gt, engine=loop) it is ``nn.BatchNorm*d.forward``,
    so those paths are bit-identical to plain PyTorch. Works under ``functional_call`` + ``vmap``.
    """
    tracking = False

    def forward(self, x: Tensor) -> Tensor:
        if not self.tracking or self.momentum is None or not self.track_running_stats:
            return super().forward(x)      # cumulative averaging (momentum=None) is not used by dice-cli
        self._check_input_dim(x)
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self.training:
            dims = [0] + list(range(2, x.dim()))
            out = F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
            m = self.momentum
            mean, var = x.mean(dims), x.var(dims, correction=1)
            self.running_mean.copy_((1 - m) * self.running_mean + m * mean)
            self.running_var.copy_((1 - m) * self.running_var + m * var)
            self.num_batches_tracked.add_(1)
            return out
        out = (x - self.running_mean.view(shape)) * torch.rsqrt(self.running_var.view(shape) + self.eps)
        if self.weight is not None:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


class TrackedBatchNorm1d(_TrackedStats, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with differentiable running statistics while tracking (see ``_TrackedStats``)."""


class TrackedBatchNorm2d(_TrackedStats, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with differentiable running statistics while tracking (see ``_TrackedStats``)."""


_TRACKED = {nn.BatchNorm1d: TrackedBatchNorm1d, nn.BatchNorm2d: TrackedBatchNorm2d}


def _track_batchnorm(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm1d/2d for its tracked subclass in place (same parameters, buffers and init)."""
    for m in module.modules():
        if type(m) in _TRACKED:
            m.__class__ = _TRACKED[type(m)]
    return module


def build_module(cfg: ModelConfig, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """A fresh ``nn.Module`` for one node (default PyTorch initialisation from the global RNG); its
    BatchNorm layers are ``TrackedBatchNorm*d`` (plain PyTorch behaviour unless tracking is turned on)."""
    return _track_batchnorm(_build_module(cfg, input_shape, num_classes))


def _build_module(cfg: ModelConfig, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    check_choice("model.name", cfg.name, ["logreg", "mlp", "cnn", "resnet18"])
    in_features = int(math.prod(input_shape))
    if cfg.name == "logreg":
        return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))
    if cfg.name == "mlp":
        layers: List[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        return nn.Sequential(*layers)
    if len(input_shape) != 3:
        raise UserError(f"model={cfg.name} needs image data [C, H, W], but the dataset gives shape "
                        f"{tuple(input_shape)}; use model=mlp or model=logreg for it")
    if cfg.name == "cnn":
        c_in, h, w = input_shape
        layers = []
        for c in cfg.channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1)]
            if cfg.batchnorm:
                layers.append(nn.BatchNorm2d(c))
            layers += [nn.ReLU()]
            if min(h, w) >= 4:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c_in = c
        layers += [nn.Flatten(), nn.Linear(c_in * h * w, num_classes)]
        return nn.Sequential(*layers)
    from torchvision.models import resnet18

    net = resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


class FunctionalModel:
    """Flat-parameter view of an architecture.

    ``unflatten(θ)`` turns θ [..., P] into named views [..., *shape] (no copy); ``loss`` and ``logits``
    evaluate one node (vmap them over nodes). Parameter order = ``module.named_parameters()``.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.names = [k for k, _ in module.named_parameters()]
        self.shapes = [tuple(p.shape) for _, p in module.named_parameters()]
        self.numels = [p.numel() for _, p in module.named_parameters()]
        self.num_params = sum(self.numels)
        self.buffer_names = [k for k, _ in module.named_buffers()]
        self.has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
        self._tracked = [m for m in module.modules() if isinstance(m, _TrackedStats)]

    @contextmanager
    def tracking(self, on: bool = True) -> Iterator[None]:
        """While active (and ``on``), BatchNorm running statistics are differentiable (``_TrackedStats``)."""
        if not on or not self._tracked:
            yield
            return
        before = [m.tracking for m in self._tracked]
        for m in self._tracked:
            m.tracking = True
        try:
            yield
        finally:
            for m, b in zip(self._tracked, before):
                m.tracking = b

    # ---- layout -------------------------------------------------------------------------------------
    def unflatten(self, flat: Tensor) -> Dict[str, Tensor]:
        """θ [..., P] -> {name: view [..., *shape]}."""
        lead = flat.shape[:-1]
        chunks = torch.split(flat, self.numels, dim=-1)
        return {n: c.reshape(*lead, *s) for n, c, s in zip(self.names, chunks, self.shapes)}

    def flatten_module(self, module: nn.Module) -> Tensor:
        """A module's parameters -> θ [P] (detached copy)."""
        return torch.cat([p.detach().reshape(-1) for p in module.parameters()])

    def load_into(self, module: nn.Module, theta: Tensor, buffers: Dict[str, Tensor]) -> None:
        """Copy θ [P] and one node's buffers into ``module`` in place."""
        with torch.no_grad():
            for p, v in zip(module.parameters(), self.unflatten(theta).values()):
                p.copy_(v)
            for name, b in module.named_buffers():
                b.copy_(buffers[name])

    def module_buffers(self, module: nn.Module) -> Dict[str, Tensor]:
        return {k: b.detach().clone() for k, b in module.named_buffers()}

    # ---- evaluation (one node; vmap over nodes) ----------------------------------------------------
    def logits(self, theta: Tensor, buffers: Dict[str, Tensor], x: Tensor) -> Tensor:
        """θ [P], x [B, ...] -> logits [B, classes]."""
        return functional_call(self.module, (self.unflatten(theta), buffers), (x,))

    def loss(self, theta: Tensor, buffers: Dict[str, Tensor], x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        """Weighted mean loss (1/|B|) Σ_i w_i ℓ_i (spec §2: removal sets w_i = 0, the divisor stays |B|)."""
        ce = F.cross_entropy(self.logits(theta, buffers, x), y, reduction="none")
        return (w * ce).sum() / y.shape[0]


def init_nodes(cfg: ModelConfig, input_shape: Sequence[int], num_classes: int, n: int, seed: int,
               dtype: torch.dtype, device: torch.device) -> Tuple[FunctionalModel, Tensor, Dict[str, Tensor]]:
    """Initial Θ [n, P] and stacked buffers {name: [n, ...]}.

    ``model.init=independent`` seeds node k with (seed, k) as in the paper's code; ``shared`` gives every
    node node 0's initialisation. The returned FunctionalModel's module lives on the meta device.
    """
    rows, bufs = [], []
    template = None
    for k in range(n if cfg.init == "independent" else 1):
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed also queues a seed for every lazy CUDA device,
            # with a stack trace each time (2 ms per node, 2 s at 1,024 nodes), and init is on the CPU
            torch.default_generator.manual_seed(seed * 100_003 + k)
            m = build_module(cfg, input_shape, num_classes).to(dtype)
        if template is None:
            template = m
        rows.append(torch.cat([p.detach().reshape(-1) for p in m.parameters()]))
        bufs.append({k_: b.detach().clone() for k_, b in m.named_buffers()})
    theta = torch.stack(rows)
    if theta.shape[0] == 1:
        theta = theta.expand(n, -1).clone()
        bufs = bufs * n
    buffers = {k_: torch.stack([b[k_] for b in bufs]).to(device) for k_ in (bufs[0] if bufs else {})}
    fm = FunctionalModel(template.to("meta"))
    return fm, theta.to(device), buffers


def node_module(cfg: ModelConfig, fm: FunctionalModel, input_shape: Sequence[int], num_classes: int,
                theta: Tensor, buffers: Dict[str, Tensor]) -> nn.Module:
    """A real ``nn.Module`` holding θ [P] and one node's buffers (used by the loop engine and exports)."""
    m = build_module(cfg, input_shape, num_classes).to(dtype=theta.dtype, device=theta.device)
    fm.load_into(m, theta, buffers)
    return m
