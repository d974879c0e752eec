"""Directory locks and command scopes: one writer per directory, readers never see a directory being replaced.

A lock is ``flock`` on a hidden file (``<dir>/.dice.lock``; a shard part: ``<out>/shards/.shard_<i>_of_<n>.lock``):

- exclusive (a command writing the directory): the holder writes its pid, host, command and how long it
  holds the lock (``hold``: "whole" = for the command's whole life, "short" = while claiming or merging
  shards) into the file, and removes the file when it lets go;
- shared (a command reading a run: gt, estimate, detect read their ``run=``): nothing is written.

The kernel drops a lock when its process dies, however it dies, so a lock file whose holder is gone is
simply taken over (with a note naming the dead holder). A command that finds the lock taken stops with
exit code 2 naming the holder — except where waiting is the protocol (``wait=True``: shard jobs wait while
another shard job claims or merges).

Locks are re-entrant within a process (``dice pipeline`` holds its run directory while its train stage
takes it again) and belong to a *scope*: ``@scoped`` functions (train, measure, detect, pipeline, every
command) release what they took, and run the exit hooks registered in them, when they return or raise.
Outside any scope nothing is locked (library use, e.g. a notebook reading a run).
"""
from __future__ import annotations

import errno
import functools
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

from .atomic import pid_alive
from .errors import UserError

LOCK_NAME = ".dice.lock"
WAIT_S = 600.0                 # longest wait for another shard job's claim or merge (they take seconds)
POLL_S = 0.05


class Busy(UserError):
    """The lock is held by another process; ``holder`` is what it wrote (may be empty for readers)."""

    def __init__(self, message: str, holder: Dict[str, Any]):
        super().__init__(message)
        self.holder = holder


@dataclass
class _Held:
    fd: int
    shared: bool
    count: int = 1
    info: Dict[str, Any] = field(default_factory=dict)


_held: Dict[str, _Held] = {}
_scopes: List[List[Callable[[Optional[BaseException]], None]]] = []
_notes_given: set = set()


# --------------------------------------------------------------------------- scopes


@contextmanager
def scope() -> Iterator[None]:
    """Everything registered with ``on_exit`` inside runs (newest first) when the block ends."""
    _scopes.append([])
    exc: Optional[BaseException] = None
    try:
        yield
    except BaseException as e:
        exc = e
        raise
    finally:
        hooks = _scopes.pop()
        for hook in reversed(hooks):
            try:
                hook(exc)
            except Exception as e:     # cleanup is best effort: it must not hide the command's own outcome
                print(f"dice: note: cleanup after the command failed: {e}", file=sys.stderr)


def scoped(fn: Callable) -> Callable:
    """Run ``fn`` in its own scope (see the module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with scope():
            return fn(*args, **kwargs)

    return wrapper


def in_scope() -> bool:
    return bool(_scopes)


def on_exit(hook: Callable[[Optional[BaseException]], None]) -> bool:
    """Register ``hook(exception or None)`` in the innermost scope; False (nothing registered) outside one."""
    if not _scopes:
        return False
    _scopes[-1].append(hook)
    return True


# --------------------------------------------------------------------------- locks


def _note(text: str) -> None:
    if text not in _notes_given:
        _notes_given.add(text)
        print(f"dice: note: {text}", file=sys.stderr)


def _read_info(fd: int) -> Dict[str, Any]:
    try:
        raw = os.pread(fd, 65536, 0)
        return json.loads(raw.decode()) if raw.strip() else {}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}


def describe_holder(info: Dict[str, Any]) -> str:
    if not info.get("pid"):
        return "another dice process"
    host = info.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    since = f", since {info['started']}" if info.get("started") else ""
    return f"pid {info['pid']}{where} ({info.get('command', 'dice')}{since})"


def _holder_alive(info: Dict[str, Any]) -> bool:
    if not info.get("pid"):
        return False
    if info.get("host") not in (None, socket.gethostname()):
        return True             # cannot tell for another host; the kernel lock decides
    return pid_alive(int(info["pid"]))


class Hold:
    """One acquisition of a lock; ``release()`` is idempotent (the scope calls it too)."""

    def __init__(self, key: str):
        self.key = key
        self.active = True

    def release(self) -> None:
        if self.active:
            self.active = False
            _release(self.key)


def holds(lock_file: os.PathLike, exclusive: bool = False) -> bool:
    h = _held.get(os.path.abspath(lock_file))
    return h is not None and (not exclusive or not h.shared)


def acquire(lock_file: os.PathLike, command: str, what: str, shared: bool = False, wait: bool = False,
            hold: str = "whole", fix: str = "") -> Optional[Hold]:
    """Take the lock on ``lock_file`` until the innermost scope ends (or ``Hold.release()``).

    ``what`` names the locked thing in messages. ``wait``: keep trying while the holder holds it "short"
    (another shard job claiming or merging), for at most WAIT_S seconds. Raises ``Busy`` (a UserError,
    exit 2) naming the holder. Returns None when nothing was locked (no scope, no fcntl, a read-only run,
    or a filesystem without locks — then a note says so)."""
    if not in_scope():
        return None
    try:
        import fcntl
    except ImportError:                       # not a POSIX system: run without locks
        return None
    key = os.path.abspath(lock_file)
    held = _held.get(key)
    if held is not None:
        if not shared and held.shared:
            try:
                fcntl.flock(held.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Busy(f"{what} is being read by another dice process; nothing was changed. Wait for it "
                           f"to finish{fix}", {}) from None
            held.shared = False
            _write_info(held, command, hold)
        held.count += 1
        return _scoped_hold(key)
    deadline = time.monotonic() + WAIT_S
    waited = False
    while True:
        try:
            fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            if shared and e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                return None                   # a read-only run: nobody can replace it through us either
            raise
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read_info(fd)
            os.close(fd)
            short = info.get("hold") == "short" or not info.get("pid")
            if wait and short and time.monotonic() < deadline:
                if not waited and info.get("pid"):
                    _note(f"waiting for {describe_holder(info)}, which holds {what}")
                waited = True
                time.sleep(POLL_S)
                continue
            holder = describe_holder(info) if _holder_alive(info) else "another dice process"
            msg = f"{what} is in use by {holder}"
            raise Busy(f"{msg}; nothing was changed. Wait for it to finish{fix}", info) from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                _note(f"the filesystem of {key} does not support file locks; running without a lock")
                return None
            raise
        try:                                  # the file may have been removed by the previous holder
            same = os.path.samestat(os.fstat(fd), os.stat(key))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        break
    h = _Held(fd, shared)
    if not shared:
        old = _read_info(fd)
        if old.get("pid") and int(old["pid"]) != os.getpid():
            _note(f"took over the lock on {what} left by {describe_holder(old)}, which is no longer running")
        _write_info(h, command, hold)
    _held[key] = h
    return _scoped_hold(key)


def _scoped_hold(key: str) -> Hold:
    hold = Hold(key)
    on_exit(lambda exc: hold.release())
    return hold


def _write_info(h: _Held, command: str, hold: str) -> None:
    h.info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "hold": hold,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    data = (json.dumps(h.info) + "\n").encode()
    try:
        os.ftruncate(h.fd, 0)
        os.pwrite(h.fd, data, 0)
    except OSError:
        pass                                  # the lock holds even if its description cannot be written


def set_hold(lock_file: os.PathLike, hold: str, command: Optional[str] = None) -> None:
    """Change what an exclusive lock this process holds says about how long it is held."""
    h = _held.get(os.path.abspath(lock_file))
    if h is not None and not h.shared:
        _write_info(h, command or h.info.get("command", "dice"), hold)


def _release(key: str) -> None:
    """Drop one hold; the last one unlocks, removing the file when nobody else has it."""
    h = _held.get(key)
    if h is None:
        return
    h.count -= 1
    if h.count > 0:
        return
    del _held[key]
    try:
        import fcntl

        if h.shared:                          # the last reader tidies up, if no one else holds it
            try:
                fcntl.flock(h.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return
        try:
            if os.path.samestat(os.fstat(h.fd), os.stat(key)):
                os.unlink(key)
        except OSError:
            pass
    finally:
        os.close(h.fd)


def probe(lock_file: os.PathLike) -> Optional[Dict[str, Any]]:
    """None when nobody holds ``lock_file`` (or it does not exist), else what its holder wrote."""
    key = os.path.abspath(lock_file)
    if key in _held or not os.path.exists(key):
        return None
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(key, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_info(fd) or {"pid": None}
    except OSError:
        return None
    finally:
        os.close(fd)
    return None
