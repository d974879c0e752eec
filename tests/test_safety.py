"""Nothing lost, nothing silently wrong (issue 8), in-process: what overwrite=true may delete, resume after
kills, integrity of what readers read, divergence, disconnected graphs, unknown keys, clean failures,
interrupts and file modes. The multi-process cases (locks, SIGTERM, shard jobs side by side, unique default
names, ``python -m dice_cli``) are in test_safety_processes.py."""
from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import FAST, ROOT
from dice_cli import cli

PLAIN = [*FAST, "out=run"]


@pytest.fixture(scope="session")
def template(tmp_path_factory):
    """One finished FAST run (with a gt result inside), trained once; tests work on copies."""
    root = tmp_path_factory.mktemp("template")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("DICE_LATEST", str(root / "latest"))
        for argv in (["train", *PLAIN], ["gt", "run=run", "progress=false"]):
            try:
                cli.main(argv)
            except SystemExit as e:
                assert e.code in (0, None), argv
    return root / "run"


@pytest.fixture
def run(template, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(template, dst, symlinks=True)
    return dst


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def listed(path: Path) -> dict:
    from dice_cli.run import RunDir

    return RunDir(path).files()


def no_temp_files(path: Path) -> bool:
    return not [p for p in path.rglob("*") if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- overwrite never loses data


def test_overwrite_never_empties_a_folder_that_merely_has_a_config_yaml(dice, tmp_path):
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "config.yaml").write_text("lr: 1\n")
    (proj / "thesis.tex").write_text("t\n")
    (proj / "src" / "main.py").write_text("print(1)\n")
    code, _, err = dice("train", *FAST, "out=proj", "overwrite=true")
    assert code == 2 and "not a dice train directory" in err and "no manifest.json" in err
    assert (proj / "thesis.tex").read_text() == "t\n" and (proj / "src/main.py").exists()
    assert (proj / "config.yaml").read_text() == "lr: 1\n"
    assert sorted(p.name for p in proj.iterdir()) == ["config.yaml", "src", "thesis.tex"]


def test_gt_overwrite_never_empties_a_foreign_folder(dice, run, tmp_path):
    proj = tmp_path / "proj2"
    (proj / "src").mkdir(parents=True)
    (proj / "config.yaml").write_text("hops: 1\n")
    (proj / "thesis.tex").write_text("t\n")
    code, _, err = dice("gt", "run=run", "out=proj2", "overwrite=true", "progress=false")
    assert code == 2 and "not a dice gt directory" in err
    assert (proj / "thesis.tex").exists() and (proj / "src").is_dir()


def test_overwrite_refuses_a_dice_run_holding_foreign_files_and_deletes_nothing(dice, run):
    (run / "notes.txt").write_text("mine")
    (run / "checkpoints" / "extra.pt").write_text("mine too")
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    code, _, err = dice("train", *PLAIN, "lr=0.2", "overwrite=true")
    assert code == 2 and "holds files dice did not write" in err
    assert "notes.txt" in err and "checkpoints/extra.pt" in err and "nothing was changed" in err
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before


def test_overwrite_deletes_exactly_what_the_manifest_lists(dice, run):
    (run / ".keep").write_text("hidden files are left alone")
    old_ckpts = {p.name for p in (run / "checkpoints").iterdir()}
    code, _, err = dice("train", *FAST, "rounds=3", "out=run", "overwrite=true")
    assert code == 0, err
    assert (run / ".keep").read_text() == "hidden files are left alone"
    assert not (run / "gt").exists()            # the old run's gt result (a nested dice dir) went with it
    assert {p.name for p in (run / "checkpoints").iterdir()} == {f"round_{t:06d}.pt" for t in range(4)}
    assert old_ckpts > {p.name for p in (run / "checkpoints").iterdir()}
    m = manifest(run)
    assert m["kind"] == "train" and len(m["id"]) == 32 and m["status"] == "complete"
    on_disk = {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}
    assert on_disk - set(m["files"]) == {"manifest.json", ".dice-files.jsonl", ".keep"}
    assert set(m["files"]) <= on_disk


def test_manifest_lists_a_sha256_for_every_file_readers_trust(run):
    import hashlib

    files = manifest(run)["files"]
    must = ["config.yaml", "plan.npy", "mixing.npy", "partition.csv", "probe.npy",
            *[f"checkpoints/round_{t:06d}.pt" for t in range(7)]]
    for name in must:
        assert files[name]["sha256"] == hashlib.sha256((run / name).read_bytes()).hexdigest(), name
        assert files[name]["bytes"] == (run / name).stat().st_size
    assert files["metrics.csv"]["sha256"] is None           # appended to: listed, not hashed
    gt = manifest(run / "gt")["files"]
    assert gt["influence.csv"]["sha256"] == hashlib.sha256((run / "gt/influence.csv").read_bytes()).hexdigest()


# --------------------------------------------------------------------------- resume rewrites what is missing


def test_a_kill_right_after_config_yaml_resumes_into_a_complete_run(dice, tmp_path, monkeypatch):
    from dice_cli import training

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "write_static", killed)
    code, _, err = dice("train", *PLAIN)
    assert code == 130 and "interrupted" in err
    assert (tmp_path / "run/config.yaml").exists() and not (tmp_path / "run/plan.npy").exists()
    assert manifest(tmp_path / "run")["status"] == "interrupted"
    monkeypatch.undo()                  # the suite keeps cwd and DICE_LATEST (conftest)
    code, out, err = dice("train", *PLAIN)
    assert code == 0 and "nothing to do" not in out, err
    for f in ["plan.npy", "mixing.npy", "partition.csv", "probe.npy", "graph.json", "topology.png"]:
        assert (tmp_path / "run" / f).exists(), f
    assert dice("gt", "run=run", "progress=false")[0] == 0


@pytest.mark.parametrize("name", ["plan.npy", "mixing.npy", "probe.npy", "checkpoints/round_000006.pt"])
def test_a_complete_run_with_a_file_deleted_is_finished_again_not_nothing_to_do(dice, run, template, name):
    (run / name).unlink()
    code, out, err = dice("train", *PLAIN)
    assert code == 0 and "nothing to do" not in out, err
    assert (run / name).read_bytes() == (template / name).read_bytes()
    code, out, _ = dice("train", *PLAIN)
    assert code == 0 and "nothing to do" in out


def test_deleted_metrics_csv_is_rebuilt_exactly(dice, run, template):
    (run / "metrics.csv").unlink()
    code, out, err = dice("train", *PLAIN)
    assert code == 0 and "nothing to do" not in out, err
    pd.testing.assert_frame_equal(pd.read_csv(run / "metrics.csv"), pd.read_csv(template / "metrics.csv"))
    assert manifest(run)["final"] == manifest(template)["final"]


def test_metrics_csv_cut_short_or_garbage_is_rebuilt_on_resume(dice, run, template):
    full = (template / "metrics.csv").read_text().splitlines(keepends=True)
    for text in ["".join(full[:7]), "garbage\x00,\n1,2\n"]:
        (run / "metrics.csv").write_text(text)
        m = manifest(run)
        m["status"] = "interrupted"
        (run / "manifest.json").write_text(json.dumps(m))
        code, out, err = dice("train", *PLAIN)
        assert code == 0, err
        pd.testing.assert_frame_equal(pd.read_csv(run / "metrics.csv"), pd.read_csv(template / "metrics.csv"))


def test_stale_temp_files_of_a_dead_writer_are_removed_on_the_next_start(dice, run):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = run / "checkpoints" / f".round_000003.pt.{dead}.0123abcd.tmp"
    stale.write_bytes(b"half a checkpoint")
    code, out, _ = dice("train", *PLAIN)
    assert code == 0 and "nothing to do" in out
    assert not stale.exists() and no_temp_files(run)


# --------------------------------------------------------------------------- integrity: readers verify


def test_a_replaced_mixing_matrix_is_refused_by_every_reader(dice, run):
    np.save(run / "mixing.npy", np.eye(4))
    for command in (["gt"], ["estimate"], ["detect"]):
        code, _, err = dice(*command, "run=run", "progress=false", "overwrite=true")
        assert code == 2, command
        assert "mixing.npy has changed since dice wrote it" in err and "sha256" in err


def test_an_edited_checkpoint_is_refused(dice, run):
    p = run / "checkpoints/round_000005.pt"
    c = torch.load(p, weights_only=True)
    c["theta"][0, 0] += 0.01
    torch.save(c, p)
    code, _, err = dice("gt", "run=run", "progress=false", "overwrite=true", "out=run/gt2")
    assert code == 2 and "round_000005.pt has changed since dice wrote it" in err
    assert not (run / "gt2/influence.csv").exists()


@pytest.mark.parametrize("name", ["plan.npy", "partition.csv", "probe.npy", "config.yaml"])
def test_edited_inputs_are_refused(dice, run, name):
    p = run / name
    p.write_bytes(p.read_bytes()[:-3] + b"abc")
    code, _, err = dice("detect", "run=run", "progress=false")
    assert code == 2 and f"{name} has changed since dice wrote it" in err


def test_w_is_rebuilt_from_the_config_even_without_recorded_hashes(dice, run):
    """A run from before file lists (no hashes): the recorded W is still compared with the config's."""
    m = manifest(run)
    del m["files"]
    (run / "manifest.json").write_text(json.dumps(m))
    (run / ".dice-files.jsonl").unlink()
    assert dice("gt", "run=run", "progress=false", "out=run/gt_ok")[0] == 0
    W = np.load(run / "mixing.npy")
    np.save(run / "mixing.npy", W[::-1].copy())         # still row-stochastic, not the config's graph
    code, _, err = dice("gt", "run=run", "progress=false", "out=run/gt_bad")
    assert code == 2 and "does not match the mixing matrix rebuilt from config.yaml" in err


def test_estimate_refuses_a_changed_or_missing_gt(dice, run):
    assert dice("gt", "run=run", "progress=false", "overwrite=true")[0] == 0    # this copy's own gt
    code, _, err = dice("estimate", "run=run", "gt=/nonexistent", "progress=false")
    assert code == 2 and "gt='/nonexistent' does not exist" in err
    df = pd.read_csv(run / "gt/influence.csv")
    df.loc[0, "influence"] += 1
    df.to_csv(run / "gt/influence.csv", index=False)
    code, _, err = dice("estimate", "run=run", f"gt={run / 'gt'}", "progress=false")
    assert code == 2 and "influence.csv has changed since dice wrote it" in err
    code, out, err = dice("estimate", "run=run", "progress=false")          # the default gt: a note
    assert code == 0 and "no alignment written" in out and "has changed since dice wrote it" in out
    assert not (run / "estimate/alignment.json").exists()


def test_estimate_aligns_with_an_intact_gt(dice, run):
    assert dice("gt", "run=run", "progress=false", "overwrite=true")[0] == 0    # this copy's own gt
    code, out, err = dice("estimate", "run=run", f"gt={run / 'gt'}", "progress=false")
    assert code == 0, err
    assert (run / "estimate/alignment.json").exists()


# --------------------------------------------------------------------------- divergence and topology


def test_lr_100_on_the_default_run_stops_as_diverged(dice, tmp_path):
    code, _, err = dice("train", "lr=100", "out=run", "progress=false")
    assert code == 2 and "training diverged at round" in err and "on node" in err
    m = manifest(tmp_path / "run")
    assert m["status"] == "diverged" and m["divergence"]["round"] < 10
    assert m["divergence"]["value"] > m["divergence"]["bound"]
    assert "Traceback" not in err


def test_divergence_bound_is_configurable(dice, tmp_path):
    code, _, err = dice("train", *FAST, "lr=5", "out=tight", "divergence=1.0001")
    assert code == 2 and "divergence=1.0001" in err
    assert manifest(tmp_path / "tight")["status"] == "diverged"
    assert dice("train", *FAST, "lr=100", "out=default")[0] == 2
    assert manifest(tmp_path / "default")["status"] == "diverged"
    code, _, err = dice("train", *FAST, "lr=100", "out=off", "divergence=0")    # only NaN/inf would stop it
    assert code == 0, err
    assert manifest(tmp_path / "off")["status"] == "complete"
    code, out, err = dice("train", *FAST, "lr=100", "out=default", "divergence=0")  # the bound is not identity
    assert code == 0 and "different config" not in err, err
    assert manifest(tmp_path / "default")["status"] == "complete"


def test_divergence_guard_names_round_node_and_quantity():
    from dice_cli.divergence import DivergenceGuard
    from dice_cli.errors import DivergenceError

    g = DivergenceGuard(10.0, norm0=np.array([2.0, 0.5]))
    g.check(0, torch.tensor([2.0, 3.0]), torch.ones(2, 3))
    g.check(1, torch.tensor([19.0, 29.0]), torch.full((2, 3), 5.0))     # 5√3 ≈ 8.7 < 10 (floor 1 for node 1)
    with pytest.raises(DivergenceError) as e:
        g.check(2, torch.tensor([2.0, 31.0]), torch.ones(2, 3))
    assert e.value.details == {"round": 2, "node": 1, "quantity": "loss", "value": 31.0, "bound": 30.0}
    with pytest.raises(DivergenceError) as e:
        g.check(3, torch.tensor([1.0, 1.0]), torch.tensor([[30.0, 0, 0], [0.1, 0, 0]]))
    assert e.value.details["quantity"] == "parameter_norm" and e.value.details["node"] == 0


@pytest.mark.parametrize("matrix, needle", [
    (np.eye(8), "disconnected: 8 strongly connected components {0}, {1}, {2}, {3}, {4} and 3 more"),
    (np.kron(np.eye(2), np.full((4, 4), 0.25)), "disconnected: 2 strongly connected components {0, 1, 2, 3}, "
                                                 "{4, 5, 6, 7}"),
    (np.eye(8)[[0, 0, 1, 2, 3, 4, 5, 6]] * 0.5 + np.eye(8) * 0.5, "not strongly connected"),
])
def test_a_graph_that_is_not_strongly_connected_is_refused(dice, tmp_path, matrix, needle):
    np.save(tmp_path / "w.npy", matrix)
    args = [*FAST, "nodes=8", "topology=file", f"topology.path={tmp_path / 'w.npy'}"]
    code, _, err = dice("train", *args, "out=bad")
    assert code == 2 and needle in err and "topology.allow_disconnected=true" in err
    assert not (tmp_path / "bad").exists()
    code, _, err = dice("train", *args, "out=ok", "topology.allow_disconnected=true")
    assert code == 0, err


def test_time_varying_graphs_are_checked_over_the_whole_run(dice, tmp_path):
    code, _, err = dice("train", *FAST, "nodes=8", "rounds=1", "topology=random_matching", "out=one")
    assert code == 2 and "over the run's 1 round(s)" in err
    assert dice("train", *FAST, "nodes=8", "rounds=12", "topology=random_matching", "out=many")[0] == 0


# --------------------------------------------------------------------------- keys and choices


@pytest.mark.parametrize("argv, needle", [
    (["train", "+foo=1"], "unknown key `foo`"),
    (["train", "roundz=3"], "Did you mean `rounds`?"),
    (["train", "++optim.momentun=0.5"], "Did you mean `optim.momentum`?"),
    (["train", "topology=rign"], "Did you mean `ring`?"),
    (["train", "-m", "topology=ring,exponentail"], "Did you mean `exponential`?"),
    (["train", "engine=lop"], "Did you mean `loop`?"),
    (["gt", "+hopz=3"], "Did you mean `hops`?"),
    (["pipeline", "influence.hopz=3"], "Did you mean `influence.hops`?"),
    (["detect", "windw=3"], "Did you mean `window`?"),
])
def test_unknown_keys_and_choices_exit_2_with_a_suggestion(dice, tmp_path, argv, needle):
    code, out, err = dice(*argv, "out=bad")
    assert code == 2 and needle in out + err
    assert not (tmp_path / "bad").exists()


def test_the_composed_config_is_checked_against_the_schema():
    from dice_cli.config import TrainConfig, check_known_keys
    from dice_cli.errors import UserError

    with pytest.raises(UserError, match="unknown key `topology.nmae`. Did you mean `topology.name`"):
        check_known_keys({"nodes": 4, "topology": {"nmae": "ring"}}, TrainConfig, "train")
    check_known_keys({"nodes": 4, "topology": {"name": "ring"}, "attack": {"nodes": [1]}}, TrainConfig)


def test_unknown_command_gets_a_suggestion(dice):
    code, _, err = dice("trian")
    assert code == 2 and "Did you mean `train`?" in err


# --------------------------------------------------------------------------- clean failures


@pytest.mark.parametrize("target, content, needle", [
    ("manifest.json", b'{"kind": "train", "sta', "manifest.json cannot be read"),
    ("manifest.json", b"[1, 2]", "is not a dice manifest"),
    ("config.yaml", b"!!python/object/apply:os.system ['echo pwned']\n", "config.yaml"),
    ("config.yaml", b"nodes: [1,\n", "config.yaml"),
])
def test_garbage_identity_files_exit_2_for_train_and_readers(dice, run, target, content, needle):
    (run / target).write_bytes(content)
    for argv in (["train", *PLAIN], ["gt", "run=run", "progress=false", "out=run/g"]):
        code, out, err = dice(*argv)
        assert code == 2 and needle in err and "Traceback" not in err, argv
    assert "pwned" not in out


@pytest.mark.parametrize("name, content", [
    ("checkpoints/round_000005.pt", b"PK\x03\x04 truncated"),
    ("checkpoints/round_000005.pt", b""),
    ("checkpoints/round_000005.pt", pickle.dumps(Path("/etc/passwd"))),      # a pickle torch must not load
    ("plan.npy", b"\x93NUMPY garbage"),
])
def test_garbage_files_of_an_old_run_without_hashes_exit_2_naming_them(dice, run, name, content):
    m = manifest(run)
    del m["files"]
    (run / "manifest.json").write_text(json.dumps(m))
    (run / ".dice-files.jsonl").unlink()
    (run / name).write_bytes(content)
    code, _, err = dice("gt", "run=run", "progress=false", "rounds=5", "out=run/g")
    assert code == 2 and name.split("/")[-1] in err and "cannot be read" in err and "Traceback" not in err


def test_a_pickled_npy_is_refused_not_loaded(dice, run):
    m = manifest(run)
    del m["files"]
    (run / "manifest.json").write_text(json.dumps(m))
    (run / ".dice-files.jsonl").unlink()
    np.save(run / "probe.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    code, _, err = dice("gt", "run=run", "progress=false", "out=run/g")
    assert code == 2 and "probe.npy cannot be read" in err


def test_garbage_shard_csv_is_refused_at_merge(dice, run):
    sel = ["run=run", "rounds=[1,3]", "progress=false", "out=run/sh"]
    assert dice("gt", *sel, "shard=0/2")[0] == 0
    (run / "sh/shards/shard_0_of_2.csv").write_text("round,source\n1,2\n")
    code, _, err = dice("gt", *sel, "shard=1/2")
    assert code == 2 and "shard_0_of_2.csv has changed since dice wrote it" in err
    assert not (run / "sh/influence.csv").exists()


@pytest.mark.parametrize("out, needle", [
    ("afile", "is a file, not a directory"),
    ("afile/sub", "is a file, so no directory can be made below it"),
    ("/proc/dice_run", "lies under /proc"),
    ("x" * 300, "more than this filesystem allows"),
    ("deep/" + "y" * 300 + "/run", "more than this filesystem allows"),
])
def test_unusable_out_paths_exit_2(dice, tmp_path, out, needle):
    (tmp_path / "afile").write_text("data")
    for argv in (["train", *FAST, f"out={out}"], ["gt", "run=nothing", f"out={out}"]):
        code, _, err = dice(*argv)
        assert code == 2 and "Traceback" not in err, argv
    code, _, err = dice("train", *FAST, f"out={out}")
    assert needle in err
    assert (tmp_path / "afile").read_text() == "data"


def test_threads_beyond_the_machine_exit_2(dice):
    from dice_cli.config import usable_cpus

    code, _, err = dice("train", *FAST, f"threads={usable_cpus() + 1}", "out=bad")
    assert code == 2 and f"this process may use; use threads={usable_cpus()} or fewer" in err


def test_disk_full_marks_the_run_failed_and_it_resumes_once_space_is_freed(dice, tmp_path, template, monkeypatch):
    from dice_cli import atomic

    real = atomic.write_bytes

    def full(path, data):
        if Path(path).name == "round_000003.pt":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    real_torch = atomic.save_torch

    def full_torch(path, obj):          # checkpoints stream into their file without write_bytes
        if Path(path).name == "round_000003.pt":
            with atomic.atomic_path(path) as tmp:
                Path(tmp).write_bytes(b"PK")             # a partial archive, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_torch(path, obj)

    monkeypatch.setattr(atomic, "write_bytes", full)
    monkeypatch.setattr(atomic, "save_torch", full_torch)
    code, _, err = dice("train", *PLAIN)
    assert code == 2 and "no space left on the device" in err and "round_000003.pt" in err
    assert "Traceback" not in err
    m = manifest(tmp_path / "run")
    assert m["status"] == "failed" and "No space left" in m["error"]
    assert no_temp_files(tmp_path / "run")
    monkeypatch.setattr(atomic, "write_bytes", real)
    monkeypatch.setattr(atomic, "save_torch", real_torch)
    code, out, err = dice("train", *PLAIN)
    assert code == 0 and "resuming" in out, err
    for t in range(7):
        name = f"checkpoints/round_{t:06d}.pt"
        a = torch.load(tmp_path / "run" / name, weights_only=True)
        b = torch.load(template / name, weights_only=True)
        assert torch.equal(a["theta"], b["theta"]), name


# --------------------------------------------------------------------------- interrupts of every command


def test_ctrl_c_in_gt_and_estimate_says_what_they_were_doing(dice, run, monkeypatch):
    from dice_cli.influence import gt as gt_module

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gt_module, "ground_truth", stop)
    code, _, err = dice("gt", "run=run", "rounds=[2,4]", "progress=false", "out=run/g")
    assert code == 130 and "dice gt: interrupted while measuring round 2 (0 of 2 rounds done); run the same " \
                           "command again" in err
    assert err.count("\n") == 1 and manifest(run / "g")["status"] == "interrupted"
    assert no_temp_files(run)


def test_ctrl_c_in_detect_marks_it_interrupted(dice, run, monkeypatch):
    from dice_cli import detect

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(detect, "proximal_scores", stop)
    code, _, err = dice("detect", "run=run", "progress=false")
    assert code == 130 and err.startswith("dice detect: interrupted") and err.count("\n") == 1
    assert manifest(run / "detect")["status"] == "interrupted"
    monkeypatch.undo()                  # the suite keeps cwd and DICE_LATEST (conftest)
    assert dice("detect", "run=run", "progress=false")[0] == 0
    assert manifest(run / "detect")["status"] == "complete"


def test_sigterm_in_process_exits_143_and_marks_the_run(dice, tmp_path, monkeypatch):
    import signal

    from dice_cli import engine

    real = engine.Dynamics.round

    def termed(self, state, *a, **k):
        if state.round == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, state, *a, **k)

    monkeypatch.setattr(engine.Dynamics, "round", termed)
    code, _, err = dice("train", *PLAIN)
    assert code == 143 and err.strip() == "dice train: interrupted at round 3; run the same command again to resume"
    assert manifest(tmp_path / "run")["status"] == "interrupted" and no_temp_files(tmp_path / "run")
    assert signal.getsignal(signal.SIGTERM) is not None and signal.getsignal(signal.SIGTERM) != signal.SIG_IGN


# --------------------------------------------------------------------------- file modes, outputs/latest


def test_result_files_honour_the_umask(dice, tmp_path):
    old = os.umask(0o022)
    try:
        assert dice("train", *PLAIN)[0] == 0
        assert dice("gt", "run=run", "progress=false")[0] == 0
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode)
             for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o644}, modes


def test_the_suite_keeps_outputs_latest_out_of_the_checkout(dice, tmp_path):
    assert Path.cwd() == tmp_path and Path.cwd() != ROOT
    assert os.environ["DICE_LATEST"] == str(tmp_path / "outputs" / "latest")
    from dice_cli.run import point_latest

    point_latest(tmp_path / "somewhere")
    assert os.readlink(tmp_path / "outputs" / "latest") == str(tmp_path / "somewhere")
    os.environ["DICE_LATEST"] = ""
    point_latest(tmp_path / "elsewhere")                  # off
    assert os.readlink(tmp_path / "outputs" / "latest") == str(tmp_path / "somewhere")


def test_default_run_names_are_unique_within_a_second():
    from dice_cli.run import default_run_name

    names = {default_run_name("train") for _ in range(200)}
    assert len(names) == 200
    assert all(n.startswith("outputs/train/") for n in names)


def test_default_out_is_made_by_dice_under_outputs_command(dice, tmp_path):
    code, _, err = dice("train", *FAST)
    assert code == 0, err
    runs = list((tmp_path / "outputs/train").iterdir())
    assert len(runs) == 1 and manifest(runs[0])["status"] == "complete"
    assert (tmp_path / "outputs/latest").resolve() == runs[0].resolve()


def test_a_run_made_before_file_lists_is_still_complete_readable_and_replaceable(dice, run):
    """Old run directories: no `files` in the manifest, no journal, a config without the new keys."""
    m = manifest(run)
    del m["files"], m["id"]
    (run / "manifest.json").write_text(json.dumps(m))
    (run / ".dice-files.jsonl").unlink()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    del cfg["divergence"], cfg["topology"]["allow_disconnected"]
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    code, out, _ = dice("train", *PLAIN)
    assert code == 0 and "nothing to do" in out
    assert dice("gt", "run=run", "progress=false", "out=run/gt_new")[0] == 0
    (run / "mine.txt").write_text("keep")
    code, _, err = dice("train", *PLAIN, "lr=0.2", "overwrite=true")
    assert code == 2 and "mine.txt" in err
    (run / "mine.txt").unlink()
    code, _, err = dice("train", *PLAIN, "lr=0.2", "overwrite=true")
    assert code == 0, err
    assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == 0.2
