"""Typed configuration schemas: the single home of every default and range check.

Hydra composes YAML from ``configs/`` on top of these dataclasses (registered in ``ConfigStore``), so an
unknown key or a wrong type is rejected with the key's name before any work starts. ``__post_init__``
checks choices and ranges and raises ``UserError`` (exit code 2). Core code receives these dataclasses,
never Hydra objects: ``to_dataclass(cfg)`` converts a composed DictConfig.

    dice train --cfg job          # shows the composed config
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional

from .errors import UserError, check_choice, check_range, suggest

DATASETS = ["digits", "synthetic", "mnist", "fashion_mnist", "cifar10", "cifar100", "tinyimagenet"]
MODELS = ["logreg", "mlp", "cnn", "resnet18"]
TOPOLOGIES = ["ring", "exponential", "torus", "grid", "complete", "star", "erdos_renyi", "random_regular",
              "hypercube", "file", "one_peer_exponential", "random_matching"]
WEIGHT_RULES = ["auto", "metropolis", "uniform", "max_degree"]
PARTITIONS = ["iid", "dirichlet", "shards"]
PROBE_KINDS = ["shared", "per_node"]
SCHEDULES = ["constant", "step", "cosine"]
ENGINES = ["vmap", "loop", "distributed"]
DEVICES = ["auto", "cpu", "cuda"]
DTYPES = ["float32", "float64"]
INITS = ["independent", "shared"]
LOGGERS = ["csv", "tensorboard"]          # dice_cli/tblog.py


@dataclass
class DatasetConfig:
    """Which data, and how to shape it. ``synthetic_*`` keys only matter for ``name=synthetic``."""
    name: str = "digits"  # digits (offline) | synthetic | mnist | fashion_mnist | cifar10 | cifar100 | tinyimagenet
    resize: Optional[int] = None          # square side in pixels for image data (paper: CIFAR at 28)
    test_fraction: float = 0.2            # digits/synthetic: held-out share (stratified, fixed split)
    synthetic_samples: int = 2000     # synthetic: number of samples (train and test)
    synthetic_features: int = 32      # synthetic: input dimension
    synthetic_classes: int = 10       # synthetic: number of classes (Gaussian blobs)
    synthetic_separation: float = 2.0     # distance scale between class means

    def __post_init__(self) -> None:
        check_choice("dataset.name", self.name, DATASETS, "Pick a file from configs/dataset/.")
        if self.resize is not None:
            check_range("dataset.resize", self.resize, 1)
        check_range("dataset.test_fraction", self.test_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
        check_range("dataset.synthetic_samples", self.synthetic_samples, 2)
        check_range("dataset.synthetic_features", self.synthetic_features, 1)
        check_range("dataset.synthetic_classes", self.synthetic_classes, 2)


@dataclass
class PartitionConfig:
    """How the training set is split over nodes; every sample keeps its dataset index."""
    name: str = "iid"                 # iid | dirichlet (label skew, alpha) | shards (classes_per_node)
    alpha: float = 0.5                    # dirichlet concentration (small = more skewed)
    classes_per_node: int = 2             # shards: number of classes each node sees
    per_node: Optional[int] = None        # samples per node (paper: 100); None = split the whole set

    def __post_init__(self) -> None:
        check_choice("partition.name", self.name, PARTITIONS, "Pick a file from configs/partition/.")
        check_range("partition.alpha", self.alpha, 0.0, lo_open=True)
        check_range("partition.classes_per_node", self.classes_per_node, 1)
        if self.per_node is not None:
            check_range("partition.per_node", self.per_node, 1)


@dataclass
class ProbeConfig:
    """The evaluation ("probe") sets z'_k: a shared test subset, or held-out data per node."""
    kind: str = "shared"              # shared (one test subset for every node) | per_node (held-out data of each node)
    size: int = 100                       # samples per probe set (paper: the first 5 test images)

    def __post_init__(self) -> None:
        check_choice("probe.kind", self.kind, PROBE_KINDS)
        check_range("probe.size", self.size, 1)


@dataclass
class ModelConfig:
    name: str = "mlp"                 # logreg | mlp | cnn | resnet18
    hidden: List[int] = field(default_factory=lambda: [32])      # mlp hidden widths (paper: [128, 64])
    channels: List[int] = field(default_factory=lambda: [16, 32])  # cnn conv widths
    batchnorm: bool = False               # cnn: BatchNorm after each conv (resnet18 always has it)
    init: str = "independent"             # independent (paper's code) | shared initial parameters
    gossip_buffers: bool = True           # average BatchNorm running statistics with W like parameters

    def __post_init__(self) -> None:
        check_choice("model.name", self.name, MODELS, "Pick a file from configs/model/.")
        check_choice("model.init", self.init, INITS)
        for i, h in enumerate(self.hidden):
            check_range(f"model.hidden[{i}]", h, 1)
        for i, c in enumerate(self.channels):
            check_range(f"model.channels[{i}]", c, 1)


@dataclass
class TopologyConfig:
    """Communication graph and weight rule. Row k of W^t = weights receiver k puts on its senders."""
    name: str = "ring"                # the graph (configs/topology/): ring, exponential, torus, complete, file, ...
    weights: str = "auto"                 # auto: the paper's rule for ring/exponential, MH for undirected
    lazy: bool = False                    # W <- (I + W) / 2
    p: float = 0.3                        # erdos_renyi edge probability
    degree: int = 4                       # random_regular degree
    rows: Optional[int] = None            # torus/grid rows (None: the most square factorisation)
    path: Optional[str] = None            # file: a CSV or .npy n x n matrix
    seed: Optional[int] = None            # graph randomness; None = the run's seed
    # Training refuses (exit 2) a graph that is not strongly connected — for time-varying W^t, the union of
    # W^0 ... W^{T-1} over the run — since influence cannot flow between its components; true trains anyway.
    allow_disconnected: bool = False

    def __post_init__(self) -> None:
        check_choice("topology.name", self.name, TOPOLOGIES, "Pick a file from configs/topology/.")
        check_choice("topology.weights", self.weights, WEIGHT_RULES)
        check_range("topology.p", self.p, 0.0, 1.0, lo_open=True)
        check_range("topology.degree", self.degree, 1)
        if self.rows is not None:
            check_range("topology.rows", self.rows, 1)
        if self.name == "file" and not self.path:
            raise UserError("topology=file needs topology.path=<matrix.csv|matrix.npy>")


@dataclass
class OptimConfig:
    """Local optimiser (SGD with momentum / weight decay, PyTorch semantics) and lr schedule."""
    name: str = "sgd"                 # sgd (the only optimiser)
    momentum: float = 0.0             # heavy-ball momentum in [0, 1) (0 = plain SGD)
    weight_decay: float = 0.0         # L2 penalty added to the gradient
    schedule: str = "constant"        # lr schedule: constant | step | cosine
    step_size: int = 50                   # step: multiply lr by gamma every step_size rounds
    gamma: float = 0.1                # step: lr factor every step_size rounds
    min_lr: float = 0.0                   # cosine: final lr

    def __post_init__(self) -> None:
        check_choice("optim.name", self.name, ["sgd"])
        check_range("optim.momentum", self.momentum, 0.0, 1.0, hi_open=True)
        check_range("optim.weight_decay", self.weight_decay, 0.0)
        check_choice("optim.schedule", self.schedule, SCHEDULES)
        check_range("optim.step_size", self.step_size, 1)
        check_range("optim.gamma", self.gamma, 0.0, lo_open=True)
        check_range("optim.min_lr", self.min_lr, 0.0)


@dataclass
class RecordConfig:
    """What the run keeps for replay and influence: checkpoints theta^t and local updates Delta^t."""
    every: int = 0                        # checkpoint every k rounds; 0 = auto (every round if it fits max_mb)
    deltas: bool = True                   # keep each node's local update Delta_k^t at recorded rounds
    max_mb: float = 512.0                 # auto mode's budget for checkpoints on disk

    def __post_init__(self) -> None:
        check_range("record.every", self.every, 0)
        check_range("record.max_mb", self.max_mb, 0.0, lo_open=True)


ATTACKS = ["none", "label_flip", "label_noise", "feature_noise", "sign_flip", "scale", "gaussian",
           "free_rider", "stealth", "alie", "ipm", "dissensus", "orthogonal", "inflate"]
# attacks the distributed engine cannot run: per-edge messages need every honest model of the round, and
# orthogonal / inflate need the probe set inside the attack
MESSAGE_ATTACKS = ["alie", "ipm", "dissensus"]
SINGLE_PROCESS_ATTACKS = ["alie", "ipm", "dissensus", "orthogonal", "inflate"]
LABEL_MAPPINGS = ["shift", "random"]


@dataclass
class AttackConfig:
    """Known misbehaviour injected into training; the manifest records it as detection ground truth.

    Data attacks change what an attacker trains on (labels or inputs of its batches); update attacks change
    the update Δ it sends (and keeps); message attacks (alie, ipm, dissensus) send each receiver its own
    crafted model m_{l→k} (ROBUST.md §1-2). Attackers: ``nodes`` if given, else ``count`` nodes, else a
    ``fraction`` of the nodes, chosen with ``seed`` (None = the run's seed).
    """
    name: str = "none"                # none | label_flip | sign_flip | alie | ... (configs/attack/)
    nodes: Optional[List[int]] = None # attacker node ids; None = count or fraction, drawn with seed
    count: Optional[int] = None       # number of attackers (when nodes is None)
    fraction: float = 0.0             # share of the nodes that attack (when nodes and count are None)
    rounds: Any = "all"                   # all | "a:b" (rounds a … b−1)
    flip_fraction: float = 1.0            # label_flip / label_noise: share of the attacker's samples hit
    mapping: str = "shift"                # label_flip: shift (c -> c+1 mod C) | random (seeded permutation)
    sigma: float = 100.0                  # feature_noise: std of Gaussian input noise (the paper: 100)
    scale: float = 1.0                    # sign_flip sends −scale·Δ; scale sends scale·Δ
    strength: float = 0.1                 # stealth: Δ + s·(Δ_flip − Δ); orthogonal: Δ + s·(d − (dᵀĝ)ĝ)
    z: Optional[float] = None             # alie: μ − zσ; None = Baruch et al.'s rule from nodes and attackers
    epsilon: Optional[float] = None       # ipm (None = 0.1) and dissensus (None = 1.5, epfml's experiments)
    seed: Optional[int] = None        # draws the attackers and their noise; None = the run's seed

    def __post_init__(self) -> None:
        check_choice("attack.name", self.name, ATTACKS, "Pick a file from configs/attack/.")
        check_range("attack.fraction", self.fraction, 0.0, 1.0)
        check_range("attack.flip_fraction", self.flip_fraction, 0.0, 1.0)
        check_choice("attack.mapping", self.mapping, LABEL_MAPPINGS)
        check_range("attack.sigma", self.sigma, 0.0)
        check_range("attack.strength", self.strength, 0.0)
        if self.epsilon is not None:
            check_range("attack.epsilon", self.epsilon, 0.0)
        if self.count is not None:
            check_range("attack.count", self.count, 0)


DEFENSES = ["none", "clipped_gossip", "trimmed_mean", "median", "balance", "dice", "dice_select"]
DEFENSE_ACTIONS = ["cut", "downweight"]
SELECT_BY = ["influence", "similarity"]
DICE_SCORES = ["edge", "update"]


@dataclass
class DefenseConfig:
    """Receiver-side aggregation AGG_k of ``dice train`` (ROBUST.md §4; dice_cli/defenses.py).

    Every rule is receiver-local and online: receiver k combines its own θ_k^{t+½} with the messages it
    received in round t (and, for dice / dice_select, a running score it keeps per in-neighbour, part of
    the checkpointed state). Keys are read only by the rules named next to them.
    """
    name: str = "none"                # none | clipped_gossip | trimmed_mean | median | balance | dice | dice_select
    b: int = 1                            # trimmed_mean: values trimmed per side; clipped_gossip (adaptive
    #                                       tau): the b farthest neighbours are clipped to the next one's distance
    tau: Optional[float] = None           # clipped_gossip: fixed radius; None = adaptive (above)
    gamma: float = 0.3                    # balance: accept ‖m − θ_k‖ ≤ gamma·exp(−kappa·t/T)·‖θ_k‖
    kappa: float = 1.0                    # balance: decay of the acceptance radius over the run
    alpha: float = 0.5                    # balance: θ_k ← alpha·θ_k + (1 − alpha)·mean(accepted)
    decay: float = 0.9                    # dice, dice_select: running score S ← decay·S + (1 − decay)·u
    threshold: float = 3.0                # dice: act on an in-neighbour whose robust z-score exceeds this
    action: str = "cut"                   # dice: cut (weight → self) | downweight (weight·threshold/z → self)
    sticky: bool = True                   # dice, action=cut: a neighbour cut once stays cut for the rest of the run
    min_spread: float = 1.0               # dice: floor of the z-score's spread (units: the round's median |score|)
    warmup: int = 0                       # dice: rounds before the first cut
    score: str = "update"                 # dice, dice_select: update = g_kᵀ Δ_{l→k} (DICE's proximal term) | edge =
    #                                       g_kᵀ(m_{l→k} − θ_k^{t+½}) (what mixing l's model does to k; docs/robustness.md)
    probe_batch: int = 0                  # dice, dice_select: probe samples per round's gradient (0 = the whole
    #                                       probe set; b > 0: rows (t·b + i) mod m, a cheaper, noisier gradient)
    every: int = 10                       # dice_select: re-choose collaborators every R rounds (first at R)
    keep: int = 3                         # dice_select: m in-neighbours kept from the candidates (W's support)
    select_by: str = "influence"          # dice_select: influence (DICE) | similarity (model distance, SONAR's baseline)

    def __post_init__(self) -> None:
        check_choice("defense.name", self.name, DEFENSES, "Pick a file from configs/defense/.")
        check_range("defense.b", self.b, 0)
        if self.tau is not None:
            check_range("defense.tau", self.tau, 0.0, lo_open=True)
        check_range("defense.gamma", self.gamma, 0.0, lo_open=True)
        check_range("defense.kappa", self.kappa, 0.0)
        check_range("defense.alpha", self.alpha, 0.0, 1.0)
        check_range("defense.decay", self.decay, 0.0, 1.0, hi_open=True)
        check_range("defense.threshold", self.threshold, 0.0, lo_open=True)
        check_choice("defense.action", self.action, DEFENSE_ACTIONS)
        check_range("defense.min_spread", self.min_spread, 0.0, lo_open=True)
        check_range("defense.warmup", self.warmup, 0)
        check_range("defense.probe_batch", self.probe_batch, 0)
        check_choice("defense.score", self.score, DICE_SCORES)
        check_range("defense.every", self.every, 1)
        check_range("defense.keep", self.keep, 1)
        check_choice("defense.select_by", self.select_by, SELECT_BY)


CHURNS = ["none", "bernoulli", "markov", "trace", "schedule"]
DELAYS = ["none", "fixed", "uniform", "per_edge"]
COMPRESSIONS = ["none", "top_k", "random_k", "qsgd"]


@dataclass
class NetworkConfig:
    """Unreliable networks (NETWORKS.md; dice_cli/network.py): churn, link drops, stale messages and
    CHOCO-compressed gossip. The defaults are a plain run. Everything random is drawn once from ``seed``
    (None = the run's seed) at train start and recorded in <run>/network.npz; replays read that file."""
    churn: str = "none"                   # none | bernoulli | markov | trace | schedule
    churn_p: float = 1.0                  # bernoulli: probability a node is online in a round
    p_on: float = 0.5                     # markov: off -> on probability per round
    p_off: float = 0.1                    # markov: on -> off probability per round
    trace: Optional[str] = None           # trace: a [T, n] 0/1 file (.npy or .csv), row t = round t
    join: Optional[List[int]] = None      # schedule: per-node join round (None = 0 for all)
    leave: Optional[List[int]] = None     # schedule: per-node leave round (None = never)
    drop: float = 0.0                     # each directed edge l -> k (l != k) fails per round with this probability
    delay: str = "none"                   # none | fixed (d = D) | uniform (d ~ U{0..D} per edge and round) | per_edge
    max_delay: int = 1                    # D: the largest delay in rounds
    compression: str = "none"             # none | top_k | random_k | qsgd (CHOCO-SGD with public copies)
    ratio: float = 0.1                    # top_k / random_k: fraction of the coordinates sent
    levels: int = 16                      # qsgd: quantisation levels s
    gamma: float = 0.5                    # CHOCO consensus step size
    seed: Optional[int] = None            # network randomness; None = the run's seed

    def __post_init__(self) -> None:
        check_choice("network.churn", self.churn, CHURNS)
        check_range("network.churn_p", self.churn_p, 0.0, 1.0)
        check_range("network.p_on", self.p_on, 0.0, 1.0)
        check_range("network.p_off", self.p_off, 0.0, 1.0)
        check_range("network.drop", self.drop, 0.0, 1.0, hi_open=True)
        check_choice("network.delay", self.delay, DELAYS)
        check_range("network.max_delay", self.max_delay, 0)
        check_choice("network.compression", self.compression, COMPRESSIONS)
        check_range("network.ratio", self.ratio, 0.0, 1.0, lo_open=True)
        check_range("network.levels", self.levels, 1)
        check_range("network.gamma", self.gamma, 0.0, 1.0, lo_open=True)
        if self.churn == "bernoulli" and self.churn_p == 0:
            raise UserError("network.churn_p=0 takes every node offline in every round; use a probability in "
                            "(0, 1] (1 = always online)")
        if self.churn == "markov" and self.p_on == 0 and self.p_off == 1:
            raise UserError("network.p_on=0 with network.p_off=1 takes every node offline for good; raise p_on")
        if self.churn == "trace" and not self.trace:
            raise UserError("network.churn=trace needs network.trace=<file.npy|file.csv> (a [T, n] 0/1 matrix, "
                            "row t = round t, column k = node k)")
        if self.churn == "schedule" and self.join is None and self.leave is None:
            raise UserError("network.churn=schedule needs network.join=[r_0,...] and/or network.leave=[r_0,...] "
                            "(one round per node)")
        for key in ("join", "leave"):
            for i, r in enumerate(getattr(self, key) or []):
                if isinstance(r, bool) or not isinstance(r, int):
                    raise UserError(f"network.{key}[{i}]={r!r} is not a round; use integers >= 0")
                check_range(f"network.{key}[{i}]", r, 0)

    @property
    def plain(self) -> bool:
        """True when nothing here changes the run (every knob at its neutral value)."""
        return (self.churn == "none" and self.drop == 0 and (self.delay == "none" or self.max_delay == 0)
                and self.compression == "none")


@dataclass
class TrainConfig:
    """``dice train``: decentralized SGD (adapt-then-combine) on ``nodes`` nodes for ``rounds`` rounds."""
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    record: RecordConfig = field(default_factory=RecordConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)   # unreliable network (network.*; docs/networks.md)
    nodes: int = 16                   # number of nodes n
    rounds: int = 200                 # training rounds T (a larger value on a finished run extends it)
    batch_size: int = 16              # samples per node and round (each node's mini-batch)
    lr: float = 0.1                   # learning rate (before optim.schedule)
    seed: int = 0                     # seeds data split, batches, graph randomness and initial models
    device: str = "auto"              # auto (cuda when available) | cpu | cuda
    dtype: str = "float32"            # float32 | float64 (use float64 for influence studies)
    engine: str = "vmap"              # vmap (all nodes at once) | loop (per-node reference) | distributed (torchrun)
    chunk_nodes: int = 0                  # vmap engine: nodes per chunk of the local step (0 = all at once)
    threads: int = 0                      # CPU intra-op threads; 0 = auto (1 for small problems, else torch's)
    data_dir: str = "data"            # where downloaded datasets live
    download: bool = False            # allow downloading mnist / cifar / tinyimagenet into data_dir
    out: Optional[str] = None             # run directory; None = outputs/train/<time>_<random> (per job in -m)
    overwrite: bool = False               # allow replacing a finished run made with a different config
    eval_every: int = 1                   # probe loss/accuracy every k rounds (and at the last round)
    log_every: int = 0                    # one-line summary every k rounds; 0 = about 10 lines per run
    progress: bool = True                 # tqdm bar (it also turns itself off when not in a terminal)
    logger: str = "csv"                   # csv (metrics.csv) | tensorboard (also <run>/tensorboard/; pip install tensorboard)
    # Stop (exit 2, manifest status "diverged") when a node's batch loss or parameter norm |θ_k| exceeds
    # divergence × max(its round-0 value, 1); 0 = stop only on NaN/inf. Default 1000.
    divergence: float = 1000.0

    def __post_init__(self) -> None:
        check_range("nodes", self.nodes, 1)
        check_range("rounds", self.rounds, 1)
        check_range("batch_size", self.batch_size, 1)
        check_range("lr", self.lr, 0.0, lo_open=True)
        check_choice("device", self.device, DEVICES)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("engine", self.engine, ENGINES)
        check_range("chunk_nodes", self.chunk_nodes, 0)
        check_range("threads", self.threads, 0)
        check_range("eval_every", self.eval_every, 1)
        check_range("log_every", self.log_every, 0)
        check_choice("logger", self.logger, LOGGERS)
        if self.engine == "distributed" and self.defense.name != "none":
            raise UserError(f"defense={self.defense.name} cannot run with engine=distributed (its ranks see only "
                            f"their block's models, a defense needs every message a receiver gets); use "
                            f"engine=vmap or engine=loop")
        if self.engine == "distributed" and self.attack.name in SINGLE_PROCESS_ATTACKS:
            raise UserError(f"attack={self.attack.name} cannot run with engine=distributed (it needs every honest "
                            f"model of the round or the probe set); use engine=vmap or engine=loop")
        check_range("divergence", self.divergence, 0.0)
        self._check_network()

    def _check_network(self) -> None:
        net = self.network
        if net.plain:
            return
        if self.engine == "distributed":
            raise UserError("network.* (churn, drops, delays, compression) cannot run with engine=distributed; "
                            "use engine=vmap or engine=loop")
        if self.defense.name != "none":
            raise UserError(f"network.* needs plain gossip, but defense={self.defense.name} aggregates with a "
                            f"non-linear rule; use defense=none with an unreliable network")
        if self.attack.name in MESSAGE_ATTACKS:
            raise UserError(f"network.* needs plain gossip, but attack={self.attack.name} sends per-edge messages; "
                            f"use a data or update attack (e.g. attack=label_flip) with an unreliable network")
        for key in ("join", "leave"):
            v = getattr(net, key)
            if v is not None and len(v) != self.nodes:
                raise UserError(f"network.{key} has {len(v)} entries but nodes={self.nodes}; give one round per "
                                f"node (network.{key}=[{', '.join(['0'] * min(self.nodes, 4))}{', ...' if self.nodes > 4 else ''}])")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; os.cpu_count() where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_threads(threads: int) -> None:
    """UserError for more threads than this process may run on (libgomp aborts far beyond that)."""
    cpus = usable_cpus()
    if threads > cpus:
        raise UserError(f"threads={threads} is more than the {cpus} CPU(s) this process may use; use "
                        f"threads={cpus} or fewer, or threads=0 (auto)")


def schema_fields(schema) -> Dict[str, Any]:
    """{field name: type} of a dataclass schema (ClassVars excluded; string annotations resolved)."""
    hints = typing.get_type_hints(schema)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(schema)}


def _dataclass_of(tp) -> Optional[type]:
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in getattr(tp, "__args__", ()) or ():     # Optional[SomeConfig]
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def unknown_keys(config: dict, schema, prefix: str = "") -> List[str]:
    """Messages for every key of ``config`` (nested dicts as dotted names) that ``schema`` does not have,
    each with the nearest valid key."""
    fields = schema_fields(schema)
    out = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if key not in fields:
            near = suggest(key, fields)
            if near:
                near = near.replace("`", f"`{prefix}", 1)
            out.append(f"unknown key `{name}`.{near or suggest(name, _dotted(schema, prefix))}")
            continue
        sub = _dataclass_of(fields[key])
        if sub is not None and isinstance(value, dict):
            out.extend(unknown_keys(value, sub, f"{name}."))
    return out


def _dotted(schema, prefix: str = "") -> List[str]:
    names = []
    for key, tp in schema_fields(schema).items():
        names.append(prefix + key)
        sub = _dataclass_of(tp)
        if sub is not None:
            names.extend(_dotted(sub, f"{prefix}{key}."))
    return names


def check_known_keys(config: dict, schema, command: str = "") -> None:
    """UserError when the composed config holds keys the schema does not know (``+foo=1``, a stray key in
    a preset): such keys would be stored in config.yaml and silently ignored."""
    bad = unknown_keys(config, schema)
    if bad:
        cmd = f"dice {command} " if command else ""
        raise UserError(f"{'; '.join(bad)} {cmd}has no such key, so it would be ignored. Fix the spelling "
                        f"(`{cmd}--help` lists the keys; the schema is dice_cli/config.py {schema.__name__})")


def to_dataclass(cfg, schema=TrainConfig):
    """Composed DictConfig (or dict) -> validated dataclass; range errors surface as UserError."""
    from omegaconf import OmegaConf

    if isinstance(cfg, schema):
        return cfg
    node = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    if "hydra" in node:
        node.pop("hydra")
    return OmegaConf.to_object(node)


UNITS = ["batch", "sample"]
NODE_WEIGHTS = ["one", "uniform", "data"]
METHODS = ["first_order", "exact"]


@dataclass
class SelectionConfig:
    """What ``dice gt`` / ``dice estimate`` measure: units of chosen rounds and sources, over ``hops``.

    ``rounds``: ``last`` (the last round with room for ``hops``), ``all``, an int, a list, a range
    ``"a:b"`` / ``"a:b:k"`` (Python slice, end excluded) or ``"every:k"`` (every k-th round).
    ``sources``: ``all`` or a list of node ids. ``samples`` (sample units): ``all``, an int m (a seeded
    subset of m samples per source batch) or a list of dataset indices. Inside ``dice pipeline`` the same
    keys live under ``influence.`` and are shared by gt and every estimate method, so they align.
    """
    _prefix: ClassVar[str] = "influence."
    unit: str = "batch"               # batch (a node's whole mini-batch of a round) | sample (one sample of it)
    rounds: Any = "every:20"          # rounds t whose units are measured: last | all | t | [t1,t2] | a:b[:k] | every:k
    sources: Any = "all"              # source nodes j whose units are measured: all | [j1,j2,...]
    samples: Any = "all"              # sample units: all | m (seeded subset per batch) | [dataset indices]
    hops: int = 2                     # rounds after t over which influence spreads (hop r: targets r gossip steps away)
    q: str = "one"                        # node weights q_k: one | uniform (1/n) | data (|D_k| / Σ|D|)
    dtype: str = "float64"                # analysis precision (the run is replayed in it)
    chunk: int = 256                      # counterfactual copies advanced together (memory bound)
    seed: int = 0                         # for sample subsets
    shard: Optional[str] = None           # "i/n": compute only part i (0-based) of n of the selection's units
    reachable_only: bool = False          # drop structural-zero rows (targets the unit cannot reach by that hop)

    def __post_init__(self) -> None:
        p = self._prefix
        check_choice(f"{p}unit", self.unit, UNITS)
        check_range(f"{p}hops", self.hops, 1)
        check_choice(f"{p}q", self.q, NODE_WEIGHTS)
        check_choice(f"{p}dtype", self.dtype, DTYPES)
        check_range(f"{p}chunk", self.chunk, 1)


@dataclass
class InfluenceConfig(SelectionConfig):
    """A selection plus the keys of a standalone ``dice gt`` / ``dice estimate`` command."""
    _prefix: ClassVar[str] = ""
    rounds: Any = "last"
    hops: int = 1
    run: str = "outputs/latest"       # the `dice train` run directory to measure (default: the newest run)
    device: str = "auto"              # auto | cpu | cuda
    out: Optional[str] = None             # default: <run>/gt or <run>/estimate
    overwrite: bool = False           # replace a finished result made with a different selection
    progress: bool = True             # tqdm bar with ETA (it also turns itself off when not in a terminal)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("device", self.device, DEVICES)


@dataclass
class GtConfig(InfluenceConfig):
    """``dice gt``: counterfactual re-simulation (spec §3)."""


@dataclass
class EstimateConfig(InfluenceConfig):
    """``dice estimate``: DICE-E (spec §4). ``first_order`` drops the Hessian terms; ``exact`` keeps them."""
    method: str = "first_order"       # first_order (paper: Hessian terms dropped) | exact (curvature kept)
    gt: Optional[str] = None              # gt result to align with; default <run>/gt when it exists
    paths: bool = False                   # also write paths.csv: the term of every gossip path (first_order, small hops)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("method", self.method, METHODS)


VALUE_UNITS = ["node", "batch", "sample", "participant"]
VALUE_METHODS = ["gt", "exact", "first_order", "cascade_sum"]
VALUE_TARGETS = ["all", "network"]


@dataclass
class ValueConfig:
    """``dice value``: whole-run influence of every unit on every node's final loss (VALUE.md).

    ``window``: ``"a:b"`` (rounds a … b−1 in which removal applies; an empty side = 0 / T), default the
    whole run. ``horizon``: T_e ≥ b, the round whose state is measured (None = T, the final models).
    ``lds``: M random subsets for the linear datamodeling score (0 = off), each unit in with probability
    ``lds_alpha`` (None = 0.5 for node/participant units, 0.1 for batch/sample units).
    """
    run: str = "outputs/latest"       # the `dice train` run directory to value (default: the newest run)
    unit: str = "node"                    # node | batch | sample | participant (gt only)
    method: str = "exact"                 # gt | exact | first_order | cascade_sum
    window: Any = "0:"                    # a:b: rounds a..b-1 in which units are removed ("0:" = the whole run)
    horizon: Optional[int] = None         # T_e; None = the run's last round T
    sources: Any = "all"                  # all | [j1,j2,...]
    samples: Any = "all"                  # sample units: all (drawn in the window) | m (seeded per source) | [indices]
    targets: str = "all"                  # all (one column per node k) | network (Σ_k q_k L_k, target = -1)
    q: str = "one"                        # node weights q_k: one | uniform (1/n) | data (|D_k| / Σ|D|)
    dtype: str = "float64"                # analysis precision (the run is replayed in it)
    hops: int = 1                         # cascade_sum only: r, hops of each round's DICE-E
    scale: float = 1.0                    # gt only: remove a fraction c of each unit's weight (c -> 0: finite differences)
    lds: int = 0                          # LDS subsets M (0 = off; else >= 3)
    lds_alpha: Optional[float] = None     # inclusion probability; None = 0.5 (node/participant) or 0.1 (batch/sample)
    chunk: int = 64                       # gt: counterfactual copies per pass; estimates: targets per sweep
    shard: Optional[str] = None           # "i/n": part i (0-based) of n (gt: of the units; estimates: of the targets)
    seed: int = 0                         # sample subsets and LDS subsets
    gt: Optional[str] = None              # a `dice value method=gt` result to align with; None = look in <run>/value_gt
    eval: str = "probe"                   # L_k on the run's probe sets | heldout: test samples no probe set holds
    device: str = "auto"              # auto | cpu | cuda
    out: Optional[str] = None             # default: <run>/value
    overwrite: bool = False           # replace a finished result made with a different config
    progress: bool = True             # tqdm bars with ETA (they also turn themselves off when not in a terminal)

    def __post_init__(self) -> None:
        check_choice("unit", self.unit, VALUE_UNITS)
        check_choice("method", self.method, VALUE_METHODS)
        check_choice("targets", self.targets, VALUE_TARGETS)
        check_choice("eval", self.eval, ["probe", "heldout"])
        check_choice("q", self.q, NODE_WEIGHTS)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("device", self.device, DEVICES)
        check_range("hops", self.hops, 1)
        check_range("chunk", self.chunk, 1)
        check_range("seed", self.seed, 0)
        if self.unit == "participant" and self.method != "gt":
            raise UserError(f"unit=participant with method={self.method!r} is not possible: removing a participant "
                            f"changes who trains and who mixes with whom (the mixing matrices), not a loss weight, "
                            f"so there is no derivative in w for an estimate to take. Use method=gt (retraining), or "
                            f"unit=node for the estimates (removes the node's data, keeps it in the network).")
        if self.scale == 0 or not -1.0 <= self.scale <= 1.0:
            raise UserError(f"scale={self.scale!r} is not valid; it must lie in [-1, 1] and not be 0 (the fraction of "
                            f"each unit's weight gt removes: 1 removes it, small c gives finite differences; "
                            f"negative c up-weights)")
        if self.scale != 1.0 and self.method != "gt":
            raise UserError(f"scale={self.scale!r} only applies to method=gt (the retraining removes a fraction c); "
                            f"method={self.method} is a derivative at w = 1 and has no scale. Drop scale=, or use "
                            f"method=gt")
        if self.lds != 0 and (isinstance(self.lds, bool) or self.lds < 3):
            raise UserError(f"lds={self.lds!r} is not valid; use lds=0 (off) or a number of subsets M >= 3 "
                            f"(a Spearman correlation over subsets needs at least 3; 50 or more is usual)")
        if self.lds_alpha is not None:
            check_range("lds_alpha", self.lds_alpha, 0.0, 1.0, lo_open=True, hi_open=True)


VALUATIONS = ["none", "loo", "shapley_exact", "shapley_mc"]
PLAYERS = ["data", "participant"]
UTILITIES = ["all", "honest"]
EVAL_SETS = ["probe", "heldout"]


@dataclass
class ContribConfig:
    """``dice contrib``: node-level accounting of a node-unit ``dice value`` table and Shapley baselines
    (VALUE.md §5–§6).

    ``value``: the value result to account (None = ``<run>/value``). ``valuation``: none (accounting only) |
    loo | shapley_exact (n ≤ 12) | shapley_mc, over ``player=data|participant`` with utility
    U(S) = −Σ_{k∈K} q_k L_k(θ_k^T(S)), K = every node (``utility=all``) or the honest ones, L_k on the run's
    probe sets (``eval=probe``) or on the test samples no probe set holds (``eval=heldout``).
    """
    run: str = "outputs/latest"            # the dice train run whose nodes are valued
    value: Optional[str] = None           # a dice value result (node units, targets=all); None = <run>/value
    valuation: str = "none"               # none | loo | shapley_exact | shapley_mc
    player: str = "data"                  # data (only S's data counts) | participant (only S takes part)
    utility: str = "all"                  # U(S) over all nodes' losses | honest (not in the attack record)
    eval: str = "probe"                   # the losses of U: the run's probe sets | heldout test samples
    tolerance: float = 0.005              # shapley_mc: stop when every stderr <= tolerance·|U(all) − U(∅)|
    budget: int = 2000                    # shapley_mc: at most this many coalition trainings
    truncation: float = 0.01              # shapley_mc: TMC truncation at |U(all) − U(S)| < truncation·|U(all) − U(∅)|; 0 = off
    free_rider_tol: float = 0.05          # free rider: |given| <= tol·mean|received| < received
    chunk: int = 32                       # coalitions retrained together per pass (copies axis)
    seed: int = 0                         # shapley_mc permutations
    dtype: str = "float64"                # analysis dtype of the coalition retrainings
    device: str = "auto"                  # auto | cpu | cuda
    out: Optional[str] = None             # default: <run>/contrib
    overwrite: bool = False               # replace a contrib result made with another config
    progress: bool = True                 # tqdm bar over coalition passes (terminal only)

    def __post_init__(self) -> None:
        check_choice("valuation", self.valuation, VALUATIONS,
                     "loo: U(all) − U(all∖j); shapley_exact: all 2^n coalitions (n <= 12); shapley_mc: "
                     "permutation sampling with truncation")
        check_choice("player", self.player, PLAYERS,
                     "data: only the coalition's data counts (every node stays in the network); participant: "
                     "only the coalition takes part")
        check_choice("utility", self.utility, UTILITIES)
        check_choice("eval", self.eval, EVAL_SETS)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("device", self.device, DEVICES)
        if isinstance(self.budget, bool) or self.budget < 1:
            raise UserError(f"budget={self.budget!r} is not valid: it is the most coalition trainings shapley_mc "
                            f"may spend, so it must be >= 1 (at least n + 1 for one permutation of n nodes; "
                            f"the default is 2000). Set e.g. budget=500, or use valuation=loo (n + 2 trainings)")
        if not self.tolerance > 0:
            raise UserError(f"tolerance={self.tolerance!r} is not valid: shapley_mc stops when every standard "
                            f"error is below tolerance·|U(all) − U(∅)|, so it must be > 0 (default 0.005); "
                            f"use budget= to bound the cost")
        check_range("truncation", self.truncation, 0.0, 1.0, hi_open=True)
        check_range("free_rider_tol", self.free_rider_tol, 0.0, 1.0, hi_open=True)
        check_range("chunk", self.chunk, 1)
        check_range("seed", self.seed, 0)


NORMALIZATIONS = ["receiver", "none"]
AGGREGATIONS = ["mean", "median"]
SCORES = ["proximal_influence", "dot", "cosine", "distance", "loss", "krum", "norm"]
STAGES = ["train", "gt", "estimate", "detect"]


def parse_scores(spec, key: str = "scores") -> List[str]:
    """``scores`` -> the list of detector scores: ``all`` or a list / comma-separated string of SCORES."""
    if spec is None or (isinstance(spec, str) and spec.strip() == "all"):
        return list(SCORES)
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s) for s in spec]
    items = [s for s in items if s]
    if not items:
        raise UserError(f"{key}={spec!r} selects no score; use all or a list of: {', '.join(SCORES)}")
    for s in items:
        check_choice(f"{key}[]", s, SCORES)
    return list(dict.fromkeys(items))


@dataclass
class DetectStageConfig:
    """How ``dice detect`` scores senders. ``window``: an int w (the last w rounds) or ``"a:b"``.

    Default window ``"0:"`` (the whole run): detection is strongest while the network is still learning
    and weakest late (docs/detection.md: mean AUC over 8 attacks × 2 graphs 0.930 vs 0.761 for the
    last 20 rounds), and where learning ends depends on the run.
    """
    _prefix: ClassVar[str] = "detect."
    window: Any = "0:"  # rounds scored: "a:b" (rounds a..b-1; "0:" = the whole run) | w (the last w rounds)
    score: str = "proximal_influence"     # the primary score (top-level summary fields, flags, topology.png)
    scores: Any = "all"                   # all | a list of SCORES: computed in the same pass, all in summary.scores
    krum_f: Optional[int] = None          # krum: Byzantine in-neighbours assumed; None = the run's largest count
    normalize: str = "receiver"           # robust z-score of each receiver's in-neighbours per round | none
    aggregation: str = "mean"             # over a sender's receivers: mean | median
    k: float = 3.0                        # flag senders with score > median + k · MAD
    q: str = "one"                    # node weights q_k: one | uniform (1/n) | data (|D_k| / Σ|D|)

    def __post_init__(self) -> None:
        p = self._prefix
        check_choice(f"{p}score", self.score, SCORES)
        parse_scores(self.scores, f"{p}scores")
        if self.krum_f is not None:
            check_range(f"{p}krum_f", self.krum_f, 0)
        check_choice(f"{p}normalize", self.normalize, NORMALIZATIONS)
        check_choice(f"{p}aggregation", self.aggregation, AGGREGATIONS)
        check_range(f"{p}k", self.k, 0.0)
        check_choice(f"{p}q", self.q, NODE_WEIGHTS)


@dataclass
class DetectConfig(DetectStageConfig):
    """``dice detect``: proximal influence of every sender on every receiver over a window (spec §5)."""
    _prefix: ClassVar[str] = ""
    run: str = "outputs/latest"       # the `dice train` run directory to score (default: the newest run)
    dtype: str = "float64"            # analysis precision (the run is replayed in it)
    device: str = "auto"              # auto | cpu | cuda
    out: Optional[str] = None             # default: <run>/detect
    overwrite: bool = False           # replace a finished result made with a different config
    progress: bool = True             # tqdm bar with ETA (it also turns itself off when not in a terminal)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("device", self.device, DEVICES)


@dataclass
class PipelineConfig(TrainConfig):
    """``dice pipeline``: train → gt → estimate → detect in one job with one config (stages skippable)."""
    # stages to run, in order: train, gt, estimate, detect
    stages: List[str] = field(default_factory=lambda: list(STAGES))
    influence: SelectionConfig = field(default_factory=SelectionConfig)
    # estimate methods, each written to <run>/estimate_<method>
    methods: List[str] = field(default_factory=lambda: ["exact", "first_order"])
    detect: DetectStageConfig = field(default_factory=DetectStageConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        for s in self.stages:
            check_choice("stages[]", s, STAGES)
        for m in self.methods:
            check_choice("methods[]", m, METHODS)
        nonlinear = self.defense.name != "none" or self.attack.name in MESSAGE_ATTACKS
        if nonlinear and "estimate" in self.stages and "first_order" in self.methods:
            what = f"defense={self.defense.name}" if self.defense.name != "none" else f"attack={self.attack.name}"
            raise UserError(f"methods includes first_order, which assumes linear gossip, but {what} makes the "
                            f"gossip step non-linear; use methods=[exact] (method=exact differentiates through it)")
