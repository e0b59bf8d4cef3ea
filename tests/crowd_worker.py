"""Crowd storms: N processes forked from one parent that imported partydbm.

    python tests/crowd_worker.py open PATH N [--lead] [--leader-nofile F] [--timeout T]
    python tests/crowd_worker.py failover PATH N [--timeout T] [--writes M]

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

The parent never opens the database before the children are gone (a child forked from
a leader could not lead, DESIGN.md trap 2), then reads it back and compares with the
model built from what each child says was acknowledged. Every wait has a deadline;
children still alive at the end are SIGKILLed and every one is reaped.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import partydbm
from partydbm import _seams
from partydbm._holder import Holder

OPEN_CONCURRENCY = 8  # failover: children opening at once (below any backlog)
MAX_REPORT = 3500  # bytes: one write(2) to a pipe below PIPE_BUF is never interleaved


class Gate:
    """All children block in read() until the parent closes the write end."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()

    def child_side(self) -> None:
        os.close(self.w)

    def wait(self) -> None:
        while os.read(self.r, 1):
            pass

    def open(self) -> None:
        os.close(self.w)


def _key(i: int, j: int) -> bytes:
    return b"c%d-%d" % (i, j)


def _value(i: int, j: int) -> bytes:
    return b"v%d-%d" % (i, j)


def _last(i: int) -> bytes:
    return b"c%d" % i


class Child:
    """What runs in each forked child; `report` writes its one JSON line."""

    def __init__(self, i: int, results_w: int) -> None:
        self.i = i
        self.results_w = results_w
        self.out: dict[str, Any] = {"i": i}

    def report(self) -> None:
        line = json.dumps(self.out).encode()
        if len(line) > MAX_REPORT:
            self.out["error"] = str(self.out.get("error"))[:300]
            self.out.pop("bad", None)
            line = json.dumps(self.out).encode()
        os.write(self.results_w, line + b"\n")

    def write(self, db: Any, j: int) -> None:
        t = time.monotonic()
        with db.write_batch() as wb:  # one request: the pair is acknowledged together
            wb.put(_key(self.i, j), _value(self.i, j))
            wb.put(_last(self.i), b"%d" % j)
        self.out["acked"] = j + 1
        self.out["max_write_s"] = max(self.out.get("max_write_s", 0.0), time.monotonic() - t)

    def check(self, db: Any, writes: int) -> None:
        bad = [j for j in range(writes) if db.get(_key(self.i, j)) != _value(self.i, j)]
        if db.get(_last(self.i)) != b"%d" % (writes - 1):
            bad.append(-1)
        self.out["bad"] = bad


def _fork(n: int, body: Callable[[Child], None], results_w: int,
          gates: list[Gate]) -> list[int]:
    pids = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            child = Child(i, results_w)
            try:
                for g in gates:
                    g.child_side()
                body(child)
                code = 0
            except BaseException as exc:
                child.out["error"] = f"{type(exc).__name__}: {exc}"
                try:
                    child.report()
                except BaseException:
                    pass
            finally:
                os._exit(code)
        pids.append(pid)
    return pids


class Crowd:
    """The parent's side: children, their reports, deadlines, reaping."""

    def __init__(self, n: int, deadline: float) -> None:
        self.n = n
        self.deadline = time.monotonic() + deadline
        self.results_r, self.results_w = os.pipe()
        self.ready_r, self.ready_w = os.pipe()
        self.reports: dict[int, dict[str, Any]] = {}
        self.pids: list[int] = []
        self.exit_codes: dict[int, int] = {}
        self._buf = b""

    def fork(self, body: Callable[[Child], None], gates: list[Gate]) -> None:
        self.pids = _fork(self.n, body, self.results_w, gates)
        os.close(self.results_w)

    def wait_bytes(self, fd: int, count: int) -> bytes:
        """Read `count` bytes of `fd` (fewer at the deadline)."""
        got = b""
        while len(got) < count:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            chunk = os.read(fd, count - len(got))
            if not chunk:
                break
            got += chunk
        return got

    def collect(self, count: int) -> None:
        """Read reports until `count` children have reported (or the deadline)."""
        while len(self.reports) < count:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.results_r], [], [], left)[0]:
                return
            chunk = os.read(self.results_r, 65536)
            if not chunk:
                return
            self._buf += chunk
            *lines, self._buf = self._buf.split(b"\n")
            for line in lines:
                rep = json.loads(line)
                self.reports[rep["i"]] = rep

    def reap(self) -> None:
        """Wait for every child until the deadline, then SIGKILL the rest."""
        for pid in self.pids:
            while pid not in self.exit_codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    self.exit_codes[pid] = os.waitstatus_to_exitcode(status)
                elif time.monotonic() > self.deadline:
                    os.kill(pid, signal.SIGKILL)
                    _, status = os.waitpid(pid, 0)
                    self.exit_codes[pid] = os.waitstatus_to_exitcode(status)
                else:
                    time.sleep(0.005)


def _summary(crowd: Crowd, path: Path, model: dict[bytes, bytes],
             maybe: set[bytes]) -> dict[str, Any]:
    """Successes, errors by message, and the database read back against the model
    (`maybe`: keys of writes in flight when a child failed, either way is right)."""
    errors = Counter(r["error"].split("\n")[0][:160] for r in crowd.reports.values()
                     if "error" in r)
    with partydbm.open(path, "r") as db:
        found = dict(db.items())
    lost = sorted(k for k, v in model.items() if found.get(k) != v)
    extra = sorted(k for k in found if k not in model and k not in maybe)
    return {
        "n": crowd.n,
        "ok": sum(1 for r in crowd.reports.values() if r.get("ok")),
        "reported": len(crowd.reports),
        "errors": dict(errors),
        "bad_exits": sum(1 for c in crowd.exit_codes.values() if c != 0),
        "lost": [k.decode() for k in lost[:20]],
        "lost_count": len(lost),
        "unexpected": [k.decode() for k in extra[:20]],
        "leaders": sum(1 for r in crowd.reports.values() if r.get("leader")),
    }


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"median": round(statistics.median(values), 4), "max": round(max(values), 4)}


def _model(crowd: Crowd, total: int) -> tuple[dict[bytes, bytes], set[bytes]]:
    """What the database must hold after each child wrote `total` steps, as far as each
    says they were acknowledged; and the keys a child that failed may or may not have
    written (its write in flight)."""
    model: dict[bytes, bytes] = {}
    maybe: set[bytes] = set()
    for i in range(crowd.n):
        acked = crowd.reports.get(i, {}).get("acked", 0)
        model.update({_key(i, j): _value(i, j) for j in range(acked)})
        if acked == total:
            model[_last(i)] = b"%d" % (acked - 1)
        else:
            maybe.update({_key(i, acked), _last(i)})
    return model, maybe


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
        model, maybe = _model(storm.crowd, 1)
        if lead:
            model[b"seed"] = b"s"
        reports = storm.crowd.reports.values()
        out = _summary(storm.crowd, path, model, maybe)
        out["seed_seen"] = sum(1 for r in reports if r.get("seed") == "s")
        out["open_s"] = _stats([r["open_s"] for r in reports if "open_s" in r])
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
        model, maybe = _model(storm.crowd, 3 * writes)
        reports = storm.crowd.reports.values()
        out = _summary(storm.crowd, path, model, maybe)
        out["opened_before_kill"] = opened
        ends = [r["t_end"] - t_kill for r in reports if "t_end" in r]
        out["all_done_after_kill_s"] = round(max(ends), 4) if ends else None
        out["max_write_s"] = _stats([r["max_write_s"] for r in reports if "max_write_s" in r])
        return out
    finally:
        holder.kill()


def main() -> int:
    _seams.load(os.environ)  # a test's env={"PARTYDBM_...": ...}, for the forked crowd too
    ap = argparse.ArgumentParser()
    ap.add_argument("storm", choices=["open", "failover"])
    ap.add_argument("path", type=Path)
    ap.add_argument("n", type=int)
    ap.add_argument("--lead", action="store_true", help="open: a Holder leads first")
    ap.add_argument("--leader-nofile", type=int, help="open --lead: the Holder's soft "
                    "limit on open files")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--writes", type=int, default=5)
    args = ap.parse_args()
    if args.storm == "open":
        out = run_open(args.path, args.n, args.lead, args.timeout, args.leader_nofile)
    else:
        out = run_failover(args.path, args.n, args.writes, args.timeout)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
