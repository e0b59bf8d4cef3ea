"""The processes of `partydbm demo` (`python -m partydbm.cli._demo_children ROLE PATH ...`).

Each reports on stdout, one line at a time:
    S <leader|follower> <writes acknowledged>              a writer (or the host: 0)
    S <leader|follower> <scans> <bad scans> <keys seen>    the reader
    BAD <description>                                      the reader found a bad scan
"""

from __future__ import annotations

import sys
import time
from typing import Any

from .._open import open as party_open

REPORT_EVERY = 0.1  # seconds between a child's status lines


def key_of(wid: int, i: int) -> bytes:
    return b"w%d:%07d" % (wid, i)


def value_of(wid: int, i: int) -> bytes:
    return b"value %d of writer %d" % (i, wid)


def _role(db: Any) -> str:
    return "leader" if db.is_leader else "follower"


class _Status:
    """Prints a child's status line "S <role> <counts>..." at most every REPORT_EVERY
    seconds (always when `final`)."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.last = 0.0

    def report(self, *counts: int, final: bool = False) -> None:
        now = time.monotonic()
        if final or now - self.last >= REPORT_EVERY:
            print("S", _role(self.db), *counts, flush=True)
            self.last = now


def writer(path: str, wid: int, start: int, until: float) -> int:
    db = party_open(path, "c")
    i, status = start, _Status(db)
    while time.time() < until:
        db[key_of(wid, i)] = value_of(wid, i)
        i += 1  # acknowledged: keys 0 .. i-1 are written
        if i % 20 == 0:
            time.sleep(0.002)  # leave CPU for the others: the machine may have 2 cores
        status.report(i)
    status.report(i, final=True)
    db.close()
    return 0


def reader(path: str, until: float) -> int:
    db = party_open(path, "c")
    scans = bad = seen = 0
    status = _Status(db)
    while time.time() < until:
        reverse = scans % 2 == 1
        problem, seen = _check_scan(db, reverse, until)
        if problem is None and time.time() >= until:
            break  # cut short at the end: not a complete scan
        scans += 1
        if problem:
            bad += 1
            print(f"BAD scan {scans} ({'reverse' if reverse else 'forward'}): {problem}",
                  flush=True)
        status.report(scans, bad, seen)
    status.report(scans, bad, seen, final=True)
    db.close()
    return 0


def _check_scan(db: Any, reverse: bool, until: float) -> tuple[str | None, int]:
    """Scan every key; a description of what is wrong, or None. Writers append keys in
    order, so each writer's keys must be a run 0..n-1 with no gap."""
    prev: bytes | None = None
    runs: dict[bytes, list[int]] = {}  # writer prefix -> [count, lowest, highest]
    n = 0
    for key in db.iterator(include_value=False, reverse=reverse):
        if prev is not None and (key >= prev if reverse else key <= prev):
            return f"{key!r} came after {prev!r}", n
        prev = key
        n += 1
        head, _, index = key.partition(b":")
        i = int(index)
        run = runs.setdefault(head, [0, i, i])
        run[0] += 1
        run[1], run[2] = min(run[1], i), max(run[2], i)
        if n % 4096 == 0 and time.time() >= until:
            return None, n
    for head, (count, low, high) in runs.items():
        if low != 0 or count != high - low + 1:
            return f"{head.decode()}: {count} keys from {low} to {high} (a gap)", n
    return None, n


def host(path: str, until: float) -> int:
    db = party_open(path, "c")
    _Status(db).report(0, final=True)
    while time.time() < until:
        time.sleep(0.05)
    db.close()
    return 0


def _main(argv: list[str]) -> int:
    kind, path, *rest = argv
    if kind == "writer":
        return writer(path, int(rest[0]), int(rest[1]), float(rest[2]))
    if kind == "reader":
        return reader(path, float(rest[0]))
    if kind == "host":
        return host(path, float(rest[0]))
    raise SystemExit(f"unknown demo role {kind!r}")


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
