"""The one training loop: buffered metrics, where a resume restarts, and that every engine shares it."""
from __future__ import annotations

import json

import pandas as pd
import torch

from conftest import FAST
from dice_cli.config import TrainConfig
from dice_cli.run import RunDir
from dice_cli.training import MetricsLog, evaluated


def test_resume_restarts_where_the_metrics_on_disk_end(dice, tmp_path):
    """Metrics rows are buffered: a kill can lose the last few. Resume must then restart from the latest
    checkpoint whose earlier rounds all have their rows on disk, and still end bit-identical."""
    assert dice("train", *FAST, "out=ref")[0] == 0
    assert dice("train", *FAST, "out=cut")[0] == 0
    cut = tmp_path / "cut"
    lines = (cut / "metrics.csv").read_text().splitlines(keepends=True)
    (cut / "metrics.csv").write_text("".join(lines[: 1 + 4 * 3]))          # rows of rounds 0..2 only
    m = json.loads((cut / "manifest.json").read_text())
    m["status"] = "interrupted"
    (cut / "manifest.json").write_text(json.dumps(m))
    assert RunDir(cut).resume_round(nodes=4, rounds=6, eval_every=1) == 3
    code, out, _ = dice("train", *FAST, "out=cut")
    assert code == 0 and "resuming" in out and "from round 3" in out
    a = torch.load(tmp_path / "ref/checkpoints/round_000006.pt", weights_only=True)
    b = torch.load(cut / "checkpoints/round_000006.pt", weights_only=True)
    assert torch.equal(a["theta"], b["theta"])
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "ref/metrics.csv"), pd.read_csv(cut / "metrics.csv"))


def test_eval_every_rows_and_resume_point():
    cfg = TrainConfig(nodes=4, rounds=10, eval_every=4)
    assert [t for t in range(10) if evaluated(cfg, t)] == [3, 7, 9]


def test_metrics_log_buffers_and_flushes_on_close(tmp_path):
    from dice_cli.training import METRIC_COLUMNS, RoundRecord
    import numpy as np

    p = tmp_path / "metrics.csv"
    log = MetricsLog(p, 0)
    one = np.ones(2)
    log.write(RoundRecord(0, 0.1, one * 2.5, one, one * 0.25, one * 0.5, one * 1e-3))
    log.close()
    df = pd.read_csv(p)
    assert list(df.columns) == METRIC_COLUMNS
    assert df["train_loss"].tolist() == [2.5, 2.5] and df["node"].tolist() == [0, 1]
    assert df["consensus_distance"].tolist() == [1e-3, 1e-3] and df["lr"].tolist() == [0.1, 0.1]
