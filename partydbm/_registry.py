"""The process's engines: one per real database path (trap 1 in docs/TRAPS.md: a second
LevelDB open of a path in one process would drop the process's lock on it), shared by
every handle and thread; how long each outlives its last handle (its grace period,
_grace.py); and what happens to them at fork and at interpreter exit.

An engine in `_engines` with no reference (`refs == 0`) is in its grace period, until
`idle_until`: acquire() takes it back if its route still works; the Reaper closes it
when the period ends.

Lock order: `_lock` before any engine's locks, before the Reaper's.
"""

from __future__ import annotations

import atexit
import errno
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from . import _engine, _grace
from ._client import Connection, ask_to_let_go
from ._election import LockFile, socket_address
from ._engine import Engine
from ._errors import error
from ._remote import RemoteRoute
from ._routes import LocalRoute

LET_GO_TIMEOUT = 10.0
"""Seconds exclusively() waits for an idle leader it asked to let go to do so."""
FORK_LOCK_WAIT = 10.0
"""Seconds a fork waits for the registry (another thread closing an engine, say)."""

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
        if engine is not None and engine.refs == 0 and not _reusable(engine):
            _close(engine)
            engine = None
        if engine is None:
            lockfile = _lockfiles.get(path)
            if lockfile is not None and lockfile.is_stale():
                lockfile.retire()
                lockfile = None
            if lockfile is None:
                lockfile = _lockfiles[path] = LockFile(path)
            engine = _engines[path] = Engine(path, lockfile, KEEPER)
        engine.refs += 1
        engine.idle_until = None
        engine.serve_only |= serve_only
    engine.want_cache(cache_size)  # before start(): its first route may be cached
    try:
        engine.start(timeout)
    except BaseException:
        release(engine)
        raise
    return engine


def release(engine: Engine) -> None:
    """Drop one reference. After the last one the engine lingers for its grace period
    (_grace.py), or closes now (a leader hands over) if it has no working route."""
    if _engine.shutting_down:
        # _shutdown() closed every engine already. Take no lock now: a daemon thread
        # frozen by interpreter finalization may hold it forever.
        return
    with _lock:
        engine.refs -= 1
        if engine.refs > 0:
            return
        grace = _grace_for(engine)
        if grace > 0:
            engine.idle_until = time.monotonic() + grace
            if _reaper.wake_by(engine.idle_until):
                return
            engine.idle_until = None
        _close(engine)


def _reusable(engine: Engine) -> bool:
    """Whether an engine in its grace period may serve a new handle: not if its route
    died meanwhile (its leader went away), nor if the database it has open is no longer
    the one at its path (deleted, and maybe made anew: its LOCK file was replaced)."""
    return engine.route.alive() and not engine._lockfile.is_stale()


def let_go(path: str | None) -> None:
    """End the grace period of this process's idle engine for `path` (of every idle one
    if None) now."""
    with _lock:
        for engine in list(_engines.values()):
            if engine.refs == 0 and path in (None, engine.path):
                _close(engine)


def _grace_for(engine: Engine) -> float:
    """How long `engine`, whose last handle just closed, lingers: not at all without a
    working route (a takeover failed, its leader is gone), nor in a process that only
    serves (`partydbm serve`, the fork helper: their close is a hand-over)."""
    if engine.closed or engine.serve_only or _engines.get(engine.path) is not engine:
        return 0.0
    route = engine.route
    if not route.alive():
        return 0.0
    if isinstance(route, LocalRoute):
        return _grace.leader()
    return _grace.follower() if isinstance(route, RemoteRoute) else 0.0


def _close(engine: Engine) -> None:
    """Close `engine` and forget it. Called with `_lock` held."""
    if _engines.get(engine.path) is engine:
        del _engines[engine.path]
    engine.close()
    _forget_lockfile(engine.path, engine._lockfile)


def _due() -> float | None:
    """The Reaper's call: close the engines whose grace period is over. When the next
    one's ends (None: no engine is idle)."""
    with _lock:
        now, later = time.monotonic(), None
        for engine in list(_engines.values()):
            until = engine.idle_until
            if engine.refs or until is None:
                continue
            if until > now:
                later = until if later is None else min(later, until)
                continue
            try:
                _close(engine)
            except Exception:
                pass  # nobody to tell: no handle has it open; it is closed and forgotten
        return later


_reaper = _grace.Reaper(_due)


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
        if engine is None or engine.refs == 0 or _engine.shutting_down:
            # Nobody here wants the database any more (an engine in its grace period
            # would lead for nobody): pass the lock on. Safe because no engine for `path`
            # leads, so LevelDB does not hold it in this process.
            lockfile.unlock()
            if engine is not None and not _engine.shutting_down:
                _close(engine)
            elif engine is None:
                _forget_lockfile(path, lockfile)
            return
        engine.lock_won()


class _Keeper:
    """What engines tell the registry (_engine.Keeper)."""

    def lock_acquired(self, path: str, lockfile: LockFile) -> None:
        _lock_acquired(path, lockfile)

    def hung_up(self, engine: Engine, conn: Connection) -> None:
        with _lock:
            if engine.refs == 0 and _engines.get(engine.path) is engine:
                # In its grace period: it would take over the database for nobody (and
                # keep another program from it), and its cache is as dead as its leader.
                _close(engine)
                return
            engine.contend_after(conn)

    def let_go(self, engine: Engine) -> Callable[[], None] | None:
        # Only with no follower connected but the one asking: a follower that has the
        # database open would take it over first (and one in its grace period may be
        # back any moment). Called by a serving thread, which the close joins: it must
        # not wait for `_lock` (the Reaper holds it while it closes). A race with
        # acquire() at worst ends the grace of an engine that has a handle again: the
        # Reaper leaves it open.
        server = engine.server
        if (engine.refs or engine.idle_until is None or engine.closed or server is None
                or server.followers() > 1):
            return None

        def end_now() -> None:
            engine.idle_until = 0.0
            _reaper.wake_by(0.0)
        return end_now


KEEPER = _Keeper()


def exclusively(path: str, fn: Callable[[], Any]) -> Any:
    """Run `fn` while holding the database's LOCK with nobody having it open, this
    process included (for LevelDB's repair, which takes no lock itself). An engine in
    its grace period is closed first, here or in the leader's process (asked: RELEASE).
    Raises error (EBUSY) when anybody has it open. `_lock` is held throughout, so this
    process cannot open the database meanwhile; a lock taken on a second fd of LOCK
    here would be dropped with it (trap 1), hence the check of this process's own
    engines first."""
    with _lock:
        engine = _engines.get(path)
        if engine is not None and engine.refs == 0:
            _close(engine)
        if path in _engines or path in _lockfiles:
            raise error(errno.EBUSY, "the database is open in this process", path)
        lockfile = LockFile(path)
        try:
            if not lockfile.try_lock() and not _take_from_idle_leader(path, lockfile):
                pid = lockfile.holder_pid()
                raise error(errno.EBUSY, "the database is open (process "
                            f"{pid if pid is not None else '?'} holds LevelDB's LOCK)", path)
            return fn()
        finally:
            lockfile.close()  # also releases the lock


def _take_from_idle_leader(path: str, lockfile: LockFile) -> bool:
    """Ask the leader to let go if it only lingers (no handle of its own, no other
    follower), and take the LOCK when it has. False if it would not, or if another
    process took the LOCK first (one that was opening the database just then)."""
    pid = ask_to_let_go(socket_address(path), path, LET_GO_TIMEOUT)
    if pid is None:
        return False
    deadline = time.monotonic() + LET_GO_TIMEOUT
    while time.monotonic() < deadline:
        if lockfile.try_lock():
            return True
        holder = lockfile.holder_pid()
        if holder is not None and holder != pid:
            return False
        time.sleep(0.001)  # it is closing: LevelDB gives the LOCK up within milliseconds
    return False


_held_across_fork = False


def _before_fork() -> None:
    """Close the idle leaders before a fork: a child forked while LevelDB is open here
    could never lead that database itself (docs/TRAPS.md, trap 2). `_lock` stays held across
    the fork, so the child copies no engine in the middle of a change. A fork from a
    thread the lock's holder waits for (an observer callback, say) must not deadlock:
    after FORK_LOCK_WAIT it forks as it would have without this."""
    global _held_across_fork
    _held_across_fork = _lock.acquire(timeout=FORK_LOCK_WAIT)
    if not _held_across_fork:
        return
    for engine in list(_engines.values()):
        if engine.refs == 0 and isinstance(engine.route, LocalRoute):
            try:
                _close(engine)
            except Exception:
                pass


def _after_fork_in_parent() -> None:
    if _held_across_fork:
        _lock.release()


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.RLock()
    _reaper.reset_after_fork()
    for lockfile in _lockfiles.values():
        lockfile.reset_after_fork()
    for engine in list(_engines.values()):
        engine.after_fork_in_child()
        if engine.refs == 0:  # lingering for the parent: no handle of the child's
            del _engines[engine.path]
            _forget_lockfile(engine.path, engine._lockfile)  # the child holds no lock


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
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)
atexit.register(_shutdown)
