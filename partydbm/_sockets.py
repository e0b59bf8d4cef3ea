"""Unix-socket plumbing; the only socket importer."""

from __future__ import annotations

import os
import socket
import struct

Socket = socket.socket
SocketTimeout = socket.timeout

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


def connect(address: str | bytes, timeout: float | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


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
