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

Every measurement runs in a fresh worker process (bench/worker.py) on a fresh temporary
directory; results go to bench/results/latest.json and bench/results/bench.png, and a
table of per-op costs plus the target ratios (PASS/MISS) is printed. A system that
cannot run a workload shows n/a with the reason. Slow systems stop at a time budget and
are marked `*` (partial: the cost is measured over the ops that ran).

Adding a workload (e.g. the failover stall): write `run(ctx, system) -> {row: result}`
and fill its slot in WORKLOADS (see `failover_stall` below); give it `lines` for the
table/plot. A result is a dict with `us_per_op` / `ops_per_s` / anything, or `{"na": why}`.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "worker.py")
RESULTS = os.path.join(HERE, "results")
PY313 = os.environ.get("PARTYBENCH_PY313", "/root/.pyenv/versions/3.13.0/bin/python3.13")

SYSTEMS = ["plyvel", "party-leader", "party-follower", "dbm.dumb", "dbm.sqlite3",
           "sqlitedict", "diskcache", "socket-rtt"]
SHORT = {"party-leader": "party-L", "party-follower": "party-F", "dbm.sqlite3": "sqlite3",
         "socket-rtt": "sock-rtt", "sqlitedict": "sqlitedict", "dbm.dumb": "dumb"}
MODES = {
    "quick": dict(n=2_000, bulk_n=100_000, lat_n=1_000, mp_duration=1.0, budget=3.0,
                  bulk_budget=4.0),
    "full": dict(n=20_000, bulk_n=1_000_000, lat_n=5_000, mp_duration=5.0, budget=30.0,
                 bulk_budget=60.0),
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
    _seq: int = 0

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
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


@contextlib.contextmanager
def serving(system: str, path: str) -> Iterator[dict[str, Any]]:
    """What must run beside the measured process: a Holder leading for party-follower,
    the dict server for socket-rtt. Yields extra task fields."""
    if system == "party-follower":
        from partydbm._holder import Holder

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
            yield {"address": address}
        finally:
            if proc.poll() is None:
                proc.terminate()
            reap(proc)
    elif system == "party-leader":
        yield {"role": "leader"}
    else:
        yield {}


def proc_mem(pid: int) -> dict[str, float]:
    out = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                out["hwm_mb" if line[2] == "H" else "rss_mb"] = int(line.split()[1]) / 1024
    return out


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


def single(ctx: Ctx, system: str) -> dict[str, dict[str, Any]]:
    path = ctx.fresh_dir(system)
    with serving(system, path) as extra:
        r = run_worker(system, {"task": "session", "path": path, "n": ctx.n,
                                "budget": ctx.budget, "lat_n": ctx.lat_n, **extra},
                       timeout=6 * ctx.budget + 120)
    out = {k: r[k] for k in ("put", "get", "lat_get", "lat_put")}
    out["iter"] = r.get("iter") or {"na": SOCK_ONLY}
    return out


def multi(kind: str) -> Callable[[Ctx, str], dict[str, dict[str, Any]]]:
    roles = ["mixed"] * 4 if kind == "mixed4" else ["writer", "reader", "reader", "reader"]

    def run(ctx: Ctx, system: str) -> dict[str, dict[str, Any]]:
        path = ctx.fresh_dir(system)
        with serving(system, path) as extra:
            if system == "party-leader":
                extra = {}  # whoever opens first leads
            run_worker(system, {"task": "bulk", "path": path, "n": ctx.n, "budget": 1e9,
                                **extra}, timeout=600)
            procs = [spawn(system, {"task": "mp", "system": system, "path": path,
                                    "n": ctx.n, "mp_role": role, "seed": i,
                                    "duration": ctx.mp_duration, **extra})
                     for i, role in enumerate(roles)]
            try:
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
    for proc in procs:
        if read_line(proc, 60).strip() != "ready":
            raise _fail(proc)
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
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
    leaders = [r["role"] for r in results if r["db_role"] == "leader"]
    if leaders:
        out["leader_role"] = leaders[0]
    if errors:
        out["note"] = f"errors: {errors}"
    return out


def bulk(ctx: Ctx, system: str) -> dict[str, dict[str, Any]]:
    path = ctx.fresh_dir(system)
    with serving(system, path) as extra:
        leader = extra.get("leader_pid")
        b = run_worker(system, {"task": "bulk", "path": path, "n": ctx.bulk_n,
                                "budget": ctx.bulk_budget, **extra},
                       timeout=3 * ctx.bulk_budget + 300)["bulk"]
        if leader:
            b["leader_mem"] = proc_mem(leader)
        it = run_worker(system, {"task": "iterbulk", "path": path, "n": b["ops"], **extra},
                        timeout=600)["iter_bulk"]
        if leader:
            it["leader_mem"] = proc_mem(leader)
    return {"bulk": b, "iter_bulk": it}


def failover_stall(ctx: Ctx, system: str) -> dict[str, dict[str, Any]]:
    """SLOT (not written yet): the failover stall workload. Kill the leader mid-load and
    measure how long followers stall; return {"failover": {"us_per_op"/..., ...}}."""
    raise NotImplementedError


NO_MP = {"plyvel": MP_ONLY_ONE, "dbm.dumb": NOT_MP_SAFE, "socket-rtt": SOCK_ONLY}
WORKLOADS: dict[str, Workload] = {
    "single": Workload(single, ("put", "get", "iter", "lat_get", "lat_put"), (
        Line("put", "us_per_op", "put", plot=True),
        Line("get", "us_per_op", "random get", plot=True),
        Line("iter", "us_per_op", "ordered iteration /key", plot=True),
        Line("lat_get", "p50_us", "get latency p50", plot=True),
        Line("lat_get", "p99_us", "get latency p99"),
        Line("lat_put", "p50_us", "put latency p50", plot=True),
        Line("lat_put", "p99_us", "put latency p99"))),
    "mixed4": Workload(multi("mixed4"), ("mixed4",), (
        Line("mixed4", "us_per_op", "4 procs 90/10 get/put (1/agg)", plot=True),
        Line("mixed4", "ops_per_s", "4 procs 90/10 aggregate ops/s", "rate")), NO_MP),
    "w1r3": Workload(multi("w1r3"), ("w1r3",), (
        Line("w1r3", "us_per_op", "1 writer + 3 readers (1/agg)", plot=True),
        Line("w1r3", "ops_per_s", "1w+3r aggregate ops/s", "rate"),
        Line("w1r3", "writer_ops_per_s", "1w+3r writer ops/s", "rate"),
        Line("w1r3", "readers_ops_per_s", "1w+3r readers ops/s (sum)", "rate")), NO_MP),
    "bulk": Workload(bulk, ("bulk", "iter_bulk"), (
        Line("bulk", "us_per_op", "bulk load /key", plot=True),
        Line("iter_bulk", "us_per_op", "iterate bulk keys /key", plot=True),
        Line("bulk", "ops_per_s", "bulk load keys/s", "rate"),
        Line("bulk", "mem.hwm_mb", "bulk: loader peak RSS MB", "rate"),
        Line("bulk", "leader_mem.hwm_mb", "bulk: leader peak RSS MB", "rate"),
        Line("iter_bulk", "ops_per_s", "iterate bulk keys/s", "rate"),
        Line("iter_bulk", "hwm_growth_mb", "iterate bulk: peak RSS growth MB", "rate"),
        Line("iter_bulk", "mem.hwm_mb", "iterate bulk: peak RSS MB", "rate")),
        {"socket-rtt": SOCK_ONLY}),
    # Slot for the failover stall workload (someone else fills it in): set run to
    # failover_stall once written, with its rows, lines and n/a systems.
    "failover": Workload(None, ("failover",), ()),
}

# (label, row, system, baseline or None, field, op, target); cost ratios compare
# us_per_op (lower is better), rate ratios ops_per_s.
RATIOS = [
    ("partydbm leader get cost / raw plyvel", "get", "party-leader", "plyvel", "us_per_op",
     "<=", 1.5),
    ("partydbm leader put cost / raw plyvel", "put", "party-leader", "plyvel", "us_per_op",
     "<=", 1.5),
    ("follower get cost / bare socket round trip", "get", "party-follower", "socket-rtt",
     "us_per_op", "<=", 1.5),
    ("follower iteration rate / leader-local (bulk keys)", "iter_bulk", "party-follower",
     "party-leader", "ops_per_s", ">=", 0.40),
    ("follower bulk write keys/s (update())", "bulk", "party-follower", None, "ops_per_s",
     ">=", 100_000),
    ("4-proc mixed ops/s: partydbm / diskcache", "mixed4", "party-leader", "diskcache",
     "ops_per_s", ">=", 1.0),
    ("4-proc mixed ops/s: partydbm / dbm.sqlite3", "mixed4", "party-leader", "dbm.sqlite3",
     "ops_per_s", ">=", 5.0),
    ("leader put rate / diskcache put rate", "put", "party-leader", "diskcache", "ops_per_s",
     ">=", 5.0),
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
    results: dict[str, dict[str, Any]] = {}
    missing = {s: unavailable(s) for s in systems}
    for wname in workloads:
        w = WORKLOADS[wname]
        if w.run is None:
            continue
        for system in systems:
            why = missing[system] or w.na.get(system)
            t0 = time.monotonic()
            if why:
                got = {row: {"na": why} for row in w.rows}
            else:
                try:
                    got = w.run(ctx, system)
                except Failed as exc:
                    got = {row: {"na": str(exc)} for row in w.rows}
                finally:
                    for entry in os.listdir(ctx.tmp):
                        shutil.rmtree(os.path.join(ctx.tmp, entry), ignore_errors=True)
            for row, res in got.items():
                results.setdefault(row, {})[system] = res
            print(f"  {wname:<8} {system:<15} {time.monotonic() - t0:6.1f}s"
                  f"{'  n/a: ' + why if why else ''}", file=sys.stderr, flush=True)
    return results


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
            passed = entry["value"] <= target if op == "<=" else entry["value"] >= target
            entry["verdict"] = "PASS" if passed else "MISS"
        out.append(entry)
    return out


def fmt(x: float) -> str:
    if x >= 100_000:
        return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.0f}k"
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:.3g}" if x >= 1 else f"{x:.2f}"


def table(results: dict[str, Any], systems: list[str], kind: str, width: int = 10) -> str:
    lines = [ln for w in WORKLOADS.values() for ln in w.lines if ln.table == kind]
    head = f"{'':<34}" + "".join(f"{SHORT.get(s, s):>{width}}" for s in systems)
    rows, notes = [head], []
    for ln in lines:
        if ln.row not in results:
            continue
        cells = []
        for s in systems:
            res = results[ln.row].get(s, {})
            v = value(res, ln.field)
            if "na" in res:
                cells.append("n/a")
                note = f"{SHORT.get(s, s)}: {res['na']}"
                if note not in notes:
                    notes.append(note)
            elif v is None:
                cells.append("-")
            else:
                cells.append(fmt(v) + ("*" if res.get("partial") else ""))
        rows.append(f"{ln.label:<34}" + "".join(f"{c:>{width}}" for c in cells))
    if kind == "cost":
        rows += ["", "* partial: stopped at the time budget; cost measured over the ops run"]
        rows += [f"n/a  {n}" for n in notes]
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
        xs, ys = [], []
        for j, ln in enumerate(lines):
            v = value(results[ln.row].get(s), ln.field)
            if v:
                xs.append(j + (i - (len(systems) - 1) / 2) * width)
                ys.append(v)
        ax.bar(xs, ys, width, label=s)
    ax.set_yscale("log")
    ax.set_xticks(range(len(lines)))
    ax.set_xticklabels([ln.label for ln in lines], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("µs per op (log; lower is better)")
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(ncol=4, fontsize=8)
    ax.set_title(f"partydbm bench ({meta['mode']}, N={meta['n']:,}, bulk {meta['bulk_n']:,}): "
                 f"{meta['machine']}, {meta['cpus']} CPUs, {meta['date']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, whole run ~1 min")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--out", default=RESULTS, help="directory for latest.json, bench.png")
    args = ap.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    workloads = [w for w in args.workloads.split(",") if w]
    for name, known in ((systems, SYSTEMS), (workloads, list(WORKLOADS))):
        bad = set(name) - set(known)
        if bad:
            ap.error(f"unknown {sorted(bad)}; choose from {known}")
    mode = "quick" if args.quick else "full"
    meta = {"mode": mode, "machine": platform.node(), "cpus": os.cpu_count(),
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "python": sys.version.split()[0], "python313": PY313, **MODES[mode]}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = tempfile.mkdtemp(prefix="partybench-")
    t0 = time.monotonic()
    print(f"partydbm bench, {mode}: {meta['machine']}, {meta['cpus']} CPUs, {meta['date']}",
          file=sys.stderr)
    try:
        results = run_all(Ctx(mode, tmp, MODES[mode]), systems, workloads)
    finally:
        for proc in list(_procs):
            reap(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    meta["seconds"] = round(time.monotonic() - t0, 1)
    rat = ratios(results)
    print(f"\npartydbm bench ({mode}; N={meta['n']:,} keys of 16 B + 100 B values, bulk "
          f"{meta['bulk_n']:,}) on {meta['machine']}, {meta['cpus']} CPUs, {meta['date']}, "
          f"{meta['seconds']}s\n")
    print("per-op cost, µs (lower is better)")
    print(table(results, systems, "cost"))
    print("\nrates and memory")
    print(table(results, systems, "rate"))
    print("\ntarget ratios (one run)")
    for r in rat:
        shown = "n/a" if "value" not in r else (
            f"{r['value']:,.0f}" if r["target"] >= 1000 else f"{r['value']:.2f}x")
        print(f"  {r['verdict']:<4}  {r['label']:<52} {shown:>10}  (target {r['op']} "
              f"{r['target']:,})")
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
