"""Atomic file writes: write to a temporary file in the same folder, then rename over the target.

A reader (or a killed run) therefore sees either the old complete file or the new complete file,
never half of one. Used for every file a run directory holds.

The temporary file is ``.<name>.<pid>.<random>.tmp`` next to the target, created with mode 0666 minus the
umask (so results are as readable as any other file the user makes: 0644 under umask 022); it is removed
when the write fails or is interrupted, and the writer's pid in its name lets the next command on the
directory remove the leftovers of a process that was killed outright (``stale_temp_files``).

Observers: ``dice_cli.run`` registers a callback for each run directory a command writes, and every atomic
write below it is reported twice — ``before(path)`` ahead of the first byte and ``after(path, sha256,
size)`` once the file is in place — so the manifest can list every file dice wrote, with its hash.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

PathLike = Union[str, Path]
TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")

# root directory -> [(before(path), after(path, sha256, size)), ...]; the deepest root containing a path wins
Before = Callable[[Path], None]
After = Callable[[Path, Optional[str], int], None]
_observers: Dict[Path, List[Tuple[Before, After]]] = {}


def observe(root: PathLike, before: Before, after: After) -> None:
    """Report every atomic write below ``root`` (see the module docstring) until ``unobserve``."""
    _observers.setdefault(Path(os.path.abspath(root)), []).append((before, after))


def unobserve(root: PathLike, before: Before, after: After) -> None:
    key = Path(os.path.abspath(root))
    pairs = _observers.get(key, [])
    if (before, after) in pairs:
        pairs.remove((before, after))
    if not pairs:
        _observers.pop(key, None)


def _observer(path: Path) -> Optional[Tuple[Before, After]]:
    if not _observers:
        return None
    p = Path(os.path.abspath(path))
    best, found = -1, None
    for root, pairs in _observers.items():
        if pairs and root in p.parents and len(root.parts) > best:
            best, found = len(root.parts), pairs[-1]
    return found


def note_in_place(path: PathLike, done: bool) -> None:
    """Report a file that another library writes in place (not atomically) to the observer of its directory:
    ``done=False`` when it is created (listed, no hash yet), ``done=True`` once it is closed (hashed)."""
    path = Path(path)
    obs = _observer(path)
    if obs is None:
        return
    if done:
        obs[1](path, _sha256_file(path), path.stat().st_size)
    else:
        obs[0](path)


def temp_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _create(path: Path) -> Path:
    """A fresh temporary file next to ``path``: O_EXCL, mode 0666 & ~umask (the kernel applies the umask)."""
    while True:
        tmp = temp_name(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_path(path: PathLike, digest: Optional[str] = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    ``digest``: the sha256 of what will be written, when the caller knows it (else the file is hashed
    after writing, only if an observer wants it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obs = _observer(path)
    if obs is not None:
        obs[0](path)
    tmp = _create(path)
    try:
        yield tmp
        size = tmp.stat().st_size
        if obs is not None and digest is None:
            digest = _sha256_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if obs is not None:
        obs[1](path, digest, size)


def write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_path(path, hashlib.sha256(data).hexdigest()) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text(path: PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def npy_bytes(array) -> bytes:
    """The exact bytes ``save_npy`` writes for ``array`` (so a rebuilt array can be compared by hash)."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def save_npy(path: PathLike, array) -> None:
    write_bytes(path, npy_bytes(array))


def save_torch(path: PathLike, obj: Any) -> None:
    """``torch.save`` straight into the temporary file (no in-memory copy of the archive first). Through a
    file object, not the path: torch names the archive's records after a path's stem, and the temporary
    name is random, so the bytes would differ from one write of the same state to the next."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def save_figure(path: PathLike, fig) -> None:
    """Save a matplotlib figure atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError as e:
        return e.errno != errno.ESRCH
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def stale_temp_files(root: PathLike) -> List[Path]:
    """Temporary files below ``root`` left by writers that no longer run (killed mid-write)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            m = TEMP_PATTERN.match(name)
            if m and int(m.group("pid")) != os.getpid() and not pid_alive(int(m.group("pid"))):
                out.append(Path(dirpath) / name)
    return out
