"""``dice estimate``: DICE-E estimates (spec §4), aligned with `dice gt` when it exists.

    dice estimate hops=3 rounds=every:10 method=exact   # <run>/estimate/influence.csv, alignment.json
"""
from __future__ import annotations

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from ..config import EstimateConfig
from ..plots import background
from . import CONFIG_DIR, plain_config, sweep_job_dir, typed_config, user_errors

ConfigStore.instance().store(name="estimate_schema", node=EstimateConfig)


def run(cfg: DictConfig) -> None:
    with user_errors("estimate"):
        from ..influence.measure import measure

        typed = typed_config(cfg, EstimateConfig, "estimate")
        if typed.gt:                       # an explicit gt= must be a finished gt result, checked up front
            from ..run import read_result

            read_result(typed.gt, "gt", "influence.csv")
        with background():            # figures drawn by a child process while torch loads and work runs
            measure(typed, "estimate", typed.out or sweep_job_dir(), plain_config(cfg))


main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="estimate")(run)
