"""The run directory: what a run writes, how it is found again, and how it refuses to clobber results.

Layout written by ``dice train`` (every file written atomically: temp file, then rename)::

    <run>/config.yaml            resolved config (the identity of the run)
    <run>/manifest.json          versions, git revision, device, dtype, seed, status, timings
    <run>/metrics.csv            per round and node: lr, train_loss, probe_loss, probe_acc, consensus_distance
    <run>/metrics.png
    <run>/mixing.npy | mixing_schedule.npz, graph.json, topology.png
    <run>/plan.npy               batch plan [T, n, B] of dataset indices (replay any round exactly)
    <run>/partition.csv          dataset index -> node;  probe.npy [n, m] probe indices (split in manifest)
    <run>/checkpoints/round_000010.pt   state at the START of round t (Θ^t, buffers, momentum) and,
                                        for t < T, the local updates Δ^t ("gradient checkpoints")

A finished or interrupted run is found again by its directory; ``outputs/latest`` points at the newest.

    dice train out=outputs/my_run        # then: ls outputs/my_run
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from . import atomic
from .errors import UserError

CONFIG = "config.yaml"
MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
# Keys that may change between a run and its resumption without changing what the run computes
# (chunk_nodes only trades memory for speed: same numbers, see tests/test_chunking.py).
VOLATILE_KEYS = {"out", "overwrite", "progress", "log_every", "chunk_nodes"}


def checkpoint_name(t: int) -> str:
    return f"round_{t:06d}.pt"


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(d, dict):
        out: Dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_differences(old: dict, new: dict) -> List[str]:
    """Keys whose values differ (dotted names), ignoring VOLATILE_KEYS."""
    a, b = _flatten(old), _flatten(new)
    keys = sorted((set(a) | set(b)) - VOLATILE_KEYS)
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in keys if a.get(k) != b.get(k)]


def git_revision() -> Optional[str]:
    """The git commit of the dice_cli source tree, with '+dirty' when it has local changes."""
    src = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> Dict[str, Any]:
    import numpy
    import torch

    from . import __version__

    return {"dice_cli": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "platform": platform.platform(), "git_revision": git_revision()}


class RunDir:
    """One command's output directory: config identity, manifest, atomic files, checkpoints."""

    def __init__(self, path: os.PathLike | str, kind: str = "train"):
        self.path = Path(path)
        self.kind = kind

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ---- identity and rerun safety -----------------------------------------------------------------
    def check(self, config: dict, overwrite: bool) -> str:
        """What claiming the directory for ``config`` would do, without writing anything.

        Returns 'fresh', 'resume' (same config, unfinished), 'complete' (same config, finished) or
        'replace' (different config and ``overwrite``). Raises UserError for a different config without
        ``overwrite``, for a result of another kind (a gt directory is never replaced by a train run, nor
        a train run by gt), and for a non-empty directory that dice did not make — even with ``overwrite``.
        """
        cfg_file = self.path / CONFIG
        if cfg_file.exists():
            other_kind = self.manifest().get("kind")
            if other_kind is not None and other_kind != self.kind:
                raise UserError(f"{self.path} holds a dice {other_kind} result, not a {self.kind} result; nothing was "
                                f"changed (overwrite=true only replaces a {self.kind} result). Choose another out=<dir>.")
            old = yaml.safe_load(cfg_file.read_text()) or {}
            diffs = config_differences(old, config)
            if not diffs:
                status = self.manifest().get("status")
                return "complete" if status == "complete" else "resume"
            if not overwrite:
                shown = "\n  ".join(diffs[:12]) + ("\n  ..." if len(diffs) > 12 else "")
                raise UserError(
                    f"{self.path} already holds a {self.kind} run made with a different config:\n  {shown}\n"
                    f"Nothing was changed. Choose a new out=<dir>, or pass overwrite=true to replace it.")
            return "replace"
        if self.path.exists() and any(p for p in self.path.iterdir() if not p.name.startswith(".")):
            raise UserError(f"out={str(self.path)!r} exists, is not empty and is not a dice {self.kind} directory "
                            f"(no {CONFIG}); nothing was changed, and overwrite=true does not empty folders it did "
                            f"not make. Choose an empty or new out=<dir>.")
        return "fresh"

    def claim(self, config: dict, mode: str) -> None:
        """Act on ``check``'s verdict: empty the directory for 'replace', write config.yaml when new."""
        if mode == "replace":
            self._empty()
        if mode in ("fresh", "replace"):
            self.path.mkdir(parents=True, exist_ok=True)
            atomic.write_text(self.path / CONFIG, yaml.safe_dump(config, sort_keys=False))

    def discard_if_empty(self) -> None:
        """Remove the directory if nothing was written into it (a run that failed before starting)."""
        try:
            if self.path.is_dir() and not any(self.path.iterdir()):
                self.path.rmdir()
        except OSError:
            pass

    def _empty(self) -> None:
        for p in self.path.iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    # ---- manifest -------------------------------------------------------------------------------------
    def manifest(self) -> Dict[str, Any]:
        f = self.path / MANIFEST
        return json.loads(f.read_text()) if f.exists() else {}

    def update_manifest(self, **fields: Any) -> Dict[str, Any]:
        m = self.manifest()
        m.update(fields)
        m["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic.write_json(self.path / MANIFEST, m)
        return m

    def config(self) -> dict:
        return yaml.safe_load((self.path / CONFIG).read_text())

    # ---- checkpoints ----------------------------------------------------------------------------------
    def checkpoint_path(self, t: int) -> Path:
        return self.path / CHECKPOINTS / checkpoint_name(t)

    def checkpoint_rounds(self) -> List[int]:
        d = self.path / CHECKPOINTS
        if not d.exists():
            return []
        return sorted(int(p.stem.split("_")[1]) for p in d.glob("round_*.pt"))

    def save_checkpoint(self, t: int, payload: dict) -> None:
        atomic.save_torch(self.checkpoint_path(t), payload)

    def load_checkpoint(self, t: int) -> dict:
        import torch

        p = self.checkpoint_path(t)
        if not p.exists():
            raise UserError(f"checkpoint {p} is missing; available rounds: {self.checkpoint_rounds()}")
        return torch.load(p, map_location="cpu", weights_only=True)


def open_run(path: os.PathLike | str, need: tuple = (CONFIG, MANIFEST, "plan.npy"),
             require_complete: bool = True) -> RunDir:
    """Open an existing ``dice train`` run for reading, with clear errors when it is missing or partial."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"run={str(path)!r} does not exist. Point run= at a `dice train` output directory "
                        f"(default: outputs/latest), or train one first: dice train out={path}")
    missing = [f for f in need if not (p / f).exists()]
    if missing:
        raise UserError(f"run={str(path)!r} is not a complete dice train run: missing {', '.join(missing)}. "
                        f"Re-run `dice train out={path}` to finish it.")
    run = RunDir(p.resolve())
    status = run.manifest().get("status")
    if require_complete and status != "complete":
        raise UserError(f"run={str(path)!r} has status {status!r}, not 'complete'. "
                        f"Resume it first: dice train out={path}")
    return run


def point_latest(run_path: Path, root: Path = Path("outputs")) -> None:
    """Atomically repoint ``outputs/latest`` (a symlink) at ``run_path``."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        link = root / "latest"
        tmp = root / f".latest.{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(os.path.abspath(run_path), tmp)
        os.replace(tmp, link)
    except OSError:
        pass  # a read-only or symlink-less filesystem must not fail a finished run
