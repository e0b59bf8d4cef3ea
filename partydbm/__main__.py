"""The partydbm command line.

    python -m partydbm demo            a live multi-process demonstration (make demo)
    python -m partydbm dump PATH       print every key and value (repr), in key order
    python -m partydbm info PATH       size and who leads
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

from . import open as party_open
from . import whichdb

WORKERS = 4
KEYS_PER_WORKER = 3000


def _worker(path: str, wid: int, n: int) -> int:
    db = party_open(path, "c")
    role = "leader" if db.is_leader else "follower"
    print(f"  worker {wid} (pid {os.getpid()}) starts as {role}", flush=True)
    start = time.perf_counter()
    worst = 0.0
    for i in range(n):
        t = time.perf_counter()
        db[f"w{wid}:{i:05d}"] = f"written by worker {wid}, pid {os.getpid()}"
        worst = max(worst, time.perf_counter() - t)
        now = "leader" if db.is_leader else "follower"
        if now != role:
            print(f"  worker {wid} (pid {os.getpid()}) is now the {now} "
                  f"(after write {i})", flush=True)
            role = now
        if i % 100 == 0:
            time.sleep(0.03)  # give the demo time to pull the plug mid-run
    took = time.perf_counter() - start
    mine = sum(1 for _ in db.iterator(prefix=f"w{wid}:", include_value=False))
    print(f"  worker {wid} done: {n} writes in {took:.2f}s, slowest write "
          f"{worst * 1e3:.1f} ms, reads back {mine} of its keys", flush=True)
    db.close()
    return 0 if mine == n else 1


def _host(path: str) -> int:
    db = party_open(path, "c")
    print(f"  host (pid {os.getpid()}) opened the database as "
          f"{'leader' if db.is_leader else 'follower'}", flush=True)
    time.sleep(60)
    db.close()
    return 0


def demo() -> int:
    py = [sys.executable, "-m", "partydbm"]
    with tempfile.TemporaryDirectory(prefix="partydbm-demo-") as tmp:
        path = os.path.join(tmp, "party.db")
        print(f"partydbm demo: {WORKERS} worker processes write {KEYS_PER_WORKER} keys each "
              f"into {path}\nwhile the leader process is killed with SIGKILL.\n")
        host = subprocess.Popen([*py, "_host", path])
        procs: list[subprocess.Popen[bytes]] = []
        try:
            _wait_for_leader(path, host)
            procs = [subprocess.Popen([*py, "_worker", path, str(w), str(KEYS_PER_WORKER)])
                     for w in range(WORKERS)]
            time.sleep(0.5)
            print(f"\n>>> SIGKILL the leader (pid {host.pid}) while the workers write\n",
                  flush=True)
            host.send_signal(signal.SIGKILL)
            host.wait(10)
            failed = [p for p in procs if p.wait(120) != 0]
        finally:
            for p in [host, *procs]:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
        with party_open(path, "r") as db:
            keys = db.keys()
            expected = [f"w{w}:{i:05d}".encode() for w in range(WORKERS)
                        for i in range(KEYS_PER_WORKER)]
            ok = keys == sorted(expected) and not failed
            print(f"\nafterwards: {len(keys)} keys (expected {len(expected)}), in key "
                  f"order: {keys == sorted(keys)}, first {keys[0]!r}, last {keys[-1]!r}")
            print(f"db[{keys[-1]!r}] = {db[keys[-1]]!r}")
        print("\nOK: no write lost, none doubled, nobody noticed the leader die."
              if ok else "\nFAILED: see above")
        return 0 if ok else 1


def _wait_for_leader(path: str, host: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while whichdb(path) != "partydbm" or not os.path.exists(
            os.path.join(path, "partydbm.sock")):
        if host.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the demo's leader process did not start")
        time.sleep(0.01)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="partydbm", description="partydbm command line")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help="a live multi-process demonstration")
    p = sub.add_parser("dump", help="print every key and value, in key order")
    p.add_argument("path")
    p = sub.add_parser("info", help="size and who leads")
    p.add_argument("path")
    w = sub.add_parser("_worker")
    w.add_argument("path")
    w.add_argument("wid", type=int)
    w.add_argument("n", type=int)
    h = sub.add_parser("_host")
    h.add_argument("path")
    args = ap.parse_args(argv)
    if args.cmd == "demo":
        return demo()
    if args.cmd == "_worker":
        return _worker(args.path, args.wid, args.n)
    if args.cmd == "_host":
        return _host(args.path)
    with party_open(args.path, "r") as db:
        if args.cmd == "dump":
            for key, value in db.iterator():
                print(f"{key!r}: {value!r}")
        else:
            engine = db._engine
            assert engine is not None
            print(f"{args.path}: {len(db)} keys; leader pid {engine.leader_pid}"
                  f"{' (this process)' if db.is_leader else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
