"""The repl worker: the test's Python, run line by line; the holder is one too."""

from __future__ import annotations

import os
import random
import sys
import threading
import time
import traceback
from typing import Any

import partydbm
from partydbm._open import open_to_serve
from tests.wire import decode

from . import DEADLINE, report, run_threads, wait_file, write_range
from .races import race

# Module globals, not locals: a handle a worker leaves open must stay open until the
# interpreter exits (a local would be closed by its __del__ when the function returns).
NS: dict[str, Any] = {}
held: dict[str, Any] = {}  # the holder's handles, by path


# -- repl: run the test's Python, one JSON line per request --------------------------------
def repl() -> None:
    """Requests {"op": "exec"|"eval", "code": ...}; answers {"ok": value} or {"exc": [type,
    mro, message, traceback]}. Falls off the end when stdin closes, leaving any handle
    the test opened (in NS) open: interpreter exit, no explicit close."""
    NS.update(partydbm=partydbm, os=os, sys=sys, time=time, threading=threading,
              random=random, wait_file=wait_file, thread_workload=thread_workload,
              write_range=write_range, write_through=write_through, race=race, held=held,
              hold=hold, let_go=let_go)
    while True:
        line = sys.stdin.readline()
        if not line:
            return
        req = decode(line)
        try:
            if req["op"] == "exec":
                NS.pop("result", None)
                exec(req["code"], NS)
                reply = {"ok": NS.pop("result", None)}
            else:
                reply = {"ok": eval(req["code"], NS)}
        except BaseException as exc:
            reply = {"exc": [type(exc).__name__, [c.__name__ for c in type(exc).__mro__],
                             str(exc), traceback.format_exc()]}
        report(reply)


def holder() -> None:
    """A repl that holds databases (`hold`, `let_go`, `held`) and only serves them;
    when its stdin closes it closes every handle, so that a leader hands over."""
    try:
        repl()
    finally:
        for handle in held.values():
            handle.close()


def hold(path: str, flag: str) -> str:
    """Open `path` (closing this worker's earlier handle on it); 'leader' or 'follower'."""
    let_go(path)
    handle = held[path] = open_to_serve(path, flag, timeout=10.0)
    return "leader" if handle.is_leader else "follower"


def let_go(path: str) -> None:
    handle = held.pop(path, None)
    if handle is not None:
        handle.close()


def write_through(handle: Any, fmt: str, started: str | None, flag: str, extra: int = 100,
                  timeout: float = DEADLINE) -> dict[bytes, bytes]:
    """Write fmt % j -> j for j = 0, 1, ...; touch `started` after 20 writes; once `flag`
    exists, write `extra` more and return everything written."""
    written: dict[bytes, bytes] = {}
    j, stop_at = 0, None
    deadline = time.monotonic() + timeout
    while stop_at is None or j < stop_at:
        key, value = (fmt % j).encode(), b"%d" % j
        handle[key] = value
        written[key] = value
        j += 1
        if j == 20 and started:
            open(started, "w").close()
        if stop_at is None and os.path.exists(flag):
            stop_at = j + extra
        if time.monotonic() > deadline:
            raise TimeoutError(f"{j} writes and {flag} still missing")
    return written


def thread_workload(handle: Any, seed: int, nthreads: int = 4, nops: int = 300,
                    nkeys: int = 20, started: str | None = None) -> dict[str, Any]:
    """`nthreads` threads share one handle; each owns the keys under its prefix and
    checks every read against its own model. Thread 0 touches `started` after 50
    operations. Returns the errors and the merged model."""
    errors: list[str] = []
    models: list[dict[bytes, bytes]] = [{} for _ in range(nthreads)]
    barrier = threading.Barrier(nthreads, timeout=DEADLINE)

    def run(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        model = models[i]
        prefix = b"t%d-" % i
        n = -1
        try:
            barrier.wait()
            for n in range(nops):
                _thread_step(handle, rng, model, prefix, i, n, nkeys)
                if started and i == 0 and n == 50:
                    open(started, "w").close()
        except BaseException:
            errors.append(f"thread {i} op {n} (seed {seed}):\n{traceback.format_exc()}")

    errors += [f"{t.name} still running at the deadline" for t in run_threads(run, nthreads)]
    merged: dict[bytes, bytes] = {}
    for model in models:
        merged.update(model)
    return {"errors": errors, "model": merged}


def _thread_step(h: Any, rng: random.Random, model: dict[bytes, bytes], prefix: bytes,
                 i: int, n: int, nkeys: int) -> None:
    key = prefix + b"%02d" % rng.randrange(nkeys)
    roll = rng.random()
    if roll < 0.35:
        value = b"%d-%d" % (i, n)
        h[key] = value
        model[key] = value
    elif roll < 0.5:
        try:
            del h[key]
            existed = True
        except KeyError:
            existed = False
        assert existed == (key in model), (key, existed)
        model.pop(key, None)
    elif roll < 0.7:
        assert h.get(key) == model.get(key), key
    elif roll < 0.78:
        assert (key in h) == (key in model), key
    elif roll < 0.86:
        other = prefix + b"%02d" % rng.randrange(nkeys)
        value = b"b%d-%d" % (i, n)
        with h.write_batch() as wb:
            wb.put(key, value)
            wb.delete(other)
        model[key] = value
        if other != key:
            model.pop(other, None)
        else:
            model.pop(key)
    elif roll < 0.93:
        got = list(h.iterator(prefix=prefix))
        assert got == sorted(model.items()), (got, sorted(model.items()))
    else:
        assert h.pop(key, None) == model.pop(key, None), key
