"""partydbm benchmark: every system side by side, same workloads, one run.

Usage (from the repository root, in the venv with the `bench` extra installed):

    .venv/bin/python bench/bench.py --quick      # ~1 minute: small N, short runs
    .venv/bin/python bench/bench.py              # full: N=20,000, bulk 1,000,000 keys
    .venv/bin/python bench/bench.py --systems party-follower,socket-rtt --workloads single

Systems: plyvel (one process: the floor), party-leader (this side leads), party-follower
(a partydbm Holder process leads; the measuring process follows), dbm.dumb, dbm.sqlite3
(run under Python 3.13: PARTYBENCH_PY313 overrides the interpreter), sqlitedict
(autocommit=True), diskcache (Cache), socket-rtt (a bare msgpack round trip over a unix
socket to a dict in another process: the floor for a follower's synchronous request).

Workloads (WORKLOADS): single (put N keys, random get, ordered iteration, p50/p99
latency), paired (partydbm and its floor in one process, alternating blocks: the
leader vs raw plyvel, the follower vs socket-rtt; the <=1.5x ratios use these), mixed4
(4 processes 90% get / 10% put), w1r3 (1 writer + 3 readers), bulk (load 1,000,000 keys,
peak RSS; then iterate them from a fresh process: memory must stay flat), openclose
(`with X.open(path, "r") as db: db[k]` in a loop, partydbm in both roles beside
dbm.sqlite3 and dbm.dumb, all in one set of interleaved blocks: bench/openclose.py),
failover (bench/failover.py). Full mode runs single, paired, mixed4 and w1r3 3 times, systems
interleaved, and keeps each system's median round (ratios within a round: the median).

Every measurement runs in a fresh worker process (bench/worker.py) on a fresh temporary
directory; results go to bench/results/latest.json and bench/results/bench.png, and a
table of per-op costs plus the target ratios (PASS/MISS) is printed. A system that
cannot run a workload shows n/a with the reason. Slow systems stop at a time budget and
are marked `*` (partial: the cost is measured over the ops that ran).

Adding a workload: write `run(ctx, system) -> {row: result}` and register it in WORKLOADS
with its `lines` for the table/plot and the systems it cannot run (`failover_stall`, which
runs bench/failover.py, is the example). A result is a dict with `us_per_op` / `ops_per_s`
/ anything, or `{"na": why}`; `RATIOS` holds the targets.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import openclose  # bench/ is sys.path[0] when this file runs as a script
from worker import mem

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "worker.py")
RESULTS = os.path.join(HERE, "results")
PY313 = os.environ.get("PARTYBENCH_PY313", "/root/.pyenv/versions/3.13.0/bin/python3.13")

SYSTEMS = ["plyvel", "party-leader", "party-follower", "dbm.dumb", "dbm.sqlite3",
           "sqlitedict", "diskcache", "lmdb", "lmdbm", "socket-rtt"]
SHORT = {"party-leader": "party-L", "party-follower": "party-F", "dbm.sqlite3": "sqlite3",
         "socket-rtt": "sock-rtt", "sqlitedict": "sqlitedict", "dbm.dumb": "dumb"}
READ99_PROCS = 4  # processes in the read99 workload (--read99-procs)
CACHE_SIZE: int | None = None  # partydbm's cache_size in the multi-process workloads
MODES = {
    "quick": dict(n=5_000, bulk_n=100_000, lat_n=2_000, mp_duration=1.0, budget=3.0,
                  bulk_budget=4.0, failover_rounds=5, rounds=1, openclose_rounds=5),
    "full": dict(n=20_000, bulk_n=1_000_000, lat_n=5_000, mp_duration=3.0, budget=30.0,
                 bulk_budget=60.0, failover_rounds=20, rounds=3, openclose_rounds=30),
}
MP_ONLY_ONE = "one process only (LevelDB's LOCK)"
NOT_MP_SAFE = "not multi-process safe (each process keeps its own index)"
SOCK_ONLY = "socket-rtt is the floor for one synchronous get/put only"

_procs: list[subprocess.Popen[str]] = []


class Failed(Exception):
    """A worker failed; the message becomes the n/a reason."""


@dataclass
class Ctx:
    mode: str
    tmp: str
    cfg: dict[str, Any]
    systems: list[str] = field(default_factory=list)  # those of this run
    _seq: int = 0
    _joint: dict[str, dict[str, Any]] = field(default_factory=dict)  # see open_close()

    def __getattr__(self, name: str) -> Any:
        try:
            return self.cfg[name]
        except KeyError:
            raise AttributeError(name) from None

    def fresh_dir(self, system: str) -> str:
        self._seq += 1
        path = os.path.join(self.tmp, f"{self._seq:03d}-{system}")
        os.mkdir(path)
        return path


# -- processes ------------------------------------------------------------------------
def python_for(system: str) -> str:
    return PY313 if system == "dbm.sqlite3" else sys.executable


def spawn(system: str, task: dict[str, Any]) -> subprocess.Popen[str]:
    proc = subprocess.Popen([python_for(system), WORKER, json.dumps(task)], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    _procs.append(proc)
    return proc


def reap(proc: subprocess.Popen[str], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()
    if proc in _procs and proc.returncode is not None:
        _procs.remove(proc)


def _why(proc: subprocess.Popen[str], err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    return f"worker failed (exit {proc.returncode}): {lines[-1] if lines else 'no output'}"


def run_worker(system: str, task: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one task to completion (deadline `timeout`); its result dict."""
    proc = spawn(system, {**task, "system": system})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        reap(proc)
        raise Failed(f"worker timed out after {timeout:.0f}s") from None
    finally:
        reap(proc)
    if proc.returncode != 0 or not out.strip():
        raise Failed(_why(proc, err))
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """One line from a worker's stdout, or "" at the deadline or EOF. Reads the fd a
    byte at a time: no read-ahead can hide a second line from select()."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    out = b""
    while not out.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return ""
        byte = os.read(fd, 1)
        if not byte:
            return ""
        out += byte
    return out.decode()


@contextlib.contextmanager
def serving(system: str, path: str) -> Iterator[dict[str, Any]]:
    """What must run beside the measured process: a Holder leading for party-follower,
    the dict server for socket-rtt. Yields extra task fields."""
    if system == "party-follower":
        root = os.path.dirname(HERE)  # the repository root, for the tests' Holder
        if root not in sys.path:
            sys.path.insert(0, root)
        from tests.procs import Holder

        with Holder(timeout=60) as holder:
            role = holder.open(path)
            if role != "leader":
                raise Failed(f"the Holder opened as {role}, not leader")
            yield {"role": "follower", "leader_pid": holder.pid}
    elif system == "socket-rtt":
        address = os.path.join(path, "rtt.sock")
        proc = spawn(system, {"task": "sockserver", "address": address})
        try:
            if read_line(proc, 30).strip() != "ready":
                raise Failed("socket-rtt server did not start")
            yield {"address": address, "server_pid": proc.pid}
        finally:
            if proc.poll() is None:
                proc.terminate()
            reap(proc)
    elif system == "party-leader":
        yield {"role": "leader"}
    else:
        yield {}


# -- workloads ------------------------------------------------------------------------
@dataclass
class Line:
    """One table line: `row` of the results, `field` of each system's result dict."""

    row: str
    field: str
    label: str
    table: str = "cost"  # "cost" (µs, lower is better) or "rate" (rates and memory)
    plot: bool = False


@dataclass
class Workload:
    run: Callable[[Ctx, str], dict[str, dict[str, Any]]] | None
    rows: tuple[str, ...]
    lines: tuple[Line, ...]
    na: dict[str, str] = field(default_factory=dict)  # system -> why it cannot run
    repeat: bool = False  # run `rounds` times, keep the median (cheap workloads only)
    quiet_na: bool = False  # show the systems in `na` as blank, not as n/a


def single(ctx: Ctx, system: str) -> dict[str, dict[str, Any]]:
    path = ctx.fresh_dir(system)
    with serving(system, path) as extra:
        r = run_worker(system, {"task": "session", "path": path, "n": ctx.n,
                                "budget": ctx.budget, "lat_n": ctx.lat_n, **extra},
                       timeout=6 * ctx.budget + 120)
    out = {k: r[k] for k in ("put", "get", "get_again", "lat_get", "lat_put")}
    out["iter"] = r.get("iter") or {"na": SOCK_ONLY}
    out["get_many"] = r.get("get_many") or {"na": "no batched get", "quiet": True}
    return out


def multi(kind: str) -> Callable[[Ctx, str], dict[str, dict[str, Any]]]:
    # The first process opens before the others start: with party-leader it leads (in
    # w1r3, the writer leads, as a writer daemon started before its readers would).
    def run(ctx: Ctx, system: str) -> dict[str, dict[str, Any]]:
        roles = {"mixed4": ["mixed"] * 4, "w1r3": ["writer", "reader", "reader", "reader"],
                 "read99": ["read99"] * READ99_PROCS}[kind]
        path = ctx.fresh_dir(system)
        with serving(system, path) as extra:
            if system == "party-leader":
                extra = {}  # whoever opens first leads
            run_worker(system, {"task": "bulk", "path": path, "n": ctx.n, "budget": 1e9,
                                **extra}, timeout=600)
            procs: list[subprocess.Popen[str]] = []
            try:
                for i, role in enumerate(roles):
                    procs.append(spawn(system, {
                        "task": "mp", "system": system, "path": path, "n": ctx.n,
                        "mp_role": role, "seed": i, "duration": ctx.mp_duration, **extra,
                        **({"cache_size": CACHE_SIZE} if CACHE_SIZE is not None
                           and system.startswith("party") else {})}))
                    if i == 0 and read_line(procs[0], 1800).strip() != "ready":
                        raise _fail(procs[0])  # the first opens alone: party-L's leader
                return {kind: _drive(procs, ctx.mp_duration, kind)}
            finally:
                for proc in procs:
                    with contextlib.suppress(OSError):
                        assert proc.stdin is not None
                        proc.stdin.close()
                for proc in procs:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(30)
                    reap(proc)
    return run


def _fail(proc: subprocess.Popen[str]) -> Failed:
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    err = proc.stderr.read() if proc.stderr is not None else ""
    reap(proc)
    return Failed(_why(proc, err))


def _drive(procs: list[subprocess.Popen[str]], duration: float, kind: str) -> dict[str, Any]:
    for proc in procs[1:]:
        if read_line(proc, 1800).strip() != "ready":
            raise _fail(proc)
    for proc in procs:
        assert proc.stdin is not None
        try:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        except OSError:
            raise _fail(proc) from None
    results = []
    for proc in procs:
        line = read_line(proc, duration + 60)
        if not line.strip():
            raise _fail(proc)
        results.append(json.loads(line))
    total = sum(r["ops_per_s"] for r in results)
    errors: dict[str, int] = {}
    for r in results:
        for name, count in r["errors"].items():
            errors[name] = errors.get(name, 0) + count
    out: dict[str, Any] = {"ops_per_s": total, "us_per_op": 1e6 / total if total else None,
                           "errors": errors, "procs": results}
    if kind == "w1r3":
        out["writer_ops_per_s"] = sum(r["ops_per_s"] for r in results if r["role"] == "writer")
        out["readers_ops_per_s"] = sum(r["ops_per_s"] for r in results
                                       if r["role"] == "reader")
        out["min_reader_ops_per_s"] = min(r["ops_per_s"] for r in results
                                          if r["role"] == "reader")
    out["min_proc_ops_per_s"] = min(r["ops_per_s"] for r in results)
    cached = [r for r in results if "cache_misses" in r]
    if cached:  # partydbm followers: the share of their gets answered from their cache
        gets = sum(r["gets"] for r in cached)
        out["cache_hit_pct"] = 100.0 * (1 - sum(r["cache_misses"] for r in cached) / gets
                                        ) if gets else None
    out["max_warm_s"] = max(r.get("warm_s", 0.0) for r in results)
    leaders = [r["role"] for r in results if r["db_role"] == "leader"]
    notes = []
    if leaders and kind == "w1r3":
        out["leader_role"] = leaders[0]
        notes.append(f"the {leaders[0]} process led")
    if errors:
        notes.append(f"errors: {errors}")
    if notes:
        out["note"] = "; ".join(notes)
    return out


def bulk(ctx: Ctx, system: str) -> dict[str, dict[str, Any]]:
    path = ctx.fresh_dir(system)
    with serving(system, path) as extra:
        leader = extra.get("leader_pid")
        b = run_worker(system, {"task": "bulk", "path": path, "n": ctx.bulk_n,
                                "budget": ctx.bulk_budget, **extra},
                       timeout=3 * ctx.bulk_budget + 300)["bulk"]
        if leader:
            b["leader_mem"] = mem(leader)
        its = []
        for _ in range(ctx.rounds):  # cheap ones again: keep the median
            its.append(run_worker(system, {"task": "iterbulk", "path": path, "n": b["ops"],
                                           "budget": ctx.bulk_budget, **extra},
                                  timeout=3 * ctx.bulk_budget + 300)["iter_bulk"])
            if its[-1]["seconds"] > 10:
                break
        it = median_round(its)
        if leader:
            it["leader_mem"] = mem(leader)
    return {"bulk": b, "iter_bulk": it}


def paired(ctx: Ctx, system: str) -> dict[str, dict[str, Any]]:
    path = ctx.fresh_dir(system)
    with contextlib.ExitStack() as stack:
        extra = stack.enter_context(serving(system, path))
        ref_path = ctx.fresh_dir("floor")
        if system == "party-follower":
            extra.update(stack.enter_context(serving("socket-rtt", ref_path)))
        # A follower's get against the bare round trip: without its cache, which would
        # answer every get in-process (the cached get is the single workload's party-F).
        r = run_worker(system, {"task": "paired", "path": path, "ref_path": ref_path,
                                "n": ctx.n, "cache_size": 0, **extra},
                       timeout=6 * ctx.budget + 120)
    return {"paired": r["paired"]}


def failover_stall(ctx: Ctx, system: str) -> dict[str, dict[str, Any]]:
    """The failover stall (bench/failover.py, run in its own process): from SIGKILL of a
    leader to the completion of a follower's request blocked on it."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import failover; "
            "print(json.dumps(failover.measure(int(sys.argv[2]))))")
    proc = subprocess.Popen([sys.executable, "-c", code, HERE, str(ctx.failover_rounds)],
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _procs.append(proc)
    try:
        out, err = proc.communicate(timeout=30 + 15 * ctx.failover_rounds)
    except subprocess.TimeoutExpired:
        reap(proc)
        raise Failed("failover measurement timed out") from None
    finally:
        reap(proc)
    if proc.returncode != 0 or not out.strip():
        raise Failed(_why(proc, err))
    return {"failover": json.loads(out.strip().splitlines()[-1])}


def open_close(ctx: Ctx, system: str) -> dict[str, dict[str, Any]]:
    """bench/openclose.py: every system's open+get+close, measured together in one set
    of interleaved blocks. The first system of a round runs them all; the others take
    their share."""
    if system not in ctx._joint:
        wanted = [s for s in openclose.SYSTEMS if s in ctx.systems and not unavailable(s)]
        try:
            ctx._joint = openclose.measure(wanted, ctx.tmp, ctx.openclose_rounds, python_for)
        except RuntimeError as exc:
            raise Failed(str(exc)) from None
    return {"openclose": ctx._joint.pop(system)}


NO_MP = {"plyvel": MP_ONLY_ONE, "dbm.dumb": NOT_MP_SAFE, "socket-rtt": SOCK_ONLY}
WORKLOADS: dict[str, Workload] = {
    "single": Workload(single, ("put", "get", "get_again", "get_many", "iter", "lat_get",
                                "lat_put"), (
        Line("put", "us_per_op", "put", plot=True),
        Line("get", "us_per_op", "random get, first read of each key", plot=True),
        Line("get_again", "us_per_op", "random get, second pass", plot=True),
        Line("get_many", "us_per_op", "random get, get_many() of 100 /key"),
        Line("iter", "us_per_op", "ordered iteration /key", plot=True),
        Line("lat_get", "p50_us", "get latency p50", plot=True),
        Line("lat_get", "p99_us", "get latency p99"),
        Line("lat_put", "p50_us", "put latency p50", plot=True),
        Line("lat_put", "p99_us", "put latency p99")), repeat=True),
    "paired": Workload(paired, ("paired",), (
        Line("paired", "get.us_per_op", "get, paired with floor (F: 1 CPU)"),
        Line("paired", "get_floor.us_per_op", "  its floor, same blocks"),
        Line("paired", "put.us_per_op", "put, paired with floor (F: 1 CPU)"),
        Line("paired", "put_floor.us_per_op", "  its floor, same blocks"),
        Line("paired", "split.get.us_per_op", "get, paired, F on 2 CPUs"),
        Line("paired", "split.get_floor.us_per_op", "  its floor, same blocks")),
        {s: "paired runs: party-L vs plyvel, party-F vs socket-rtt" for s in SYSTEMS
         if not s.startswith("party")}, repeat=True, quiet_na=True),
    "mixed4": Workload(multi("mixed4"), ("mixed4",), (
        Line("mixed4", "us_per_op", "4 procs 90/10 get/put (1/agg)", plot=True),
        Line("mixed4", "ops_per_s", "4 procs 90/10 aggregate ops/s", "rate"),
        Line("mixed4", "min_proc_ops_per_s", "4 procs 90/10 slowest proc ops/s", "rate"),
        Line("mixed4", "cache_hit_pct", "4 procs 90/10 follower cache hits %", "rate")),
        NO_MP, repeat=True),
    "w1r3": Workload(multi("w1r3"), ("w1r3",), (
        Line("w1r3", "us_per_op", "1 writer + 3 readers (1/agg)", plot=True),
        Line("w1r3", "ops_per_s", "1w+3r aggregate ops/s", "rate"),
        Line("w1r3", "writer_ops_per_s", "1w+3r writer ops/s", "rate"),
        Line("w1r3", "readers_ops_per_s", "1w+3r readers ops/s (sum)", "rate"),
        Line("w1r3", "min_reader_ops_per_s", "1w+3r slowest reader ops/s", "rate"),
        Line("w1r3", "cache_hit_pct", "1w+3r follower cache hits %", "rate"),
        Line("w1r3", "max_warm_s", "1w+3r warm-up s (read each key once)", "rate")), NO_MP,
        repeat=True),
    "read99": Workload(multi("read99"), ("read99",), (
        Line("read99", "us_per_op", "P procs 99/1 get/put (1/agg)", plot=True),
        Line("read99", "ops_per_s", "P procs 99/1 aggregate ops/s", "rate"),
        Line("read99", "min_proc_ops_per_s", "P procs 99/1 slowest proc ops/s", "rate"),
        Line("read99", "cache_hit_pct", "P procs 99/1 follower cache hits %", "rate"),
        Line("read99", "max_warm_s", "P procs 99/1 warm-up s (read each key once)", "rate")),
        NO_MP, repeat=True),
    "bulk": Workload(bulk, ("bulk", "iter_bulk"), (
        Line("bulk", "us_per_op", "bulk load /key", plot=True),
        Line("iter_bulk", "us_per_op", "iterate bulk keys /key", plot=True),
        Line("bulk", "ops_per_s", "bulk load keys/s", "rate"),
        Line("bulk", "seconds", "bulk load seconds", "rate"),
        Line("bulk", "mem.hwm_mb", "bulk: loader peak RSS MB", "rate"),
        Line("bulk", "peak_anon_mb", "bulk: loader peak anon MB", "rate"),
        Line("bulk", "leader_mem.hwm_mb", "bulk: leader peak RSS MB", "rate"),
        Line("iter_bulk", "ops_per_s", "iterate bulk keys/s", "rate"),
        Line("iter_bulk", "mem.hwm_mb", "iterate bulk: peak RSS MB", "rate"),
        Line("iter_bulk", "hwm_growth_mb", "iterate bulk: peak RSS growth MB", "rate"),
        Line("iter_bulk", "anon_growth_mb", "iterate bulk: anon growth MB", "rate")),
        {"socket-rtt": SOCK_ONLY}),
    "openclose": Workload(open_close, ("openclose",), (
        Line("openclose", "us_per_op", "open+get+close", plot=True),
        Line("openclose", "cold.us_per_op", "open+get+close, grace over")),
        {s: "open+get+close: partydbm, dbm.sqlite3 and dbm.dumb" for s in SYSTEMS
         if s not in openclose.SYSTEMS}, quiet_na=True),
    # The failover stall: only a follower can measure it (bench/failover.py).
    "failover": Workload(failover_stall, ("failover",), (
        Line("failover", "median_ms", "failover stall median ms", "rate"),
        Line("failover", "max_ms", "failover stall max ms", "rate")),
        {s: "failover is measured from a follower (party-F)" for s in SYSTEMS
         if s != "party-follower"}),
}

# (label, row, system, baseline or None, field, op, target); cost ratios compare
# us_per_op (lower is better), rate ratios ops_per_s.
RATIOS = [
    # partydbm and its floor in the same process, alternating blocks (the "paired" rows)
    ("leader get / raw plyvel (paired)", "paired", "party-leader", None, "get_ratio",
     "<=", 1.5),
    ("leader put / raw plyvel (paired)", "paired", "party-leader", None, "put_ratio",
     "<=", 1.5),
    ("follower get / bare socket, paired, one CPU", "paired", "party-follower", None,
     "get_ratio", "<=", 1.5),
    ("follower get / bare socket, paired, two CPUs", "paired", "party-follower", None,
     "split.get_ratio", "<=", 1.5),
    ("follower iteration rate / leader-local (bulk keys)", "iter_bulk", "party-follower",
     "party-leader", "ops_per_s", ">=", 0.40),
    ("follower bulk write keys/s (update())", "bulk", "party-follower", None, "ops_per_s",
     ">=", 100_000),
    ("4-proc mixed ops/s: partydbm / diskcache", "mixed4", "party-leader", "diskcache",
     "ops_per_s", ">=", 1.0),
    ("4-proc mixed ops/s: partydbm / dbm.sqlite3", "mixed4", "party-leader", "dbm.sqlite3",
     "ops_per_s", ">=", 5.0),
    ("1w+3r readers ops/s: partydbm / dbm.sqlite3", "w1r3", "party-leader", "dbm.sqlite3",
     "readers_ops_per_s", ">=", 1.0),
    ("4-proc 99/1 slowest proc: partydbm / dbm.sqlite3", "read99", "party-leader",
     "dbm.sqlite3", "min_proc_ops_per_s", ">=", 2.0),
    ("4-proc 99/1 slowest proc: partydbm / LMDB", "read99", "party-leader", "lmdb",
     "min_proc_ops_per_s", ">=", 0.5),
    ("leader put rate / diskcache put rate", "put", "party-leader", "diskcache", "ops_per_s",
     ">=", 5.0),
    ("open+get+close, leading itself / dbm.sqlite3", "openclose", "party-leader",
     "dbm.sqlite3", "us_per_op", "<=", 1.0),
    ("open+get+close, another process leads / dbm.sqlite3", "openclose", "party-follower",
     "dbm.sqlite3", "us_per_op", "<=", 1.0),
    ("failover stall median ms (bench/failover.py)", "failover", "party-follower", None,
     "median_ms", "<=", 20),
    # information only (no target)
    ("open+get+close, leading itself / dbm.dumb", "openclose", "party-leader", "dbm.dumb",
     "us_per_op", "", None),
    ("open+get+close, another process leads / dbm.dumb", "openclose", "party-follower",
     "dbm.dumb", "us_per_op", "", None),
    ("follower put / bare socket, paired, one CPU", "paired", "party-follower", None,
     "put_ratio", "", None),
    ("follower put / bare socket, paired, two CPUs", "paired", "party-follower", None,
     "split.put_ratio", "", None),
    ("leader get / raw plyvel (separate sessions)", "get", "party-leader", "plyvel",
     "us_per_op", "", None),
    ("leader put / raw plyvel (separate sessions)", "put", "party-leader", "plyvel",
     "us_per_op", "", None),
    ("follower get from its cache / leader get (second pass)", "get_again", "party-follower",
     "party-leader", "us_per_op", "", None),
    ("follower get / socket-rtt (separate sessions)", "get", "party-follower", "socket-rtt",
     "us_per_op", "", None),
    ("4-proc mixed ops/s, all followers / diskcache", "mixed4", "party-follower", "diskcache",
     "ops_per_s", "", None),
    ("4-proc mixed ops/s, all followers / dbm.sqlite3", "mixed4", "party-follower",
     "dbm.sqlite3", "ops_per_s", "", None),
]


def unavailable(system: str) -> str | None:
    needs = {"plyvel": "plyvel", "party-leader": "partydbm", "party-follower": "partydbm",
             "sqlitedict": "sqlitedict", "diskcache": "diskcache", "socket-rtt": "msgpack"}
    if system in needs and importlib.util.find_spec(needs[system]) is None:
        return f"module {needs[system]} not installed"
    if system == "dbm.sqlite3":
        if not os.path.exists(PY313):
            return f"needs Python 3.13: {PY313} not found"
        ok = subprocess.run([PY313, "-c", "import dbm.sqlite3"], capture_output=True,
                            timeout=60).returncode == 0
        return None if ok else f"{PY313} cannot import dbm.sqlite3"
    return None


# -- the run --------------------------------------------------------------------------
def run_all(ctx: Ctx, systems: list[str], workloads: list[str]) -> dict[str, Any]:
    """Every workload on every system. A `repeat` workload runs `rounds` times, systems
    interleaved, and keeps each system's median round: the machine's load drifts."""
    results: dict[str, dict[str, Any]] = {}
    missing = {s: unavailable(s) for s in systems}
    for wname in workloads:
        w = WORKLOADS[wname]
        if w.run is None:
            continue
        runs: dict[str, list[dict[str, dict[str, Any]]]] = {s: [] for s in systems}
        rounds = ctx.rounds if w.repeat else 1
        for r in range(rounds):
            for system in systems:
                why = missing[system] or w.na.get(system)
                t0 = time.monotonic()
                if why:
                    quiet = w.quiet_na and not missing[system]
                    got = {row: {"na": why, "quiet": quiet} for row in w.rows}
                else:
                    try:
                        got = w.run(ctx, system)
                    except Failed as exc:
                        got = {row: {"na": str(exc)} for row in w.rows}
                    except Exception as exc:  # a bench bug: say so, go on with the rest
                        traceback.print_exc()
                        got = {row: {"na": f"bench error: {exc!r}"} for row in w.rows}
                    finally:
                        for entry in os.listdir(ctx.tmp):
                            shutil.rmtree(os.path.join(ctx.tmp, entry), ignore_errors=True)
                runs[system].append(got)
                if why and r:
                    continue
                tag = f" {r + 1}/{rounds}" if rounds > 1 else ""
                print(f"  {wname + tag:<12} {system:<15} {time.monotonic() - t0:6.1f}s"
                      f"{'  n/a: ' + why if why else ''}", file=sys.stderr, flush=True)
        for system, gots in runs.items():
            for row in w.rows:
                results.setdefault(row, {})[system] = median_round([g[row] for g in gots])
    return results


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median cost (failed rounds dropped), with every round's cost."""
    ok = sorted((r for r in rounds if "na" not in r), key=lambda r: r.get("us_per_op") or 0)
    if not ok:
        return rounds[0]
    if len(rounds) == 1:
        return ok[0]
    pick = dict(ok[(len(ok) - 1) // 2])
    pick["rounds_us_per_op"] = [r.get("us_per_op") for r in ok]
    # ratios measured inside one round (paired): the median over the rounds
    for name in [None, *(k for k, v in pick.items() if isinstance(v, dict))]:
        if name is not None:
            pick[name] = dict(pick[name])
        at = pick if name is None else pick[name]
        for key in [k for k in at if k.endswith("_ratio")]:
            got = sorted(x for x in (value(r, key if name is None else f"{name}.{key}")
                                     for r in ok) if x is not None)
            at["rounds_" + key] = got
            at[key] = got[(len(got) - 1) // 2]
    if len(ok) < len(rounds):
        pick["note"] = f"{len(rounds) - len(ok)} of {len(rounds)} rounds failed"
    return pick


def value(res: dict[str, Any] | None, path: str) -> float | None:
    cur: Any = res
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return float(cur) if isinstance(cur, (int, float)) and not isinstance(cur, bool) else None


def ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for label, row, system, base, fld, op, target in RATIOS:
        got = value(results.get(row, {}).get(system), fld)
        ref = 1.0 if base is None else value(results.get(row, {}).get(base), fld)
        entry: dict[str, Any] = {"label": label, "row": row, "system": system,
                                 "baseline": base, "field": fld, "op": op, "target": target}
        if got is None or not ref:
            entry["verdict"] = "n/a"
        else:
            entry["value"] = got / ref
            if target is None:
                entry["verdict"] = "info"
            else:
                ok = entry["value"] <= target if op == "<=" else entry["value"] >= target
                entry["verdict"] = "PASS" if ok else "MISS"
        out.append(entry)
    return out


def fmt(x: float) -> str:
    if x >= 100_000:
        return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.0f}k"
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:.3g}" if x >= 1 else f"{x:.2f}"


def table(results: dict[str, Any], systems: list[str], kind: str, width: int = 11) -> str:
    lines = [ln for w in WORKLOADS.values() for ln in w.lines if ln.table == kind]
    head = f"{'':<34}" + "".join(f"{SHORT.get(s, s):>{width}}" for s in systems)
    rows, notes = [head], []
    remarks: list[tuple[str, str, str]] = []
    for ln in lines:
        if ln.row not in results:
            continue
        cells = []
        for s in systems:
            res = results[ln.row].get(s, {})
            v = value(res, ln.field)
            if res.get("quiet"):
                cells.append("")
            elif "na" in res:
                cells.append("n/a")
                note = f"{SHORT.get(s, s)}: {res['na']}"
                if note not in notes:
                    notes.append(note)
            elif v is None:
                cells.append("-")
            else:
                cells.append(fmt(v) + ("*" if res.get("partial") else ""))
                remark = res.get("note", "")
                if res.get("ordered") is False:
                    remark = "not in key order"
                if remark and (ln.row, s, remark) not in remarks:
                    remarks.append((ln.row, s, remark))
        rows.append(f"{ln.label:<34}" + "".join(f"{c:>{width}}" for c in cells))
    if kind == "rate":
        rows += ["", "RSS counts mmapped LevelDB tables (page cache); anon = heap, sampled"]
    if kind == "cost":
        rows += ["", "* partial: stopped at the time budget; cost measured over the ops run"]
        rows += [f"n/a  {n}" for n in notes]
        for row in dict.fromkeys(r[0] for r in remarks):
            rows.append(f"note {row}: " + "; ".join(
                f"{SHORT.get(s, s)} {text}" for r, s, text in remarks if r == row))
    return "\n".join(rows)


def plot(results: dict[str, Any], systems: list[str], meta: dict[str, Any], out: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot"
    lines = [ln for w in WORKLOADS.values() for ln in w.lines
             if ln.plot and ln.row in results]
    fig, ax = plt.subplots(figsize=(15, 6.5))
    width = 0.8 / len(systems)
    for i, s in enumerate(systems):
        xs, ys, hatch = [], [], []
        for j, ln in enumerate(lines):
            res = results[ln.row].get(s) or {}
            v = value(res, ln.field)
            if v:
                xs.append(j + (i - (len(systems) - 1) / 2) * width)
                ys.append(v)
                hatch.append("//" if res.get("partial") else "")
        bars = ax.bar(xs, ys, width, label=s, color=f"C{i}")
        for bar, h in zip(bars, hatch, strict=True):
            bar.set_hatch(h)
    ax.set_yscale("log")
    ax.set_xticks(range(len(lines)))
    ax.set_xticklabels([ln.label for ln in lines], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("µs per op (log; lower is better)")
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(ncol=len(systems), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    ax.text(1.0, 1.01, "hatched: partial (time budget)", transform=ax.transAxes, ha="right",
            fontsize=7)
    ax.set_title(f"partydbm bench ({meta['mode']}, N={meta['n']:,}, bulk {meta['bulk_n']:,}): "
                 f"{meta['machine']}, {meta['cpus']} CPUs, {meta['date']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    global READ99_PROCS, CACHE_SIZE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, whole run ~1 min")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--out", default=RESULTS, help="directory for latest.json, bench.png")
    ap.add_argument("--read99-procs", type=int, default=4,
                    help="processes in the read99 workload (the scaling table)")
    ap.add_argument("--n", type=int, default=None, help="keys (default: the mode's)")
    ap.add_argument("--cache-size", type=int, default=None, metavar="BYTES",
                    help="partydbm's cache_size in the multi-process workloads "
                         "(default: partydbm's own)")
    args = ap.parse_args(argv)
    READ99_PROCS, CACHE_SIZE = args.read99_procs, args.cache_size
    systems = [s for s in args.systems.split(",") if s]
    workloads = [w for w in args.workloads.split(",") if w]
    for name, known in ((systems, SYSTEMS), (workloads, list(WORKLOADS))):
        bad = set(name) - set(known)
        if bad:
            ap.error(f"unknown {sorted(bad)}; choose from {known}")
    mode = "quick" if args.quick else "full"
    cfg = {**MODES[mode], **({"n": args.n} if args.n else {})}
    meta = {"mode": mode, "machine": platform.node(), "cpus": os.cpu_count(),
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "python": sys.version.split()[0], "python313": PY313, **cfg,
            "read99_procs": READ99_PROCS, "cache_size": CACHE_SIZE}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = tempfile.mkdtemp(prefix="partybench-")
    t0 = time.monotonic()
    print(f"partydbm bench, {mode}: {meta['machine']}, {meta['cpus']} CPUs, {meta['date']}",
          file=sys.stderr)
    try:
        results = run_all(Ctx(mode, tmp, cfg, systems), systems, workloads)
    finally:
        for proc in list(_procs):
            reap(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    meta["seconds"] = round(time.monotonic() - t0, 1)
    rat = ratios(results)
    print(f"\npartydbm bench ({mode}; N={meta['n']:,} keys of 16 B + 100 B values, "
          f"P={READ99_PROCS} processes in read99, bulk "
          f"{meta['bulk_n']:,}) on {meta['machine']}, {meta['cpus']} CPUs, {meta['date']}, "
          f"{meta['seconds']}s\n")
    print("per-op cost, µs (lower is better)")
    print(table(results, systems, "cost"))
    rates = table(results, systems, "rate")
    if any(ln.row in results for w in WORKLOADS.values() for ln in w.lines
           if ln.table == "rate"):
        print("\nrates and memory")
        print(rates)
    print("\ntarget ratios (one run)")
    for r in rat:
        shown = "n/a" if "value" not in r else (
            f"{r['value']:.2f}x" if r["baseline"] or r["field"].endswith("_ratio")
            else f"{r['value']:,.{r['value'] < 100:d}f}")
        goal = f"(target {r['op']} {r['target']:,})" if r["target"] is not None else ""
        print(f"  {r['verdict']:<4}  {r['label']:<52} {shown:>10}  {goal}")
    os.makedirs(args.out, exist_ok=True)
    dest = os.path.join(args.out, "latest.json")
    with open(dest + ".tmp", "w") as f:
        json.dump({"meta": meta, "results": results, "ratios": rat}, f, indent=1)
    os.replace(dest + ".tmp", dest)
    png = plot(results, systems, meta, os.path.join(args.out, "bench.png"))
    print(f"\nwrote {dest}; plot: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
