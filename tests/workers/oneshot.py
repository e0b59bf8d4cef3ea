"""Workers that do one thing and exit (or wait for the test to close their stdin)."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from typing import Any

import partydbm
from tests.wire import decode

from . import DEADLINE, report

# A module global: the handle must outlive the function (closed at interpreter exit).
db: Any = None


def turnover(path: str, key: str, value: str, how: str) -> None:
    """Open, write one key, read it back, and close (how == "close") or just exit."""
    global db
    db = partydbm.open(path, timeout=DEADLINE)
    db[key] = value
    assert db[key] == value.encode()
    if how == "close":
        db.close()


def forker() -> None:
    """Start turnover processes on request, each forked from this one, which imported
    partydbm but never opens a database (so its children are not fork-tainted): as
    much a process of their own as a fresh interpreter, without its start-up cost.

    Requests (one JSON line each): [path, key, value, how] forks a turnover child and
    answers its pid; "reap" waits for every child started since the last reap (SIGKILL
    at the deadline) and answers their exit codes, in order (None: killed for hanging).
    A child returns from here into __main__ and ends like any worker: interpreter exit,
    atexit included (a handle left open hands over there), a traceback and exit code 1
    if its turnover failed."""
    started: list[int] = []
    for line in sys.stdin:
        request = decode(line)
        if request == "reap":
            report(_reap(started))
            started = []
            continue
        pid = os.fork()
        if pid == 0:
            turnover(*request)
            return
        started.append(pid)
        report(pid)


def _reap(pids: list[int], timeout: float = DEADLINE) -> list[int | None]:
    codes: dict[int, int | None] = {}
    deadline = time.monotonic() + timeout
    while len(codes) < len(pids):
        for pid in pids:
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            for pid in set(pids) - set(codes):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                codes[pid] = None
        time.sleep(0.001)
    return [codes[pid] for pid in pids]


def plain_leveldb(path: str) -> None:
    """A plain LevelDB user: holds the LOCK and never serves the socket."""
    from partydbm._backend import plyvel  # the binding partydbm uses here

    handle = plyvel.DB(path)
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes stdin (or kills us)
    handle.close()


def uid_probe(uid: str, path: str, address_hex: str) -> None:
    """Drop to `uid` and try the database through the API and through the raw socket."""
    from partydbm import _protocol as P
    from partydbm._election import socket_address

    raw = bytes.fromhex(address_hex)
    address: str | bytes = raw if raw.startswith(b"\0") else os.fsdecode(raw)
    os.setgroups([])
    os.setgid(int(uid))
    os.setuid(int(uid))
    if not address:  # the way partydbm itself reaches a deep database's socket
        address = socket_address(path)
    out: dict[str, Any] = {"uid": os.getuid()}
    try:
        handle = partydbm.open(path, "w", timeout=2)
    except BaseException as exc:
        out["api"] = f"{type(exc).__name__}: {exc}"
        out["api_error_is_partydbm_error"] = isinstance(exc, partydbm.error)
    else:
        out["api"] = "opened"
        for name, fn in (("api_put", lambda: handle.__setitem__("secret", "pwned")),
                         ("api_get", lambda: handle.get("secret"))):
            try:
                out[name] = fn()
            except BaseException as exc:
                out[name] = f"{type(exc).__name__}: {exc}"
    replies: list[Any] = []
    out["raw"] = replies
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(3)
        sock.connect(address)
        hello = {"v": P.VERSION, "client": os.urandom(16), "pid": os.getpid()}
        sock.sendall(P.pack([P.HELLO, 0, hello]))
        sock.sendall(P.pack([P.PUT, 1, b"secret", b"pwned", False])
                     + P.pack([P.GET, 2, b"secret"]))
        decoder = P.Decoder()
        while True:
            data = sock.recv(65536)
            if not data:
                break
            decoder.feed(data)
            replies.extend(decoder.messages())
    except BaseException as exc:
        replies.append(f"{type(exc).__name__}: {exc}")
    report(out)
