"""Tests for dice_cli/data.py: loaders on tiny files in the real on-disk formats, partitions, probes, batches."""
from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dice_cli.config import DatasetConfig, PartitionConfig, ProbeConfig
from dice_cli.data import Dataset, NodeData, batch_plan, load_dataset, sample_owner, split_nodes
from dice_cli.errors import UserError


# ------------------------------------------------------------------------------------------ file writers

def write_idx(raw: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """MNIST idx format: big-endian magic 2051 (images, uint8 [N,28,28]) / 2049 (labels, uint8 [N])."""
    raw.mkdir(parents=True, exist_ok=True)
    n = len(images)
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28)
                                                      + images.astype(np.uint8).tobytes())
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n)
                                                      + labels.astype(np.uint8).tobytes())


def make_mnist(root: Path, folder: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    tr_x = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    tr_y = np.arange(12) % 10
    te_x = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    te_y = np.array([3, 1, 4, 1, 5])
    write_idx(root / folder / "raw", "train", tr_x, tr_y)
    write_idx(root / folder / "raw", "t10k", te_x, te_y)
    return tr_x, tr_y, te_x, te_y


def write_pickle(path: Path, data: np.ndarray, labels, key: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({b"data": data, key: labels, b"batch_label": b"x"}, f)


def make_cifar10(root: Path):
    rng = np.random.default_rng(1)
    xs, ys = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        y = [(i + j) % 10 for j in range(3)]
        write_pickle(root / "cifar-10-batches-py" / f"data_batch_{i}", x, y, b"labels")
        xs.append(x)
        ys += y
    te = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    write_pickle(root / "cifar-10-batches-py" / "test_batch", te, [9, 8, 7, 6], b"labels")
    return np.concatenate(xs), np.array(ys), te


def write_jpeg(path: Path, color) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), color).save(path, "JPEG", quality=95)


def make_tiny(root: Path):
    base = root / "tiny-imagenet-200"
    wnids = ["n01", "n02", "n03"]
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    colors = {"n01": (250, 0, 0), "n02": (0, 250, 0), "n03": (0, 0, 250)}
    for w in wnids:
        for j in range(2):
            write_jpeg(base / "train" / w / "images" / f"{w}_{j}.JPEG", colors[w])
    ann = []
    for j, w in enumerate(["n03", "n01"]):
        write_jpeg(base / "val" / "images" / f"val_{j}.JPEG", colors[w])
        ann.append(f"val_{j}.JPEG\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")


def assert_standardised(ds: Dataset, raw_train: torch.Tensor, raw_test: torch.Tensor) -> None:
    """x_test must equal (raw_test - train mean) / train std, per channel."""
    dims = (0, 2, 3)
    mean = raw_train.mean(dim=dims, keepdim=True)
    std = raw_train.std(dim=dims, keepdim=True)
    torch.testing.assert_close(ds.x_train, (raw_train - mean) / std, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ds.x_test, (raw_test - mean) / std, atol=1e-5, rtol=1e-5)
    assert ds.x_train.mean(dim=dims).abs().max() < 1e-5
    assert ds.x_test.mean(dim=dims).abs().max() > 1e-3  # the test split is NOT re-centred on itself


# ------------------------------------------------------------------------------------------------ loaders

@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_like_loaders_read_idx_files(tmp_path, name, folder):
    tr_x, tr_y, te_x, te_y = make_mnist(tmp_path, folder, seed=len(name))
    ds = load_dataset(DatasetConfig(name=name), str(tmp_path), download=False)
    assert ds.name == name and ds.num_classes == 10
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_test.shape == (5, 1, 28, 28)
    assert ds.input_shape == (1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.y_train.tolist() == tr_y.tolist() and ds.y_test.tolist() == te_y.tolist()
    raw_tr = torch.from_numpy(tr_x).float()[:, None] / 255
    raw_te = torch.from_numpy(te_x).float()[:, None] / 255
    assert_standardised(ds, raw_tr, raw_te)


def test_fashion_mnist_does_not_read_mnist_folder(tmp_path):
    make_mnist(tmp_path, "MNIST")
    with pytest.raises(UserError) as e:
        load_dataset(DatasetConfig(name="fashion_mnist"), str(tmp_path), download=False)
    assert str(tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte") in str(e.value)
    assert "download=true" in str(e.value) and "data_dir=" in str(e.value)


def test_cifar10_reads_pickles(tmp_path):
    tr, tr_y, te = make_cifar10(tmp_path)
    ds = load_dataset(DatasetConfig(name="cifar10"), str(tmp_path), download=False)
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    assert ds.num_classes == 10
    assert ds.y_train.tolist() == tr_y.tolist() and ds.y_test.tolist() == [9, 8, 7, 6]
    raw_tr = torch.from_numpy(tr.reshape(-1, 3, 32, 32)).float() / 255
    raw_te = torch.from_numpy(te.reshape(-1, 3, 32, 32)).float() / 255
    assert_standardised(ds, raw_tr, raw_te)


def test_cifar100_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(2)
    base = tmp_path / "cifar-100-python"
    tr = rng.integers(0, 256, (6, 3072), dtype=np.uint8)
    with open(base.mkdir() or base / "train", "wb") as f:
        pickle.dump({b"data": tr, b"fine_labels": [0, 99, 50, 1, 2, 3], b"coarse_labels": [0] * 6}, f)
    write_pickle(base / "test", rng.integers(0, 256, (2, 3072), dtype=np.uint8), [42, 7], b"fine_labels")
    ds = load_dataset(DatasetConfig(name="cifar100"), str(tmp_path), download=False)
    assert ds.num_classes == 100
    assert ds.y_train.tolist() == [0, 99, 50, 1, 2, 3] and ds.y_test.tolist() == [42, 7]
    assert ds.x_train.shape == (6, 3, 32, 32)
    # channel order: the first 1024 bytes are the red plane
    raw = torch.from_numpy(tr.reshape(-1, 3, 32, 32)).float() / 255
    r = raw[:, 0]
    torch.testing.assert_close(ds.x_train[:, 0], (r - r.mean()) / r.std(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,path", [("cifar10", "cifar-10-batches-py/data_batch_1"),
                                       ("cifar100", "cifar-100-python/train"),
                                       ("mnist", "MNIST/raw/train-images-idx3-ubyte")])
def test_missing_files_name_the_path(tmp_path, name, path):
    with pytest.raises(UserError) as e:
        load_dataset(DatasetConfig(name=name), str(tmp_path), download=False)
    msg = str(e.value)
    assert str(tmp_path / path) in msg and "download=true" in msg and "data_dir=" in msg


def test_mnist_download_failure_is_user_error(tmp_path, monkeypatch):
    from urllib.error import URLError

    import torchvision.datasets as tvd

    def offline(self):
        raise URLError("no network")

    monkeypatch.setattr(tvd.MNIST, "download", offline)
    with pytest.raises(UserError) as e:
        load_dataset(DatasetConfig(name="mnist"), str(tmp_path), download=True)
    msg = str(e.value)
    assert "download failed" in msg and str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte") in msg


def test_corrupt_idx_is_user_error(tmp_path):
    make_mnist(tmp_path, "MNIST")
    (tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(UserError, match="cannot read the idx files"):
        load_dataset(DatasetConfig(name="mnist"), str(tmp_path), download=False)


def test_cifar_download_true_fetches_then_reads(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    calls = []

    class FakeCIFAR10:  # stands in for torchvision's downloader: unpacks the archive into root
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            make_cifar10(Path(root))

    monkeypatch.setattr(tvd, "CIFAR10", FakeCIFAR10)
    ds = load_dataset(DatasetConfig(name="cifar10"), str(tmp_path), download=True)
    assert calls == [(str(tmp_path), True, True)] and ds.x_train.shape == (15, 3, 32, 32)
    load_dataset(DatasetConfig(name="cifar10"), str(tmp_path), download=True)
    assert len(calls) == 1  # files present: no second download


def test_cifar10_partial_files_name_the_first_missing(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(UserError, match="test_batch"):
        load_dataset(DatasetConfig(name="cifar10"), str(tmp_path), download=False)


def test_corrupt_cifar_pickle_is_user_error(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="data_batch_3"):
        load_dataset(DatasetConfig(name="cifar10"), str(tmp_path), download=False)


def test_tinyimagenet_reads_folders(tmp_path):
    make_tiny(tmp_path)
    ds = load_dataset(DatasetConfig(name="tinyimagenet"), str(tmp_path), download=False)
    assert ds.num_classes == 3
    assert ds.x_train.shape == (6, 3, 64, 64) and ds.x_test.shape == (2, 3, 64, 64)
    assert ds.y_train.tolist() == [0, 0, 1, 1, 2, 2] and ds.y_test.tolist() == [2, 0]
    # solid colours: after standardisation the red channel of class 0 is the largest value
    red = ds.x_train[:, 0].mean(dim=(1, 2))
    assert red.argmax().item() in (0, 1)
    assert ds.x_train.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    torch.testing.assert_close(ds.x_test[1], ds.x_train[0], atol=0.05, rtol=0)  # val_1 is class n01


def test_tinyimagenet_missing_says_where_to_get_it(tmp_path):
    with pytest.raises(UserError) as e:
        load_dataset(DatasetConfig(name="tinyimagenet"), str(tmp_path), download=True)
    msg = str(e.value)
    assert str(tmp_path / "tiny-imagenet-200" / "wnids.txt") in msg
    assert "cs231n.stanford.edu/tiny-imagenet-200.zip" in msg


def test_tinyimagenet_unknown_val_wnid(tmp_path):
    make_tiny(tmp_path)
    ann = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    ann.write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(UserError, match="n99"):
        load_dataset(DatasetConfig(name="tinyimagenet"), str(tmp_path), download=False)


def test_digits_shape_classes_and_fixed_split():
    from sklearn.datasets import load_digits

    n = len(load_digits().target)
    n_test = int(np.ceil(n * 0.2))
    a = load_dataset(DatasetConfig(name="digits"), "unused", download=False, seed=0)
    b = load_dataset(DatasetConfig(name="digits"), "unused", download=False, seed=7)
    assert a.x_train.shape == (n - n_test, 1, 8, 8) and a.x_test.shape == (n_test, 1, 8, 8)
    assert a.num_classes == 10 and sorted(set(a.y_train.tolist())) == list(range(10))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)  # independent of seed
    assert a.x_train.mean().abs() < 1e-5 and abs(a.x_train.std().item() - 1) < 1e-3


def test_digits_without_sklearn_is_bit_identical_to_sklearn():
    """The fast twin (CSV read + stratified split written out) against scikit-learn itself."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from dice_cli.data import digits_arrays, stratified_split

    d = load_digits()
    images, target = digits_arrays()
    assert images.dtype == d.images.dtype and np.array_equal(images, d.images)
    assert target.dtype == d.target.dtype and np.array_equal(target, d.target)
    idx = np.arange(len(target))
    for frac in (0.2, 0.1, 1 / 3, 0.5, 0.77):
        for seed in (0, 1, 42):
            want_tr, want_te = train_test_split(idx, test_size=frac, stratify=target, random_state=seed)
            got_tr, got_te = stratified_split(target, frac, seed)
            assert np.array_equal(got_tr, want_tr) and np.array_equal(got_te, want_te), (frac, seed)
    # the loaded dataset equals the scikit-learn pipeline it replaced
    x = d.images.astype(np.float32)[:, None] / 16.0
    xtr, xte, ytr, yte = train_test_split(x, d.target.astype(np.int64), test_size=0.2, stratify=d.target,
                                          random_state=0)
    got = load_dataset(DatasetConfig(name="digits"), "unused", download=False)
    assert torch.equal(got.y_train, torch.from_numpy(ytr)) and torch.equal(got.y_test, torch.from_numpy(yte))
    t = torch.from_numpy(xtr)
    mean, std = t.mean(dim=(0, 2, 3), keepdim=True), t.std(dim=(0, 2, 3), keepdim=True)
    assert torch.equal(got.x_train, (t - mean) / std)
    assert torch.equal(got.x_test, (torch.from_numpy(xte) - mean) / std)


def test_digits_load_does_not_import_sklearn():
    import subprocess
    import sys

    code = ("import sys; from dice_cli.config import DatasetConfig; from dice_cli.data import load_dataset; "
            "load_dataset(DatasetConfig(name='digits'), 'unused', False); "
            "print(sorted(m for m in ('sklearn', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


def test_synthetic_is_seeded_and_standardised_per_feature():
    cfg = DatasetConfig(name="synthetic", synthetic_samples=200, synthetic_features=5, synthetic_classes=4,
                        test_fraction=0.25)
    a = load_dataset(cfg, "unused", False, seed=1)
    b = load_dataset(cfg, "unused", False, seed=1)
    c = load_dataset(cfg, "unused", False, seed=2)
    assert a.x_train.shape == (150, 5) and a.x_test.shape == (50, 5) and a.input_shape == (5,)
    assert a.num_classes == 4 and a.y_train.dtype == torch.int64
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.x_train, c.x_train)
    torch.testing.assert_close(a.x_train.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(a.x_train.std(0), torch.ones(5), atol=1e-5, rtol=0)
    assert np.bincount(torch.cat([a.y_train, a.y_test]).numpy()).tolist() == [50] * 4


def test_synthetic_rejects_resize():
    with pytest.raises(UserError, match="dataset.resize"):
        load_dataset(DatasetConfig(name="synthetic", resize=8), "unused", False)


def test_resize_then_standardise(tmp_path):
    make_cifar10(tmp_path)
    ds = load_dataset(DatasetConfig(name="cifar10", resize=28), str(tmp_path), download=False)
    assert ds.x_train.shape == (15, 3, 28, 28) and ds.input_shape == (3, 28, 28)
    assert ds.x_test.shape == (4, 3, 28, 28)
    assert ds.x_train.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    torch.testing.assert_close(ds.x_train.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4, rtol=0)
    up = load_dataset(DatasetConfig(name="digits", resize=16), "unused", download=False)
    assert up.x_train.shape[1:] == (1, 16, 16)


# ------------------------------------------------------------------------------------------- partitions

def labels(n=600, k=10, seed=0):
    return np.random.default_rng(seed).permutation(np.arange(n) % k)


def split(y, nodes=6, seed=0, bs=4, y_test=None, **kw):
    part = PartitionConfig(**{k: v for k, v in kw.items() if k in ("name", "alpha", "classes_per_node",
                                                                    "per_node")})
    kw.setdefault("probe_size", 5)
    probe = ProbeConfig(**{k[6:]: v for k, v in kw.items() if k.startswith("probe_")})
    y_test = np.zeros(50, dtype=np.int64) if y_test is None else y_test
    return split_nodes(y, y_test, nodes, part, probe, seed, bs)


def assert_disjoint(parts):
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx)
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)  # sorted, unique


def test_iid_disjoint_cover_even_and_seeded():
    y = labels(603)
    nd = split(y, nodes=6, name="iid")
    assert isinstance(nd, NodeData) and nd.probe_split == "test"
    assert_disjoint(nd.parts)
    assert np.array_equal(np.sort(np.concatenate(nd.parts)), np.arange(603))
    assert sorted(len(p) for p in nd.parts) == [100, 100, 100, 101, 101, 101]
    again = split(y, nodes=6, name="iid")
    other = split(y, nodes=6, name="iid", seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(nd.parts, again.parts))
    assert not all(np.array_equal(a, b) for a, b in zip(nd.parts, other.parts))


def test_dirichlet_covers_and_small_alpha_is_skewed():
    y = labels(2000)
    skew = split(y, nodes=5, name="dirichlet", alpha=0.1)
    flat = split(y, nodes=5, name="dirichlet", alpha=100.0)
    for nd in (skew, flat):
        assert_disjoint(nd.parts)
        assert np.array_equal(np.sort(np.concatenate(nd.parts)), np.arange(2000))
        assert min(len(p) for p in nd.parts) >= 4

    def top_share(nd):  # mean share of each node's most frequent class
        return np.mean([np.bincount(y[p], minlength=10).max() / len(p) for p in nd.parts])

    assert top_share(skew) > 0.4 > 0.15 > top_share(flat)


def test_dirichlet_impossible_gives_user_error():
    with pytest.raises(UserError) as e:
        split(labels(40), nodes=8, bs=8, name="dirichlet", alpha=0.01)
    assert "partition.alpha=0.01" in str(e.value) and "larger partition.alpha" in str(e.value)


def test_shards_limit_classes_per_node():
    y = labels(1000)
    y[:37] = 3  # uneven class sizes
    for nodes, cpn in [(5, 2), (10, 2), (7, 3), (4, 1), (3, 2)]:
        nd = split(y, nodes=nodes, name="shards", classes_per_node=cpn)
        assert_disjoint(nd.parts)
        for p in nd.parts:
            assert len(np.unique(y[p])) == cpn
        if nodes * cpn >= 10:  # enough shards: every sample is used
            assert np.array_equal(np.sort(np.concatenate(nd.parts)), np.arange(1000))


def test_shards_more_classes_than_exist():
    with pytest.raises(UserError, match="partition.classes_per_node=11"):
        split(labels(), nodes=2, name="shards", classes_per_node=11)


def test_per_node_keeps_m_samples():
    y = labels()
    nd = split(y, nodes=4, name="iid", per_node=20)
    assert [len(p) for p in nd.parts] == [20] * 4
    assert_disjoint(nd.parts)
    full = split(y, nodes=4, name="iid")
    for small, big in zip(nd.parts, full.parts):
        assert np.isin(small, big).all()
    with pytest.raises(UserError) as e:
        split(y, nodes=4, name="iid", per_node=151)
    msg = str(e.value)
    assert "partition.per_node=151" in msg and "nodes=4" in msg and "N=600" in msg


def test_batch_size_guard_names_node():
    with pytest.raises(UserError) as e:
        split(labels(30), nodes=4, bs=8, name="iid")
    assert "batch_size=8" in str(e.value) and "node 2" in str(e.value) and "7 samples" in str(e.value)


def test_shared_probe_is_first_test_samples():
    nd = split(labels(), nodes=3, name="iid", probe_kind="shared", probe_size=5)
    assert nd.probe_split == "test" and nd.probe.dtype == np.int64
    assert nd.probe.tolist() == [[0, 1, 2, 3, 4]] * 3
    with pytest.raises(UserError, match="probe.size=51"):
        split(labels(), nodes=3, name="iid", probe_size=51)


def test_per_node_probe_is_held_out_of_own_part():
    y = labels()
    nd = split(y, nodes=4, name="iid", probe_kind="per_node", probe_size=10)
    assert nd.probe_split == "train" and nd.probe.shape == (4, 10)
    assert_disjoint(nd.parts)
    assert len(np.unique(nd.probe)) == 40
    assert not np.isin(nd.probe, np.concatenate(nd.parts)).any()
    assert np.array_equal(np.sort(np.concatenate(nd.parts + [nd.probe.ravel()])), np.arange(600))
    assert [len(p) for p in nd.parts] == [140] * 4
    # with per_node: m training samples besides the probe
    nd = split(y, nodes=4, name="iid", per_node=30, probe_kind="per_node", probe_size=10)
    assert [len(p) for p in nd.parts] == [30] * 4
    for k in range(4):
        assert not np.isin(nd.probe[k], nd.parts[k]).any()
    with pytest.raises(UserError, match="probe.size=150"):
        split(y, nodes=4, name="iid", probe_kind="per_node", probe_size=150)


def test_negative_seed_is_user_error():
    with pytest.raises(UserError, match="seed=-1"):
        split(labels(), seed=-1, name="iid")


# ------------------------------------------------------------------------------------------------ batches

def test_batch_plan_deterministic_prefix_and_epochs():
    parts = [np.arange(0, 12), np.arange(100, 108), np.array([5, 50, 77, 500])]
    plan = batch_plan(parts, rounds=9, batch_size=4, seed=3)
    assert plan.shape == (9, 3, 4) and plan.dtype == np.int64
    assert np.array_equal(plan, batch_plan(parts, 9, 4, 3))
    assert np.array_equal(plan[:5], batch_plan(parts, 5, 4, 3))
    assert not np.array_equal(plan, batch_plan(parts, 9, 4, 4))
    for k, part in enumerate(parts):
        batches = plan[:, k, :]
        assert np.isin(batches, part).all()
        per_epoch = len(part) // 4
        for e in range(0, 9 // per_epoch):  # an epoch's batches never repeat a sample
            block = batches[e * per_epoch:(e + 1) * per_epoch].ravel()
            assert len(np.unique(block)) == len(block) == per_epoch * 4


def test_batch_plan_drop_last_no_repeats_within_a_batch():
    part = [np.arange(10)]
    plan = batch_plan(part, rounds=6, batch_size=4, seed=0)[:, 0]  # 2 whole batches per epoch, 2 left over
    for b in plan:
        assert len(np.unique(b)) == 4
    first, second = plan[:2].ravel(), plan[2:4].ravel()
    assert len(np.unique(first)) == 8 and len(np.unique(second)) == 8
    assert not np.array_equal(first, second)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        batch_plan([np.arange(3)], rounds=2, batch_size=4, seed=0)


def test_sample_owner():
    parts = [np.array([0, 3]), np.array([1, 5, 6])]
    assert sample_owner(parts, 8).tolist() == [0, 1, -1, 0, -1, 1, 1, -1]
    nd = split(labels(), nodes=4, name="iid", probe_kind="per_node", probe_size=5)
    owner = sample_owner(nd.parts, 600)
    assert owner.dtype == np.int64
    assert (owner[nd.probe.ravel()] == -1).all() and (owner >= 0).sum() == 580
    for k, p in enumerate(nd.parts):
        assert (owner[p] == k).all()
