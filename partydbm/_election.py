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
import stat
import struct
import sys
import tempfile
import threading
from collections.abc import Callable

from ._errors import Timeout, error

SOCKET_NAME = "partydbm.sock"
LINUX = sys.platform.startswith("linux")
# sun_path holds 108 bytes on Linux, 104 on macOS and the BSDs, one of them the NUL.
MAX_UNIX_PATH = 107 if LINUX else 103


def lock_path(db_path: str) -> str:
    return os.path.join(db_path, "LOCK")


# How a database too deep for a socket path is reached (module attributes: tests switch
# the first way off to run the second). /proc/self/fd/N with N an O_PATH descriptor on
# the directory needs Linux's /proc; a symlink in a private directory works anywhere.
VIA_PROC = LINUX and hasattr(os, "O_PATH")
_VIA_FD = "/proc/self/fd/"
_DIR_FDS: dict[str, int] = {}  # real path of a deep database -> an O_PATH fd on it
_LINKS: dict[str, str] = {}  # address through a private symlink -> the real path
_ADDR_LOCK = threading.Lock()


def socket_address(db_path: str) -> str:
    """The leader's address: the socket file `partydbm.sock` in the database directory.

    When that path is too long for AF_UNIX, the same file is reached another way; the
    socket always stays inside the directory and its permissions, and nobody else can
    take the address:
    - /proc/self/fd/N/partydbm.sock, N an O_PATH descriptor on the directory that this
      process keeps (one per deep database, close-on-exec, inherited by fork with the
      same number), where there is /proc (Linux);
    - else <private>/<hash>/partydbm.sock, <hash> (of the real path) a symlink to the
      directory in a directory of this user's own (see _private_dir)."""
    path = os.path.join(db_path, SOCKET_NAME)
    if len(os.fsencode(path)) <= MAX_UNIX_PATH:
        return path
    real = os.path.realpath(db_path)
    with _ADDR_LOCK:
        fd = _proc_fd(real) if VIA_PROC else -1
        if fd >= 0:
            return f"{_VIA_FD}{fd}/{SOCKET_NAME}"
        address = _linked_address(real)
    return address


def _proc_fd(real: str) -> int:
    fd = _DIR_FDS.get(real, -1)
    if fd < 0:
        try:
            fd = os.open(real, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return -1
        if not os.path.isdir(f"{_VIA_FD}{fd}"):
            os.close(fd)  # no /proc
            return -1
        _DIR_FDS[real] = fd
    return fd


def _linked_address(real: str) -> str:
    digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:16]
    for base in (tempfile.gettempdir(), "/tmp"):
        link = os.path.join(base, f"partydbm-{os.geteuid()}", digest)
        address = os.path.join(link, SOCKET_NAME)
        if len(os.fsencode(address)) <= MAX_UNIX_PATH:
            _LINKS[address] = real
            relink(address)
            return address
    raise error(errno.ENAMETOOLONG, "the database's socket path is too long and so is "
                "the temporary directory's: set TMPDIR to a shorter one", real)


def _private_dir(path: str) -> None:
    """Make sure `path` is a directory that only this user can change (0700, ours, not
    a symlink): the symlinks in it decide where this user's processes bind and
    connect. One another user made first (in a shared /tmp) is refused, not used."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise error(errno.EPERM, f"{path!r} belongs to uid {st.st_uid}, not to us: "
                        "refusing to reach deep databases through it", path)
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def relink(address: str) -> None:
    """For an address through a private symlink: make sure the symlink (and its
    directory) is there and points at the database: a temporary-file cleaner may have
    removed it while this process had the database open. Called before each bind and
    connect; other addresses: nothing to do."""
    real = _LINKS.get(address)
    if real is None:
        return
    link = os.path.dirname(address)
    try:
        if os.readlink(link) == real:
            return
    except OSError:
        pass
    _private_dir(os.path.dirname(link))
    spare = f"{link}.{os.getpid()}.{threading.get_ident()}"
    try:
        os.unlink(spare)
    except FileNotFoundError:
        pass
    os.symlink(real, spare)
    os.replace(spare, link)  # atomic: a reader sees the old link or the new one


def shown_address(db_path: str, address: str) -> str:
    """The address as a person can find it: the socket file's real path (not the
    process-local /proc/self/fd/N/... or a private symlink)."""
    if address != os.path.join(db_path, SOCKET_NAME):
        return os.path.join(os.path.realpath(db_path), SOCKET_NAME)
    return address


def remove_stale_socket(address: str) -> None:
    """Unlink a socket file left by a dead leader. Call only while holding the LOCK.

    Whatever sits at the path goes, and only the name: unlink() never follows a symlink
    (a symlink planted there is removed, its target untouched), and a directory there
    raises (the database then cannot be served: an error, not a guess)."""
    relink(address)
    try:
        os.unlink(address)
    except FileNotFoundError:
        pass


def socket_identity(address: str) -> tuple[int, int] | None:
    """Which file sits at a socket address: (device, inode); None when nothing is there
    (a private symlink on the way is made again first, as for a bind)."""
    relink(address)
    try:
        st = os.lstat(address)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def remove_own_socket(address: str, identity: tuple[int, int] | None) -> None:
    """Unlink the socket file a leader bound (`identity`), if that file still sits at
    `address`: a database deleted and made anew while its old leader still had it open
    (say, in its grace period) has the new leader's socket there, which only the new
    leader may remove."""
    if identity is not None and socket_identity(address) == identity:
        remove_stale_socket(address)


def may_access(db_path: str, uid: int | None, gid: int | None,
               groups: set[int] | None) -> bool:
    """Whether a process with these credentials could read and write the database's
    files itself, judged by the database directory's owner, group and mode the way the
    kernel would (root and our own uid always may). `groups`: its supplementary groups,
    None if unknown (then the account's groups are looked up).

    The one rule of the socket, on both ends: a leader serves only followers that could
    use the files, and a follower talks only to a leader that could (anything else at
    the address, a socket of another user's, would receive our writes and could forge
    our reads).

    uid None (the kernel cannot say who connected): True. The kernel already let the
    process connect only if it may write the socket file and search the directory,
    and the socket file has the database files' bits (less the umask) and the
    directory has x only where the files have r: whoever got through may read and
    write the files."""
    if uid is None or uid == 0 or uid == os.geteuid():
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


# struct flock as F_GETLK reads and writes it: (struct format, its fields in order), for
# 64-bit systems. None where unknown: holder_pid() then names no pid (a module
# attribute: tests set it to None to run that path).
_FLOCK_LINUX = ("hhqqi4x", ("type", "whence", "start", "len", "pid"))
# macOS and the BSDs; the padding leaves room for FreeBSD's l_sysid (zero: local).
_FLOCK_BSD = ("qqihh8x", ("start", "len", "pid", "type", "whence"))


def _flock_layout() -> tuple[str, tuple[str, ...]] | None:
    if struct.calcsize("P") != 8:
        return None
    if LINUX:
        return _FLOCK_LINUX
    if sys.platform == "darwin" or "bsd" in sys.platform or "dragonfly" in sys.platform:
        return _FLOCK_BSD
    return None


FLOCK_LAYOUT = _flock_layout()


def try_lock(fd: int) -> bool:
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
        return try_lock(self.fd)

    def unlock(self) -> None:
        """Release the process's lock. Only safe when LevelDB does not hold it here."""
        fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def holder_pid(self) -> int | None:
        """The pid holding the lock if another process does; None if none does, or if
        this system cannot tell (no known struct flock layout, F_GETLK failing)."""
        layout = FLOCK_LAYOUT
        if layout is None:
            return None
        fmt, names = layout
        fields = dict(start=0, len=0, pid=0, type=fcntl.F_WRLCK, whence=os.SEEK_SET)
        try:
            res = fcntl.fcntl(self.fd, fcntl.F_GETLK, struct.pack(fmt, *map(fields.get, names)))
            got = dict(zip(names, struct.unpack(fmt, res), strict=True))
        except (OSError, struct.error):
            return None
        if got["type"] not in (fcntl.F_RDLCK, fcntl.F_WRLCK) or got["pid"] <= 0:
            return None  # not held (F_UNLCK), or not a layout this kernel wrote
        return int(got["pid"])

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


def no_leader(path: str, address: str, lockfile: LockFile, refused: str) -> Timeout:
    """The Timeout for a process that found no leader for `path` in time, saying what it
    knows: who refused it, or who holds LevelDB's LOCK without answering."""
    if refused:
        return Timeout(f"no partydbm leader answered for {path!r} in time; "
                       f"refused: {refused}")
    pid = lockfile.holder_pid()
    if pid is None:
        return Timeout(
            f"no partydbm leader answered for {path!r} in time, and no process "
            "can be named as holding LevelDB's LOCK now (none holds it: the leader "
            "changed while we waited, try again; or this system cannot tell)")
    where = shown_address(path, address)
    return Timeout(
        f"no partydbm leader answered for {path!r} in time: LevelDB's LOCK is "
        f"held by process {pid}, which does not answer on {where!r} (a plain "
        "LevelDB user, a hung leader, or a leader still starting)")
