"""``dice train logger=tensorboard``: per-round metrics and the run's figures as TensorBoard event files.

Optional: needs the ``tensorboard`` package (``pip install tensorboard``, or the ``tensorboard`` extra);
``logger=csv`` (the default) writes metrics.csv only, which every logger keeps. Events go to
``<run>/tensorboard/``, one file per training session (a resumed run purges the steps it redoes), each
listed in the manifest like every file dice writes.

    dice train logger=tensorboard && tensorboard --logdir outputs
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from .errors import UserError

from .config import LOGGERS  # noqa: F401  (the choices; checked in TrainConfig)
SUBDIR = "tensorboard"


def check_logger(name: str) -> None:
    """UserError (before anything is written) for logger=tensorboard without the tensorboard package."""
    if name != "tensorboard":
        return
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UserError("logger=tensorboard needs the `tensorboard` package, which is not installed here: "
                        "pip install tensorboard (or pip install -e \".[tensorboard]\"), then run the same command "
                        "again; or use logger=csv (the default: metrics.csv only)") from None


class TensorBoardLog:
    """Scalars per evaluated round (node means; honest / attackers apart when the run has attackers) and
    images of the figures at the end."""

    def __init__(self, run_dir: Path, start: int, attackers: Iterable[int] = ()):
        from torch.utils.tensorboard import SummaryWriter

        from . import atomic

        self.dir = Path(run_dir) / SUBDIR
        self.attackers = sorted(int(a) for a in attackers)
        self._old = set(self.dir.glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=start if start > 0 else None)
        for f in self._new():                # listed from the start: a killed run leaves no unknown file
            atomic.note_in_place(f, done=False)

    def _new(self):
        return sorted(set(self.dir.glob("events.out.tfevents.*")) - self._old)

    def round(self, rec) -> None:
        """One evaluated round (``training.RoundRecord``); step = rounds completed (t + 1)."""
        import numpy as np

        step = rec.round + 1
        cols = {"train_loss": rec.losses, "probe_loss": rec.probe_loss, "probe_acc": rec.probe_acc,
                "consensus_distance": rec.consensus}
        honest = np.ones(len(rec.losses), dtype=bool)
        honest[self.attackers] = False
        for name, v in cols.items():
            if v is None:
                continue
            v = np.asarray(v, dtype=np.float64)
            self.writer.add_scalar(f"{name}/mean", float(v.mean()), step)
            if self.attackers:
                self.writer.add_scalar(f"{name}/honest", float(v[honest].mean()), step)
                self.writer.add_scalar(f"{name}/attackers", float(v[~honest].mean()), step)
        self.writer.add_scalar("lr", float(rec.lr), step)

    def figures(self, paths: Iterable[Path], step: int) -> None:
        from matplotlib import image

        for p in paths:
            if Path(p).is_file():
                img = image.imread(str(p))[..., :3]
                self.writer.add_image(Path(p).stem, img, step, dataformats="HWC")

    def close(self) -> None:
        from . import atomic

        self.writer.close()
        for f in self._new():
            atomic.note_in_place(f, done=True)


def open_log(logger: str, run_dir: Path, start: int, attackers=()) -> Optional[TensorBoardLog]:
    """The extra logger of a training session (None for logger=csv)."""
    return TensorBoardLog(run_dir, start, attackers) if logger == "tensorboard" else None
