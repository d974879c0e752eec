"""engine=distributed: gloo ranks on this CPU (loopback only) against the single-process engine.

Multi-rank runs start one `python -m dice_cli.cli train ...` process per rank with torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, MASTER_PORT=<free port>), which is what torchrun
itself provides, without its agent process.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import SUBPROCESS_TIMEOUT
from dice_cli import distributed
from dice_cli.distributed import GossipPlan, block_bounds

ROOT = Path(__file__).resolve().parents[1]
BASE = ["nodes=8", "batch_size=8", "progress=false", "dtype=float64", "device=cpu", "optim.momentum=0.9",
        "eval_every=4"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(ranks: int, cwd: Path, *args: str, timeout: float = SUBPROCESS_TIMEOUT) -> List[Tuple[int, str, str]]:
    """`dice train engine=distributed args` on `ranks` gloo ranks; [(exit code, stdout, stderr)] by rank."""
    port = free_port()
    procs = []
    for r in range(ranks):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(ranks), "LOCAL_RANK": str(r),
               "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen([sys.executable, "-m", "dice_cli.cli", "train", "engine=distributed", *args],
                                      cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


def ckpt(run: Path, t: int) -> dict:
    return torch.load(run / "checkpoints" / f"round_{t:06d}.pt", weights_only=True)


def assert_same_run(a: Path, b: Path, tol: float = 1e-10) -> None:
    """Every checkpoint of b equals a's (Θ, momentum, Δ, buffers), and so do the metrics."""
    rounds_a = sorted(p.name for p in (a / "checkpoints").iterdir())
    assert rounds_a == sorted(p.name for p in (b / "checkpoints").iterdir())
    for name in rounds_a:
        x = torch.load(a / "checkpoints" / name, weights_only=True)
        y = torch.load(b / "checkpoints" / name, weights_only=True)
        assert sorted(x) == sorted(y) and x["round"] == y["round"]
        for key in ("theta", "momentum", "delta"):
            if x.get(key) is None:
                assert y.get(key) is None
            else:
                assert x[key].dtype == y[key].dtype == torch.float64
                assert (x[key] - y[key]).abs().max() <= tol, (name, key)
        assert x["buffers"].keys() == y["buffers"].keys()
    ma, mb = pd.read_csv(a / "metrics.csv"), pd.read_csv(b / "metrics.csv")
    assert list(ma.columns) == list(mb.columns) and len(ma) == len(mb)
    assert np.allclose(ma.to_numpy(float), mb.to_numpy(float), rtol=0, atol=1e-9)


def ok(results) -> None:
    for r, (code, out, err) in enumerate(results):
        assert code == 0, f"rank {r} exited {code}:\n{out}\n{err}"


# ---- the gossip plan, without processes ------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_gossip_plan_moves_exactly_the_coupled_rows_and_reproduces_w_theta(world):
    rng = np.random.default_rng(world)
    n, F = 11, 3
    W = rng.random((n, n)) * (rng.random((n, n)) < 0.25)
    W[np.arange(n), np.arange(n)] += 1.0
    W /= W.sum(1, keepdims=True)
    Z = rng.standard_normal((n, F))
    bounds = block_bounds(n, world)
    assert bounds[0] == 0 and bounds[-1] == n and all(b > a for a, b in zip(bounds, bounds[1:]))
    plans = [GossipPlan.build(W, bounds, r) for r in range(world)]
    out = np.zeros_like(Z)
    for r, p in enumerate(plans):
        lo, hi = bounds[r], bounds[r + 1]
        for q, ids in p.recv.items():   # what r receives from q is exactly what q sends to r
            assert np.array_equal(ids, plans[q].send[r] + bounds[q])
            assert all(W[lo:hi, l].any() for l in ids)
        parts = [Z[lo:hi][p.own] if q == r else Z[p.recv[q]] for q in range(world) if q == r or q in p.recv]
        out[lo:hi] = p.weights @ np.concatenate(parts)
        needed = {int(l) for l in np.flatnonzero(W[lo:hi].any(0)) if not lo <= l < hi}
        assert needed == {int(l) for ids in p.recv.values() for l in ids}
    assert np.allclose(out, W @ Z, rtol=0, atol=1e-14)


def test_rank_layout_from_torchrun_or_slurm(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SUBMITIT_EXECUTOR",
              "SLURM_PROCID", "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_LOCALID", "SLURM_JOB_ID"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.rank_layout() == (0, 1, 0, "none")
    monkeypatch.setenv("PATH", "")  # no scontrol: the node list itself names the first host
    for k, v in {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234",
                 "SLURM_JOB_NODELIST": "gpu[07-08,11],cpu01"}.items():
        monkeypatch.setenv(k, v)
    assert distributed.rank_layout() == (5, 8, 1, "slurm")
    distributed._slurm_rendezvous()
    assert os.environ["MASTER_ADDR"] == "gpu07" and os.environ["MASTER_PORT"] == "21234"
    for k, v in {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}.items():   # torchrun's variables win
        monkeypatch.setenv(k, v)
    assert distributed.rank_layout() == (2, 4, 0, "torchrun")


# ---- one process (world size 1, no launcher) ----------------------------------------------------------------

def test_world_size_one_equals_vmap_and_refuses_another_engine_version(dice, tmp_path):
    args = [*BASE, "rounds=6", "topology=exponential"]
    assert dice("train", *args, "out=v")[0] == 0
    code, out, err = dice("train", *args, "out=d", "engine=distributed")
    assert code == 0, err
    assert_same_run(tmp_path / "v", tmp_path / "d", tol=0.0)
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert m["engine"] == "distributed" and m["engine_version"] == 1 and m["distributed"]["world_size"] == 1
    # an interrupted run written by another engine version is refused, nothing changed
    m.update(status="interrupted", engine_version=99)
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(m))
    code, out, err = dice("train", *args, "out=d", "engine=distributed")
    assert code == 2 and "engine version 99" in err and "Traceback" not in err
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["engine_version"] == 99


# ---- gloo ranks -------------------------------------------------------------------------------------------

def test_two_ranks_equal_vmap_and_dice_gt_reads_the_run(dice, tmp_path):
    args = [*BASE, "rounds=16", "topology=exponential"]
    assert dice("train", *args, "out=v")[0] == 0
    results = launch(2, tmp_path, *args, "out=d")
    ok(results)
    assert "dice train: wrote d" in results[0][1] and results[1][1] == ""   # rank 0 alone reports
    assert_same_run(tmp_path / "v", tmp_path / "d")
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert m["status"] == "complete" and m["engine_version"] == 1
    assert m["distributed"]["world_size"] == 2 and m["distributed"]["blocks"] == [[0, 4], [4, 8]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "outputs", "v"]   # one run directory
    for run in ("v", "d"):
        code, _, err = dice("gt", f"run={run}", "rounds=8", "hops=2", "progress=false")
        assert code == 0, err
    a = pd.read_csv(tmp_path / "v" / "gt" / "influence.csv")
    b = pd.read_csv(tmp_path / "d" / "gt" / "influence.csv")
    assert len(a) > 0 and list(a.columns) == list(b.columns)
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=0, atol=1e-12)


def test_time_varying_topology_with_attacks_and_resume(dice, tmp_path):
    # one_peer_exponential: W^t changes every round (some rounds move no row between the two blocks);
    # gaussian on nodes 2 and 5 (one per block): its per-node random streams, keyed by the global id,
    # must survive the split
    args = [*BASE, "rounds=12", "topology=one_peer_exponential", "attack=gaussian", "attack.nodes=[2,5]"]
    assert dice("train", *args, "out=v")[0] == 0
    ok(launch(2, tmp_path, *args, "out=d"))
    assert_same_run(tmp_path / "v", tmp_path / "d")
    final = ckpt(tmp_path / "d", 12)
    # interrupt: keep checkpoints up to round 6, mark the run interrupted, run the same command again
    run = tmp_path / "d"
    for t in range(7, 13):
        (run / "checkpoints" / f"round_{t:06d}.pt").unlink()
    m = json.loads((run / "manifest.json").read_text())
    m["status"] = "interrupted"
    (run / "manifest.json").write_text(json.dumps(m))
    results = launch(2, tmp_path, *args, "out=d")
    ok(results)
    assert "resuming d from round 6" in results[0][1]
    assert_same_run(tmp_path / "v", run)
    again = ckpt(run, 12)
    assert torch.equal(again["theta"], final["theta"]) and torch.equal(again["momentum"], final["momentum"])
    # the rank count may change between sessions: resume the same interruption in one process
    for t in range(7, 13):
        (run / "checkpoints" / f"round_{t:06d}.pt").unlink()
    (run / "manifest.json").write_text(json.dumps(m))
    code, out, err = dice("train", *args, "out=d", "engine=distributed")
    assert code == 0 and "resuming d from round 6" in out, err
    assert (ckpt(run, 12)["theta"] - final["theta"]).abs().max() <= 1e-10


@pytest.mark.slow
def test_four_ranks_random_matching_with_a_data_attack(dice, tmp_path):
    args = [*BASE, "rounds=12", "topology=random_matching", "attack=feature_noise", "attack.nodes=[1,6]",
            "attack.sigma=2.0"]
    assert dice("train", *args, "out=v")[0] == 0
    ok(launch(4, tmp_path, *args, "out=d"))
    assert_same_run(tmp_path / "v", tmp_path / "d")
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["distributed"]["blocks"] == \
        [[0, 2], [2, 4], [4, 6], [6, 8]]


def test_more_ranks_than_nodes_exits_2_with_one_message(tmp_path):
    results = launch(2, tmp_path, "nodes=1", "topology=complete", "progress=false", "out=bad")
    assert [code for code, _, _ in results] == [2, 2]
    msg = "engine=distributed was started with 2 ranks but the run has only nodes=1"
    assert results[0][2].count(msg) == 1 and msg not in results[1][2]
    assert "Traceback" not in results[0][2] + results[1][2]
    assert not (tmp_path / "bad").exists()
