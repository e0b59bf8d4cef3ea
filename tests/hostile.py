"""A raw protocol client for the hardening tests: speaks (or breaks) the wire protocol
by hand, with a deadline on every read."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from partydbm import _protocol as P

DEADLINE = 20.0


def address(db_path: str | os.PathLike[str]) -> str:
    return str(Path(db_path) / "partydbm.sock")


class Raw:
    """One connection to a leader's socket."""

    def __init__(self, db_path: str | os.PathLike[str], rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(DEADLINE)
        self.sock.connect(address(db_path))
        self.decoder = P.Decoder()
        self.replies: list[Any] = []
        self.rid = 0

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def hello(self, **info: Any) -> Any:
        hello = {"v": P.VERSION, "client": os.urandom(16), "pid": os.getpid(), **info}
        self.send(P.pack([P.HELLO, 0, hello]))
        return self.reply()

    def request(self, op: int, *args: Any) -> Any:
        """Send one request and return its reply [rid, ok, payload]."""
        self.rid += 1
        self.send(P.pack([op, self.rid, *args]))
        return self.reply()

    def reply(self, timeout: float = DEADLINE) -> Any:
        deadline = time.monotonic() + timeout
        while not self.replies:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "no reply in time"
            self.sock.settimeout(remaining)
            data = self.sock.recv(65536)
            assert data, "the leader hung up without a reply"
            self.decoder.feed(data)
            self.replies.extend(self.decoder.messages())
        return self.replies.pop(0)

    def until_closed(self, timeout: float = DEADLINE) -> list[Any]:
        """Every reply until the leader hangs up (AssertionError if it does not)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "the leader did not hang up in time"
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(1 << 20)
            except ConnectionResetError:
                data = b""
            if not data:
                out, self.replies = self.replies, []
                return out
            self.decoder.feed(data)
            self.replies.extend(self.decoder.messages())

    def close(self) -> None:
        self.sock.close()


def is_error(reply: Any, code: str | None = None) -> bool:
    return (isinstance(reply, list) and len(reply) == 3 and reply[1] is False
            and isinstance(reply[2], list) and (code is None or reply[2][0] == code))


def served(db_path: str | os.PathLike[str], key: bytes, timeout: float = 5.0) -> Any:
    """A well-behaved client's GET of `key`, which must be answered within `timeout`
    (the liveness check while a hostile client stalls)."""
    start = time.monotonic()
    raw = Raw(db_path)
    try:
        raw.sock.settimeout(timeout)
        assert raw.hello()[1] is True
        _rid, ok, value = raw.request(P.GET, key)
        assert ok is True, value
    finally:
        raw.close()
    assert time.monotonic() - start < timeout
    return value
