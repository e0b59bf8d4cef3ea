"""Crowd storms: N processes forked from one parent that imported partydbm.

    python -m tests.workers crowd open PATH N [--lead] [--leader-nofile F] [--timeout T]
    python -m tests.workers crowd failover PATH N [--timeout T] [--writes M]
    python -m tests.workers crowd prefork PATH N [--timeout T] [--writes M]

prints one JSON line, the report (see `_report`). tests/test_crowd.py checks it;
bench/crowd.py prints its timings.

`open`: with --lead, a Holder process leads PATH first (and wrote b"seed"), with a soft
limit of F open files if given; without, PATH does not exist and the crowd races to
create it and lead. The N children wait at
a gate (a pipe whose write end the parent closes: every child's read returns at the
same instant), then each opens PATH with flag "c", writes its own key, reads it back
and reports; they keep the database open until every one has reported, so the leader
holds them all at once.

`failover`: a Holder leads; the children open a few at a time (the open storm is the
other test) and write M acknowledged keys each, then pass a gate and write M more while
the parent SIGKILLs the Holder once half of them are under way, then, past a gate the
parent opens after the kill, M more on whoever leads now. Each child writes
b"c<i>-<j>" and overwrites b"c<i>" with j on every step, so a write applied twice
(an old value on top of a newer one) or lost shows in the parent's final read.

`prefork`: the crowd is forked by the leader itself, which the parent SIGKILLs once
every child wrote M keys; then each writes M more (see PreforkStorm). The report says
how many helper processes were alive at the end.

The parent never opens the database before the children are gone (a child forked from
a leader could not lead, docs/TRAPS.md, trap 2), then reads it back and compares with the
model built from what each child says was acknowledged. Every wait has a deadline;
children still alive at the end are SIGKILLed and every one is reaped.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import time
from pathlib import Path
from typing import Any

import partydbm
from tests.procs import Holder

from .crowd_util import (
    Child,
    Crowd,
    Gate,
    be_subreaper,
    helpers_alive,
    model_of,
    reap_all,
    stats,
    summary,
)

OPEN_CONCURRENCY = 8  # failover: children opening at once (below any backlog)


# -- the open storm -------------------------------------------------------------------------
class OpenStorm:
    def __init__(self, path: Path, n: int, timeout: float) -> None:
        self.path, self.timeout = path, timeout
        self.crowd = Crowd(n, timeout + 30)
        self.go, self.close = Gate(), Gate()

    def child(self, child: Child) -> None:
        os.write(self.crowd.ready_w, b"r")
        self.go.wait()
        t0 = time.monotonic()
        with partydbm.open(self.path, "c", timeout=self.timeout) as db:
            child.out["open_s"] = time.monotonic() - t0
            child.write(db, 0)
            child.check(db, 1)
            child.out["seed"] = (db.get(b"seed") or b"").decode()
            child.out["leader"] = db.is_leader
            child.out["ok"] = not child.out["bad"]
            child.report()
            self.close.wait()  # every child holds the database until all have reported

    def run(self) -> float:
        """Seconds from the gate's opening to the last report."""
        crowd = self.crowd
        crowd.fork(self.child, [self.go, self.close])
        crowd.wait_bytes(crowd.ready_r, crowd.n)
        t0 = time.monotonic()
        self.go.open()
        crowd.collect(crowd.n)
        wall = time.monotonic() - t0
        self.close.open()
        crowd.reap()
        return wall


def run_open(path: Path, n: int, lead: bool, timeout: float,
             leader_nofile: int | None = None) -> dict[str, Any]:
    holder = Holder() if lead else None
    try:
        if holder is not None:
            if leader_nofile is not None:
                hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                resource.prlimit(holder.pid, resource.RLIMIT_NOFILE, (leader_nofile, hard))
            assert holder.open(path) == "leader"
            holder.put(path, b"seed", b"s")
        storm = OpenStorm(path, n, timeout)
        wall = storm.run()
        if holder is not None:
            holder.close()
        model, maybe = model_of(storm.crowd, 1)
        if lead:
            model[b"seed"] = b"s"
        reports = storm.crowd.reports.values()
        out = summary(storm.crowd, path, model, maybe)
        out["seed_seen"] = sum(1 for r in reports if r.get("seed") == "s")
        out["open_s"] = stats([r["open_s"] for r in reports if "open_s" in r])
        out["all_reported_s"] = round(wall, 4)
        return out
    finally:
        if holder is not None:
            holder.kill()


# -- the failover storm ---------------------------------------------------------------------
class FailoverStorm:
    def __init__(self, path: Path, n: int, writes: int, timeout: float) -> None:
        self.path, self.writes, self.timeout = path, writes, timeout
        self.crowd = Crowd(n, timeout + 60)
        self.tokens_r, self.tokens_w = os.pipe()
        self.progress_r, self.progress_w = os.pipe()
        self.go, self.after, self.close = Gate(), Gate(), Gate()

    def child(self, child: Child) -> None:
        os.read(self.tokens_r, 1)  # a few open at a time: this storm is the failover
        try:
            db = partydbm.open(self.path, "c", timeout=self.timeout)
        except BaseException:
            os.write(self.crowd.ready_w, b"x")
            raise
        finally:
            os.write(self.tokens_w, b"t")
        with db:
            for j in range(self.writes):
                child.write(db, j)
            os.write(self.crowd.ready_w, b"r")
            self.go.wait()
            child.write(db, self.writes)
            os.write(self.progress_w, b"w")
            for j in range(self.writes + 1, 2 * self.writes):
                child.write(db, j)  # some of them on the leader that is killed meanwhile
            self.after.wait()  # the kill is over: every child writes after it too
            for j in range(2 * self.writes, 3 * self.writes):
                child.write(db, j)
            child.out["t_end"] = time.monotonic()
            child.check(db, 3 * self.writes)
            child.out["leader"] = db.is_leader
            child.out["ok"] = not child.out["bad"]
            child.report()
            self.close.wait()

    def run(self, holder: Holder) -> tuple[int, float]:
        """(children that opened before the kill, when the kill was)."""
        crowd = self.crowd
        os.write(self.tokens_w, b"t" * OPEN_CONCURRENCY)
        crowd.fork(self.child, [self.go, self.after, self.close])
        opened = crowd.wait_bytes(crowd.ready_r, crowd.n).count(b"r")
        self.go.open()
        crowd.wait_bytes(self.progress_r, max(opened // 2, 1))
        t_kill = time.monotonic()
        holder.kill()
        self.after.open()
        crowd.collect(crowd.n)
        self.close.open()
        crowd.reap()
        return opened, t_kill


def run_failover(path: Path, n: int, writes: int, timeout: float) -> dict[str, Any]:
    holder = Holder()
    try:
        assert holder.open(path) == "leader"
        storm = FailoverStorm(path, n, writes, timeout)
        opened, t_kill = storm.run(holder)
        model, maybe = model_of(storm.crowd, 3 * writes)
        out = summary(storm.crowd, path, model, maybe)
        out["opened_before_kill"] = opened
        out.update(_after_kill(storm.crowd, t_kill))
        return out
    finally:
        holder.kill()


def _after_kill(crowd: Crowd, t_kill: float) -> dict[str, Any]:
    """When the last child was done, after the kill; the longest single write of each."""
    reports = crowd.reports.values()
    ends = [r["t_end"] - t_kill for r in reports if "t_end" in r]
    return {"all_done_after_kill_s": round(max(ends), 4) if ends else None,
            "max_write_s": stats([r["max_write_s"] for r in reports if "max_write_s" in r])}


# -- the failover storm of children forked from the leader -----------------------------------
class PreforkStorm:
    """A leader process P (which the parent forks, and later SIGKILLs) opens PATH and
    forks the crowd, which uses P's handle (a server's workers forked after it opened
    the database): they can never lead themselves (docs/TRAPS.md, trap 2), so a helper
    process must lead for them, and one is enough."""

    def __init__(self, path: Path, n: int, writes: int, timeout: float) -> None:
        self.path, self.writes, self.timeout = path, writes, timeout
        self.crowd = Crowd(n, timeout + 60)
        self.after, self.close = Gate(), Gate()
        self.db: Any = None

    def leader(self) -> None:
        os.setpgid(0, 0)  # P and all it starts: one group for the parent to kill
        self.db = partydbm.open(self.path, "c", timeout=self.timeout)
        assert self.db.is_leader
        self.crowd.fork(self.child, [self.after, self.close])
        while True:
            signal.pause()

    def child(self, child: Child) -> None:
        with self.db as db:
            try:
                for j in range(self.writes):
                    child.write(db, j)
            finally:
                os.write(self.crowd.ready_w, b"r")
            self.after.wait()  # P is gone
            for j in range(self.writes, 2 * self.writes):
                child.write(db, j)
            child.out["t_end"] = time.monotonic()
            child.check(db, 2 * self.writes)
            child.out["ok"] = not child.out["bad"]
            child.report()
            self.close.wait()

    def run(self) -> tuple[int, float]:
        """(the helper processes alive once every child wrote after P's death, when P
        was killed)."""
        be_subreaper()  # P's children are reparented here when it dies
        pid = os.fork()
        if pid == 0:
            try:
                self.leader()
            finally:
                os._exit(1)
        crowd = self.crowd
        os.close(crowd.results_w)
        try:
            crowd.wait_bytes(crowd.ready_r, crowd.n)
            t_kill = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            self.after.open()
            crowd.collect(crowd.n)
            return helpers_alive(self.path), t_kill
        finally:
            self.close.open()
            codes = reap_all(pid, crowd.deadline)
            pids = {r["pid"] for r in crowd.reports.values()}
            crowd.exit_codes = {p: c for p, c in codes.items() if p in pids}


def run_prefork(path: Path, n: int, writes: int, timeout: float) -> dict[str, Any]:
    storm = PreforkStorm(path, n, writes, timeout)
    helpers, t_kill = storm.run()
    model, maybe = model_of(storm.crowd, 2 * writes)
    out = summary(storm.crowd, path, model, maybe)
    out["helpers"] = helpers
    out.update(_after_kill(storm.crowd, t_kill))
    return out


def crowd(*argv: str) -> int:
    """The worker (its seams, loaded by __main__.py first, reach the forked crowd too)."""
    ap = argparse.ArgumentParser(prog="crowd")
    ap.add_argument("storm", choices=["open", "failover", "prefork"])
    ap.add_argument("path", type=Path)
    ap.add_argument("n", type=int)
    ap.add_argument("--lead", action="store_true", help="open: a Holder leads first")
    ap.add_argument("--leader-nofile", type=int, help="open --lead: the Holder's soft "
                    "limit on open files")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--writes", type=int, default=5)
    args = ap.parse_args(argv)
    if args.storm == "open":
        out = run_open(args.path, args.n, args.lead, args.timeout, args.leader_nofile)
    elif args.storm == "failover":
        out = run_failover(args.path, args.n, args.writes, args.timeout)
    else:
        out = run_prefork(args.path, args.n, args.writes, args.timeout)
    print(json.dumps(out), flush=True)
    return 0
