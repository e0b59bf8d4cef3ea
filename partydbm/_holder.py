"""A process that holds databases open on command: the other side of role tests.

`python -m partydbm._holder` reads lines from stdin and answers one line each:

    open PATH FLAG   -> "ok leader" / "ok follower" / "err <message>"
    close PATH       -> "ok"
    put PATH KEY VAL -> "ok"            (hex-encoded key and value)
    pid              -> "ok <pid>"

and exits (closing everything, so a leader hands over) when stdin closes. `Holder`
drives one from a test: with a Holder holding a path first, the test's own handle is
a follower of another process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from . import _seams
from ._open import open_to_serve


def main() -> int:
    _seams.load(os.environ)  # a test's env={"PARTYDBM_...": ...} for this holder
    dbs: dict[str, Any] = {}
    for line in sys.stdin:
        words = line.split()
        try:
            reply = _command(dbs, words)
        except Exception as exc:
            reply = f"err {type(exc).__name__}: {exc}".replace("\n", " ")
        sys.stdout.write(reply + "\n")
        sys.stdout.flush()
    for db in dbs.values():
        db.close()
    return 0


def _command(dbs: dict[str, Any], words: list[str]) -> str:
    if words[0] == "open":
        path = bytes.fromhex(words[1]).decode()
        db = dbs.pop(path, None)
        if db is not None:
            db.close()
        db = dbs[path] = open_to_serve(path, words[2], timeout=10.0)
        return "ok leader" if db.is_leader else "ok follower"
    if words[0] == "close":
        db = dbs.pop(bytes.fromhex(words[1]).decode(), None)
        if db is not None:
            db.close()
        return "ok"
    if words[0] == "put":
        dbs[bytes.fromhex(words[1]).decode()][bytes.fromhex(words[2])] = bytes.fromhex(words[3])
        return "ok"
    if words[0] == "pid":
        return f"ok {os.getpid()}"
    return f"err unknown command {words[0]!r}"


class Holder:
    """Drive a holder process. Every call has a deadline; close() reaps the process."""

    def __init__(self, timeout: float = 30.0, env: dict[str, str] | None = None) -> None:
        """`env`: extra environment variables (e.g. the test seams PARTYDBM_CRASH_AT,
        PARTYDBM_RESEND_DELAY, which the holder loads into partydbm._seams)."""
        self.timeout = timeout
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "partydbm._holder"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, bufsize=1,
            env=None if env is None else {**os.environ, **env})
        self.pid = self.proc.pid

    def _ask(self, line: str) -> str:
        import select

        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        if not ready:
            self.kill()
            raise TimeoutError(f"holder did not answer {line!r} in {self.timeout}s")
        reply = self.proc.stdout.readline().strip()
        if not reply.startswith("ok"):
            raise RuntimeError(f"holder: {line!r} -> {reply!r}")
        return reply[3:]

    def open(self, path: str | os.PathLike[str], flag: str = "c") -> str:
        """Open `path` in the holder; returns 'leader' or 'follower'."""
        return self._ask(f"open {os.fspath(path).encode().hex()} {flag}")

    def close_db(self, path: str | os.PathLike[str]) -> None:
        self._ask(f"close {os.fspath(path).encode().hex()}")

    def put(self, path: str | os.PathLike[str], key: bytes, value: bytes) -> None:
        self._ask(f"put {os.fspath(path).encode().hex()} {key.hex()} {value.hex()}")

    def close(self) -> None:
        """Close everything (a leader hands over) and reap the process."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def kill(self) -> None:
        """SIGKILL (a crash) and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(self.timeout)

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    raise SystemExit(main())
