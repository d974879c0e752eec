"""The run directory: what a run writes, how it is found again, and how it refuses to clobber results.

Layout written by ``dice train`` (every file written atomically: temp file, then rename)::

    <run>/config.yaml            resolved config (the identity of the run)
    <run>/manifest.json          kind, id, status, versions, git revision, device, dtype, seed, timings, and
                                 ``files``: every file dice wrote here with its sha256 and size
    <run>/metrics.csv            per round and node: lr, train_loss, probe_loss, probe_acc, consensus_distance
    <run>/metrics.png
    <run>/mixing.npy | mixing_schedule.npz, graph.json, topology.png
    <run>/plan.npy               batch plan [T, n, B] of dataset indices (replay any round exactly)
    <run>/partition.csv          dataset index -> node;  probe.npy [n, m] probe indices (split in manifest)
    <run>/checkpoints/round_000010.pt   state at the START of round t (Θ^t, buffers, momentum) and,
                                        for t < T, the local updates Δ^t ("gradient checkpoints")
    <run>/.dice-files.jsonl      the file list as it grows (two lines per file written: before, after)
    <run>/.dice.lock             present while a command writes (or reads) the directory

A finished or interrupted run is found again by its directory; ``outputs/latest`` points at the newest.

Safety rules (README "Errors and rerun safety"):

- A directory is dice's when its manifest.json names a kind (train, gt, estimate, detect) and an id.
  ``overwrite=true`` deletes only the files its manifest lists (and dice directories nested in it, by
  their own manifests); when anything else is there, nothing is deleted and the command exits 2.
- Every command holds the directory's lock (``dice_cli.lock``) from ``check`` until it ends; readers hold
  a shared lock on the run they read.
- ``manifest.json`` is written before ``config.yaml``, and status "complete" last: a run is complete only
  when its manifest says so and every file it lists exists.
- Readers (``open_run``, ``load_checkpoint``, ``read_result``) check the sha256 of what they read against
  the manifest and exit 2 naming a file that changed.

    dice train out=outputs/my_run        # then: ls outputs/my_run
"""
from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import platform
import secrets
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from . import atomic, lock
from .errors import DivergenceError, UserError, note_where

CONFIG = "config.yaml"
MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
JOURNAL = ".dice-files.jsonl"
LOCK = lock.LOCK_NAME
MIXING_FILES = ("mixing.npy", "mixing_schedule.npz")
# Written once atomically, then appended to round by round: listed, but without a hash.
APPENDED = {"metrics.csv"}
# Files of a train run fixed by its config (rewritten on resume when missing or changed).
TRAIN_STATIC = ("plan.npy", "partition.csv", "probe.npy", "graph.json", "topology.png")
# What gt / estimate / detect read from a train run besides checkpoints: verified when the run is opened.
TRAIN_INPUTS = (CONFIG, "plan.npy", "partition.csv", "probe.npy", "network.npz")
# Keys that may change between a run and its resumption without changing what the run computes
# (chunk_nodes only trades memory for speed: same numbers, see tests/test_chunking.py; divergence and
# topology.allow_disconnected only decide whether a run may go on).
VOLATILE_KEYS = {"out", "overwrite", "progress", "log_every", "logger", "chunk_nodes", "divergence",
                 "topology.allow_disconnected"}
# What each kind writes, for directories made before manifests listed their files.
LEGACY_LAYOUT = {
    "train": [CONFIG, MANIFEST, "metrics.csv", "metrics.png", *MIXING_FILES, "graph.json", "topology.png",
              "plan.npy", "partition.csv", "probe.npy", "pipeline.yaml", f"{CHECKPOINTS}/round_*.pt"],
    "gt": [CONFIG, MANIFEST, "influence.csv", "summary.json", "decay.png", "heatmap.png", "paths.csv",
           "shards/shard_*_of_*.csv", "shards/shard_*_of_*.json"],
    "detect": [CONFIG, MANIFEST, "pairs.csv", "senders.csv", "rounds.csv", "summary.json", "roc.png",
               "topology.png"],
}
LEGACY_LAYOUT["estimate"] = LEGACY_LAYOUT["gt"] + ["alignment.json", "alignment.png"]
VIRTUAL_ROOTS = ("/proc", "/sys", "/dev")
MAX_LISTED = 8


def checkpoint_name(t: int) -> str:
    return f"round_{t:06d}.pt"


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(d, dict):
        out: Dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _flat_recorded(old: dict, new: Dict[str, Any]) -> Dict[str, Any]:
    """A recorded config, flattened; when the new (flattened) config has a network section and the recorded
    one has none, its ``network.*`` keys count as their defaults (train runs from before the network section
    stay resumable)."""
    a = _flatten(old)
    if any(k.startswith("network.") for k in new) and not any(k.startswith("network.") for k in a):
        import dataclasses

        from .config import NetworkConfig

        for f in dataclasses.fields(NetworkConfig):
            a.setdefault(f"network.{f.name}", f.default)
    return a


def changed_keys(old: dict, new: dict) -> List[str]:
    """Dotted keys whose values differ between a recorded config and a new one, ignoring VOLATILE_KEYS."""
    b = _flatten(new)
    a = _flat_recorded(old, b)
    return [k for k in sorted((set(a) | set(b)) - VOLATILE_KEYS) if a.get(k) != b.get(k)]


def config_differences(old: dict, new: dict) -> List[str]:
    """'key: old -> new' for every key whose value differs (dotted names), ignoring VOLATILE_KEYS."""
    b = _flatten(new)
    a = _flat_recorded(old, b)
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in changed_keys(old, new)]


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


def default_run_name(command: str, root: str = "outputs") -> str:
    """``outputs/<command>/<date>_<time>-<ms>_<8 random hex>``: unique even for runs started in the same
    millisecond (32 random bits: 200 names in one millisecond collide with probability ~5e-6)."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(now))
    return f"{root}/{command}/{stamp}-{int(now * 1000) % 1000:03d}_{secrets.token_hex(4)}"


# --------------------------------------------------------------------------- paths and hashes


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except OSError:                           # a name too long to even look up
        return False


def _name_max(path: Path) -> int:
    p = path
    while not _exists(p) and p != p.parent:
        p = p.parent
    try:
        return os.pathconf(p, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_out_path(path: os.PathLike | str, key: str = "out") -> None:
    """UserError unless ``path`` could be a directory dice writes: not a file, not under /proc, /sys or
    /dev, no file among its parents, no component longer than the filesystem allows."""
    p = Path(os.path.abspath(path))
    for root in VIRTUAL_ROOTS:
        if p == Path(root) or Path(root) in p.parents:
            raise UserError(f"{key}={str(path)!r} lies under {root}, a virtual filesystem that cannot hold files; "
                            f"choose a directory on a disk, e.g. {key}=outputs/my_run")
    limit = _name_max(p)
    for part in p.parts[1:]:
        if len(os.fsencode(part)) > limit:
            raise UserError(f"{key}={str(path)!r}: the name {part[:40]!r}... has {len(os.fsencode(part))} bytes, "
                            f"more than this filesystem allows ({limit}); choose a shorter name")
    if _exists(p) and not p.is_dir():
        raise UserError(f"{key}={str(path)!r} is a file, not a directory; nothing was changed. Choose a "
                        f"directory for {key}=")
    for parent in p.parents:
        if _exists(parent):
            if not parent.is_dir():
                raise UserError(f"{key}={str(path)!r}: {parent} is a file, so no directory can be made below it; "
                                f"choose another {key}=")
            break


_hash_cache: Dict[Tuple, str] = {}


def sha256_file(path: Path) -> str:
    """sha256 of a file, remembered per process while its size, mtime and inode stay the same."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    h = _hash_cache.get(key)
    if h is None:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        h = _hash_cache[key] = digest.hexdigest()
    return h


def _rel(root: Path, path: Path) -> Optional[str]:
    try:
        return Path(os.path.abspath(path)).relative_to(Path(os.path.abspath(root))).as_posix()
    except ValueError:
        return None


def _short(e: BaseException, limit: int = 160) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------- the directory


class RunDir:
    """One command's output directory: identity, manifest and file list, lock, atomic files, checkpoints."""

    def __init__(self, path: os.PathLike | str, kind: str = "train"):
        self.path = Path(path)
        self.kind = kind
        self._hold: Optional[lock.Hold] = None
        self._shared = False
        self._observing = False
        self._part: Optional[lock.Hold] = None
        self._created: List[Path] = []
        self._files_cache: Optional[Tuple[Tuple, Dict[str, Dict[str, Any]]]] = None
        self._removal: Optional[Tuple[List[Path], List[Path]]] = None
        self._journal_fd: Optional[int] = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK

    # ---- locking ---------------------------------------------------------------------------------------
    def lock(self, command: Optional[str] = None, shared: bool = False, wait: bool = False,
             hold: Optional[str] = None) -> None:
        """Hold this directory's lock until the current scope ends: exclusive to write (the directory is
        made if needed; stale temporary files of killed writers are removed), shared to read. ``hold``:
        "whole" (the default: for the command's life) or "short" (claiming or merging shards). A no-op when
        already held, except that an explicit ``hold`` is recorded."""
        if self._hold is not None and self._hold.active and (shared or not self._shared):
            if not shared and hold is not None:
                lock.set_hold(self.lock_file, hold, command)
            return
        hold = hold or "whole"
        command = command or f"dice {self.kind}"
        if not shared:
            check_out_path(self.path)
            self._mkdir()
        elif not self.path.is_dir():
            return
        self._hold = lock.acquire(self.lock_file, command, f"{self.path}", shared=shared, wait=wait, hold=hold,
                                  fix="" if shared else ", or choose another out=<dir>")
        self._shared = shared
        if not shared and self._hold is not None:
            self._observe()
            for stale in atomic.stale_temp_files(self.path):
                stale.unlink(missing_ok=True)

    def unlock(self) -> None:
        """Let go of the directory's lock before the scope ends (shard jobs, after claiming)."""
        if self._hold is not None:
            self._hold.release()
            self._hold = None

    def locked(self) -> bool:
        return self._hold is not None and self._hold.active and not self._shared

    def relock_for_merge(self, identity: dict) -> bool:
        """A shard job that finished its part: take the lock again to merge (waiting while another shard
        job claims or merges). False, with the reason printed, when there is nothing for it to do: another
        command holds the directory for its whole life (it merges the parts itself), or the merge is done."""
        try:
            self.lock(wait=True, hold="short")
        except lock.Busy as e:
            print(f"dice {self.kind}: {lock.describe_holder(e.holder)} holds {self.path} and merges the parts "
                  f"when they are done")
            return False
        if self.check(identity, overwrite=False) == "complete":
            print(f"dice {self.kind}: {self.path} was merged by another shard job; nothing to do.")
            return False
        return True

    def lock_part(self, name: str, wait: bool) -> None:
        """Hold ``shards/.<name>.lock`` (one part of a sharded measurement) instead of any part held before.
        ``wait``: until its holder lets go (a plain rerun waits for the shard job computing that part);
        otherwise a part held by another job is a UserError naming it."""
        if self._part is not None:
            self._part.release()
            self._part = None
        f = self.path / "shards" / f".{name}.lock"
        f.parent.mkdir(parents=True, exist_ok=True)
        told = False
        while True:
            try:
                self._part = lock.acquire(f, f"dice {self.kind} {name}", f"{name} of {self.path}",
                                          fix=" (were two jobs given the same shard=?)")
                return
            except lock.Busy as e:
                if not wait:
                    raise
                if not told:
                    print(f"dice {self.kind}: waiting for {lock.describe_holder(e.holder)}, which computes {name}")
                    told = True
                time.sleep(lock.POLL_S * 4)

    def _mkdir(self) -> None:
        missing = []
        p = Path(os.path.abspath(self.path))
        while not p.exists():
            missing.append(p)
            p = p.parent
        self.path.mkdir(parents=True, exist_ok=True)
        if missing:
            self._created = missing      # leaf first

    def _observe(self) -> None:
        if self._observing or not lock.in_scope():
            return
        token = (self._before_write, self._after_write)
        atomic.observe(self.path, *token)
        self._observing = True
        lock.on_exit(lambda exc: self._scope_exit(exc, token))

    def _scope_exit(self, exc: Optional[BaseException], token) -> None:
        atomic.unobserve(self.path, *token)
        self._observing = False
        self._close_journal()
        if exc is not None and self.locked():
            self._mark_stopped(exc)
        self._discard_created()

    def _mark_stopped(self, exc: BaseException) -> None:
        """The command stopped on ``exc`` while holding the directory: say so in its manifest."""
        try:
            m = self.manifest()
        except UserError:
            return
        if not m or m.get("status") == "complete":
            return
        while isinstance(exc, SystemExit) and exc.__context__ is not None:
            exc = exc.__context__             # engine=distributed turns its errors into exit codes
        if isinstance(exc, SystemExit):
            return
        if isinstance(exc, KeyboardInterrupt):
            fields: Dict[str, Any] = {"status": "interrupted"}
            note_where(exc, f"while writing {self.path}")
            fields["interrupted"] = getattr(exc, "dice_where", None)
        elif isinstance(exc, DivergenceError):
            fields = {"status": "diverged", "error": str(exc), "divergence": exc.details}
        else:
            fields = {"status": "failed", "error": _short(exc, 500)}
        try:
            self.update_manifest(**fields)
        except (OSError, UserError):
            pass                              # e.g. the disk is full: the status stays 'running'

    def _discard_created(self) -> None:
        """Remove the directories this command made when nothing was written into them."""
        if not self._created:
            return
        leaf = self._created[0]
        try:
            entries = list(leaf.iterdir()) if leaf.is_dir() else None
        except OSError:
            return
        if entries is None or any(p.name != LOCK for p in entries):
            return
        if entries and not self.locked():
            return                            # someone else's lock file
        self.unlock()
        for d in self._created:
            try:
                d.rmdir()
            except OSError:
                break
        self._created = []

    # ---- the file list ---------------------------------------------------------------------------------
    def _append_journal(self, entry: Dict[str, Any]) -> None:
        """One line, one write() on an O_APPEND descriptor kept open while the command observes the
        directory (so concurrent shard jobs never interleave within a line on a local filesystem)."""
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        if self._journal_fd is None:
            self._journal_fd = os.open(self.path / JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        os.write(self._journal_fd, line)

    def _close_journal(self) -> None:
        if self._journal_fd is not None:
            try:
                os.close(self._journal_fd)
            except OSError:
                pass
            self._journal_fd = None

    def _before_write(self, path: Path) -> None:
        rel = _rel(self.path, path)
        if rel and rel != MANIFEST:
            self._append_journal({"f": rel})

    def _after_write(self, path: Path, sha: Optional[str], size: int) -> None:
        rel = _rel(self.path, path)
        if rel and rel != MANIFEST:
            appended = rel in APPENDED
            self._append_journal({"f": rel, "sha256": None if appended else sha, "bytes": None if appended else size,
                                  **({"appended": True} if appended else {})})

    def has_file_list(self) -> bool:
        """Whether this directory lists its files (made by a dice-cli that keeps a manifest file list)."""
        if (self.path / JOURNAL).exists():
            return True
        try:
            return "files" in self.manifest()
        except UserError:
            return False

    def files(self) -> Dict[str, Dict[str, Any]]:
        """Every file dice wrote here: relative path -> {"sha256", "bytes"} (sha256 None while being written,
        or for metrics.csv, which is appended to). Manifest list updated by the journal, cached per state."""
        def stat(p: Path):
            try:
                st = p.stat()
                return st.st_ino, st.st_size, st.st_mtime_ns
            except OSError:
                return None

        key = (stat(self.path / MANIFEST), stat(self.path / JOURNAL))
        if self._files_cache is not None and self._files_cache[0] == key:
            return self._files_cache[1]
        try:
            listed = dict(self.manifest().get("files") or {})
        except UserError:
            listed = {}
        try:
            lines = (self.path / JOURNAL).read_bytes().splitlines()
        except OSError:
            lines = []
        for raw in lines:
            try:
                e = json.loads(raw)
                rel = e["f"]
            except (ValueError, KeyError, TypeError):
                continue                      # a line cut by a kill, or interleaved on NFS
            if not isinstance(rel, str):
                continue
            listed[rel] = {"sha256": e.get("sha256"), "bytes": e.get("bytes")}
        self._files_cache = (key, listed)
        return listed

    def missing(self) -> List[str]:
        """Listed files that are gone."""
        return sorted(rel for rel in self.files() if not (self.path / rel).exists())

    # ---- identity and rerun safety -----------------------------------------------------------------
    def check(self, config: dict, overwrite: bool) -> str:
        """What claiming the directory for ``config`` would do; takes the directory's lock, writes nothing else.

        Returns 'fresh', 'resume' (same config, unfinished or with files missing), 'complete' (same config,
        finished, every listed file present) or 'replace' (different config and ``overwrite``). Raises
        UserError for a different config without ``overwrite``, for a result of another kind (a gt directory
        is never replaced by a train run, nor a train run by gt), for a directory that dice did not make, and
        for 'replace' when the directory holds anything its manifest does not list.
        """
        self.lock()
        m = self._manifest_or_none()
        cfg_file = self.path / CONFIG
        if m is None:
            if self._only_housekeeping():
                return "fresh"
            what = (f"it has a {CONFIG} but no {MANIFEST}, so it was not made by dice (or its manifest was "
                    f"deleted)") if cfg_file.exists() else f"it has no {MANIFEST}"
            raise UserError(f"out={str(self.path)!r} exists, is not empty and is not a dice {self.kind} directory "
                            f"({what}); nothing was changed, and overwrite=true does not empty folders it did "
                            f"not make. Choose an empty or new out=<dir>.")
        other_kind = m.get("kind")
        if other_kind is not None and other_kind != self.kind:
            raise UserError(f"{self.path} holds a dice {other_kind} result, not a {self.kind} result; nothing was "
                            f"changed (overwrite=true only replaces a {self.kind} result). Choose another out=<dir>.")
        if not cfg_file.exists():
            if self._only_housekeeping(allow=(MANIFEST, JOURNAL)):
                return "fresh"                 # stopped between its manifest and its config: nothing to lose
            if overwrite:
                self._removal = self._removal_plan()
                return "replace"
            raise UserError(f"{self.path} is a dice {self.kind} directory without its {CONFIG}, so dice cannot "
                            f"tell which config made it; nothing was changed. Pass overwrite=true to replace it, "
                            f"or choose another out=<dir>.")
        try:
            old = self.config()
        except UserError as e:
            if not overwrite:
                raise UserError(f"{e}. Nothing was changed; restore it, pass overwrite=true to replace this "
                                f"{self.kind} directory, or choose another out=<dir>.") from None
            self._removal = self._removal_plan()
            return "replace"
        diffs = config_differences(old, config)
        if not diffs:
            return "complete" if m.get("status") == "complete" and not self.missing() else "resume"
        if not overwrite:
            shown = "\n  ".join(diffs[:12]) + ("\n  ..." if len(diffs) > 12 else "")
            raise UserError(
                f"{self.path} already holds a {self.kind} run made with a different config:\n  {shown}\n"
                f"Nothing was changed. Choose a new out=<dir>, or pass overwrite=true to replace it.")
        self._removal = self._removal_plan()
        return "replace"

    def claim(self, config: dict, mode: str) -> None:
        """Act on ``check``'s verdict: for 'replace' delete what the manifest lists; for 'fresh' and 'replace'
        write the manifest (kind, id, status running) and then config.yaml; for 'extend' (a train run given
        more rounds, its manifest already 'running') the new config.yaml."""
        if mode == "replace":
            self._remove(*(self._removal or self._removal_plan()))
            self._removal = None
        self.lock()
        if mode == "extend":                  # dice_cli.extend: same run, more rounds
            atomic.write_text(self.path / CONFIG, yaml.safe_dump(config, sort_keys=False))
        if mode in ("fresh", "replace"):
            m = self._manifest_or_none() or {}
            self.update_manifest(kind=self.kind, id=m.get("id") or uuid.uuid4().hex, status="running",
                                 created=m.get("created") or time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            atomic.write_text(self.path / CONFIG, yaml.safe_dump(config, sort_keys=False))

    def discard_if_empty(self) -> None:
        """Remove the directory if nothing was written into it (a run that failed before starting)."""
        try:
            if not self.path.is_dir():
                return
            entries = list(self.path.iterdir())
            if any(p.name != LOCK for p in entries):
                return
            if entries:
                if not self.locked():
                    return
                self.unlock()
            self.path.rmdir()
            self._created = []
        except OSError:
            pass

    def _only_housekeeping(self, allow: Sequence[str] = ()) -> bool:
        """The directory is absent, or holds only hidden files and ``allow``."""
        if not self.path.exists():
            return True
        return all(p.name.startswith(".") or p.name in allow for p in self.path.iterdir())

    def _removal_plan(self) -> Tuple[List[Path], List[Path]]:
        """(files, directories) that replacing this directory deletes: what its manifest lists, dice
        directories nested in it (by their own manifests), dice's lock, journal and stale temporary files.
        UserError listing the rest when anything else (except hidden files, which stay) is there, or when
        a nested directory is in use."""
        files: List[Path] = []
        dirs: List[Path] = []
        foreign: List[str] = []
        busy: List[str] = []
        self._plan_dir(self, "", files, dirs, foreign, busy)
        if busy:
            raise UserError(f"{self.path} cannot be replaced: {busy[0]}; nothing was changed. Wait for it to finish.")
        if foreign:
            shown = ", ".join(foreign[:MAX_LISTED]) + (f" and {len(foreign) - MAX_LISTED} more"
                                                        if len(foreign) > MAX_LISTED else "")
            raise UserError(f"{self.path} holds files dice did not write ({shown}); nothing was changed: "
                            f"overwrite=true only deletes the files listed in {MANIFEST}. Move them away, or "
                            f"choose another out=<dir>.")
        return files, dirs

    def _plan_dir(self, owner: "RunDir", prefix: str, files: List[Path], dirs: List[Path], foreign: List[str],
                  busy: List[str]) -> None:
        base = owner.path / prefix if prefix else owner.path
        listed = set(owner.files())
        legacy = [] if owner.has_file_list() else LEGACY_LAYOUT.get(owner.kind, [])
        for entry in sorted(base.iterdir()):
            rel = prefix + entry.name
            shown = _rel(self.path, entry) or rel
            if entry.is_dir() and not entry.is_symlink():
                nested = RunDir(entry, "?")
                m = nested._manifest_or_none() if (entry / MANIFEST).is_file() else None
                if m is not None and m.get("kind"):
                    nested.kind = m["kind"]
                    self._plan_dir(nested, "", files, dirs, foreign, busy)
                else:
                    self._plan_dir(owner, rel + "/", files, dirs, foreign, busy)
                dirs.append(entry)
                continue
            name = entry.name
            if name == LOCK or (name.startswith(".") and name.endswith(".lock")):
                if entry != self.lock_file:
                    holder = lock.probe(entry)
                    if holder is not None:
                        busy.append(f"{_rel(self.path, entry.parent) or '.'} is in use by "
                                    f"{lock.describe_holder(holder)}")
                    files.append(entry)
            elif rel in listed or rel in (MANIFEST, JOURNAL, CONFIG) or any(fnmatch.fnmatch(rel, p) for p in legacy):
                files.append(entry)
            elif atomic.TEMP_PATTERN.match(name):
                pid = int(atomic.TEMP_PATTERN.match(name).group("pid"))
                if atomic.pid_alive(pid) and pid != os.getpid():
                    busy.append(f"pid {pid} is writing {shown}")
                files.append(entry)
            elif name.startswith("."):
                continue                      # hidden files that were there before dice: left alone
            else:
                foreign.append(shown)

    def _remove(self, files: List[Path], dirs: List[Path]) -> None:
        self._close_journal()                 # the journal goes too; the next write starts a new one
        for f in files:
            try:
                f.unlink()
            except FileNotFoundError:
                pass
        for d in dirs:                        # deepest first (the plan lists children before parents)
            try:
                d.rmdir()
            except OSError:
                pass                          # hidden files stay, so does their folder
        self._files_cache = None

    # ---- manifest -------------------------------------------------------------------------------------
    def _manifest_or_none(self) -> Optional[Dict[str, Any]]:
        f = self.path / MANIFEST
        return self.manifest() if f.exists() else None

    def manifest(self) -> Dict[str, Any]:
        f = self.path / MANIFEST
        if not f.exists():
            return {}
        try:
            m = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UserError(f"{f} cannot be read ({_short(e)}); it is truncated or not a dice manifest, so dice "
                            f"cannot tell what this directory holds. Restore it, or choose another directory") \
                from None
        if not isinstance(m, dict):
            raise UserError(f"{f} is not a dice manifest (it holds a {type(m).__name__}, not an object); restore "
                            f"it, or choose another directory")
        return m

    def update_manifest(self, **fields: Any) -> Dict[str, Any]:
        """Merge ``fields`` into manifest.json (with the current file list), atomically. A command that does
        not hold the directory (a shard job between claiming and merging) takes its lock for the write,
        waiting while another shard job holds it briefly, and skips the write when another command holds it
        for good (that command keeps the manifest)."""
        hold = None
        if lock.in_scope() and not self.locked() and not lock.holds(self.lock_file, exclusive=True):
            try:
                hold = lock.acquire(self.lock_file, f"dice {self.kind}", str(self.path), wait=True, hold="short")
            except lock.Busy:
                return self.manifest()
        try:
            m = self.manifest()
            m.update(fields)
            m["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            m.pop("files", None)
            m["files"] = self.files()
            atomic.write_json(self.path / MANIFEST, m)
            return m
        finally:
            if hold is not None:
                hold.release()

    def config(self) -> dict:
        f = self.path / CONFIG
        try:
            d = yaml.safe_load(f.read_text())
        except FileNotFoundError:
            raise UserError(f"{f} is missing") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise UserError(f"{f} cannot be read as a dice config ({_short(e)})") from None
        if not isinstance(d, dict):
            raise UserError(f"{f} is not a dice config (it holds {type(d).__name__}, not key: value pairs)")
        return d

    # ---- integrity -------------------------------------------------------------------------------------
    def mixing_file(self) -> Optional[str]:
        for name in MIXING_FILES:
            if (self.path / name).exists():
                return name
        return None

    def verify(self, *names: str, fix: str = "") -> None:
        """UserError naming the first of ``names`` whose sha256 differs from the one the manifest records
        (files without a recorded hash, e.g. from older runs, are only checked to be readable)."""
        files = self.files()
        for name in names:
            p = self.path / name
            if not p.is_file():
                continue
            rec = (files.get(name) or {}).get("sha256")
            if rec:
                now = sha256_file(p)
                if now != rec:
                    raise UserError(
                        f"{p} has changed since dice wrote it (sha256 now {now[:12]}..., the manifest records "
                        f"{rec[:12]}...); results computed from it would be silently wrong. Restore the original"
                        f"{fix or '; or delete it and run the command that wrote it again (it rewrites missing files)'}")
            elif name.endswith(".npy"):
                _check_npy(p)

    def verify_mixing(self, train_cfg) -> None:
        """Rebuild W^t from the run's config and compare it with the recorded mixing file (static: W; time-
        varying: the first 64 rounds and the last). Skipped, with a note, when the config cannot rebuild it
        (topology=file whose matrix file is gone: the recorded sha256 vouches for it)."""
        import numpy as np

        from .graph import MixingSchedule, build_schedule

        name = self.mixing_file()
        if name is None:
            return
        try:
            built = build_schedule(train_cfg.topology, train_cfg.nodes, train_cfg.seed)
        except UserError as e:
            print(f"dice: note: W of {self.path} could not be rebuilt from its config ({_short(e)}); only its "
                  f"recorded sha256 was checked", file=sys.stderr)
            return
        stored = MixingSchedule.load(self.path)
        T = int(train_cfg.rounds)
        rounds = [0] if not (built.time_varying or stored.time_varying) else \
            sorted(set(range(min(T, 64))) | {T - 1})
        for t in rounds:
            a, b = built.at(t), stored.at(t)
            if a.shape != b.shape or not np.allclose(a, b, rtol=0, atol=1e-12):
                where = ""
                if a.shape == b.shape:
                    k, l = np.unravel_index(int(np.argmax(np.abs(a - b))), a.shape)
                    where = f" (round {t}: W[{k}, {l}] is {b[k, l]:.6g} in the file, {a[k, l]:.6g} from the config)"
                raise UserError(f"{self.path / name} does not match the mixing matrix rebuilt from {CONFIG} "
                                f"(topology={train_cfg.topology.name}){where}; the run would be replayed with "
                                f"the wrong W. Restore the original, or delete it and run `dice train` with the "
                                f"same config again to rewrite it")

    def static_intact(self, plan) -> bool:
        """On resume: whether every file fixed by the config is present and unchanged. UserError when the
        plan rebuilt from the config differs from the recorded one: the checkpoints came from that plan, so
        this dice-cli (or these data files) cannot continue the run."""
        import numpy as np

        files = self.files()
        rec = (files.get("plan.npy") or {}).get("sha256")
        rebuilt = None
        if rec:
            rebuilt = hashlib.sha256(atomic.npy_bytes(plan)).hexdigest()
            differs = rebuilt != rec
        elif (self.path / "plan.npy").exists() and self.checkpoint_rounds():
            try:
                differs = not np.array_equal(np.load(self.path / "plan.npy", allow_pickle=False), plan)
            except (OSError, ValueError):
                differs = False               # unreadable: rewritten below
        else:
            differs = False
        if differs and rec and self._plan_is_prefix_related(plan):
            return False                      # an extension (rounds raised) stopped mid-way: rewritten
        if differs:
            raise UserError(f"{self.path}: the batch plan rebuilt from its config differs from the one this run "
                            f"recorded (another dice-cli version or other data files?), so it cannot be resumed "
                            f"consistently. Finish it with the setup that started it, or start a new run (a new "
                            f"out=<dir>, or overwrite=true)")
        names = list(TRAIN_STATIC) + [self.mixing_file() or MIXING_FILES[0]]
        for name in names:
            p = self.path / name
            if not p.is_file():
                return False
            r = (files.get(name) or {}).get("sha256")
            if r and sha256_file(p) != r:
                return False
        return True

    def _plan_is_prefix_related(self, plan) -> bool:
        """The recorded plan and ``plan`` agree on the rounds both have (one run extends the other)."""
        import numpy as np

        try:
            recorded = np.load(self.path / "plan.npy", allow_pickle=False)
        except (OSError, ValueError):
            return False
        T = min(len(recorded), len(plan))
        return recorded.shape[1:] == plan.shape[1:] and bool(np.array_equal(recorded[:T], plan[:T]))

    def network_intact(self) -> bool:
        """network.npz is present and has the sha256 the manifest records."""
        p = self.path / "network.npz"
        rec = (self.files().get("network.npz") or {}).get("sha256")
        return p.is_file() and bool(rec) and sha256_file(p) == rec

    def recorded_network(self):
        """The network record this run wrote (``network.NetworkRecord``), or None (none recorded, or not intact:
        it is drawn again from the config, which gives the same draws unless a trace file changed)."""
        if not self.network_intact():
            return None
        from .network import NetworkRecord

        return NetworkRecord.load(self.path)

    # ---- checkpoints ----------------------------------------------------------------------------------
    def checkpoint_path(self, t: int) -> Path:
        return self.path / CHECKPOINTS / checkpoint_name(t)

    def checkpoint_rounds(self) -> List[int]:
        """Rounds with a checkpoint on disk (only those the run wrote, when it lists its files)."""
        d = self.path / CHECKPOINTS
        if not d.exists():
            return []
        listed = self.files() if self.has_file_list() else None
        out = []
        for p in d.glob("round_*.pt"):
            try:
                t = int(p.stem.split("_")[1])
            except (IndexError, ValueError):
                continue
            if listed is None or f"{CHECKPOINTS}/{p.name}" in listed:
                out.append(t)
        return sorted(out)

    def save_checkpoint(self, t: int, payload: dict) -> None:
        atomic.save_torch(self.checkpoint_path(t), payload)

    def load_checkpoint(self, t: int) -> dict:
        import torch

        p = self.checkpoint_path(t)
        if not p.exists():
            raise UserError(f"checkpoint {p} is missing; available rounds: {self.checkpoint_rounds()}")
        fix = ("; or delete it and run the same `dice train` command again: it resumes from the checkpoint "
               "before it and rewrites it")
        self.verify(f"{CHECKPOINTS}/{p.name}", fix=fix)
        try:
            with warnings.catch_warnings():   # torch warns about odd pickles before refusing them
                warnings.simplefilter("ignore", UserWarning)
                payload = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"checkpoint {p} cannot be read ({_short(e)}); it is truncated or not a dice "
                            f"checkpoint. Restore it{fix}") from None
        if not isinstance(payload, dict) or not {"round", "theta", "buffers", "momentum"} <= set(payload):
            raise UserError(f"checkpoint {p} is not a dice checkpoint (it lacks round/theta/buffers/momentum). "
                            f"Restore it{fix}")
        return payload

    def resume_round(self, nodes: int, rounds: int, eval_every: int) -> Optional[int]:
        """The checkpoint a resumed training session starts from: the latest one such that metrics.csv holds
        every evaluated round before it (so a deleted or cut metrics.csv is rebuilt by re-running those
        rounds, which reproduces them exactly); None: start from round 0."""
        have = self.checkpoint_rounds()
        if not have:
            return None
        logged = _logged_rounds(self.path / "metrics.csv", nodes)
        evaluated = [t for t in range(rounds) if (t + 1) % eval_every == 0 or t == rounds - 1]
        first_missing = next((t for t in evaluated if t not in logged), rounds)
        ok = [r for r in have if r <= first_missing]
        return ok[-1] if ok else None


def measuring_where(rounds: Sequence[int], done: int) -> str:
    """'while measuring round 40 (2 of 5 rounds done)': what gt / estimate were doing when stopped."""
    current = f"round {rounds[done]} " if 0 <= done < len(rounds) else ""
    return f"while measuring {current}({done} of {len(rounds)} rounds done)"


def _logged_rounds(path: Path, nodes: int) -> set:
    """Rounds with a complete row for every node in a metrics.csv (empty when it is missing or unreadable)."""
    import pandas as pd

    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return set()
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]
    try:
        df = pd.read_csv(io.StringIO("".join(lines)))
        counts = df.dropna(subset=["round", "node"]).groupby("round")["node"].nunique()
    except (ValueError, KeyError, TypeError, pd.errors.EmptyDataError):
        return set()
    return {int(r) for r, c in counts.items() if c == nodes}


def _check_npy(p: Path) -> None:
    import numpy as np

    try:
        np.load(p, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{p} cannot be read as a .npy array ({_short(e)}); it is truncated or not what dice "
                        f"wrote. Restore it, or delete it and run the command that wrote it again") from None


# --------------------------------------------------------------------------- readers


def open_run(path: os.PathLike | str, need: tuple = (CONFIG, MANIFEST, "plan.npy"),
             require_complete: bool = True) -> RunDir:
    """Open an existing ``dice train`` run for reading, with clear errors when it is missing, partial or
    changed: a shared lock for the command's life (no one replaces it meanwhile), every listed file
    present, the sha256 of config.yaml, plan, partition, probe set and mixing file checked, and W rebuilt
    from the config and compared. Checkpoints are checked when they are read (``load_checkpoint``)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"run={str(path)!r} does not exist. Point run= at a `dice train` output directory "
                        f"(default: outputs/latest), or train one first: dice train out={path}")
    if not p.is_dir():
        raise UserError(f"run={str(path)!r} is a file, not a `dice train` output directory")
    missing = [f for f in need if not (p / f).exists()]
    if missing:
        raise UserError(f"run={str(path)!r} is not a complete dice train run: missing {', '.join(missing)}. "
                        f"Re-run `dice train out={path}` to finish it.")
    run = RunDir(p.resolve())
    m = run.manifest()
    kind = m.get("kind")
    if kind not in (None, "train"):
        raise UserError(f"run={str(path)!r} holds a dice {kind} result, not a `dice train` run; point run= at the "
                        f"train run it was computed from ({p.resolve().parent})")
    run.lock(command="reading", shared=True)
    status = m.get("status")
    if require_complete and status != "complete":
        raise UserError(f"run={str(path)!r} has status {status!r}, not 'complete'. "
                        f"Resume it first: dice train out={path}")
    gone = run.missing()
    if gone:
        raise UserError(f"run={str(path)!r} is missing {', '.join(gone[:MAX_LISTED])}, which dice train wrote; run "
                        f"the same `dice train` command (out={path}) again to rewrite it")
    if require_complete:
        run.verify(*TRAIN_INPUTS, *(x for x in [run.mixing_file()] if x))
        from .config import TrainConfig, to_dataclass

        try:
            train_cfg = to_dataclass(run.config(), TrainConfig)
        except UserError as e:
            raise UserError(f"run={str(path)!r}: its {CONFIG} is not a valid train config: {e}") from None
        run.verify_mixing(train_cfg)
    return run


def read_result(path: os.PathLike | str, kind: str, name: str, key: str = "gt") -> dict:
    """The config of a finished ``dice <kind>`` result at ``path`` after checking ``name`` (and its
    config.yaml) against the manifest; UserError (naming ``key=``) when it is missing, partial or changed."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{key}={str(path)!r} does not exist or is not a directory; point {key}= at a `dice "
                        f"{kind}` result (default: <run>/{kind})")
    res = RunDir(p, kind)
    m = res.manifest()
    if m.get("kind", kind) != kind:
        raise UserError(f"{key}={str(path)!r} holds a dice {m.get('kind')} result, not a {kind} result")
    if m.get("status", "complete") != "complete" or not (p / name).exists():
        raise UserError(f"{key}={str(path)!r} is not a finished dice {kind} result (status {m.get('status')!r}"
                        f"{'' if (p / name).exists() else f', no {name}'}); run `dice {kind}` to finish it")
    res.verify(CONFIG, name)
    return res.config() if (p / CONFIG).exists() else {}


def point_latest(run_path: Path, root: Path = Path("outputs")) -> None:
    """Atomically repoint ``outputs/latest`` (a symlink) at ``run_path``.

    ``DICE_LATEST=<path>`` in the environment moves the link (the test suite keeps it out of the checkout);
    ``DICE_LATEST=`` (empty) turns it off."""
    env = os.environ.get("DICE_LATEST")
    if env == "":
        return
    link = Path(env) if env else root / "latest"
    try:
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.parent / f".{link.name}.{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(os.path.abspath(run_path), tmp)
        os.replace(tmp, link)
    except OSError:
        pass  # a read-only or symlink-less filesystem must not fail a finished run
