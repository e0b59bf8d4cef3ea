"""Races over the same keys, and a handle closed under its own threads."""

from __future__ import annotations

import os
import random
import threading
import time
import traceback
from typing import Any

import partydbm

from . import DEADLINE, report, run_threads, wait_file


def race(handle: Any, op: str, keys: list[bytes], seed: int, start: str,
         nthreads: int = 2, count: int = 0) -> list[list[Any]]:
    """`nthreads` threads each apply `op` to every key of `keys` in the same order (so that
    they meet on every key: the most contention), all starting once the file `start`
    exists (a barrier across processes). `seed` is unused by the ops listed here.
    Returns [key, outcome] pairs for every attempt. `op`:
      pop        -> the value popped, or None (missing)
      del        -> True if `del` succeeded, False on KeyError
      setdefault -> what setdefault(key, b"<pid>-<thread>") returned
      popitem    -> [key, value] for every popitem() until KeyError (keys unused)
      incr       -> `count` increments of each key by compare_and_set; the outcome is
                    the number of attempts (a retry when another writer got there first)
    """
    out: list[list[Any]] = []
    errors: list[str] = []
    me = os.getpid()

    def one(key: bytes, t: int) -> Any:
        if op == "pop":
            return handle.pop(key, None)
        if op == "del":
            try:
                del handle[key]
                return True
            except KeyError:
                return False
        if op == "setdefault":
            return handle.setdefault(key, b"%d-%d" % (me, t))
        if op == "incr":
            attempts = 0
            for _ in range(count):
                while True:
                    attempts += 1
                    old = handle.get(key)
                    new = b"%d" % (int(old or 0) + 1)
                    if handle.compare_and_set(key, old, new):
                        break
            return attempts
        raise ValueError(op)

    def run(t: int) -> None:
        try:
            wait_file(start)
            if op == "popitem":
                while True:
                    try:
                        out.append(list(handle.popitem()))
                    except KeyError:
                        return
            for key in keys:
                out.append([key, one(key, t)])
        except BaseException:
            errors.append(traceback.format_exc())

    running = run_threads(run, nthreads)
    if errors or running:
        raise AssertionError(f"race {op}: {errors or 'threads still running'}")
    return out


# -- closing a handle under its threads ---------------------------------------------------------
def close_under_threads(path: str, rounds: str, seed: str) -> None:
    """Each round: open `path`, start four threads that read, iterate, write and list
    keys through the one handle, close it from this thread after a few milliseconds,
    and check that every thread ended with ClosedError (or had finished). A crash of
    the process (SIGSEGV) is the test's exit status; anything else is reported."""
    rng = random.Random(int(seed))
    problems: list[str] = []
    leader_rounds = 0
    for r in range(int(rounds)):
        handle = partydbm.open(path, timeout=DEADLINE)
        leader_rounds += handle.is_leader
        if r == 0:
            handle.update({b"k%04d" % i: b"v" * 50 for i in range(2000)})
        problems += [f"round {r}: {p}" for p in _close_round(handle, rng)]
    report({"problems": problems, "leader_rounds": leader_rounds, "rounds": int(rounds)})


def _close_round(handle: Any, rng: random.Random) -> list[str]:
    ended: list[str] = []
    problems: list[str] = []

    def work(kind: str) -> None:
        try:
            while True:
                if kind == "read":
                    handle.get(b"k%04d" % rng.randrange(2000))
                elif kind == "iterate":
                    for _ in handle.items():
                        pass
                elif kind == "write":
                    handle[b"k%04d" % rng.randrange(2000)] = b"w" * 50
                else:
                    handle.keys()
        except partydbm.ClosedError:
            ended.append(kind)
        except BaseException:
            problems.append(f"{kind}: {traceback.format_exc()}")

    threads = [threading.Thread(target=work, args=(k,), daemon=True)
               for k in ("read", "iterate", "write", "keys")]
    for t in threads:
        t.start()
    time.sleep(rng.uniform(0.001, 0.01))
    handle.close()
    for t in threads:
        t.join(DEADLINE)
    if any(t.is_alive() for t in threads):
        problems.append("a thread still runs after close()")
    elif sorted(ended) != ["iterate", "keys", "read", "write"] and not problems:
        problems.append(f"threads ended {sorted(ended)}")
    return problems
