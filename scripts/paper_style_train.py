#!/usr/bin/env python
"""An independent decentralized-SGD training script written the way the DICE paper's code is written: the
baseline that ``scripts/bench_train.py --whole`` times ``dice train`` against, as its own process.

What it shares with the paper's code (github.com/Raiden-Zhu/ICLR-2025-DICE, experiment1): one ``nn.Module``
and one ``torch.optim.SGD`` per node, one ``DataLoader`` per node (shuffled, drop-last, a new iterator at
every epoch), the mixing matrix as a torch tensor, and the official gossip loop (``merge_model``: for every
node, every parameter and every sender i, ``param.data += state_dict_i[name] * P[rank][i]``, zeros
included). No per-round evaluation; one intra-op thread (``--threads``). At the end every node is evaluated
on the probe set (the first 100 test samples) and a small JSON result is written. It does not import
dice_cli: only torch, numpy and (for digits) scikit-learn, as such a script would.

The setup matches ``dice train``'s defaults: digits (scikit-learn's 8x8 images, a stratified 80/20 split),
16 nodes on a ring (1/3 on self and both neighbours), MLP 64-32-10, batch 16, lr 0.1, 200 rounds.
``--data synthetic`` draws digits-shaped Gaussian data (64 features, 10 classes) big enough for
``nodes x batch`` (the 256-node comparison: digits has only 1437 training images).

    python scripts/paper_style_train.py                       # the default config, ~as dice train
    python scripts/paper_style_train.py --nodes 256 --data synthetic --rounds 20
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def load(args):
    """(x_train, y_train, x_test, y_test) as float32 / int64 tensors, standardised with train statistics."""
    if args.data == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x = d.images.reshape(len(d.images), -1).astype(np.float32) / 16.0
        xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.2, stratify=d.target, random_state=0)
    else:
        rng = np.random.default_rng(args.seed)
        n = max(2000, math.ceil(args.nodes * args.batch_size * 1.5 / 0.8))
        means = rng.standard_normal((10, 64)) * 3.0 / 8.0
        y = rng.permutation(np.arange(n) % 10)
        x = (means[y] + rng.standard_normal((n, 64))).astype(np.float32)
        cut = n // 5
        xtr, xte, ytr, yte = x[cut:], x[:cut], y[cut:], y[:cut]
    mean, std = xtr.mean(0), xtr.std(0)
    std[std == 0] = 1.0
    t = torch.from_numpy
    return (t((xtr - mean) / std), t(np.asarray(ytr, dtype=np.int64)),
            t((xte - mean) / std), t(np.asarray(yte, dtype=np.int64)))


def ring(size: int) -> torch.Tensor:
    """The paper's generate_P('ring')."""
    P = torch.zeros((size, size))
    for i in range(size):
        P[i][i] = 1 / 3
        P[i][(i - 1 + size) % size] = 1 / 3
        P[i][(i + 1) % size] = 1 / 3
    return P


def merge_model(models, P) -> None:
    """The paper's official gossip loop (utils.merge_model)."""
    model_dict_list = [m.state_dict() for m in models]
    for rank, m in enumerate(models):
        for name, param in m.named_parameters():
            param.data = torch.zeros_like(param.data)
            for i in range(len(models)):
                p = P[rank][i]
                param.data += model_dict_list[i][name].data * p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", choices=["digits", "synthetic"], default="digits")
    ap.add_argument("--out", default=None, help="write the final probe losses as JSON here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    xtr, ytr, xte, yte = load(args)
    perm = np.random.default_rng(args.seed).permutation(len(ytr))
    parts = np.array_split(perm, args.nodes)
    loaders = [DataLoader(TensorDataset(xtr[p], ytr[p]), batch_size=args.batch_size, shuffle=True, drop_last=True)
               for p in parts]
    models = [nn.Sequential(nn.Flatten(), nn.Linear(64, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 10))
              for _ in range(args.nodes)]
    opts = [torch.optim.SGD(m.parameters(), lr=args.lr) for m in models]
    criterion = nn.CrossEntropyLoss()
    P = ring(args.nodes)
    iters = [iter(dl) for dl in loaders]
    t1 = time.perf_counter()
    for iteration in range(args.rounds):
        for k, (m, opt) in enumerate(zip(models, opts)):
            if iteration % len(loaders[k]) == 0:
                iters[k] = iter(loaders[k])
            data, target = next(iters[k])
            m.train()
            loss = criterion(m(data), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        merge_model(models, P)
    t2 = time.perf_counter()
    xp, yp = xte[:100], yte[:100]
    losses, accs = [], []
    with torch.no_grad():
        for m in models:
            m.eval()
            out = m(xp)
            losses.append(float(criterion(out, yp)))
            accs.append(float((out.argmax(1) == yp).float().mean()))
    result = {"probe_loss": losses, "probe_acc": accs, "setup_s": t1 - t0, "train_s": t2 - t1,
              "ms_per_round": 1e3 * (t2 - t1) / max(args.rounds, 1)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f)
    print(f"paper-style: {args.nodes} nodes, {args.rounds} rounds, {result['ms_per_round']:.2f} ms/round, "
          f"final probe acc {np.mean(accs):.3f}")


if __name__ == "__main__":
    main()
