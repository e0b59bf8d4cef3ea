"""`partydbm demo`: writers and a reader on one database while the leader is SIGKILLed.

The parent opens nothing while the children run. It starts a host (the first leader),
WRITERS writers and one reader, shows each child's live progress, SIGKILLs whichever
process holds LevelDB's LOCK (found with F_GETLK, so never a guess) KILLS times, and
restarts a killed writer or reader where it left off. Afterwards it checks that every
write a writer reported as acknowledged is in the database with its value, and that
every scan the reader finished was in key order with no duplicate and no gap.

The children are in _demo_children.py.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import IO, Any

from .._election import LockFile
from .._open import let_go, whichdb
from .._open import open as party_open
from ._demo_children import key_of, value_of
from ._errors import CliError

WRITERS = 3
KILLS = 3


@dataclass
class Child:
    name: str
    kind: str  # host, writer, reader
    proc: subprocess.Popen[bytes]
    err: IO[bytes]
    wid: int = -1
    role: str = "starting"
    count: int = 0  # writes acknowledged, or scans done
    bad: int = 0
    seen: int = 0
    killed: bool = False
    buf: bytes = b""
    bad_lines: list[str] = field(default_factory=list)


class Demo:
    def __init__(self, path: str, duration: float) -> None:
        self.path = path
        self.duration = duration
        self.children: list[Child] = []
        self.sel = selectors.DefaultSelector()
        self.tty = sys.stdout.isatty()
        self.drawn = 0
        self.acked = [0] * WRITERS
        self.scans = 0
        self.kills: list[str] = []
        self.until = 0.0
        self.t0 = time.monotonic()

    def spawn(self, kind: str, *args: Any, wid: int = -1) -> Child:
        err = tempfile.TemporaryFile()  # noqa: SIM115 - closed in cleanup()
        proc = subprocess.Popen(
            [sys.executable, "-m", "partydbm.cli._demo_children", kind, self.path,
             *(str(a) for a in args)], stdout=subprocess.PIPE, stderr=err,
            stdin=subprocess.DEVNULL)
        name = {"writer": f"writer {wid}", "reader": "reader", "host": "host"}[kind]
        child = Child(name, kind, proc, err, wid=wid,
                      count=int(args[1]) if kind == "writer" else 0)
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        self.sel.register(proc.stdout, selectors.EVENT_READ, child)
        self.children.append(child)
        return child

    def pump(self, seconds: float) -> None:
        """Read children's lines for `seconds`."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            for sk, _ in self.sel.select(left):
                self._read(sk.data)

    def _read(self, child: Child) -> None:
        assert child.proc.stdout is not None
        try:
            data = os.read(child.proc.stdout.fileno(), 65536)
        except BlockingIOError:
            return
        if not data:
            self.sel.unregister(child.proc.stdout)
            return
        child.buf += data
        *lines, child.buf = child.buf.split(b"\n")
        for line in lines:
            self._line(child, line.decode())

    def _line(self, child: Child, line: str) -> None:
        words = line.split()
        if words[:1] == ["BAD"]:
            child.bad_lines.append(line)
            self.event(f"{child.name}: {line}")
        elif words[:1] == ["S"]:
            child.role = words[1]
            if child.kind == "writer":
                child.count = int(words[2])
                self.acked[child.wid] = max(self.acked[child.wid], child.count)
            elif child.kind == "reader":
                child.count, child.bad, child.seen = map(int, words[2:5])

    def alive(self) -> list[Child]:
        """Children still running (a killed one was waited for: never among them)."""
        return [c for c in self.children if c.proc.poll() is None]

    # -- the display ------------------------------------------------------------------------
    def event(self, text: str) -> None:
        self._erase()
        print(f">>> {self.elapsed():5.1f}s  {text}", flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _erase(self) -> None:
        if self.tty and self.drawn:
            sys.stdout.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0

    def draw(self) -> None:
        holder = lock_holder(self.path)
        if self.tty:
            self._erase()
            who = next((f"{c.name}, pid {holder}" for c in self.alive()
                        if c.proc.pid == holder), f"pid {holder}" if holder else "nobody")
            lines = [f"  {self.elapsed():5.1f}s  LevelDB's LOCK held by {who}   "
                     f"leader kills {len(self.kills)}/{KILLS}"]
            lines += [self._describe(c, holder) for c in self.alive()]
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()
            self.drawn = len(lines)
        else:
            parts = [f"{c.name}{'*' if c.proc.pid == holder else ''}"
                     + ("" if c.kind == "host" else f" {c.count:,}")
                     + (" scans" if c.kind == "reader" else "") for c in self.alive()]
            print(f"  {self.elapsed():5.1f}s  " + " | ".join(parts) + "  (* leads)",
                  flush=True)

    def _describe(self, c: Child, holder: int | None) -> str:
        role = "LEADER" if c.role == "leader" else c.role
        mark = " <- holds the LOCK" if c.proc.pid == holder else ""
        if c.kind == "writer":
            what = f"{c.count:>9,} writes acknowledged"
        elif c.kind == "reader":
            what = (f"{c.count:>9,} full scans ({c.bad} bad), last saw {c.seen:,} keys")
        else:
            what = "          holds the database, does nothing else"
        return f"  {c.name:9} pid {c.proc.pid:<7} {role:9} {what}{mark}"


def lock_holder(path: str) -> int | None:
    """The pid holding the database's LevelDB LOCK. The fd is closed at once: this
    process must never keep an fd on LOCK while it opens the database (docs/TRAPS.md, trap 1)."""
    try:
        lockfile = LockFile(path)
    except OSError:
        return None
    try:
        return lockfile.holder_pid()
    finally:
        lockfile.close()


def run(path: str | None, short: bool) -> int:
    duration = 4.0 if short else 20.0
    tmp = None
    if path is None:
        tmp = tempfile.mkdtemp(prefix="partydbm-demo-")
        path = os.path.join(tmp, "party.db")
    else:
        _check_fresh(path)
    demo = Demo(path, duration)
    # SIGTERM (or a closed terminal) must not orphan the children: unwind through the
    # finally below like Ctrl-C does.
    old = {sig: signal.signal(sig, _unwind) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        print(f"partydbm demo: {WRITERS} writers and a reader on {path}; the leader is "
              f"SIGKILLed {KILLS} times in {duration:.0f}s.\n", flush=True)
        ok = _play(demo) and _verify(demo)
    finally:
        _cleanup(demo)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for sig, handler in old.items():
            signal.signal(sig, handler)
    print("\nPASS" if ok else "\nFAIL", flush=True)
    return 0 if ok else 1


def _unwind(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _check_fresh(path: str) -> None:
    if os.path.exists(path) and whichdb(path) != "partydbm":
        raise CliError(f"{path} exists and is not a partydbm database")
    if whichdb(path) == "partydbm":
        holder = lock_holder(path)
        if holder is not None:
            raise CliError(f"{path} is open in process {holder}: the demo kills whoever "
                           "leads, so it needs a database no other process has open")
        try:
            with party_open(path, "r") as db:
                if db.firstkey() is not None:
                    raise CliError(f"{path} is not empty: give the demo a new or empty "
                                   "database")
        finally:
            # Now, not at the end of the grace period: this process looks at the LOCK
            # through an fd of its own later (lock_holder), which would drop a lock that
            # LevelDB still held here (trap 1).
            let_go(path)


def _play(demo: Demo) -> bool:
    first = demo.spawn("host", time.time() + demo.duration + 30)
    deadline = time.monotonic() + 20
    while first.role != "leader":
        if first.proc.poll() is not None or time.monotonic() > deadline:
            demo.event("the host process did not start leading")
            return False
        demo.pump(0.05)
    demo.until = time.time() + demo.duration
    start = time.monotonic()
    for wid in range(WRITERS):
        demo.spawn("writer", wid, 0, demo.until, wid=wid)
    demo.spawn("reader", demo.until)
    demo.event("started " + ", ".join(f"{c.name} (pid {c.proc.pid})" for c in demo.children))
    kill_at = [start + demo.duration * (k + 1) / (KILLS + 1) for k in range(KILLS)]
    tick = 0.1 if demo.tty else 1.0
    next_draw = 0.0
    while time.monotonic() < start + demo.duration + 20:
        if kill_at and time.monotonic() >= kill_at[0] and _kill_leader(demo):
            kill_at.pop(0)
        if time.monotonic() >= next_draw:
            demo.draw()
            next_draw = time.monotonic() + tick
        demo.pump(0.05)
        if time.time() > demo.until and not [c for c in demo.alive() if c.kind != "host"]:
            break
    demo.pump(0.1)  # the last lines of the children that just exited
    demo.drawn = 0  # leave the last table on the screen
    return True


def _kill_leader(demo: Demo) -> bool:
    """SIGKILL the process holding the LOCK, if it is ours; restart it if it was a
    writer or the reader. False if nobody (of ours) holds it right now: try later."""
    holder = lock_holder(demo.path)
    victim = next((c for c in demo.alive() if c.proc.pid == holder), None)
    if victim is None:
        return False
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    victim.killed = True
    demo.kills.append(f"{victim.name} (pid {victim.proc.pid})")
    demo.event(f"SIGKILL the leader: {victim.name}, pid {victim.proc.pid} (kill "
               f"{len(demo.kills)} of {KILLS})")
    if time.time() < demo.until - 0.3:
        if victim.kind == "writer":
            again = demo.spawn("writer", victim.wid, demo.acked[victim.wid], demo.until,
                               wid=victim.wid)
            demo.event(f"restart {victim.name} as pid {again.proc.pid}, from its "
                       f"{demo.acked[victim.wid]:,}th acknowledged write")
        elif victim.kind == "reader":
            demo.scans += victim.count
            again = demo.spawn("reader", demo.until)
            demo.event(f"restart the reader as pid {again.proc.pid}")
    return True


def _verify(demo: Demo) -> bool:
    problems = []
    for c in demo.children:
        code = c.proc.poll()
        if not c.killed and code != 0:
            c.err.seek(0)
            tail = c.err.read().decode(errors="replace").strip().splitlines()[-3:]
            problems.append(f"{c.name} (pid {c.proc.pid}) exited with {code}: "
                            f"{' / '.join(tail)}")
    readers = [c for c in demo.children if c.kind == "reader" and not c.killed]
    scans = demo.scans + sum(c.count for c in readers)
    bad = [line for c in demo.children for line in c.bad_lines]
    if len(demo.kills) < KILLS:
        problems.append(f"only {len(demo.kills)} of {KILLS} leader kills happened")
    if scans == 0:
        problems.append("the reader finished no scan")
    problems += bad
    acked = sum(demo.acked)
    with party_open(demo.path, "r") as db:
        for wid in range(WRITERS):
            problems += _check_writer(db, wid, demo.acked[wid])
        total = len(db)
    print(f"\nresult after {demo.elapsed():.1f}s:")
    print(f"  leader SIGKILLed {len(demo.kills)} times: {', '.join(demo.kills)}")
    print(f"  {acked:,} writes acknowledged to {WRITERS} writers; the database holds "
          f"{total:,} keys (a writer killed while leading may have written a few more "
          "than it reported)")
    print(f"  the reader finished {scans} full scans, forward and reverse, "
          f"{len(bad)} out of order, duplicated or with a gap")
    for p in problems:
        print(f"  PROBLEM: {p}")
    if not problems:
        print("  every acknowledged write is there with its value; every scan was "
              "ordered, duplicate-free and gap-free")
    return not problems


def _check_writer(db: Any, wid: int, acked: int) -> list[str]:
    n = 0
    for key, value in db.iterator(prefix=b"w%d:" % wid):
        if key != key_of(wid, n):
            return [f"writer {wid}: found {key!r} where {key_of(wid, n)!r} belongs"]
        if value != value_of(wid, n):
            return [f"writer {wid}: {key!r} holds {value!r}"]
        n += 1
    if n < acked:
        return [f"writer {wid}: {acked} writes acknowledged, only {n} in the database"]
    return []


def _cleanup(demo: Demo) -> None:
    for c in demo.children:
        if c.proc.poll() is None:
            c.proc.kill()
        try:
            c.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        if c.proc.stdout is not None:
            c.proc.stdout.close()
        c.err.close()
    demo.sel.close()
