"""logger=tensorboard: per-round scalars and the figures as event files listed in the manifest; without the
package a clear exit 2 naming `pip install tensorboard`; csv stays the default."""
from __future__ import annotations

import builtins
import json

import pytest

from conftest import FAST


def test_missing_package_exits_2_naming_the_install(dice, tmp_path, monkeypatch):
    real = builtins.__import__

    def no_tensorboard(name, *args, **kw):
        if name == "tensorboard" or name.startswith(("tensorboard.", "torch.utils.tensorboard")):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    code, out, err = dice("train", *FAST, "logger=tensorboard", "out=run")
    assert code == 2 and "pip install tensorboard" in err and "logger=csv" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_unknown_logger_names_the_choices(dice):
    code, _, err = dice("train", *FAST, "logger=wandb", "out=run")
    assert code == 2 and "logger='wandb'" in err and "csv, tensorboard" in err


def test_csv_is_the_default(dice, tmp_path):
    assert dice("train", *FAST, "out=run")[0] == 0
    assert not (tmp_path / "run/tensorboard").exists()


def test_event_files_hold_the_metrics_and_figures(dice, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code, _, err = dice("train", *FAST, "attack=sign_flip", "attack.nodes=[1]", "logger=tensorboard", "out=run")
    assert code == 0, err
    run = tmp_path / "run"
    events = sorted((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    m = json.loads((run / "manifest.json").read_text())
    rel = f"tensorboard/{events[0].name}"
    assert rel in m["files"] and m["files"][rel]["sha256"]             # listed and hashed like every file
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"probe_acc/mean", "probe_acc/honest", "probe_acc/attackers", "train_loss/mean", "lr"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("probe_acc/mean")] == [1, 2, 3, 4, 5, 6]
    assert {"metrics", "topology"} <= set(tags["images"])
    # the event files belong to the run: overwrite=true replaces it (nothing foreign), resume adds a session
    code, _, err = dice("train", *FAST, "lr=0.2", "logger=tensorboard", "overwrite=true", "out=run")
    assert code == 0, err
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
