"""``dice pipeline``: train → gt → estimate → detect in one job with one config, so one Hydra sweep is a study.

Each stage writes where its own command would (``<run>/gt``, ``<run>/estimate_<method>``, ``<run>/detect``)
and keeps its own rerun safety: a re-submitted job skips the stages already complete and resumes the rest.
The whole pipeline config is saved as ``<run>/pipeline.yaml`` once every stage has finished (``dice report``
reads it).

    dice pipeline -m topology=ring,exponential attack=label_flip,sign_flip seed=0,1,2,3,4
    dice report outputs/multirun/pipeline/<time>
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from . import atomic
from .config import DetectConfig, EstimateConfig, GtConfig, PipelineConfig, TrainConfig
from .lock import scoped
from .run import RunDir

PIPELINE_ONLY = {"stages", "influence", "methods", "detect"}


def _train_part(cfg: PipelineConfig, config_dict: dict):
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    train_cfg = TrainConfig(**{k: getattr(cfg, k) for k in fields})
    return train_cfg, {k: v for k, v in config_dict.items() if k not in PIPELINE_ONLY}


@scoped
def pipeline(cfg: PipelineConfig, out: Path, config_dict: dict) -> Path:
    """Run the configured stages into the run directory ``out`` (held for the whole pipeline)."""
    from .influence.measure import measure

    out = Path(out)
    RunDir(out, "train").lock("dice pipeline")
    train_cfg, train_dict = _train_part(cfg, config_dict)
    if "train" in cfg.stages:
        if train_cfg.engine == "distributed":
            from .distributed import train_distributed as train
        else:
            from .training import train
        train(train_cfg, out, train_dict)
    sel = dataclasses.asdict(cfg.influence)
    common = dict(run=str(out), progress=cfg.progress, overwrite=cfg.overwrite, device=cfg.device)
    if "gt" in cfg.stages:
        gt_cfg = GtConfig(**sel, **common)
        measure(gt_cfg, "gt", out / "gt", dataclasses.asdict(gt_cfg))
    if "estimate" in cfg.stages:
        for method in cfg.methods:
            est_cfg = EstimateConfig(**sel, **common, method=method, gt=str(out / "gt"))
            measure(est_cfg, "estimate", out / f"estimate_{method}", dataclasses.asdict(est_cfg))
    if "detect" in cfg.stages:
        from .detect import run_detect

        det_cfg = DetectConfig(**dataclasses.asdict(cfg.detect), **common, dtype=cfg.influence.dtype)
        run_detect(det_cfg, out / "detect", dataclasses.asdict(det_cfg))
    # written last: a stage refused for a changed config leaves the record of what was actually run
    atomic.write_text(out / "pipeline.yaml", yaml.safe_dump(config_dict, sort_keys=False))
    print(f"dice pipeline: {out} done ({', '.join(cfg.stages)})")
    return out
