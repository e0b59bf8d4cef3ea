"""`python -m partydbm._helper PATH`: lead a database for a process that cannot.

A process forked while its parent held the database open inherits LevelDB's in-process
lock table and can never open it (docs/TRAPS.md, trap 2). When such a process needs a leader,
it starts this helper: a fresh interpreter that opens the database like any other
process (leading if it wins the LOCK) and keeps it open until its standard input
closes, i.e. until the process that started it is gone. `Helper` is the starting side
(in the engine of the forked process), `HelperLock` makes it one helper per crowd.
"""

from __future__ import annotations

import os
import subprocess
import sys

from ._election import try_lock

HELPER_LOCK_NAME = "partydbm.helper-lock"


class HelperLock:
    """The right to keep a helper leader for a database (see Helper), among processes
    that cannot open it themselves (forked from a leader: docs/TRAPS.md, trap 2).

    When a leader with a crowd of such children dies, each would start a helper, a new
    interpreter: 150 at once on 2 CPUs took longer than the children's timeout to lead
    at all. Whoever holds this lock (a POSIX lock on its own file, so never inherited
    by fork and dropped when the holder dies) keeps the one helper; the others wait for
    it, or for the lock when its holder goes."""

    def __init__(self, db_path: str) -> None:
        self.path = os.path.join(db_path, HELPER_LOCK_NAME)
        self._mode = os.stat(db_path).st_mode & 0o666  # as LOCK (see LockFile)
        self.fd = -1

    def try_lock(self) -> bool:
        """Take the lock (again: a no-op while this process holds it). False if another
        process holds it; True also where the lock file cannot be made (then every such
        process keeps a helper, as if there were no lock)."""
        if self.fd < 0:
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
                                  | os.O_NOFOLLOW, self._mode)
            except OSError:
                return True
        return try_lock(self.fd)

    def release(self) -> None:
        """Let go (closing the fd drops this process's lock). In a forked child, where
        the lock is the parent's, this closes only the child's copy of the fd."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Helper:
    """The helper leader this process keeps for one database, if it is the one that
    keeps it (HelperLock): it lives until this process closes the database or dies."""

    def __init__(self, db_path: str) -> None:
        self.db_path = db_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock: HelperLock | None = None

    def ensure(self) -> None:
        """Have a helper running, unless another such process keeps one."""
        if self._proc is not None and self._proc.poll() is None:
            return
        if self._lock is None:
            self._lock = HelperLock(self.db_path)
        if not self._lock.try_lock():
            return  # another such process keeps a helper: one for the whole crowd
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "partydbm._helper", self.db_path],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, close_fds=True)

    def close(self) -> None:
        """Let the helper go (it ends when its standard input closes) and the lock."""
        if self._proc is not None and self._proc.stdin is not None:
            self._proc.stdin.close()
        if self._lock is not None:
            self._lock.release()

    def forget_after_fork(self) -> None:
        """In a forked child: the helper and the lock are the parent's."""
        self._proc = None
        if self._lock is not None:
            self._lock.release()  # this closes the child's copy of the fd only
            self._lock = None


def main(argv: list[str]) -> int:
    from ._open import open_to_serve  # here: _open imports the engine, which imports us

    db = open_to_serve(argv[0], "w", timeout=None)
    try:
        while sys.stdin.buffer.read(4096):
            pass
    finally:
        db.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
