"""The grace period: a process's engine for a database outlives its last handle by a
short while, so that code that opens the database for every operation (`with
partydbm.open(p) as db: return db[k]`, dogpile.cache's dbm backend) finds it still
open: a leader keeps LevelDB open and serving, a follower keeps its connection and its
cache. _registry decides which engines linger and closes them; this module holds how
long, and the one thread per process that wakes up when a grace period ends.

Promises (README, "Opening per operation"), and where each is kept:
- Another program can have the database at most LEADER seconds after this process
  closed its last handle (a follower holds no lock: it never stands in the way), and at
  once where partydbm needs it alone: repair() closes its own process's idle engine and
  asks an idle leader elsewhere to let go (_registry.exclusively, the server's RELEASE),
  which it does unless another follower is connected.
- Nothing lingers past the process: the Reaper is a daemon thread (it never keeps the
  interpreter alive), the registry's atexit handler closes engines in grace, a fork
  closes the parent's idle leaders first (so the child can lead later: docs/TRAPS.md,
  trap 2) and the child forgets every idle engine (no pending close is inherited).
- A handle opened later sees every write made before, in any process: an idle follower
  is only reused while its leader still answers (its cache is then kept coherent by the
  ring, as for an open handle), and one whose leader hangs up closes at once instead of
  taking over the database for nobody; no engine is reused for a database deleted and
  made anew at its path (its LOCK file is another).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from . import _seams

LEADER = 1.0
"""Seconds an idle leader keeps LevelDB open (and keeps serving its followers) after its
process closed its last handle: the bound on how long another program (plain plyvel, a
copy of the directory) waits for the database after this process is done with it."""

FOLLOWER = 5.0
"""Seconds an idle follower keeps its connection and its cache. It holds no lock, so this
binds no other program; it costs the leader a serving thread, and its writes their
publication to the follower's cache (~4 us a put here): bounded, so that processes that
opened once long ago keep nothing of the leader's."""


def leader() -> float:
    return _seams.grace[0] if _seams.grace is not None else LEADER


def follower() -> float:
    return _seams.grace[1] if _seams.grace is not None else FOLLOWER


class Reaper:
    """One daemon thread that calls `due()` when the earliest grace period ends. `due()`
    closes what is over and returns when to call it next (None: nothing is idle). The
    thread ends when nothing lingers (a process done with partydbm keeps no thread of
    it, and forks without one) and is made again by the next wake_by(), also in a
    forked child (threads do not survive fork)."""

    def __init__(self, due: Callable[[], float | None]) -> None:
        self._due = due
        self._cond = threading.Condition(threading.Lock())
        self._next: float | None = None  # when to call due() (monotonic)
        self._thread: threading.Thread | None = None
        self._pid = 0

    def wake_by(self, when: float) -> bool:
        """Make sure due() is called by `when`. Cheap when an earlier call is due already
        (the common case: an engine reused and closed again moves its own end later, and
        the thread finds that out when it wakes): no thread is woken per close. False
        if no thread can be started (the interpreter is exiting: Python 3.12+ starts
        none once its threads are being joined): nothing may linger then."""
        with self._cond:
            if self._thread is None or self._pid != os.getpid():
                try:
                    self._start()
                except RuntimeError:
                    self._thread = None
                    return False
            if self._next is None or when < self._next:
                self._next = when
                self._cond.notify()
            return True

    def _start(self) -> None:
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="partydbm-grace")
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._next is None:
                        self._thread = None  # under the lock: wake_by() starts another
                        return
                    now = time.monotonic()
                    if self._next <= now:
                        break
                    self._cond.wait(self._next - now)
                self._next = None
            later = self._due()
            if later is not None:
                self.wake_by(later)

    def reset_after_fork(self) -> None:
        """In a forked child: the thread is gone, and nothing of the parent's is due."""
        self._cond = threading.Condition(threading.Lock())
        self._next = None
        self._thread = None
