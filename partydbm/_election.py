"""Who leads: LevelDB's LOCK file, the socket address, and stale socket removal.

Invariants enforced here:
- Only the process holding LevelDB's LOCK may unlink a socket file or bind the address.
- One LockFile (one fd on LOCK) per database per process, never closed while the
  process lives: closing *any* fd of LOCK drops the process's POSIX lock, LevelDB's
  included (docs/TRAPS.md, trap 1).
- Waiting for leadership blocks in fcntl on LOCK itself (no polling): the kernel wakes
  exactly one waiter when the holder dies.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
import threading
from collections.abc import Callable

SOCKET_NAME = "partydbm.sock"
MAX_UNIX_PATH = 107  # sun_path holds 108 bytes on Linux, one of them the NUL


def lock_path(db_path: str) -> str:
    return os.path.join(db_path, "LOCK")


_DIR_FDS: dict[str, int] = {}  # real path of a deep database -> an O_PATH fd on it
_DIR_FDS_LOCK = threading.Lock()
_VIA_FD = "/proc/self/fd/"


def socket_address(db_path: str) -> str | bytes:
    """The leader's address: the socket file `partydbm.sock` in the database directory.

    When that path is too long for AF_UNIX (107 bytes), the same file is reached through
    /proc/self/fd/N/partydbm.sock, N an O_PATH descriptor on the directory that this
    process keeps (one per deep database, close-on-exec, inherited by fork with the same
    number): the socket stays inside the directory and its permissions, and no other
    user can squat the address. Only without /proc does it fall back to a Linux
    abstract-namespace name derived from the real path (any local user could bind that
    name first; followers then refuse to talk to it, see _engine)."""
    path = os.path.join(db_path, SOCKET_NAME)
    if len(os.fsencode(path)) <= MAX_UNIX_PATH:
        return path
    real = os.path.realpath(db_path)
    with _DIR_FDS_LOCK:
        fd = _DIR_FDS.get(real)
        if fd is None:
            try:
                fd = os.open(real, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                fd = -1
            if fd >= 0 and not os.path.isdir(f"{_VIA_FD}{fd}"):
                os.close(fd)  # no /proc
                fd = -1
            if fd >= 0:
                _DIR_FDS[real] = fd
    if fd >= 0:
        return f"{_VIA_FD}{fd}/{SOCKET_NAME}"
    digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:40]
    return b"\0partydbm-" + digest.encode()


def shown_address(db_path: str, address: str | bytes) -> str:
    """The address as a person can find it: the socket file's real path (not the
    process-local /proc/self/fd/N/...), an abstract name with '@' as ss(8) shows it."""
    if isinstance(address, bytes):
        return "@" + address[1:].decode()
    if address.startswith(_VIA_FD):
        return os.path.join(os.path.realpath(db_path), SOCKET_NAME)
    return address


def remove_stale_socket(address: str | bytes) -> None:
    """Unlink a socket file left by a dead leader. Call only while holding the LOCK.

    Whatever sits at the path goes, and only the name: unlink() never follows a symlink
    (a symlink planted there is removed, its target untouched), and a directory there
    raises (the database then cannot be served: an error, not a guess)."""
    if isinstance(address, str):
        try:
            os.unlink(address)
        except FileNotFoundError:
            pass


def may_access(db_path: str, uid: int, gid: int, groups: set[int] | None) -> bool:
    """Whether a process with these credentials could read and write the database's
    files itself, judged by the database directory's owner, group and mode the way the
    kernel would (root and our own uid always may). `groups`: its supplementary groups,
    None if unknown (then the account's groups are looked up).

    The one rule of the socket, on both ends: a leader serves only followers that could
    use the files, and a follower talks only to a leader that could (anything else at
    the address, a socket of another user's or a squatter on an abstract name, would
    receive our writes and could forge our reads)."""
    if uid == 0 or uid == os.geteuid():
        return True
    st = os.stat(db_path)
    if uid == st.st_uid:
        bits = st.st_mode >> 6
    elif gid == st.st_gid or st.st_gid in (_groups_of(uid) if groups is None else groups):
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return bits & 0o7 == 0o7


def _groups_of(uid: int) -> set[int]:
    try:
        import pwd

        entry = pwd.getpwuid(uid)
        return set(os.getgrouplist(entry.pw_name, entry.pw_gid))
    except (KeyError, OSError):
        return set()


def _try_lock(fd: int) -> bool:
    """Take this process's POSIX lock on the whole file; False if another process has it."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class LockFile:
    """The process's one fd on a database's LOCK file, and a waiter thread on it."""

    def __init__(self, db_path: str) -> None:
        self.path = lock_path(db_path)
        # Created no wider than the database (the directory's bits less x: see _open).
        mode = os.stat(db_path).st_mode & 0o666
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
        self._waiter: threading.Thread | None = None
        self._mutex = threading.Lock()
        self.retired = False

    def is_stale(self) -> bool:
        """Whether our fd is on a LOCK file that has since been deleted or replaced (the
        database was removed and created again): locks on it guard nothing."""
        mine = os.fstat(self.fd)
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (mine.st_dev, mine.st_ino) != (now.st_dev, now.st_ino)

    def waiting(self) -> bool:
        with self._mutex:
            return self._waiter is not None and self._waiter.is_alive()

    def close(self) -> None:
        """Close the fd. Only when LevelDB does not hold the lock in this process and no
        waiter blocks on the fd (a lock granted after the close could never be given
        back)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def retire(self) -> None:
        """Stop using a stale LockFile. Its fd is on a dead inode, so closing it drops no
        lock that matters; if a waiter still blocks on it, the waiter's callback finds
        the LockFile retired and closes it then."""
        with self._mutex:
            self.retired = True
            if self._waiter is None or not self._waiter.is_alive():
                os.close(self.fd)
                self.fd = -1

    def try_lock(self) -> bool:
        return _try_lock(self.fd)

    def unlock(self) -> None:
        """Release the process's lock. Only safe when LevelDB does not hold it here."""
        fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def holder_pid(self) -> int | None:
        """The pid holding the lock, if another process does (best effort, Linux)."""
        try:
            req = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
            res = fcntl.fcntl(self.fd, fcntl.F_GETLK, req)
            ltype, _whence, _start, _len, pid = struct.unpack("hhqqi4x", res)
        except (OSError, struct.error):
            return None
        return pid if ltype != fcntl.F_UNLCK and pid > 0 else None

    def wait_in_background(self, on_acquired: Callable[[], None]) -> None:
        """Start (once) a daemon thread that blocks on the lock and calls `on_acquired`
        when this process gets it. The thread cannot be cancelled; `on_acquired` decides
        what the lock is for when it comes."""
        with self._mutex:
            if self._waiter is not None and self._waiter.is_alive():
                return
            self._waiter = threading.Thread(
                target=self._wait, args=(on_acquired,), daemon=True,
                name=f"partydbm-lock-wait {os.path.dirname(self.path)}"
            )
            self._waiter.start()

    def _wait(self, on_acquired: Callable[[], None]) -> None:
        while True:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX)
            except InterruptedError:
                continue
            except OSError:
                return
            break
        with self._mutex:
            self._waiter = None
        on_acquired()

    def reset_after_fork(self) -> None:
        """In a forked child: the waiter thread is gone (threads do not survive fork) and
        POSIX locks are not inherited; the fd is shared and stays usable."""
        self._waiter = None
        self._mutex = threading.Lock()


HELPER_LOCK_NAME = "partydbm.helper-lock"


class HelperLock:
    """The right to keep a helper leader for a database (see _helper), among processes
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
        return _try_lock(self.fd)

    def release(self) -> None:
        """Let go (closing the fd drops this process's lock). In a forked child, where
        the lock is the parent's, this closes only the child's copy of the fd."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
