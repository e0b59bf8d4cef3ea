"""The machinery of the crowd worker (crowd.py): children forked at once, gates, reports,
deadlines, reaping, and the model their writes are checked against."""

from __future__ import annotations

import json
import os
import select
import signal
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import partydbm

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


def key(i: int, j: int) -> bytes:
    return b"c%d-%d" % (i, j)


def value(i: int, j: int) -> bytes:
    return b"v%d-%d" % (i, j)


def last(i: int) -> bytes:
    return b"c%d" % i


class Child:
    """What runs in each forked child; `report` writes its one JSON line."""

    def __init__(self, i: int, results_w: int) -> None:
        self.i = i
        self.results_w = results_w
        self.out: dict[str, Any] = {"i": i, "pid": os.getpid()}

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
            wb.put(key(self.i, j), value(self.i, j))
            wb.put(last(self.i), b"%d" % j)
        self.out["acked"] = j + 1
        self.out["max_write_s"] = max(self.out.get("max_write_s", 0.0), time.monotonic() - t)

    def check(self, db: Any, writes: int) -> None:
        bad = [j for j in range(writes) if db.get(key(self.i, j)) != value(self.i, j)]
        if db.get(last(self.i)) != b"%d" % (writes - 1):
            bad.append(-1)
        self.out["bad"] = bad


def fork_children(n: int, body: Callable[[Child], None], results_w: int,
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
        self.pids = fork_children(self.n, body, self.results_w, gates)
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


def summary(crowd: Crowd, path: Path, model: dict[bytes, bytes],
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


def stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"median": round(statistics.median(values), 4), "max": round(max(values), 4)}


def model_of(crowd: Crowd, total: int) -> tuple[dict[bytes, bytes], set[bytes]]:
    """What the database must hold after each child wrote `total` steps, as far as each
    says they were acknowledged; and the keys a child that failed may or may not have
    written (its write in flight)."""
    model: dict[bytes, bytes] = {}
    maybe: set[bytes] = set()
    for i in range(crowd.n):
        acked = crowd.reports.get(i, {}).get("acked", 0)
        model.update({key(i, j): value(i, j) for j in range(acked)})
        if acked == total:
            model[last(i)] = b"%d" % (acked - 1)
        else:
            maybe.update({key(i, acked), last(i)})
    return model, maybe



def be_subreaper() -> None:
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def helpers_alive(path: Path) -> int:
    """How many `python -m partydbm._helper PATH` processes are alive."""
    want = b"partydbm._helper\0" + os.fsencode(path) + b"\0"
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                count += want in f.read()
        except OSError:
            pass
    return count


def reap_all(pgid: int, deadline: float) -> dict[int, int]:
    """Reap every child and orphan until none is left (their exit codes by pid); at the
    deadline SIGKILL the group P made (the crowd and its helpers) first."""
    codes: dict[int, int] = {}
    while True:
        try:
            done, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return codes
        if done:
            codes[done] = os.waitstatus_to_exitcode(status)
        elif time.monotonic() > deadline:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = float("inf")  # the next waitpid()s reap what the kill ended
        else:
            time.sleep(0.005)
