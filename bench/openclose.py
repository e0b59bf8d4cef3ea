"""Opening per operation: `with X.open(path, "r") as db: return db[key]` in a loop, as
legacy code, a request handler or dogpile.cache's dbm backend do, for every system at
once, in short interleaved blocks (the machine's speed drifts: every system sees the
same load, and the ratios come from one run).

Each system runs in a process of its own (this file as a script: standard library
only, so dbm.sqlite3 runs under Python 3.13), on a database of `keys` keys of 16 bytes
with 100-byte values (1 by default, as in issue 16: every system's floor; dbm.dumb reads
its whole index at each open, so it grows with the keys), reading a random one per open:

    party-leader    nobody else has the database open: each open finds this process
                    leading (its engine lingers between a close and the next open)
    party-follower  another process (a Holder) leads: each open follows it
    dbm.sqlite3     flag "r"
    dbm.dumb        flag "r"

partydbm is also measured "cold": partydbm.let_go() after each close, as when the opens
come further apart than the grace period (each open then starts LevelDB or a connection
afresh).

Used by bench.py (workload "openclose"); `python bench/openclose.py [--keys N]
[--before CHECKOUT]` runs it alone (--before: also partydbm from another checkout, run
with PYTHONPATH=CHECKOUT, in the same interleaved rounds: before/after figures).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

VALUE_SIZE = 100
SYSTEMS = ("party-leader", "party-follower", "dbm.sqlite3", "dbm.dumb")
BLOCK_SECONDS = 0.05  # each system's share of one round


# -- the measured process -----------------------------------------------------------------
def _opener(system: str, path: str) -> tuple[Callable[[bytes], bytes], Callable[[], None]]:
    """(one open+get+close of the system's own calls, what 'cold' does after each)."""
    if system.startswith("party"):
        import partydbm

        def party(key: bytes) -> bytes:
            with partydbm.open(path, "r") as db:
                return db[key]
        return party, getattr(partydbm, "let_go", lambda: None)  # none before the grace
    module = _stdlib(system)
    file = os.path.join(path, "db")

    def stdlib(key: bytes) -> bytes:
        with module.open(file, "r") as db:
            return db[key]  # type: ignore[no-any-return]
    return stdlib, lambda: None


def _stdlib(system: str) -> Any:
    """dbm.sqlite3 (Python 3.13) or dbm.dumb."""
    import importlib

    return importlib.import_module("dbm.sqlite3" if system == "dbm.sqlite3" else "dbm.dumb")


def _fill(system: str, path: str, keys: list[bytes]) -> None:
    rnd = random.Random(1)
    pairs = {k: rnd.randbytes(VALUE_SIZE) for k in keys}
    if system.startswith("party"):
        import partydbm

        with partydbm.open(path, "c") as db:
            db.update(pairs)
        return
    with _stdlib(system).open(os.path.join(path, "db"), "c") as db:
        for k, v in pairs.items():
            db[k] = v


def worker(task: dict[str, Any]) -> None:
    """Fill, say "ready", then per line "warm N" or "cold N" run N opens and print the
    seconds they took; "role" prints the role (partydbm) of an open."""
    system, path, n = task["system"], task["path"], task["keys"]
    if system == "hold":
        hold(path)
        return
    keys = [b"%016d" % i for i in range(n)]
    _fill(system, path, keys)
    one, let_go = _opener(system, path)
    rnd = random.Random(2)
    print("ready", flush=True)
    for line in sys.stdin:
        kind, n = line.split()
        picks = [keys[rnd.randrange(len(keys))] for _ in range(int(n))]
        t0 = time.perf_counter()
        if kind == "warm":
            for key in picks:
                one(key)
        else:
            for key in picks:
                one(key)
                let_go()
        print(json.dumps(time.perf_counter() - t0), flush=True)


# -- the driver ---------------------------------------------------------------------------
class Proc:
    def __init__(self, python: str, system: str, path: str, keys: int,
                 env: dict[str, str] | None = None) -> None:
        self.system = system
        task = {"system": system, "path": path, "keys": keys}
        self.proc = subprocess.Popen(
            [python, os.path.abspath(__file__), json.dumps(task)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, env=None if env is None else {**os.environ, **env})

    def ask(self, line: str, timeout: float = 120.0) -> str:
        import select

        assert self.proc.stdin is not None and self.proc.stdout is not None
        if line:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        got = self.proc.stdout.readline() if ready else ""
        if not got:
            raise RuntimeError(f"{self.system}: no answer to {line!r} "
                               f"(exit {self.proc.poll()})")
        return got.strip()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def hold(path: str) -> None:
    """The leader beside party-follower: open `path` as a process that only serves (as
    the tests' Holder does), say its role, keep it until stdin closes."""
    from partydbm._open import open_to_serve

    db = open_to_serve(path, "c", timeout=60)
    print("leader" if db.is_leader else "follower", flush=True)
    sys.stdin.read()
    db.close()


@contextmanager
def _leader_beside(path: str, env: dict[str, str] | None) -> Iterator[None]:
    proc = Proc(sys.executable, "hold", path, 0, env)
    try:
        if proc.ask("", 120) != "leader":
            raise RuntimeError("the process beside party-follower did not lead")
        yield
    finally:
        proc.close()


def measure(systems: list[str], tmp: str, rounds: int, python_for: Callable[[str], str],
            keys: int = 1, before: str | None = None) -> dict[str, dict[str, Any]]:
    """Every system in `systems` (of SYSTEMS), `rounds` interleaved rounds of blocks of
    about BLOCK_SECONDS each; per system its result (partydbm's with "cold", measured in
    a process of its own: letting go there must not cool the warm one down). `before`:
    also the partydbm systems from that checkout, as "<system>@before"."""
    if before is not None:
        systems = [*systems, *(f"{s}@before" for s in systems if s.startswith("party"))]
    runs = [(s, kind) for s in systems
            for kind in (("warm", "cold") if s.startswith("party") else ("warm",))]
    spent = {run: 0.0 for run in runs}
    done = {run: 0 for run in runs}
    with ExitStack() as stack:
        procs = {}
        for system, kind in runs:
            path = os.path.join(tmp, f"openclose-{system}-{kind}")
            os.mkdir(path)
            env = {"PYTHONPATH": before} if before and system.endswith("@before") else None
            if system.startswith("party-follower"):  # its leader from the same checkout
                stack.enter_context(_leader_beside(path, env))
            proc = procs[system, kind] = Proc(python_for(system), system, path, keys, env)
            stack.callback(proc.close)
        for proc in procs.values():
            if proc.ask("", 300) != "ready":
                raise RuntimeError(f"{proc.system} did not start")
        block = {run: 20 for run in runs}
        for r in range(rounds + 1):  # round 0 sizes the blocks, and is not counted
            for run in runs:
                seconds = float(procs[run].ask(f"{run[1]} {block[run]}"))
                if r == 0:
                    block[run] = max(5, int(block[run] * BLOCK_SECONDS / seconds))
                else:
                    spent[run] += seconds
                    done[run] += block[run]
    out: dict[str, dict[str, Any]] = {}
    for system in systems:
        out[system] = _rate(spent[system, "warm"], done[system, "warm"])
        if (system, "cold") in spent:
            out[system]["cold"] = _rate(spent[system, "cold"], done[system, "cold"])
    return out


def _rate(seconds: float, ops: int) -> dict[str, Any]:
    return {"ops": ops, "seconds": seconds, "us_per_op": seconds / ops * 1e6,
            "ops_per_s": ops / seconds}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1].startswith("{"):
        worker(json.loads(sys.argv[1]))
        return 0
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--before", help="a checkout of partydbm to measure beside this one")
    args = ap.parse_args()
    py313 = os.environ.get("PARTYBENCH_PY313", "/root/.pyenv/versions/3.13.0/bin/python3.13")
    tmp = tempfile.mkdtemp(prefix="openclose-")
    try:
        got = measure(list(SYSTEMS), tmp, args.rounds,
                      lambda s: py313 if s == "dbm.sqlite3" else sys.executable, args.keys,
                      args.before and os.path.abspath(args.before))
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    base = got["dbm.sqlite3"]["us_per_op"]
    for system, res in got.items():
        cold = res.get("cold", {}).get("us_per_op")
        print(f"{system:<22} {res['us_per_op']:9.1f} us  {res['us_per_op'] / base:6.2f}x sqlite3"
              + (f"   cold {cold:8.1f} us  {cold / base:6.2f}x" if cold else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
