"""``dice pipeline``: Hydra entry point around ``dice_cli.pipeline.pipeline``.

    dice pipeline                                                   # digits, attack=none, all four stages
    dice pipeline -m topology=ring,exponential attack=label_flip,sign_flip seed=0,1,2,3,4
"""
from __future__ import annotations

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from ..config import PipelineConfig, check_threads
from ..plots import background
from . import CONFIG_DIR, job_out_dir, plain_config, typed_config, user_errors

ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)


def run(cfg: DictConfig) -> None:
    with user_errors("pipeline"):
        from ..pipeline import pipeline

        typed = typed_config(cfg, PipelineConfig, "pipeline")
        check_threads(typed.threads)
        from ..tblog import check_logger

        check_logger(typed.logger)
        out = job_out_dir(typed.out, "pipeline")
        config = plain_config(cfg)
        config["out"] = str(out)
        with background():            # figures drawn by a child process while the stages run
            pipeline(typed, out, config)


main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="pipeline")(run)
