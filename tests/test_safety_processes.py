"""Nothing lost, nothing silently wrong (issue 8), with real processes: one writer per directory (the second
exits 2 naming the first), stale locks taken over, SIGTERM and SIGINT, shard jobs side by side, unique
default run names, and ``python -m dice_cli``. Every wait is for an event with SUBPROCESS_TIMEOUT as the
only limit, so a busy machine makes these slow, never failing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pandas as pd
import pytest

from conftest import FAST, ROOT, SUBPROCESS_TIMEOUT

LONG = ["nodes=4", "rounds=50000", "batch_size=8", "dtype=float64", "progress=false", "log_every=100000"]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def dice_process(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dice_cli", *args], cwd=cwd, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(p: subprocess.Popen):
    out, err = p.communicate(timeout=SUBPROCESS_TIMEOUT)
    return p.returncode, out, err


def wait_for(predicate, what: str, proc: subprocess.Popen = None) -> None:
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended before {what}: {proc.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def training_started(run: Path) -> bool:
    return (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("round_*.pt"))


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def temp_files(run: Path) -> List[Path]:
    return [p for p in run.rglob("*") if p.name.endswith(".tmp")]


def test_python_dash_m_dice_cli_works_like_dice(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dice_cli", "--help"], cwd=tmp_path, env=env(), text=True,
                       capture_output=True, timeout=SUBPROCESS_TIMEOUT)
    assert r.returncode == 0 and "simulate decentralized SGD" in r.stdout
    r = subprocess.run([sys.executable, "-m", "dice_cli", "train", "nodez=3"], cwd=tmp_path, env=env(), text=True,
                       capture_output=True, timeout=SUBPROCESS_TIMEOUT)
    assert r.returncode == 2 and "Did you mean `nodes`?" in r.stderr


def test_a_second_writer_exits_2_naming_the_first_then_sigterm_and_resume(tmp_path):
    a = dice_process(tmp_path, "train", *LONG, "out=run")
    try:
        wait_for(lambda: training_started(tmp_path / "run"), "training to start", a)
        for argv in (["train", *LONG, "out=run"], ["train", *LONG, "lr=0.2", "out=run", "overwrite=true"],
                     ["gt", "run=run", "progress=false"]):
            code, _, err = finish(dice_process(tmp_path, *argv))
            assert code == 2, (argv, err)
            if argv[0] == "train":
                assert f"is in use by pid {a.pid}" in err and "dice train" in err and "nothing was changed" in err
            else:
                assert "status 'running'" in err or f"pid {a.pid}" in err
        a.send_signal(signal.SIGTERM)
        code, out, err = finish(a)
    finally:
        if a.poll() is None:
            a.kill()
    assert code == 143
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dice train: interrupted at round ") and \
        lines[0].endswith("; run the same command again to resume"), err
    m = manifest(tmp_path / "run")
    assert m["status"] == "interrupted" and m["interrupted"].startswith("at round ")
    assert not temp_files(tmp_path / "run") and not (tmp_path / "run/.dice.lock").exists()
    # the interrupted run resumes (a short one: the same config except rounds would be another run)
    b = dice_process(tmp_path, "train", *LONG, "out=run")
    try:
        wait_for(lambda: manifest(tmp_path / "run")["status"] == "running", "the resume to start", b)
        b.send_signal(signal.SIGINT)
        code, out, err = finish(b)
    finally:
        if b.poll() is None:
            b.kill()
    assert code == 130 and "resuming run from round" in out and err.count("\n") == 1, err
    assert manifest(tmp_path / "run")["status"] == "interrupted"


def test_a_stale_lock_of_a_killed_process_is_taken_over_with_a_note(tmp_path):
    a = dice_process(tmp_path, "train", *LONG, "out=run")
    try:
        wait_for(lambda: training_started(tmp_path / "run"), "training to start", a)
        a.kill()
        a.communicate(timeout=SUBPROCESS_TIMEOUT)
    finally:
        if a.poll() is None:
            a.kill()
    lock = json.loads((tmp_path / "run/.dice.lock").read_text())
    assert lock["pid"] == a.pid and lock["command"] == "dice train" and lock["hold"] == "whole"
    launched = time.time_ns()
    b = dice_process(tmp_path, "train", *LONG, "out=run")

    def b_trains() -> bool:   # the killed run's manifest still says "running": wait for b's own checkpoint
        return any(p.stat().st_mtime_ns > launched for p in (tmp_path / "run/checkpoints").glob("round_*.pt"))

    try:
        wait_for(b_trains, "the second process to train", b)
        b.send_signal(signal.SIGTERM)
        code, out, err = finish(b)
    finally:
        if b.poll() is None:
            b.kill()
    assert code == 143
    assert f"took over the lock on run left by pid {a.pid} (dice train" in err and "no longer running" in err
    assert "resuming run from round" in out


def test_a_lock_held_by_another_process_stops_every_writer(dice, tmp_path):
    """Any holder of the flock counts (here a bare script), and the message names it."""
    (tmp_path / "run").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, json, os, sys, time\n"
        "fd = os.open('run/.dice.lock', os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, json.dumps({'pid': os.getpid(), 'command': 'dice gt', 'hold': 'whole'}).encode())\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n")], cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = dice("train", *FAST, "out=run")
        assert code == 2 and f"is in use by pid {holder.pid} (dice gt)" in err
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".dice.lock"]
    finally:
        holder.stdin.close()
        holder.wait(timeout=SUBPROCESS_TIMEOUT)
    assert dice("train", *FAST, "out=run")[0] == 0


def test_shard_jobs_run_side_by_side_and_one_of_them_merges(dice, tmp_path):
    code, _, err = dice("train", *FAST, "nodes=5", "topology=exponential", "out=run")
    assert code == 0, err
    sel = ["run=run", "hops=2", "rounds=[1,3]", "unit=sample", "samples=2", "progress=false"]
    jobs = [dice_process(tmp_path, "gt", *sel, f"shard={i}/3", "out=run/sharded") for i in range(3)]
    results = [finish(p) for p in jobs]
    assert all(code == 0 for code, _, _ in results), results
    merged = [out for _, out, _ in results if "merged from 3 shards" in out]
    assert len(merged) == 1, results
    assert dice("gt", *sel, "out=run/plain")[0] == 0
    a, b = tmp_path / "run/sharded/influence.csv", tmp_path / "run/plain/influence.csv"
    pd.testing.assert_frame_equal(pd.read_csv(a), pd.read_csv(b), check_exact=True)
    m = manifest(tmp_path / "run/sharded")
    assert m["status"] == "complete" and all(f"shards/shard_{i}_of_3.csv" in m["files"] for i in range(3))
    assert not list((tmp_path / "run/sharded/shards").glob(".*.lock"))


def test_a_shard_being_computed_cannot_be_started_twice(dice, tmp_path):
    code, _, err = dice("train", *FAST, "out=run")
    assert code == 0, err
    sel = ["run=run", "rounds=[1,3]", "progress=false", "out=run/sh"]
    assert dice("gt", *sel, "shard=1/2")[0] == 0
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, json, os, sys\n"
        "fd = os.open('run/sh/shards/.shard_0_of_2.lock', os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, json.dumps({'pid': os.getpid(), 'command': 'dice gt shard_0_of_2'}).encode())\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n")], cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = dice("gt", *sel, "shard=0/2")
        assert code == 2 and "shard_0_of_2 of" in err and f"in use by pid {holder.pid}" in err
        assert "same shard=" in err
    finally:
        holder.stdin.close()
        holder.wait(timeout=SUBPROCESS_TIMEOUT)
    code, out, err = dice("gt", *sel, "shard=0/2")
    assert code == 0 and "merged from 2 shards" in out, err


def test_runs_started_together_without_out_get_their_own_directories(tmp_path):
    jobs = [dice_process(tmp_path, "train", *FAST) for _ in range(3)]
    results = [finish(p) for p in jobs]
    assert all(code == 0 for code, _, _ in results), results
    runs = sorted((tmp_path / "outputs/train").iterdir())
    assert len(runs) == 3
    assert all(manifest(r)["status"] == "complete" for r in runs)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_gt_interrupted_by_a_signal_says_what_it_was_doing(dice, tmp_path, sig, code):
    assert dice("train", *FAST, "rounds=200", "out=run")[0] == 0
    p = dice_process(tmp_path, "gt", "run=run", "rounds=all", "hops=3", "unit=sample", "progress=false")
    try:
        wait_for(lambda: (tmp_path / "run/gt/manifest.json").exists() and
                 manifest(tmp_path / "run/gt").get("status") == "running", "gt to start", p)
        time.sleep(0.5)
        p.send_signal(sig)
        rc, out, err = finish(p)
    finally:
        if p.poll() is None:
            p.kill()
    assert rc == code and err.startswith("dice gt: interrupted while measuring round ") and \
        err.count("\n") == 1 and "run the same command again" in err, err
    assert manifest(tmp_path / "run/gt")["status"] == "interrupted"
    assert not temp_files(tmp_path / "run")
