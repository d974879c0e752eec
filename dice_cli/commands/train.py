"""``dice train``: Hydra entry point around ``dice_cli.training.train`` (``distributed.train_distributed`` for
engine=distributed: the same training loop, one block of nodes per rank).

    dice train                                      # digits, MLP, 16-node ring (configs/train.yaml)
    dice train -m topology=ring,exponential seed=0,1,2
"""
from __future__ import annotations

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from ..config import TrainConfig, check_threads
from ..plots import background
from . import CONFIG_DIR, job_out_dir, plain_config, typed_config, user_errors

ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def run(cfg: DictConfig) -> None:
    with user_errors("train"):
        typed = typed_config(cfg, TrainConfig, "train")
        check_threads(typed.threads)
        from ..tblog import check_logger

        check_logger(typed.logger)
        out = job_out_dir(typed.out, "train")
        config = plain_config(cfg)
        config["out"] = str(out)
        if typed.engine == "distributed":
            from ..distributed import train_distributed

            train_distributed(typed, out, config)
            return
        from ..rerun import already_complete

        if already_complete("train", out, config, typed.overwrite):   # before torch is imported
            from ..run import point_latest

            point_latest(out)
            return
        with background():      # started before torch is imported: figures are drawn by a child process
            from ..training import train

            train(typed, out, config)


main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")(run)
