"""Datasets, node partitions, probe sets and the per-round mini-batch plan.

    dice train dataset=cifar10 data_dir=/data download=true
    dice train dataset=cifar100 dataset.resize=28 partition.per_node=100 probe.size=5 batch_size=5

``load_dataset`` returns whole splits as float32 CPU tensors, standardised per channel (per feature for
``synthetic``) with the TRAIN split's mean and std. ``split_nodes`` gives every node a sorted list of
dataset indices plus its probe set z'_k; ``batch_plan`` fixes every mini-batch B_k^t of a run up front, so
a counterfactual replay (DICE-GT) sees exactly the same batches. Everything is deterministic from ``seed``.

On-disk layouts under ``data_dir`` (the names the official archives unpack to):
    MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte      (and FashionMNIST/raw/...)
    cifar-10-batches-py/{data_batch_1..5,test_batch}             (python pickles)
    cifar-100-python/{train,test}
    tiny-imagenet-200/{wnids.txt,train/<wnid>/images/*.JPEG,val/images/*.JPEG,val/val_annotations.txt}
"""
from __future__ import annotations

import gzip
import importlib.util
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .config import DatasetConfig, PartitionConfig, ProbeConfig
from .errors import UserError, bad_value

DIGITS_SPLIT_SEED = 0  # digits' train/test split is the same for every run, whatever the seed
TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
MAX_DIRICHLET_DRAWS = 100


@dataclass
class Dataset:
    """Both splits of one dataset. x: [N, C, H, W] (images) or [N, D] (synthetic) float32; y: [N] int64."""
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple:
        """Shape of one sample, e.g. (3, 32, 32) or (32,)."""
        return tuple(self.x_train.shape[1:])


# ----------------------------------------------------------------------------------------------- loading

def load_dataset(cfg: DatasetConfig, data_dir: str, download: bool, seed: int = 0) -> Dataset:
    """Load ``cfg.name`` from ``data_dir`` (fetching it if ``download``), resize, standardise with train stats.

    ``seed`` only affects ``synthetic`` (which blobs are drawn); real splits are fixed.
    """
    data_dir = os.path.expanduser(str(data_dir))
    if cfg.name == "digits":
        xtr, ytr, xte, yte, k = _digits(cfg)
    elif cfg.name == "synthetic":
        xtr, ytr, xte, yte, k = _synthetic(cfg, seed)
    elif cfg.name in ("mnist", "fashion_mnist"):
        xtr, ytr, xte, yte, k = _mnist(cfg.name, data_dir, download)
    elif cfg.name in ("cifar10", "cifar100"):
        xtr, ytr, xte, yte, k = _cifar(cfg.name, data_dir, download)
    elif cfg.name == "tinyimagenet":
        xtr, ytr, xte, yte, k = _tinyimagenet(data_dir)
    else:  # DatasetConfig already rejects unknown names
        raise bad_value("dataset.name", cfg.name)

    if cfg.resize is not None:
        if xtr.dim() != 4:
            raise bad_value("dataset.resize", cfg.resize, fix=f"dataset={cfg.name} is not image data; "
                            "remove dataset.resize (or set dataset.resize=null).")
        xtr, xte = _resize(xtr, cfg.resize), _resize(xte, cfg.resize)
    xtr, xte = _standardise(xtr, xte)
    return Dataset(cfg.name, xtr.contiguous(), ytr.long(), xte.contiguous(), yte.long(), int(k))


def _resize(x: torch.Tensor, side: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, side, side], bilinear with antialiasing (so downscaling does not alias)."""
    if tuple(x.shape[-2:]) == (side, side):
        return x
    return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)


def _standardise(x_train: torch.Tensor, x_test: torch.Tensor):
    """Subtract the train mean and divide by the train std, per channel ([N,C,H,W]) or per feature ([N,D])."""
    dims = (0, 2, 3) if x_train.dim() == 4 else (0,)
    mean = x_train.mean(dim=dims, keepdim=True)
    std = x_train.std(dim=dims, keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant channel stays 0, not NaN
    return (x_train - mean) / std, (x_test - mean) / std


def _u8(x: np.ndarray) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(x)).float() / 255.0


def _digits(cfg: DatasetConfig):
    """sklearn's 8x8 digits (offline): [N, 1, 8, 8] / 16, fixed stratified split.

    Read straight from the CSV file scikit-learn ships, without importing scikit-learn (which costs ~2 s of
    startup, most of it scipy); ``tests/test_data.py`` checks the result is bit-identical to
    ``sklearn.datasets.load_digits`` followed by ``train_test_split(..., stratify=y, random_state=0)``.
    """
    images, target = digits_arrays()
    x = images.astype(np.float32)[:, None] / 16.0
    y = target.astype(np.int64)
    train, test = stratified_split(y, cfg.test_fraction, DIGITS_SPLIT_SEED)
    t = torch.from_numpy
    return t(x[train]), t(y[train]), t(x[test]), t(y[test]), int(y.max()) + 1


def _sklearn_digits_file() -> Optional[Path]:
    """scikit-learn's bundled ``datasets/data/digits.csv.gz``, located without importing the package."""
    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8] float64, target [1797] int) exactly as ``sklearn.datasets.load_digits`` returns
    them: the same file parsed by the same ``np.loadtxt`` call (scikit-learn is imported only when its data
    file cannot be located)."""
    path = _sklearn_digits_file()
    if path is None:
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images, d.target
    with gzip.open(path, "rt", encoding="utf-8") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int, copy=False)


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(train, test) indices of ``sklearn.model_selection.train_test_split(..., test_size=test_fraction,
    stratify=y, random_state=seed)``: its StratifiedShuffleSplit written out (same RandomState draws in the
    same order), so the fixed digits split needs no scikit-learn import. Checked against scikit-learn in
    tests/test_data.py."""
    n = len(y)
    n_test = math.ceil(test_fraction * n)
    n_train = n - n_test
    classes, y_indices, class_counts = np.unique(y, return_inverse=True, return_counts=True)
    if class_counts.min() < 2 or n_train < len(classes) or n_test < len(classes):
        raise UserError(f"dataset.test_fraction={test_fraction} leaves a split with fewer samples than the "
                        f"{len(classes)} classes (or a class with one sample); choose a value nearer 0.2")
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(seed)

    def approximate_mode(counts: np.ndarray, draws: int) -> np.ndarray:
        continuous = counts / counts.sum() * draws
        floored = np.floor(continuous)
        need = int(draws - floored.sum())
        if need > 0:
            remainder = continuous - floored
            for value in np.sort(np.unique(remainder))[::-1]:
                (inds,) = np.where(remainder == value)
                add = min(len(inds), need)
                floored[rng.choice(inds, size=add, replace=False)] += 1
                need -= add
                if need == 0:
                    break
        return floored.astype(int)

    n_i = approximate_mode(class_counts, n_train)
    t_i = approximate_mode(class_counts - n_i, n_test)
    train: List[int] = []
    test: List[int] = []
    for i in range(len(classes)):
        perm = class_indices[i].take(rng.permutation(class_counts[i]), mode="clip")
        train.extend(perm[: n_i[i]])
        test.extend(perm[n_i[i]: n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)


def _synthetic(cfg: DatasetConfig, seed: int):
    """Gaussian blobs: class c is N(separation * u_c, I) in D dims, u_c a random unit vector.

    Classes are balanced (round robin); a seeded shuffle decides the test_fraction held out.
    """
    rng = _rng(seed, "synthetic")
    n, d, k = cfg.synthetic_samples, cfg.synthetic_features, cfg.synthetic_classes
    u = rng.standard_normal((k, d))
    means = cfg.synthetic_separation * u / np.linalg.norm(u, axis=1, keepdims=True)
    y = rng.permutation(np.arange(n) % k).astype(np.int64)
    x = (means[y] + rng.standard_normal((n, d))).astype(np.float32)
    n_test = min(max(1, int(round(n * cfg.test_fraction))), n - 1)
    t = torch.from_numpy
    return t(x[n_test:]), t(y[n_test:]), t(x[:n_test]), t(y[:n_test]), k


def _missing(name: str, data_dir: str, path: Path, what: str, download_hint: bool = True,
             reason: str = "") -> UserError:
    """The standard 'files not found' message: path, cause and the three ways to fix it."""
    msg = f"dataset={name}: {what} not found at {path}"
    if reason:
        msg += f" ({reason})"
    top = path.relative_to(data_dir).parts[0]
    fixes = (["pass download=true"] if download_hint else []) + \
        [f"copy the files into {path.parent}", f"set data_dir=<the folder that holds {top}/>"]
    return UserError(msg + ". Fix: " + ", or ".join(fixes) + ".")


def _mnist(name: str, data_dir: str, download: bool):
    """MNIST / FashionMNIST through torchvision (reads the raw idx files): [N, 1, 28, 28] / 255."""
    from torchvision import datasets

    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    raw = Path(data_dir) / cls.__name__ / "raw"
    files = [f"{s}-{f}" for s in ("train", "t10k") for f in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    missing = [f for f in files if not (raw / f).is_file()]
    if missing and not download:
        raise _missing(name, data_dir, raw / missing[0], "the idx file")
    try:
        train = cls(root=data_dir, train=True, download=download)
        test = cls(root=data_dir, train=False, download=download)
    except Exception as e:  # torchvision: RuntimeError/AssertionError (corrupt), URLError/OSError (offline)
        reason = (str(e).strip().splitlines() or [repr(e)])[0][:200]
        if missing:
            raise _missing(name, data_dir, raw / missing[0], "the idx file", False,
                           "download failed: " + reason) from None
        raise UserError(f"dataset={name}: cannot read the idx files in {raw} ({reason}). Fix: delete them "
                        f"and pass download=true, or copy the official files there.") from None
    return (_u8(train.data.numpy()[:, None]), train.targets.long(),
            _u8(test.data.numpy()[:, None]), test.targets.long(), 10)


CIFAR = {  # name: (folder, train files, test files, label key, classes)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


def _cifar(name: str, data_dir: str, download: bool):
    """CIFAR-10/100 from the python pickles (read here: torchvision would demand the real files' MD5)."""
    folder, train_files, test_files, label_key, k = CIFAR[name]
    root = Path(data_dir) / folder
    missing = [f for f in train_files + test_files if not (root / f).is_file()]
    if missing and download:
        from torchvision import datasets

        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        try:
            cls(root=data_dir, train=True, download=True)
        except Exception as e:
            reason = "download failed: " + (str(e).strip().splitlines() or [repr(e)])[0][:200]
            raise _missing(name, data_dir, root / missing[0], "the CIFAR pickle", False, reason) from None
        missing = [f for f in train_files + test_files if not (root / f).is_file()]
    if missing:
        raise _missing(name, data_dir, root / missing[0], "the CIFAR pickle")

    def read(files):
        xs, ys = [], []
        for f in files:
            try:
                with open(root / f, "rb") as fh:
                    d = pickle.load(fh, encoding="bytes")
                xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(d[label_key], dtype=np.int64))
            except Exception as e:
                raise UserError(f"dataset={name}: cannot read {root / f} as a CIFAR python pickle ({e!r}). "
                                f"Fix: replace it with the file from the official archive.") from None
        return _u8(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    return (*read(train_files), *read(test_files), k)


def _tinyimagenet(data_dir: str):
    """Tiny ImageNet: train/<wnid>/images/*.JPEG and val/ (labelled by val_annotations.txt) as the test split.

    Labels are the line number of the wnid in wnids.txt. Images -> RGB [N, 3, 64, 64] / 255.
    """
    from PIL import Image

    root = Path(data_dir) / "tiny-imagenet-200"
    hint = f"download {TINYIMAGENET_URL} and unzip it into {data_dir}"
    for need in (root / "wnids.txt", root / "val" / "val_annotations.txt"):
        if not need.is_file():
            raise UserError(f"dataset=tinyimagenet: {need} not found (no automatic download). Fix: {hint}, "
                            f"or set data_dir=<the folder that holds tiny-imagenet-200>.")
    wnids = [w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip()]
    label = {w: i for i, w in enumerate(wnids)}

    def image(path: Path) -> np.ndarray:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (64, 64):
                im = im.resize((64, 64), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)

    train = [(p, label[w]) for w in wnids for p in sorted((root / "train" / w / "images").glob("*.JPEG"))]
    test = []
    for line in (root / "val" / "val_annotations.txt").read_text().splitlines():
        cols = line.split("\t")
        if len(cols) < 2:
            continue
        if cols[1] not in label:
            raise UserError(f"dataset=tinyimagenet: {root / 'val' / 'val_annotations.txt'} names wnid "
                            f"{cols[1]!r}, which is not in {root / 'wnids.txt'}. Fix: {hint} again.")
        test.append((root / "val" / "images" / cols[0], label[cols[1]]))
    for split, items, where in (("train", train, root / "train" / "<wnid>" / "images"),
                                ("val", test, root / "val" / "images")):
        if not items:
            raise UserError(f"dataset=tinyimagenet: no {split} images found under {where}. Fix: {hint}.")
        gone = [p for p, _ in items if not p.is_file()]
        if gone:
            raise UserError(f"dataset=tinyimagenet: {gone[0]} not found ({len(gone)} missing). Fix: {hint}.")

    def stack(items):
        x = np.stack([image(p) for p, _ in items])
        return _u8(x), torch.tensor([c for _, c in items], dtype=torch.int64)

    return (*stack(train), *stack(test), len(wnids))


# ------------------------------------------------------------------------------------- partitions & probes

@dataclass
class NodeData:
    """Who trains on what. parts[k]: sorted int64 train indices of node k.

    probe: [n, m] int64 indices into the ``probe_split`` arrays ("test" for probe.kind=shared, every row the
    same; "train" for probe.kind=per_node, held out of node k's own partition and disjoint from parts[k]).
    """
    parts: List[np.ndarray]
    probe_split: str
    probe: np.ndarray


def _rng(seed: int, *keys) -> np.random.Generator:
    """A generator for one purpose: default_rng([seed, *keys]); string keys are hashed stably."""
    if int(seed) < 0:
        raise bad_value("seed", seed, fix="Use a non-negative integer.")
    ints = [int(seed)] + [k if isinstance(k, int) else int.from_bytes(k.encode()[:8], "little") for k in keys]
    return np.random.default_rng(ints)


def split_nodes(y_train: np.ndarray, y_test: np.ndarray, nodes: int, partition: PartitionConfig,
                probe: ProbeConfig, seed: int, batch_size: int) -> NodeData:
    """Partition train indices over ``nodes`` nodes and pick the probe sets.

    Per node, in a seeded order: per_node probes take the first probe.size samples, then
    partition.per_node (if set) keeps the next m as training data, else all the rest train.
    """
    y_train = np.asarray(y_train, dtype=np.int64)
    n_train, n_test = len(y_train), len(y_test)
    held = probe.size if probe.kind == "per_node" else 0
    need = max(batch_size, partition.per_node or 0) + held   # samples a node needs before any cut
    rng = _rng(seed, "partition")

    if partition.name == "iid":
        raw = np.array_split(rng.permutation(n_train), nodes)
    elif partition.name == "dirichlet":
        raw = _dirichlet(y_train, nodes, partition, rng, need)
    elif partition.name == "shards":
        raw = _shards(y_train, nodes, partition.classes_per_node, rng)
    else:  # PartitionConfig already rejects unknown names
        raise bad_value("partition.name", partition.name)

    parts, probes = [], []
    for k, idx in enumerate(raw):
        idx = rng.permutation(np.asarray(idx, dtype=np.int64))  # the node's seeded order
        if held:
            if len(idx) <= held:
                raise UserError(f"probe.size={probe.size} is too large for probe.kind=per_node: node {k} holds "
                                f"only {len(idx)} training samples (nodes={nodes}, N={n_train}) and must keep "
                                f"some to train on. Fix: lower probe.size, use probe.kind=shared, or fewer nodes.")
            probes.append(np.sort(idx[:held]))
            idx = idx[held:]
        if partition.per_node is not None:
            if len(idx) < partition.per_node:
                raise UserError(f"partition.per_node={partition.per_node} is more than node {k} has: "
                                f"{len(idx)} samples left (nodes={nodes}, N={n_train}, partition="
                                f"{partition.name}{f', per-node probe {held}' if held else ''}). "
                                f"Fix: lower partition.per_node or use fewer nodes.")
            idx = idx[:partition.per_node]
        if len(idx) < batch_size:
            raise UserError(f"batch_size={batch_size} is larger than node {k}'s training data "
                            f"({len(idx)} samples; nodes={nodes}, N={n_train}, partition={partition.name}). "
                            f"Fix: lower batch_size, use fewer nodes, or a less skewed partition.")
        parts.append(np.sort(idx))

    if probe.kind == "shared":
        if probe.size > n_test:
            raise UserError(f"probe.size={probe.size} is more than the {n_test} test samples. "
                            f"Fix: set probe.size<={n_test}.")
        return NodeData(parts, "test", np.tile(np.arange(probe.size, dtype=np.int64), (nodes, 1)))
    return NodeData(parts, "train", np.stack(probes).astype(np.int64))


def _dirichlet(y: np.ndarray, nodes: int, partition: PartitionConfig, rng, need: int) -> List[np.ndarray]:
    """Per class, split its samples over nodes with proportions ~ Dir(alpha); redraw until all have ``need``."""
    classes = np.unique(y)
    for _ in range(MAX_DIRICHLET_DRAWS):
        chunks: List[List[np.ndarray]] = [[] for _ in range(nodes)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            p = rng.dirichlet(np.full(nodes, partition.alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for k, piece in enumerate(np.split(idx, cuts)):
                chunks[k].append(piece)
        raw = [np.concatenate(ch) for ch in chunks]
        if min(len(r) for r in raw) >= need:
            return raw
    raise UserError(f"partition.alpha={partition.alpha} is too skewed for nodes={nodes} and N={len(y)}: "
                    f"after {MAX_DIRICHLET_DRAWS} draws some node still had fewer than {need} samples "
                    f"(batch_size, partition.per_node and per-node probes need that many). "
                    f"Fix: use a larger partition.alpha or fewer nodes.")


def _shards(y: np.ndarray, nodes: int, per_node: int, rng) -> List[np.ndarray]:
    """Label-sorted shards, each within one class: nodes*per_node shards, node k gets per_node of them.

    Classes are shuffled (seeded) and get S // C shards each (+1 for the first S % C), so with S < C only
    S classes are used. Shards are dealt round robin over the class-sorted list, so a node's shards come
    from distinct classes whenever per_node <= C; which node gets which hand is shuffled too.
    """
    classes = rng.permutation(np.unique(y))
    if per_node > len(classes):
        raise bad_value("partition.classes_per_node", per_node,
                        fix=f"The data has only {len(classes)} classes; use at most that many.")
    total = nodes * per_node
    shards = []
    for i, c in enumerate(classes):
        count = total // len(classes) + (i < total % len(classes))
        if count:
            shards += np.array_split(rng.permutation(np.flatnonzero(y == c)), count)
    hands = [np.concatenate(shards[k::nodes]) for k in range(nodes)]
    return [hands[j] for j in rng.permutation(nodes)]


# ------------------------------------------------------------------------------------------ batches

def batch_plan(parts: List[np.ndarray], rounds: int, batch_size: int, seed: int) -> np.ndarray:
    """Every node's mini-batches for every round: [rounds, n, batch_size] int64 dataset indices.

    Node k walks seeded permutations of parts[k] (rng = default_rng([seed, k])), one per epoch, cut into
    ⌊|part| / B⌋ whole batches; an epoch's leftover samples are skipped (drop-last), so a batch never holds
    the same sample twice and a sample unit is identified by its dataset index. The plan for R rounds is
    a prefix of the plan for any R' > R.
    """
    plan = np.empty((rounds, len(parts), batch_size), dtype=np.int64)
    for k, part in enumerate(parts):
        part = np.asarray(part, dtype=np.int64)
        per_epoch = len(part) // batch_size
        if per_epoch == 0:
            raise ValueError(f"node {k} has {len(part)} training samples, fewer than batch_size={batch_size}")
        rng = _rng(seed, k)
        epochs = -(-rounds // per_epoch)
        batches = [rng.permutation(part)[:per_epoch * batch_size].reshape(per_epoch, batch_size)
                   for _ in range(epochs)]
        plan[:, k, :] = np.concatenate(batches)[:rounds]
    return plan


def sample_owner(parts: List[np.ndarray], n_train: int) -> np.ndarray:
    """[n_train] int64: the node whose training part holds each sample, -1 for none (unused or a probe)."""
    owner = np.full(n_train, -1, dtype=np.int64)
    for k, part in enumerate(parts):
        owner[np.asarray(part, dtype=np.int64)] = k
    return owner
