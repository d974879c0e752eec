"""``dice contrib``: node-level contribution accounting of a ``dice value`` table and Shapley baselines.

    dice contrib                                          # <run>/value -> <run>/contrib: contributions.csv, ...
    dice contrib valuation=shapley_exact player=participant utility=honest
"""
from __future__ import annotations

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from ..config import ContribConfig
from . import CONFIG_DIR, plain_config, sweep_job_dir, typed_config, user_errors

ConfigStore.instance().store(name="contrib_schema", node=ContribConfig)


def run(cfg: DictConfig) -> None:
    with user_errors("contrib"):
        from ..contrib import contrib

        typed = typed_config(cfg, ContribConfig, "contrib")
        contrib(typed, typed.out or sweep_job_dir(), plain_config(cfg))


main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="contrib")(run)
