"""The one way tests start and drive other processes.

Every process a test starts is a `Worker`: `python -m tests.workers NAME ARGS...` (see
tests/workers/) or `python -c CODE` (a user's script), in a session of its own, so that
it and everything it starts (forked children, partydbm's helper leaders) form one
process group. Every wait on a worker has a deadline; `Party` SIGKILLs each group and
reaps its worker in a `finally`, whatever the test did. Each worker loads the test seams
(`partydbm._seams.load(os.environ)`) first thing, so `env={"PARTYDBM_...": ...}` reaches it,
and sets the module attributes named in PARTYDBM_TEST_SET (tests.workers.SETTINGS).

The `repl` worker runs Python sent to it line by line (JSON, with bytes kept as bytes)
and answers one line each, so a test can drive several processes step by step:

    with Party() as party:
        a, b = party.repl(), party.repl()
        assert a.open(path) == "leader"
        b.open(path)
        a.exec("db['k'] = 'v'")
        assert b.eval("db['k']") == b"v"

A `Holder` is a repl that only holds databases and serves them (the other side of the
role tests, of conformance/ and of bench/): `Holder().open(path)` makes the test's own
handle on `path` a follower of another process.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .wire import decode, encode

ROOT = Path(__file__).resolve().parent.parent  # workers run there: `-m tests.workers`
DEADLINE = 30.0  # seconds, for any single wait on a worker


class WorkerError(AssertionError):
    """A worker died, missed its deadline or said something unexpected."""


class RemoteError(RuntimeError):
    """An exception raised by code a worker ran for the test."""

    def __init__(self, type_name: str, mro: list[str], message: str, tb: str) -> None:
        super().__init__(f"{type_name}: {message}\n--- in the worker ---\n{tb}")
        self.type_name = type_name
        self.mro = mro
        self.message = message

    def isa(self, *names: str) -> bool:
        """Whether the remote exception was an instance of every class named."""
        return all(name in self.mro for name in names)


def worker_argv(name: str, *args: Any, without: str | None = None) -> list[str]:
    """The interpreter arguments that start worker NAME of tests/workers/; `without`: a
    module the worker cannot import (a LevelDB binding: partydbm takes the other)."""
    blocked = [] if without is None else ["--without", without]
    return ["-m", "tests.workers", *blocked, name, *map(str, args)]


# -- one worker ----------------------------------------------------------------------------
class Worker:
    """One spawned process with line-based stdin/stdout. Use through `Party`."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives with the worker
        # -X faulthandler: a worker killed with SIGABRT prints every thread's stack
        # first (wait() does that to a worker that misses its deadline).
        self.proc = subprocess.Popen(
            [sys.executable, "-X", "faulthandler", *argv], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr, start_new_session=True, cwd=ROOT,
            env=None if env is None else {**os.environ, **env})
        self.pid = self.proc.pid
        self.argv = argv
        self._buf = b""
        self._reaped_group = False

    def __repr__(self) -> str:
        return f"<Worker pid={self.pid} {' '.join(self.argv)[:60]!r}>"

    # -- lines ---------------------------------------------------------------------------
    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError as exc:
            raise WorkerError(f"{self} is gone: {self.stderr()}") from exc

    def readline(self, timeout: float = DEADLINE) -> str | None:
        """The next line from the worker's stdout, None at EOF; WorkerError at the
        deadline."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerError(f"{self}: no line within {timeout}s; stderr:\n{self.stderr()}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                if self._buf:
                    line, self._buf = self._buf, b""
                    return line.decode()
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def expect(self, prefix: str, timeout: float = DEADLINE) -> str:
        """Read the next line, which must start with `prefix`; return the rest."""
        line = self.readline(timeout)
        if line is None or not line.startswith(prefix):
            raise WorkerError(f"{self}: expected {prefix!r}, got {line!r}; "
                              f"stderr:\n{self.stderr()}")
        return line[len(prefix):].strip()

    # -- the repl worker -------------------------------------------------------------------
    def submit(self, op: str, code: str) -> None:
        """Send a request without waiting for its answer (see `reply`)."""
        self.send(encode({"op": op, "code": code}))

    def reply(self, timeout: float = DEADLINE) -> Any:
        line = self.readline(timeout)
        if line is None:
            raise WorkerError(f"{self} exited (rc={self._exit_code()}) without answering; "
                              f"stderr:\n{self.stderr()}")
        msg = decode(line)
        if "exc" in msg:
            raise RemoteError(*msg["exc"])
        return msg["ok"]

    def exec(self, code: str, timeout: float = DEADLINE) -> Any:
        """Run statements in the worker; returns what they assigned to `result`."""
        self.submit("exec", code)
        return self.reply(timeout)

    def eval(self, expr: str, timeout: float = DEADLINE) -> Any:
        self.submit("eval", expr)
        return self.reply(timeout)

    def open(self, path: str | os.PathLike[str], flag: str = "c", name: str = "db",
             deadline: float = DEADLINE, **kwargs: Any) -> str:
        """Open `path` in the worker as variable `name` (`kwargs` go to partydbm.open);
        'leader' or 'follower'. `deadline`: how long the test waits for the answer."""
        args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
        return self.exec(  # type: ignore[no-any-return]
            f"{name} = partydbm.open({os.fspath(path)!r}, {flag!r}{args})\n"
            f"result = 'leader' if {name}.is_leader else 'follower'", deadline)

    # -- ending ------------------------------------------------------------------------------
    def _exit_code(self, timeout: float = 2.0) -> int | None:
        """The exit code of a worker whose stdout just ended: a dying process closes
        its files a moment before it can be reaped (None if it still runs)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def wait(self, timeout: float = DEADLINE) -> int:
        """The exit code; WorkerError (after SIGKILL) if it does not exit in time."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._dump_stacks()
            self.kill()
            raise WorkerError(f"{self} did not exit within {timeout}s; "
                              f"stderr:\n{self.stderr()}") from None

    def _dump_stacks(self) -> None:
        """Have a hung worker write every thread's stack to its stderr before it is
        killed (faulthandler, on SIGABRT): where it waits is the diagnosis."""
        try:
            os.kill(self.pid, signal.SIGABRT)
            self.proc.wait(2.0)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass

    def finish(self, timeout: float = DEADLINE) -> int:
        """Close its stdin (a repl falls off the end of its script) and wait."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the worker's whole process group (a crash) and reap the worker."""
        if not self._reaped_group:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
            self.proc.wait(DEADLINE)
        # Once the worker is reaped its pid (the group id) may be reused: never signal
        # the group again.
        self._reaped_group = True

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def cleanup(self) -> None:
        self.kill()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        self._stderr.close()


class Party:
    """The workers of one test: spawned here, all SIGKILLed and reaped on exit."""

    def __init__(self) -> None:
        self.workers: list[Worker] = []

    def spawn(self, name: str, *args: Any, env: dict[str, str] | None = None) -> Worker:
        """`python -m tests.workers NAME ARGS...`."""
        return self._add(Worker(worker_argv(name, *args), env))

    def python(self, code: str, *args: Any, env: dict[str, str] | None = None) -> Worker:
        """`python -c CODE ARGS...` (a user's script, nothing of the tests imported)."""
        return self._add(Worker(["-c", code, *map(str, args)], env))

    def repl(self, env: dict[str, str] | None = None, without: str | None = None) -> Worker:
        """A repl worker; `without`: a module it cannot import (see worker_argv)."""
        return self._add(Worker(worker_argv("repl", without=without), env))

    def repls(self, n: int) -> list[Worker]:
        return [self.repl() for _ in range(n)]

    def _add(self, worker: Worker) -> Worker:
        self.workers.append(worker)
        return worker

    def close(self) -> None:
        for worker in self.workers:
            worker.cleanup()

    def __enter__(self) -> Party:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Holder:
    """A worker that holds databases open on command and only serves them (it never
    answers in passing: it has no calls of its own). Usable without a `Party` (as a
    context manager, or `close()` in a `finally`); errors in the worker raise
    `RemoteError` (a RuntimeError), a missed deadline `WorkerError`."""

    def __init__(self, timeout: float = DEADLINE, env: dict[str, str] | None = None) -> None:
        """`env`: extra environment variables (e.g. the test seams PARTYDBM_CRASH_AT,
        PARTYDBM_RESEND_DELAY, which the worker loads into partydbm._seams)."""
        self.timeout = timeout
        self.worker = Worker(worker_argv("holder"), env)
        self.proc = self.worker.proc
        self.pid = self.worker.pid

    def open(self, path: str | os.PathLike[str], flag: str = "c") -> str:
        """Open `path` in the holder (closing its earlier handle on it, if any);
        'leader' or 'follower'."""
        return self.worker.exec(  # type: ignore[no-any-return]
            f"result = hold({os.fspath(path)!r}, {flag!r})", self.timeout)

    def close_db(self, path: str | os.PathLike[str]) -> None:
        self.worker.exec(f"let_go({os.fspath(path)!r})", self.timeout)

    def put(self, path: str | os.PathLike[str], key: bytes, value: bytes) -> None:
        self.worker.exec(f"held[{os.fspath(path)!r}][{key!r}] = {value!r}", self.timeout)

    def close(self) -> None:
        """Close everything (a leader hands over) and reap the process; SIGKILL it if
        it does not exit within the deadline."""
        try:
            if self.proc.returncode is None:
                self.worker.finish(self.timeout)
        finally:
            self.worker.cleanup()

    def kill(self) -> None:
        """SIGKILL (a crash) and reap."""
        self.worker.kill()

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- helpers -------------------------------------------------------------------------------
def all_replies(workers: Iterable[Worker], timeout: float = DEADLINE) -> list[Any]:
    """The answers to requests submitted to several workers, in order; one deadline."""
    deadline = time.monotonic() + timeout
    return [w.reply(max(deadline - time.monotonic(), 0.001)) for w in workers]


def dump(party: Party, path: str | os.PathLike[str]) -> dict[bytes, bytes]:
    """Everything in the database, read by a fresh process (which then exits)."""
    reader = party.repl()
    reader.open(path, "r")
    items: dict[bytes, bytes] = reader.eval("dict(db.items())")
    assert reader.exec("db.close()") is None
    assert reader.finish() == 0, reader.stderr()
    return items


def wait_for(predicate: Callable[[], Any], timeout: float = DEADLINE,
             what: str = "condition") -> Any:
    """Poll `predicate` until it returns something true; AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout}s")
        time.sleep(0.01)


class Witness:
    """Remembers which file sits at `path` now, through a hard link beside its directory
    (inode numbers alone prove nothing: a file created right after an unlink often gets
    the same one)."""

    _count = 0

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        Witness._count += 1
        self.link = self.path.parent.parent / f"witness-{os.getpid()}-{Witness._count}"
        os.link(self.path, self.link)

    def same(self) -> bool:
        """Whether `path` is still the very file it was (not removed, not replaced)."""
        try:
            return os.path.samefile(self.path, self.link)
        except FileNotFoundError:
            return False

    def replaced(self) -> bool:
        """Whether another file now sits at `path`."""
        return self.path.exists() and not self.same()


def clean_exit_stderr(text: str) -> list[str]:
    """The lines of a worker's stderr that show something went wrong at exit."""
    bad = ("Traceback", "Exception ignored", "Error", "Fatal Python error")
    return [line for line in text.splitlines() if any(b in line for b in bad)]


def leaders_of(workers: list[Worker]) -> list[Worker]:
    """The workers whose handle says it leads (asked of all of them at once)."""
    for w in workers:
        w.submit("eval", "db.is_leader")
    return [w for w, lead in zip(workers, all_replies(workers), strict=True) if lead]
