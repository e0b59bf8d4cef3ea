"""Worker processes for the tests: `python -m tests.workers NAME ARGS...`.

Started through `tests.procs` (a `Party`, or a `Holder`), which gives each one a
deadline and SIGKILLs it (and whatever it started) at the end of the test. Every worker
loads the test seams and the settings of SETTINGS first thing (__main__.py). Results go
to stdout, one JSON line (`tests.wire`) at a time; stderr is kept for the test's failure
message.

    repl.py     repl (the test's Python, line by line) and holder (a repl that holds
                databases and only serves them)
    oneshot.py  turnover, plain_leveldb, uid_probe
    fork.py     handles inherited through fork (multiprocessing and os.fork)
    races.py    threads racing over the same keys; close_under_threads
    stale.py    stale_check: the follower cache's staleness checker
    crowd.py    crowds of forked processes opening and failing over (crowd_util.py)
    torture.py  seeded random operations checked against a model, logged for the parent
"""

from __future__ import annotations

import ast
import importlib
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from tests.wire import encode

DEADLINE = 30.0

SETTINGS = "PARTYDBM_TEST_SET"
"""Module attributes of partydbm to set in a worker process before it does anything:
"_sockets.SO_PEERCRED=None;_election.VIA_PROC=False" (a test that switches a Linux way
off sets them in its own process and, through this variable, in the workers it starts;
the library itself never reads it)."""


def apply_settings(env: Mapping[str, str]) -> None:
    for setting in filter(None, env.get(SETTINGS, "").split(";")):
        target, value = setting.split("=", 1)
        module, attr = target.rsplit(".", 1)
        setattr(importlib.import_module(f"partydbm.{module}"), attr, ast.literal_eval(value))


def report(obj: Any) -> None:
    """One JSON line, in one write(2): forked children share stdout, and a pipe write
    of one small buffer is never interleaved with another."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (encode(obj) + "\n").encode())



def write_range(handle: Any, fmt: str, n: int, value_fmt: str) -> dict[bytes, bytes]:
    """Write keys fmt % j -> value_fmt % j for j < n; return what was written."""
    written = {}
    for j in range(n):
        key, value = (fmt % j).encode(), (value_fmt % j).encode()
        handle[key] = value
        written[key] = value
    return written


def wait_file(path: str, timeout: float = DEADLINE) -> None:
    """A barrier across processes: return once `path` exists."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout}s")
        time.sleep(0.001)


def run_threads(target: Callable[[int], None], n: int, timeout: float = DEADLINE
                ) -> list[threading.Thread]:
    """Run target(0) .. target(n - 1) in daemon threads, joined against one deadline;
    the threads still running at the deadline."""
    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(deadline - time.monotonic(), 0.001))
    return [t for t in threads if t.is_alive()]
