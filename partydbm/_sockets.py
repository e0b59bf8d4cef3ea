"""Unix-socket plumbing; the only socket importer.

The whole transport between leader and followers is here (the rest of partydbm sees an
address, a socket object and these functions), so another one (Windows named pipes)
would be a change to this module. What differs between Linux, macOS and the BSDs sits
behind a small function each, with a fallback that is tested on Linux by switching the
Linux way off through the module attribute that selects it.
"""

from __future__ import annotations

import errno
import os
import random
import resource
import select
import socket
import stat
import struct
import sys
import tempfile
import time
from typing import NamedTuple

from . import _seams

Socket = socket.socket
DONTWAIT = socket.MSG_DONTWAIT

LINUX = sys.platform.startswith("linux")
MACOS = sys.platform == "darwin"
_XUCRED_SYSTEMS = MACOS or sys.platform.startswith(("freebsd", "dragonfly"))

# The peer closed its end (Linux): what wait_hangup() waits for, 0 where poll() has no
# such event; then it waits for POLLHUP, which poll() reports whatever is asked.
POLLRDHUP: int = getattr(select, "POLLRDHUP", 0)

# Set the socket's bits with fchmod() before bind(): Linux then creates the file with
# them (less the umask). Elsewhere fchmod() on a socket fails or does nothing, and
# listen() binds in a private directory instead (_bind_privately).
FCHMOD_BEFORE_BIND = LINUX

# A backlog larger than any system allows: Linux (and the BSDs) silently cap listen(n)
# at the system's limit (Linux: /proc/sys/net/core/somaxconn, 4096 since 5.4, 128
# before and in some containers), so this asks for "as many as allowed" without reading
# the limit. The backlog is what lets a crowd of followers that connect at the same
# instant wait for the accept loop instead of being turned away (see connect()).
BACKLOG = 65535


def listen(address: str, file_mode: int) -> socket.socket:
    """Bind and listen. The socket file gets the database files' permission bits, so
    it is no wider than the database itself: never, not even for an instant, and
    nothing is ever chmod()ed at a path another user could swap a symlink into."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if FCHMOD_BEFORE_BIND:
            os.fchmod(sock.fileno(), file_mode & 0o666)
            sock.bind(address)
        else:
            _bind_privately(sock, address, file_mode & 0o666)
        backlog = _seams.listen_backlog
        sock.listen(BACKLOG if backlog is None else backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_privately(sock: socket.socket, address: str, bits: int) -> None:
    """Bind at `address` with the file's bits `bits` (less the umask) where they cannot
    be set before bind(): bind inside a new directory beside it that only we may enter
    (mkdtemp: 0700), narrow the file there, then rename it into place. Nobody can
    connect before the bits are right; rename() replaces whatever is at `address`
    without following it. The name is no longer than `address`'s (it fits the limit)."""
    private = tempfile.mkdtemp(prefix=".p", dir=os.path.dirname(address))
    inside = os.path.join(private, "s")
    try:
        sock.bind(inside)
        os.chmod(inside, bits & os.lstat(inside).st_mode)  # bind() applied the umask
        os.rename(inside, address)
    finally:
        try:
            os.unlink(inside)  # only if the rename did not happen
        except FileNotFoundError:
            pass
        os.rmdir(private)


# A blocking socket whose recv/send give up after SLICE (SO_RCVTIMEO/SO_SNDTIMEO) lets
# callers check their own deadlines without Python's per-call timeout machinery (which
# costs a poll() and two fcntl()s per request).
SLICE = 0.1
_TIMEVAL = struct.Struct("ll")


class Refused(ConnectionRefusedError):
    """We will not talk to what is at the leader's address (see its message)."""


class NotASocket(Refused):
    """What sits at the socket path is not a socket (a symlink, a regular file...)."""


class Busy(TimeoutError):
    """The leader's listen backlog stayed full until the deadline."""


# Seconds between connects that find the backlog full: doubling from the first to the
# last, each sleep drawn between half and all of the current step, so that a crowd
# turned away at the same instant comes back spread out rather than in lockstep.
CONNECT_BACKOFF = (0.001, 0.05)


def connect(address: str, deadline: float | None) -> socket.socket:
    """Connect to a leader, waiting (until `deadline`, a time.monotonic() value; None:
    for ever) while its listen backlog is full. A path that is not a socket itself (a
    symlink to one included) is refused without connecting: connect() would follow it."""
    mode = os.lstat(address).st_mode  # FileNotFoundError: no leader there
    if not stat.S_ISSOCK(mode):
        raise NotASocket(errno.ECONNREFUSED, f"not a socket ({_kind(mode)})", address)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _connect_patiently(sock, address, deadline)
        slice_ = _TIMEVAL.pack(0, int(SLICE * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, slice_)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, slice_)
    except BaseException:
        sock.close()
        raise
    return sock


def _connect_patiently(sock: socket.socket, address: str,
                       deadline: float | None) -> None:
    """connect() that retries, with backoff, while the backlog is full. The socket is
    non-blocking: a blocking connect() would wait in the kernel for room, but a signal
    handler interrupting that wait makes Python report a connection that never was."""
    sock.setblocking(False)
    step, tries, start = CONNECT_BACKOFF[0], 0, time.monotonic()
    while True:
        try:
            sock.connect(address)  # on a unix socket: at once, or EAGAIN if full
        except BlockingIOError:  # (Linux; the BSDs refuse with ECONNREFUSED instead)
            tries += 1
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise Busy(errno.EAGAIN, f"the leader's listen backlog stayed full for "
                           f"{time.monotonic() - start:.3g}s ({tries} tries): it accepts "
                           "more slowly than followers arrive, or is stopped") from None
            pause = random.uniform(step / 2, step)
            time.sleep(pause if left is None else min(pause, left))
            step = min(step * 2, CONNECT_BACKOFF[1])
            continue
        sock.setblocking(True)
        return


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    return f"file type {stat.S_IFMT(mode):o}"


def more_files(newest: int | None, spare: int) -> bool:
    """Make room for more open files in this process: when the fd `newest` (the lowest
    free one when it was made, so about how many are open) leaves fewer than `spare`
    under the soft RLIMIT_NOFILE, or when an open just failed with EMFILE (`newest`
    None), double the soft limit, up to the hard one. False if there is no room."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or (newest is not None and newest + spare < soft):
            return True
        more = soft * 2 if hard == resource.RLIM_INFINITY else min(soft * 2, hard)
        if more <= soft:
            return False
        resource.setrlimit(resource.RLIMIT_NOFILE, (more, hard))
    except (OSError, ValueError):
        return False
    return True


def serve_options(sock: socket.socket) -> None:
    """A leader's end of a connection: sends give up after SLICE (then send_all's
    stall decides), receives block (the handler waits for requests as long as it takes)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL.pack(0, int(SLICE * 1e6)))


def readable(sock: socket.socket, timeout: float) -> bool:
    """Whether `sock` has data (or EOF) within `timeout` seconds."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | POLLRDHUP)
    end = time.monotonic() + timeout
    while True:
        try:
            return bool(poller.poll(max(end - time.monotonic(), 0) * 1000))
        except InterruptedError:
            continue


def send_all(sock: socket.socket, data: bytes, deadline: float | None,
             stall: float | None = None) -> None:
    """sendall() on a socket whose sends give up after SLICE. Raises TimeoutError at
    `deadline`, or, with `stall`, when the peer has taken no byte for `stall` seconds
    (it stopped reading; one that keeps reading slowly is fine). Then part of `data`
    may have been sent: the caller must drop the connection."""
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    if sent == len(data):
        return
    view = memoryview(data)[sent:]
    if stall is not None:
        deadline = time.monotonic() + stall
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("the peer stopped reading") from None
            continue
        view = view[sent:]
        if stall is not None and sent:
            deadline = time.monotonic() + stall


def recv_some(sock: socket.socket, size: int, deadline: float | None) -> bytes:
    """recv() that raises TimeoutError at `deadline`."""
    while True:
        try:
            return sock.recv(size)
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("no answer") from None


class Credentials(NamedTuple):
    """Who a process is, as far as the kernel tells: pid 0 and uid/gid None where it
    cannot; groups (supplementary) None where unknown."""

    pid: int
    uid: int | None
    gid: int | None
    groups: set[int] | None


UNKNOWN = Credentials(0, None, None, None)

# How to ask the kernel who is at the other end of a connection, None where there is
# no such way (module attributes: tests switch a way off to run what comes next).
SO_PEERCRED: int | None = getattr(socket, "SO_PEERCRED", None) if LINUX else None
SO_PEERGROUPS: int | None = getattr(socket, "SO_PEERGROUPS", 59) if LINUX else None
LOCAL_PEERCRED: int | None = getattr(socket, "LOCAL_PEERCRED", 1) if _XUCRED_SYSTEMS else None
LOCAL_PEERPID: int | None = getattr(socket, "LOCAL_PEERPID", 2) if MACOS else None
SOL_LOCAL = 0  # the level of LOCAL_PEERCRED and LOCAL_PEERPID

_UCRED = struct.Struct("3i")  # Linux struct ucred: pid, uid, gid
_XUCRED = struct.Struct("IIh16I")  # struct xucred: version, uid, ngroups, groups[16]
_MAX_GROUPS = 256  # Python caps getsockopt buffers at 1024 bytes


def peer_credentials(sock: socket.socket) -> Credentials:
    """Who is at the other end of `sock` (as of connect()): Linux SO_PEERCRED and
    SO_PEERGROUPS; macOS and the BSDs LOCAL_PEERCRED (uid, groups) and, on macOS,
    LOCAL_PEERPID; UNKNOWN where none of these works. Then only the socket file's
    permission bits, which the kernel checks at connect(), say who could connect."""
    if SO_PEERCRED is not None:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERCRED, _UCRED.size)
        pid, uid, gid = _UCRED.unpack(raw)
        return Credentials(pid, uid, gid, _peer_groups(sock))
    if LOCAL_PEERCRED is not None:
        try:
            raw = sock.getsockopt(SOL_LOCAL, LOCAL_PEERCRED, _XUCRED.size)
        except OSError:
            return UNKNOWN
        return parse_xucred(raw, _peer_pid(sock))
    return UNKNOWN


def parse_xucred(raw: bytes, pid: int) -> Credentials:
    """Credentials from a struct xucred (cr_groups[0] is the effective gid); UNKNOWN
    for a layout version or size we do not know."""
    if len(raw) < _XUCRED.size:
        return UNKNOWN
    version, uid, ngroups, *groups = _XUCRED.unpack_from(raw)
    if version != 0 or not 0 < ngroups <= len(groups):
        return UNKNOWN
    return Credentials(pid, uid, groups[0], set(groups[:ngroups]))


def _peer_pid(sock: socket.socket) -> int:
    if LOCAL_PEERPID is None:
        return 0
    try:
        return int.from_bytes(sock.getsockopt(SOL_LOCAL, LOCAL_PEERPID, 4), sys.byteorder)
    except OSError:
        return 0


def _peer_groups(sock: socket.socket) -> set[int] | None:
    """The supplementary groups of the process at the other end when it connected
    (Linux >= 4.13), or None where the kernel cannot tell."""
    if SO_PEERGROUPS is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * _MAX_GROUPS)
    except OSError:
        return None
    return set(struct.unpack(f"{len(raw) // 4}I", raw))


def file_owner(address: str) -> Credentials:
    """The owner of the socket file at `address`: the process that bound it ran as that
    uid (a file renamed into the directory keeps its owner). Only someone who could
    write the database directory can have put it there."""
    st = os.lstat(address)
    return Credentials(0, st.st_uid, st.st_gid, None)


def peer_open(sock: socket.socket) -> bool:
    """Whether the other end has not closed: a non-blocking peek (consumes nothing)."""
    try:
        data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False
    return bool(data)


def wait_hangup(sock: socket.socket) -> None:
    """Block until the connection ends (peer gone, or our own hang_up()). Replies
    arriving meanwhile do not wake it: it waits for POLLRDHUP (or POLLHUP), not
    POLLIN."""
    poller = select.poll()
    try:
        poller.register(sock.fileno(), POLLRDHUP)
    except (OSError, ValueError):
        return
    while True:
        try:
            if poller.poll():
                return
        except InterruptedError:
            continue


def drop(sock: socket.socket) -> None:
    """Close this process's fd without touching the connection (safe after fork, where
    the parent still uses the same socket)."""
    try:
        sock.close()  # close(2) of one fd; only shutdown() would end the connection
    except OSError:
        pass


def drop_accepted(listener: socket.socket) -> None:
    """In a forked child: close this process's copy of every connection accepted on
    `listener`, including one accept() had returned but no Python object held yet when
    the fork copied it (found by its name, the listener's). Such a copy kept the
    connection open after the leader died: its follower waited for an answer until
    its timeout instead of failing over."""
    try:
        name, own = listener.getsockname(), listener.fileno()
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        try:
            if fd == own or not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=fd)
        except OSError:
            continue  # closed meanwhile (the listing's own fd)
        try:
            ours = sock.family == socket.AF_UNIX and sock.getsockname() == name
        except OSError:
            ours = False
        sock.detach()
        if ours:
            os.close(fd)


def hang_up(sock: socket.socket) -> None:
    """End the connection for every holder and wake any thread blocked on it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
