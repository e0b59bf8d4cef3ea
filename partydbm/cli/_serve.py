"""`partydbm serve`: keep a database open as a dedicated leader until SIGINT/SIGTERM.

If another process leads, serve follows it and takes over the moment it goes (the
engine contends for the LOCK as every follower does). Role and leader changes are
logged; with --verbose also followers connecting and leaving (Engine.observe).
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

from .._election import shown_address
from .._open import open_to_serve

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
            db = open_to_serve(path, "c", timeout=timeout)
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
    events: queue.SimpleQueue[tuple[str, int, int]] = queue.SimpleQueue()

    def observer(event: str, pid: int, count: int) -> None:
        events.put((event, pid, count))
    try:
        while True:
            now_role = "leader" if db.is_leader else "follower"
            now_leader = engine.leader_pid
            if now_role != role or now_leader != leader:
                if now_role == "leader":
                    log(f"leading {db.name} on {shown_address(engine.path, engine.address)}")
                    if verbose:  # (again after a takeover: a new server, same observer)
                        log(f"{engine.observe(observer)} followers connected")
                else:
                    log(f"{db.name} is led by pid {now_leader}: following it; taking "
                        "over when it goes")
                role, leader = now_role, now_leader
            while not events.empty():
                event, pid, count = events.get_nowait()
                log(f"follower pid {pid or '?'} {event} ({count} connected)")
            if stop.wait(POLL):
                return
    finally:
        engine.observe(None)
