"""Unix-socket plumbing; the only socket importer."""

from __future__ import annotations

import os
import select
import socket
import struct
import time

Socket = socket.socket

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def listen(address: str | bytes, file_mode: int) -> socket.socket:
    """Bind and listen. The socket file gets the database files' permission bits, so
    it is no wider than the database itself."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(address)
        if isinstance(address, str):
            os.chmod(address, file_mode & 0o666)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


# A blocking socket whose recv/send give up after SLICE (SO_RCVTIMEO/SO_SNDTIMEO) lets
# callers check their own deadlines without Python's per-call timeout machinery (which
# costs a poll() and two fcntl()s per request).
SLICE = 0.1
_TIMEVAL = struct.Struct("ll")


def connect(address: str | bytes, timeout: float | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.settimeout(None)
        slice_ = _TIMEVAL.pack(0, int(SLICE * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, slice_)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, slice_)
    except BaseException:
        sock.close()
        raise
    return sock


def send_all(sock: socket.socket, data: bytes, deadline: float | None) -> None:
    """sendall() that raises TimeoutError at `deadline` (then part of `data` may have
    been sent: the caller must drop the connection)."""
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    if sent == len(data):
        return
    view = memoryview(data)[sent:]
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("the peer stopped reading") from None


def recv_some(sock: socket.socket, size: int, deadline: float | None) -> bytes:
    """recv() that raises TimeoutError at `deadline`."""
    while True:
        try:
            return sock.recv(size)
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("no answer") from None


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end (Linux SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


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
    arriving meanwhile do not wake it: it waits for POLLRDHUP, not POLLIN."""
    poller = select.poll()
    try:
        poller.register(sock.fileno(), select.POLLRDHUP)
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
