"""Shared harness of the study scripts: ``scripts/faithfulness.py`` and ``scripts/detect_study.py``.

Both scripts run the library the way the CLI does and write one directory per study. This module holds what they
have in common, once:

  Study         a study's output directory, its log file (every equivalent CLI command and the library's own
                prints), its wall clock and its closing line.
  compose       the config Hydra composes from ``configs/`` for ``dice <name> overrides...`` (typed schemas).
  in_process    ``dice <name> ...`` run in-process on that config (logged, library prints sent to log.txt);
                ``train_run`` is ``dice train`` through it.
  cli           the real ``dice`` CLI in a subprocess (the paper studies: selecting a preset from the CLI is the point);
                ``cli_all`` runs independent commands side by side, ``cli_steps`` runs stages of them and stops at
                the first failure.
  KeepLatest    ``dice train`` repoints outputs/latest; a study run puts it back as it was.
  fmt, markdown, save_table   tables as CSV + Markdown, printed.
  pyplot, save_figure         matplotlib (Agg backend), figures saved and closed.
  main_parser, parse, run_studies   the common options (--study, --quick, --smoke, ...; with --smoke the script's
                smoke sizes become the defaults) and the main loop (repository root, torch threads, outputs/latest
                kept, closing line with each study's time).

The scripts import it as ``study_harness``: ``python scripts/x.py`` puts ``scripts/`` on ``sys.path``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(ROOT / "configs")
THREADS = [1]           # torch threads, also handed to the CLI subprocesses


class Study:
    """A study's output directory (recreated unless ``fresh`` is false), its log file and its wall-clock time."""

    def __init__(self, root: Path, name: str, fresh: bool = True):
        self.name = name
        self.dir = root / name
        if fresh and self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "log.txt"
        self.log_path.write_text("")
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def quiet(self):
        """Send the library's own prints (train summaries, 'wrote ...') to log.txt instead of the console."""
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                yield
        finally:
            text = buf.getvalue()
            if text:
                self.log(text)

    def log(self, text: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(text.rstrip("\n") + "\n")

    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def finish(self, note: str = "", **result) -> dict:
        """Print ``[name] <seconds> s<note>`` and return the study's result record."""
        secs = self.seconds()
        print(f"[{self.name}] {secs:.1f} s{note}")
        return {"study": self.name, "seconds": secs, **result}


def compose(config_name: str, overrides: Sequence[str]):
    """The config the CLI composes for ``dice <config_name> overrides...`` (Hydra over configs/, typed schemas)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    import dice_cli.commands.detect  # noqa: F401  (registers detect_schema)
    import dice_cli.commands.estimate  # noqa: F401  (registers estimate_schema)
    import dice_cli.commands.gt  # noqa: F401  (registers gt_schema)
    import dice_cli.commands.train  # noqa: F401  (registers train_schema and the run-dir resolvers)

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def in_process(study: Study, name: str, args: Sequence[str], schema, fn: Callable) -> None:
    """``dice <name> args...`` in-process: compose the config, log the command, call ``fn(typed, plain)`` with the
    typed dataclass (``schema``) and the plain dict the CLI records, the library's prints going to log.txt."""
    from dice_cli.commands import plain_config
    from dice_cli.config import to_dataclass

    cfg = compose(name, args)
    study.log(f"$ dice {name} {' '.join(args)}")
    with study.quiet():
        fn(to_dataclass(cfg, schema), plain_config(cfg))


def train_run(study: Study, out: Path, overrides: Sequence[str]) -> Tuple[Path, float]:
    """``dice train overrides... out=OUT progress=false`` in-process. Returns (run dir, seconds of the training)."""
    from dice_cli.config import TrainConfig
    from dice_cli.training import train

    out = Path(out)
    secs = []

    def go(typed, config):
        config["out"] = str(out)
        t0 = time.perf_counter()
        train(typed, out, config)
        secs.append(time.perf_counter() - t0)

    in_process(study, "train", [*overrides, f"out={out}", "progress=false"], TrainConfig, go)
    return out, secs[0]


def cli_all(study: Study, argvs: Sequence[List[str]]) -> List[subprocess.CompletedProcess]:
    """Independent ``dice`` commands, each the real CLI in a subprocess, run side by side (as many at a time as the
    CPUs hold at the study's thread count); commands and outputs go to log.txt in the order given."""
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS[0]), "MKL_NUM_THREADS": str(THREADS[0])}

    def run(argv: List[str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dice_cli.cli", *argv], cwd=ROOT, capture_output=True,
                              text=True, env=env)

    with ThreadPoolExecutor(max(1, min(len(argvs), (os.cpu_count() or 1) // THREADS[0]))) as pool:
        done = list(pool.map(run, argvs))
    for argv, r in zip(argvs, done):
        study.log("$ dice " + " ".join(argv))
        study.log(r.stdout + r.stderr + f"[exit {r.returncode}]")
    return done


def cli(study: Study, argv: List[str]) -> subprocess.CompletedProcess:
    """The real ``dice`` CLI in a subprocess, with the study's thread count; command and output go to log.txt."""
    return cli_all(study, [argv])[0]


def cli_steps(study: Study, stages: Sequence[Sequence[List[str]]]) -> None:
    """Stage after stage of ``cli_all`` (the commands of one stage must not depend on each other); the first command
    that fails stops the script with its exit code and stderr."""
    for stage in stages:
        for argv, r in zip(stage, cli_all(study, stage)):
            if r.returncode != 0:
                raise SystemExit(f"[{study.name}] dice {' '.join(argv)} failed (exit {r.returncode}):\n"
                                 f"{r.stderr[-2000:]}")


class KeepLatest:
    """``dice train`` repoints outputs/latest; the studies put it back as it was when they finish."""

    def __init__(self):
        self.link = Path(os.environ["DICE_LATEST"]) if os.environ.get("DICE_LATEST") else ROOT / "outputs" / "latest"
        self.target = os.readlink(self.link) if self.link.is_symlink() else None

    def restore(self) -> None:
        if self.target is None:
            return
        try:
            tmp = self.link.with_name(f".latest.restore.{os.getpid()}")
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            os.symlink(self.target, tmp)
            os.replace(tmp, self.link)
        except OSError:
            pass


# --------------------------------------------------------------------------- tables and plots

def fmt(v, decimals: int = 4, sci: bool = True) -> str:
    """A table cell: floats with ``decimals`` places (``sci``: very small/large ones as 1.234e-05), rest as str."""
    if isinstance(v, (float, np.floating)):
        if np.isnan(v):
            return "nan"
        a = abs(v)
        return f"{v:.3e}" if (sci and a != 0 and (a < 1e-3 or a >= 1e5)) else f"{v:.{decimals}f}"
    return str(v)


def markdown(df: pd.DataFrame, columns: Optional[List[str]] = None, decimals: int = 4, sci: bool = True) -> str:
    cols = columns or list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    values = [df[c].tolist() for c in cols]          # per column, so integer columns stay integers
    for row in zip(*values):
        lines.append("| " + " | ".join(fmt(v, decimals, sci) for v in row) + " |")
    return "\n".join(lines)


def save_table(study: Study, df: pd.DataFrame, title: str, columns: Optional[List[str]] = None,
               name: str = "results", decimals: int = 4, sci: bool = True) -> str:
    """``<dir>/<name>.csv`` (every column) and ``<name>.md`` (``columns``, titled), and print the Markdown."""
    df.to_csv(study.dir / f"{name}.csv", index=False)
    md = markdown(df, columns, decimals, sci)
    with open(study.dir / f"{name}.md", "w") as f:
        f.write(f"## {title}\n\n{md}\n")
    print(f"\n== {title}\n{md}")
    return md


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Lay out a matplotlib figure, write it to ``path`` and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return Path(path)


# --------------------------------------------------------------------------- command line and main loop

def main_parser(doc: str, studies: Dict[str, Callable], out: str, defaults: dict,
                helps: Dict[str, str]) -> argparse.ArgumentParser:
    """The options both study scripts have (--study --quick --smoke --out --rounds --nodes --lr --topologies
    --threads): ``defaults`` holds the script's nodes, lr and topologies, ``helps`` its help texts by option."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", nargs="+", choices=[*studies, "all"], default=["all"])
    ap.add_argument("--quick", action="store_true", help=helps.get("quick"))
    ap.add_argument("--smoke", action="store_true", help=helps.get("smoke"))
    ap.add_argument("--out", default=out, help=f"root of the study directories (default {out})")
    ap.add_argument("--rounds", type=int, help=helps.get("rounds"))
    ap.add_argument("--nodes", type=int, default=defaults["nodes"], help=helps.get("nodes"))
    ap.add_argument("--lr", type=float, default=defaults["lr"], help=helps.get("lr"))
    ap.add_argument("--topologies", nargs="+", default=defaults["topologies"], help=helps.get("topologies"))
    ap.add_argument("--threads", type=int, default=1, help=helps.get("threads", "torch CPU threads"))
    return ap


def parse(ap: argparse.ArgumentParser, argv: Optional[List[str]], smoke: dict) -> argparse.Namespace:
    """Parse; with --smoke the ``smoke`` sizes replace the defaults (options given explicitly still win)."""
    args = ap.parse_args(argv)
    if args.smoke:
        ap.set_defaults(**smoke)
        args = ap.parse_args(argv)
    return args


def run_studies(label: str, studies: Dict[str, Callable], args,
                before: Optional[Callable[[Path], None]] = None) -> int:
    """Run the selected studies from the repository root with ``args.threads`` torch threads, outputs/latest kept;
    print the closing line. ``before(root)`` runs first (after the chdir)."""
    os.chdir(ROOT)
    import torch

    torch.set_num_threads(args.threads)
    THREADS[0] = args.threads
    names = list(studies) if "all" in args.study else list(dict.fromkeys(args.study))
    root = Path(args.out)
    if before is not None:
        before(root)
    latest = KeepLatest()
    t0 = time.perf_counter()
    results = []
    try:
        for name in names:
            results.append(studies[name](args, root))
    finally:
        latest.restore()
    total = time.perf_counter() - t0
    print(f"\n{label}: {', '.join('%s %.1f s' % (r['study'], r['seconds']) for r in results)}; total {total:.1f} s "
          f"(torch threads {torch.get_num_threads()}); results under {root}/")
    return 0
