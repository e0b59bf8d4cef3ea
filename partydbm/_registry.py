"""The process's engines: one per real database path (trap 1 in docs/TRAPS.md: a second
LevelDB open of a path in one process would drop the process's lock on it), shared by
every handle and thread; and what happens to them at fork and at interpreter exit.

Lock order: `_lock` before any engine's locks.
"""

from __future__ import annotations

import atexit
import errno
import os
import threading
from collections.abc import Callable
from typing import Any

from . import _engine
from ._election import LockFile
from ._engine import Engine
from ._errors import error

_lock = threading.RLock()
_engines: dict[str, Engine] = {}
_lockfiles: dict[str, LockFile] = {}


def acquire(path: str, timeout: float | None, serve_only: bool = False,
            cache_size: int = 0) -> Engine:
    """The process's engine for `path` (real path), started; one more reference.
    `serve_only`: this process only serves the database (its next leadership runs
    without answering in passing and without niced serving threads). `cache_size`:
    what the handle asks of the follower cache (Engine.want_cache)."""
    with _lock:
        engine = _engines.get(path)
        if engine is None:
            lockfile = _lockfiles.get(path)
            if lockfile is not None and lockfile.is_stale():
                lockfile.retire()
                lockfile = None
            if lockfile is None:
                lockfile = _lockfiles[path] = LockFile(path)
            engine = _engines[path] = Engine(
                path, lockfile, lambda: _lock_acquired(path, lockfile))
        engine.refs += 1
        engine.serve_only |= serve_only
    engine.want_cache(cache_size)  # before start(): its first route may be cached
    try:
        engine.start(timeout)
    except BaseException:
        release(engine)
        raise
    return engine


def release(engine: Engine) -> None:
    """Drop one reference; the last one closes the engine (a leader hands over)."""
    if _engine.shutting_down:
        # _shutdown() closed every engine already. Take no lock now: a daemon thread
        # frozen by interpreter finalization may hold it forever.
        return
    with _lock:
        engine.refs -= 1
        if engine.refs > 0:
            return
        if _engines.get(engine.path) is engine:
            del _engines[engine.path]
        engine.close()
        _forget_lockfile(engine.path, engine._lockfile)


def _forget_lockfile(path: str, lockfile: LockFile) -> None:
    """Close a database's LOCK fd once nothing in this process needs it. Called with
    `_lock` held, after the engine closed (so LevelDB holds no lock here). A waiter
    still blocked on the fd keeps it open; its callback closes it later."""
    if path in _engines or lockfile.waiting():
        return
    if _lockfiles.get(path) is lockfile:
        del _lockfiles[path]
    lockfile.close()


def _lock_acquired(path: str, lockfile: LockFile) -> None:
    """Called by a LockFile's waiter thread when this process got the LOCK."""
    with _lock:
        if lockfile.fd < 0:
            # Closed between the grant and this call (release() saw no waiter left, or
            # retire()): closing the fd gave the lock back already; it is no one's here.
            return
        if lockfile.retired:  # a lock on a deleted LOCK file: it guards nothing
            lockfile.close()
            return
        engine = _engines.get(path)
        if engine is None or _engine.shutting_down:
            # Nobody here wants the database any more: pass the lock on. Safe because no
            # engine for `path` exists, so LevelDB does not hold it in this process.
            lockfile.unlock()
            if engine is None:
                _forget_lockfile(path, lockfile)
            return
        engine.lock_won()


def exclusively(path: str, fn: Callable[[], Any]) -> Any:
    """Run `fn` while holding the database's LOCK with nobody having it open, this
    process included (for LevelDB's repair, which takes no lock itself). Raises error
    (EBUSY) when anybody has it open. `_lock` is held throughout, so this process
    cannot open the database meanwhile; a lock taken on a second fd of LOCK here would
    be dropped with it (trap 1), hence the check of this process's own engines first."""
    with _lock:
        if path in _engines or path in _lockfiles:
            raise error(errno.EBUSY, "the database is open in this process", path)
        lockfile = LockFile(path)
        try:
            if not lockfile.try_lock():
                pid = lockfile.holder_pid()
                raise error(errno.EBUSY, "the database is open (process "
                            f"{pid if pid is not None else '?'} holds LevelDB's LOCK)", path)
            return fn()
        finally:
            lockfile.close()  # also releases the lock


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.RLock()
    for lockfile in _lockfiles.values():
        lockfile.reset_after_fork()
    for engine in _engines.values():
        engine.after_fork_in_child()


def _shutdown() -> None:
    """At interpreter exit: leaders hand over cleanly (socket removed, LOCK released)."""
    with _lock:
        _engine.shutting_down = True
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        try:
            engine.close()
        except Exception:
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_shutdown)
