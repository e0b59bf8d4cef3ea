"""Running the `partydbm` command line from the tests.

`cli()` calls the command line's `main(argv)` in this process, with stdin, stdout and
stderr swapped for byte buffers, the working directory given, and the exit code
caught (argparse's usage errors and --help end in SystemExit, as in a real run). A
command opens its database like any process and closes it before it returns, so in
this process it leads when nobody else has the path open, and follows when another
process leads (the `dbpath` fixture's "led" case: a Holder): that is the role a real
run would have. What the interpreter adds around `main` (exit codes through
`python -m partydbm`, argv bytes that are not UTF-8, a closed pipe, a terminal on
stderr, signals) is covered by `cli_process()` tests in test_cli_processes.py.
"""

from __future__ import annotations

import io
import json
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import partydbm
from partydbm.cli import main

PY = [sys.executable, "-m", "partydbm"]
DEADLINE = 60.0


@dataclass
class Ran:
    """What a command did, shaped like subprocess.CompletedProcess."""

    args: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes


def cli(*args: Any, input: bytes | None = None, cwd: Path | None = None) -> Ran:
    """Run the command line in this process. Its deadline is the test's (pytest-timeout):
    a command waits for a leader 10 s at most (its own --timeout)."""
    # The interpreter decodes argv with surrogateescape: bytes that are not UTF-8
    # reach main() as lone surrogates, exactly as here.
    argv = [os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args]
    out, err = io.BytesIO(), io.BytesIO()
    streams = (sys.stdin, sys.stdout, sys.stderr)
    sys.stdin = io.TextIOWrapper(io.BytesIO(input or b""), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(out, encoding="utf-8")
    sys.stderr = io.TextIOWrapper(err, encoding="utf-8", errors="backslashreplace")
    here = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        sys.stdout.flush()
        sys.stderr.flush()
        return Ran(argv, code, out.getvalue(), err.getvalue())
    finally:
        # A real run's process ends here, and the grace period of what it opened with it.
        partydbm.let_go()
        os.chdir(here)
        sys.stdin, sys.stdout, sys.stderr = streams


def cli_process(*args: Any, input: bytes | None = None, timeout: float = DEADLINE,
                cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """`python -m partydbm ARGS` as a process of its own, with a deadline."""
    argv = [a if isinstance(a, bytes) else str(a) for a in args]
    return subprocess.run([*PY, *argv], input=input, capture_output=True, timeout=timeout,
                          cwd=cwd)


def ok(*args: Any, **kw: Any) -> Ran:
    r = cli(*args, **kw)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r


def fails(code: int, *args: Any, says: str = "", **kw: Any) -> str:
    """Run; the exit code must be `code` and stderr one line, no traceback."""
    r = cli(*args, **kw)
    err = r.stderr.decode()
    assert r.returncode == code, (args, r.stdout, err)
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert says in err, err
    return err


def contents(path: Path) -> dict[bytes, bytes]:
    with partydbm.open(path, "r") as db:
        items = dict(db.items())
    partydbm.let_go(path)  # the commands run next may have to lead
    return items


def fill(path: Path, data: dict[bytes, bytes]) -> None:
    with partydbm.open(path, "c") as db:
        db.update(data)
    partydbm.let_go(path)


def info_json(path: Path) -> dict[str, Any]:
    return json.loads(ok("info", path, "--json").stdout)  # type: ignore[no-any-return]


def with_tty_stderr(*args: Any) -> str:
    """What `python -m partydbm ARGS` writes to stderr when stderr is a terminal."""
    import pty

    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen([*PY, *map(str, args)], stdout=subprocess.DEVNULL,
                                stderr=follower, stdin=subprocess.DEVNULL)
        try:
            os.close(follower)
            follower = -1
            chunks = _read_until_closed(leader, proc)
            assert proc.wait(DEADLINE) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(DEADLINE)
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    return b"".join(chunks).decode()


def _read_until_closed(fd: int, proc: subprocess.Popen[bytes]) -> list[bytes]:
    chunks = []
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    return chunks
