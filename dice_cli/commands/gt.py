"""``dice gt``: counterfactual re-simulation ground truth (spec §3).

    dice gt hops=3 rounds=every:10                 # <run>/gt/influence.csv
    dice gt unit=sample samples=4 hops=2
"""
from __future__ import annotations

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from ..config import GtConfig
from ..plots import background
from . import CONFIG_DIR, plain_config, sweep_job_dir, typed_config, user_errors

ConfigStore.instance().store(name="gt_schema", node=GtConfig)


def run(cfg: DictConfig) -> None:
    with user_errors("gt"):
        from ..influence.measure import measure

        typed = typed_config(cfg, GtConfig, "gt")
        with background():            # figures drawn by a child process while torch loads and work runs
            measure(typed, "gt", typed.out or sweep_job_dir(), plain_config(cfg))


main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="gt")(run)
