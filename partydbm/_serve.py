"""`partydbm serve`: keep a database open as a dedicated leader until SIGINT/SIGTERM.

If another process leads, serve follows it and takes over the moment it goes (the
engine contends for the LOCK as every follower does). Role and leader changes are
logged; with --verbose also followers connecting and leaving (see _Connections).
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

from . import _sockets
from ._open import open as party_open

POLL = 0.2


class _Stop(BaseException):
    """Raised by the signal handler while `open` is still waiting for a leader."""


def log(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"{stamp} partydbm serve[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def serve(path: str, timeout: float | None, verbose: bool) -> int:
    stop = threading.Event()
    opening = True

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        if opening:
            raise _Stop

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            db = party_open(path, "c", timeout=timeout)
        except _Stop:
            log("stopped before the database was open")
            return 0
        opening = False
        try:
            _watch(db, stop, verbose)
        finally:
            log("stopping: closing the database (a follower, if any, takes over)")
            db.close()
            log("closed")
        return 0
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _watch(db: Any, stop: threading.Event, verbose: bool) -> None:
    engine = db._engine
    role, leader = None, None
    connections = _Connections()
    while True:
        now_role = "leader" if db.is_leader else "follower"
        now_leader = engine.leader_pid
        if now_role != role or now_leader != leader:
            if now_role == "leader":
                log(f"leading {db.name} on {_address(engine.address)}")
            else:
                log(f"{db.name} is led by pid {now_leader}: following it; taking over "
                    "when it goes")
            role, leader = now_role, now_leader
        if verbose:
            connections.watch(engine)
            connections.log_events()
        if stop.wait(POLL):
            return


def _address(address: str | bytes) -> str:
    return address if isinstance(address, str) else "@" + address[1:].decode()


class _WatchedSet(set[Any]):
    """Stands in for the server's set of follower connections and reports every add
    and discard. The server mutates that set only under its own lock, so the callbacks
    run under that lock: they only queue an event (the main loop logs)."""

    def __init__(self, items: Any, events: queue.SimpleQueue[tuple[str, Any, int]]) -> None:
        super().__init__(items)
        self.events = events

    def add(self, sock: Any) -> None:
        super().add(sock)
        self.events.put(("connected", sock, _pid(sock)))

    def discard(self, sock: Any) -> None:
        if sock in self:
            self.events.put(("left", sock, 0))
        super().discard(sock)


def _pid(sock: Any) -> int:
    try:
        return _sockets.peer_credentials(sock)[0]
    except OSError:
        return 0


class _Connections:
    """Logs followers connecting and leaving. The leader side has no hook for that, so
    the server's connection set is swapped (under the server's lock, which guards every
    change to it) for a _WatchedSet; each new server (after a takeover) gets one too."""

    def __init__(self) -> None:
        self.events: queue.SimpleQueue[tuple[str, Any, int]] = queue.SimpleQueue()
        self.server: Any = None
        self.pids: dict[Any, int] = {}

    def watch(self, engine: Any) -> None:
        server = getattr(engine, "_server", None)
        if server is not None and server is not self.server:
            self.server = server
            try:
                with server._lock:
                    server._conns = _WatchedSet(server._conns, self.events)
                    for sock in server._conns:
                        self.events.put(("connected", sock, _pid(sock)))
            except AttributeError:
                log("cannot watch connections in this version of partydbm")

    def log_events(self) -> None:
        while True:
            try:
                what, sock, pid = self.events.get_nowait()
            except queue.Empty:
                return
            if what == "connected":
                self.pids[sock] = pid
            else:
                pid = self.pids.pop(sock, 0)
            log(f"follower pid {pid} {what} ({len(self.pids)} connected)")
