"""Extending a run: ``dice train rounds=400 out=R`` on a 200-round run R continues from round 200.

Allowed when ``rounds`` is the only key that changes, and only upward, and when the first 200 rounds of a
400-round run are the same computation as the 200-round run's: the batch plan of R rounds is a prefix of
the plan of more (``data.batch_plan``), W^t does not depend on the run's length, and attacks over
``all`` / ``"a:"`` rounds simply go on. What does depend on it is refused before anything is written
(optim.schedule=cosine, defense=balance, network.* conditions, whose draws are recorded for the run's length). The result is bit-identical to training the longer run from
scratch; the checkpoint stride stays the one the run recorded (manifest ``record_every``).

    dice train rounds=200 out=outputs/r && dice train rounds=400 out=outputs/r
"""
from __future__ import annotations

from typing import Optional

from .errors import UserError
from .run import CONFIG, MANIFEST, RunDir, changed_keys


def extension_base(run: RunDir, config: dict) -> Optional[int]:
    """The recorded rounds of the train run in ``run`` when ``config`` differs from its config.yaml in
    ``rounds`` alone, else None (no run there, another kind, or other keys differ). UserError when only
    ``rounds`` differs but goes down: a run cannot be shortened."""
    if not (run / MANIFEST).is_file() or not (run / CONFIG).is_file():
        return None
    try:
        if run.manifest().get("kind", "train") != "train":
            return None
        old = run.config()
    except UserError:
        return None                            # RunDir.check says what is wrong with it
    if changed_keys(old, config) != ["rounds"]:
        return None
    before, after = old.get("rounds"), config.get("rounds")
    if not isinstance(before, int) or not isinstance(after, int):
        return None
    if after < before:
        raise UserError(f"{run.path} holds a {before}-round run; rounds={after} would shorten it, and a run is "
                        f"only ever extended (rounds may grow, never shrink). Choose a new out=<dir> for a "
                        f"{after}-round run, or pass overwrite=true to replace this one")
    return before


def check_extendable(setup, before: int, run: RunDir) -> None:
    """UserError, before any write, when a ``setup.cfg.rounds``-round run would not repeat the first
    ``before`` rounds of the recorded run (so extending it could not equal training it from scratch)."""
    from .engine import lr_at

    cfg = setup.cfg
    after = cfg.rounds
    refuse = (f"so a {after}-round run differs from the {before}-round run in {run.path} from its first "
              f"rounds on and cannot extend it. Train the {after}-round run into a new out=<dir> (or pass "
              f"overwrite=true to replace this one)")
    changed = next((t for t in range(before) if lr_at(cfg.optim, cfg.lr, t, before)
                    != lr_at(cfg.optim, cfg.lr, t, after)), None)
    if changed is not None:
        raise UserError(f"optim.schedule={cfg.optim.schedule} sets every round's lr from the run's length "
                        f"(round {changed}: {lr_at(cfg.optim, cfg.lr, changed, before):.6g} in {before} "
                        f"rounds, {lr_at(cfg.optim, cfg.lr, changed, after):.6g} in {after}), {refuse}")
    if cfg.defense.name == "balance":
        raise UserError(f"defense=balance shrinks its acceptance radius with t/rounds, {refuse}")
    if getattr(setup, "network", None) is not None:
        raise UserError(f"network.* conditions are drawn once for the run's length and recorded in "
                        f"network.npz (replay never redraws them), {refuse}")
    import numpy as np

    run.verify("plan.npy")
    recorded = np.load(run / "plan.npy", allow_pickle=False)
    T = min(before, len(recorded))
    if recorded.shape[1:] != setup.plan.shape[1:] or not np.array_equal(recorded[:T], setup.plan[:T]):
        raise UserError(f"the batch plan rebuilt from the config does not start with the one {run.path} "
                        f"recorded (another dice-cli version or other data files?), {refuse}")


def results_under(run: RunDir) -> list:
    """Names of the dice results (gt, estimate, ...) in the run's immediate subdirectories."""
    import json

    out = []
    for d in sorted(p for p in run.path.iterdir() if p.is_dir()):
        try:
            kind = json.loads((d / MANIFEST).read_text()).get("kind")
        except (OSError, ValueError, AttributeError):
            continue
        if kind and kind != "train":
            out.append(d.name)
    return out
