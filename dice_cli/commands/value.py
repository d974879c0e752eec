"""``dice value``: whole-run influence of every node's data, batch, sample or participant (VALUE.md).

    dice value                                   # exact, node units, whole run, <run>/value/
    dice value unit=sample samples=5 method=gt lds=50 out=<run>/value_gt
"""
from __future__ import annotations

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from ..config import ValueConfig, to_dataclass
from . import CONFIG_DIR, plain_config, sweep_job_dir, user_errors

ConfigStore.instance().store(name="value_schema", node=ValueConfig)


def run(cfg: DictConfig) -> None:
    with user_errors("value"):
        from ..influence.run_value import value

        typed = to_dataclass(cfg, ValueConfig)
        value(typed, typed.out or sweep_job_dir(), plain_config(cfg))


main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="value")(run)
