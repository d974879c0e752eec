"""``dice detect``: Hydra entry point around ``dice_cli.detect.run_detect``.

    dice detect window=20                       # <run>/detect: pairs.csv, senders.csv, summary.json, roc.png
    dice detect run=outputs/attacked score=dot normalize=none
"""
from __future__ import annotations

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from ..config import DetectConfig
from ..plots import background
from . import CONFIG_DIR, plain_config, sweep_job_dir, typed_config, user_errors

ConfigStore.instance().store(name="detect_schema", node=DetectConfig)


def run(cfg: DictConfig) -> None:
    with user_errors("detect"):
        from pathlib import Path

        from ..rerun import already_complete
        from ..run import open_run

        typed = typed_config(cfg, DetectConfig, "detect")
        out, config = typed.out or sweep_job_dir(), plain_config(cfg)
        run = open_run(typed.run)           # a finished result returns before torch is imported
        if already_complete("detect", Path(out) if out else run.path / "detect",
                            {**config, "run": str(run.path)}, typed.overwrite):
            return
        from ..detect import run_detect

        with background():            # figures drawn by a child process while torch loads and work runs
            run_detect(typed, out, config)


main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="detect")(run)
