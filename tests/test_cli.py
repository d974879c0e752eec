"""`dice` through its real entry point, in-process: outputs, exit codes, rerun safety, resume, sweeps."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import FAST


def test_help_lists_commands_and_unknown_command_exits_2(dice):
    code, out, _ = dice("--help")
    assert code == 0 and "train" in out and "simulate decentralized SGD" in out
    code, _, err = dice("trian")
    assert code == 2 and "unknown command 'trian'" in err and "train" in err


def test_train_writes_a_self_describing_run(dice, tmp_path):
    code, out, err = dice("train", *FAST, "out=run")
    assert code == 0, err
    run = tmp_path / "run"
    for f in ["config.yaml", "manifest.json", "metrics.csv", "metrics.png", "mixing.npy", "graph.json",
              "topology.png", "plan.npy", "partition.csv", "probe.npy"]:
        assert (run / f).exists(), f
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "complete" and m["nodes"] == 4 and m["dtype"] == "float64"
    assert m["environment"]["torch"] == torch.__version__
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics.columns) == ["round", "node", "lr", "train_loss", "probe_loss", "probe_acc",
                                     "consensus_distance", "attacker", "in_degree", "out_degree"]
    assert not metrics.attacker.any() and (metrics.in_degree == 2).all() and (metrics.out_degree == 2).all()
    assert len(metrics) == 6 * 4 and metrics["round"].max() == 5
    assert ((metrics.probe_acc >= 0) & (metrics.probe_acc <= 1)).all()
    plan = np.load(run / "plan.npy")
    assert plan.shape == (6, 4, 8)
    part = pd.read_csv(run / "partition.csv")
    for k in range(4):  # every planned sample belongs to the node that trains on it
        assert set(plan[:, k].ravel()) <= set(part[part.node == k]["index"])
    # checkpoints at every round (auto) + the final state; deltas recorded
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == [f"round_{t:06d}.pt" for t in range(7)]
    c0 = torch.load(run / "checkpoints" / "round_000000.pt", weights_only=True)
    c1 = torch.load(run / "checkpoints" / "round_000001.pt", weights_only=True)
    w = np.load(run / "mixing.npy")
    expected = torch.as_tensor(w) @ (c0["theta"] + c0["delta"])
    assert torch.allclose(c1["theta"], expected, atol=1e-12)  # Θ^{t+1} = W^t (Θ^t + Δ^t)
    assert (tmp_path / "outputs" / "latest").resolve() == run.resolve()


def test_engines_agree_through_the_cli(dice, tmp_path):
    args = [*FAST, "optim.momentum=0.9", "topology=exponential"]
    assert dice("train", *args, "out=a", "engine=vmap")[0] == 0
    assert dice("train", *args, "out=b", "engine=loop")[0] == 0
    a = torch.load(tmp_path / "a/checkpoints/round_000006.pt", weights_only=True)
    b = torch.load(tmp_path / "b/checkpoints/round_000006.pt", weights_only=True)
    assert (a["theta"] - b["theta"]).abs().max() < 1e-10
    assert (a["momentum"] - b["momentum"]).abs().max() < 1e-10


@pytest.mark.parametrize("args, needle", [
    (["nodez=3"], "nodez"),
    (["nodes=abc"], "nodes"),
    (["topology=moebius"], "not a choice of config group `topology`"),
    (["nodes=0"], "nodes=0"),
    (["engine=jax"], "engine='jax'"),
    (["dataset=mnist"], "download=true"),
    (["topology=hypercube", "nodes=6"], "power of two"),
    (["lr=-1"], "lr=-1"),
])
def test_user_mistakes_exit_2_with_a_message_naming_the_key(dice, tmp_path, args, needle):
    code, out, err = dice("train", *FAST, "out=bad", *args)
    assert code == 2
    assert needle in out + err
    assert not (tmp_path / "bad").exists()  # nothing half-written


def test_non_row_stochastic_matrix_file_is_refused(dice, tmp_path):
    np.savetxt(tmp_path / "w.csv", np.array([[0.5, 0.5, 0, 0], [0, 0.5, 0.6, 0], [0, 0, 0.5, 0.5],
                                             [0.5, 0, 0, 0.5]]), delimiter=",")
    code, out, err = dice("train", *FAST, "topology=file", f"topology.path={tmp_path / 'w.csv'}", "out=bad")
    assert code == 2 and "row" in (out + err) and "1" in (out + err)


def test_rerun_safety(dice, tmp_path):
    assert dice("train", *FAST, "out=run")[0] == 0
    before = (tmp_path / "run" / "config.yaml").read_text()
    code, out, _ = dice("train", *FAST, "out=run")
    assert code == 0 and "already complete" in out
    code, _, err = dice("train", *FAST, "out=run", "lr=0.2")
    assert code == 2 and "lr: 0.1 -> 0.2" in err and "overwrite=true" in err
    assert (tmp_path / "run" / "config.yaml").read_text() == before
    code, _, err = dice("train", *FAST, "out=run", "lr=0.2", "overwrite=true")
    assert code == 0, err
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["lr"] == 0.2


def test_killed_run_resumes_bit_identical(dice, tmp_path, monkeypatch):
    args = [*FAST, "rounds=12", "record.every=5", "optim.momentum=0.9"]
    assert dice("train", *args, "out=full")[0] == 0

    from dice_cli import engine

    real_round = engine.Dynamics.round

    def dying_round(self, state, *a, **k):
        if state.round == 8:
            raise KeyboardInterrupt
        return real_round(self, state, *a, **k)

    monkeypatch.setattr(engine.Dynamics, "round", dying_round)
    code, _, err = dice("train", *args, "out=killed")
    assert code == 130 and "interrupted at round 8; run the same command again to resume" in err
    assert json.loads((tmp_path / "killed/manifest.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(engine.Dynamics, "round", real_round)
    code, out, err = dice("train", *args, "out=killed")
    assert code == 0 and "resuming" in out and "from round 5" in out
    for name in ["round_000010.pt", "round_000012.pt"]:
        a = torch.load(tmp_path / "full/checkpoints" / name, weights_only=True)
        b = torch.load(tmp_path / "killed/checkpoints" / name, weights_only=True)
        assert torch.equal(a["theta"], b["theta"]) and torch.equal(a["momentum"], b["momentum"])
    ma, mb = pd.read_csv(tmp_path / "full/metrics.csv"), pd.read_csv(tmp_path / "killed/metrics.csv")
    pd.testing.assert_frame_equal(ma, mb)


def test_cfg_job_prints_the_composed_config(dice):
    code, out, _ = dice("train", "--cfg", "job", "topology=exponential", "nodes=8")
    assert code == 0 and "name: exponential" in out and "nodes: 8" in out


def test_multirun_directory_names_have_no_commas(dice, tmp_path):
    code, out, err = dice("train", "-m", *FAST, "rounds=2", "seed=0,1", "topology=ring,exponential")
    assert code == 0, err
    runs = sorted(p for p in (tmp_path / "outputs/multirun/train").glob("*/*") if p.is_dir())
    assert len(runs) == 4
    for p in runs:
        assert "," not in p.name and (p / "manifest.json").exists()
    assert any(p.name.startswith("3__") and "seed=1__topology=exponential" in p.name for p in runs)


@pytest.mark.slow
def test_submitit_local_sweep(dice, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    code, out, err = dice("train", "-m", "hydra/launcher=submitit_local", *FAST, "rounds=2", "seed=0,1")
    assert code == 0, out + err
    manifests = list((tmp_path / "outputs/multirun/train").glob("*/*/manifest.json"))
    assert len(manifests) == 2
    assert all(json.loads(m.read_text())["status"] == "complete" for m in manifests)


@pytest.mark.parametrize("command", ["train", "gt", "estimate", "detect", "pipeline"])
def test_command_help_names_the_command(dice, command):
    code, out, _ = dice(command, "--help")
    assert code == 0 and out.startswith(f"dice {command}: ") and "key=value" in out


def test_overwrite_never_replaces_another_kind_or_a_foreign_folder(dice, tmp_path):
    assert dice("train", *FAST, "out=run")[0] == 0
    code, _, err = dice("gt", "run=run", "out=run", "overwrite=true", "progress=false")
    assert code == 2 and "holds a dice train result" in err
    assert (tmp_path / "run/checkpoints").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("keep me")
    code, _, err = dice("train", *FAST, "out=mine", "overwrite=true")
    assert code == 2 and "does not empty folders it did not make" in err
    assert (tmp_path / "mine/notes.txt").read_text() == "keep me"


def test_metrics_row_cut_by_a_kill_is_dropped_on_resume(tmp_path):
    from dice_cli.training import METRIC_COLUMNS, MetricsLog

    p = tmp_path / "metrics.csv"
    p.write_text(",".join(METRIC_COLUMNS) + "\n0,0,0.1,1,1,0.5,0\n1,0,0.1,1,1,0.5,0\n2,0,0.1,1,1,0.5,0\n3,0,0.1,1,")
    log = MetricsLog(p, resume_round=2)
    log.close()
    assert pd.read_csv(p)["round"].tolist() == [0, 1]
