"""How should a leader serve its followers? A synthetic that compares serving models.

Usage (from the repository root, in the venv): .venv/bin/python bench/serving_models.py
[--rounds 3] [--seconds 3] [--followers 3] [--models threads,inline,timed]

Not partydbm: a bare LevelDB leader (plyvel) and followers sending msgpack requests over
unix sockets, so only the serving model differs. Every process runs the bench's mixed4
loop (90% get / 10% put of 100-byte values over 5,000 keys); the leader's own operations
are local, the followers' are synchronous round trips. Models:

- threads: one thread per follower connection, blocked in recv, niced +10 (partydbm's
  model since stop 10). Every request wakes a thread that must take the GIL from the
  application's thread.
- inline: no serving thread. The leader's own thread polls every connection (epoll,
  zero timeout) after every 64 of its operations and answers what has arrived.
- timed: the same, polled when `--poll-us` microseconds have passed since the last poll
  (a clock read per operation), plus a thread that wakes every millisecond, as a real
  implementation needs one to notice that the application has stopped calling.

Prints the aggregate and per-process ops/s of each round and each model's median.
Children are killed on every exit path. This is the measurement behind partydbm's
answering in passing (_server.Server.poll, a "timed" model with parking threads): here
the median aggregate went from 262k (threads) to 455k (timed, every 50 us) ops/s, with
each follower faster too (11k to 13.5k ops/s).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import msgpack

from partydbm._backend import plyvel  # plyvel or plyvel-next, as partydbm

KEYS = 5_000
VALUE = b"v" * 100
PLAN = 8192
CHUNK = 64


def plan(seed: int) -> list[tuple[bytes, bool]]:
    rnd = random.Random(seed)
    return [(b"key%013d" % rnd.randrange(KEYS), rnd.random() < 0.9) for _ in range(PLAN)]


def answer(db: Any, request: list[Any]) -> bytes:
    op, key, value = request
    if op == 0:
        return msgpack.packb(db.get(key))  # type: ignore[no-any-return]
    db.put(key, value)
    return msgpack.packb(None)  # type: ignore[no-any-return]


def wait_go() -> None:
    print("ready", flush=True)
    ready, _, _ = select.select([sys.stdin], [], [], 60)
    if not ready or sys.stdin.readline().strip() != "go":
        raise SystemExit("no 'go' within 60 s")


def follower(address: str, seed: int, seconds: float) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(address)
    sock.settimeout(10)
    unpacker = msgpack.Unpacker()
    ops = plan(seed)
    wait_go()
    t0 = time.perf_counter()
    end, n, pos = t0 + seconds, 0, 0
    while time.perf_counter() < end:
        for key, is_get in ops[pos:pos + CHUNK]:
            sock.sendall(msgpack.packb((0, key, None) if is_get else (1, key, VALUE)))
            while True:
                unpacker.feed(sock.recv(65536))
                if any(True for _ in unpacker):
                    break
        n, pos = n + CHUNK, (pos + CHUNK) % PLAN
    print(json.dumps(n / (time.perf_counter() - t0)), flush=True)


class Inline:
    """The leader's own thread answers whatever has arrived on any connection."""

    def __init__(self, db: Any, conns: list[socket.socket]) -> None:
        self.db = db
        self.epoll = select.epoll()
        self.conns = {c.fileno(): (c, msgpack.Unpacker()) for c in conns}
        for c in conns:
            c.setblocking(False)
            self.epoll.register(c.fileno(), select.EPOLLIN)

    def poll(self, timeout: float = 0) -> None:
        for fd, _ in self.epoll.poll(timeout):
            sock, unpacker = self.conns[fd]
            try:
                unpacker.feed(sock.recv(65536))
            except BlockingIOError:
                continue
            for request in unpacker:
                sock.sendall(answer(self.db, request))


def leader(db_path: str, address: str, model: str, seconds: float, followers: int,
           poll_us: float) -> None:
    db = plyvel.DB(db_path, create_if_missing=True)
    with db.write_batch() as wb:
        for i in range(KEYS):
            wb.put(b"key%013d" % i, VALUE)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(address)
    listener.listen(followers)
    conns = [listener.accept()[0] for _ in range(followers)]
    inline = None
    if model == "threads":
        for conn in conns:
            threading.Thread(target=serve_thread, args=(db, conn), daemon=True).start()
    else:
        inline = Inline(db, conns)
    if model == "timed":
        threading.Thread(target=tick, daemon=True).start()
    ops = plan(99)
    get, put, clock = db.get, db.put, time.perf_counter
    every = poll_us / 1e6
    wait_go()
    t0 = last = clock()
    end, n, pos = t0 + seconds, 0, 0
    while clock() < end:
        for key, is_get in ops[pos:pos + CHUNK]:
            if is_get:
                get(key)
            else:
                put(key, VALUE)
            if model == "timed":
                now = clock()
                if now - last >= every:
                    last = now
                    inline.poll()  # type: ignore[union-attr]
        n, pos = n + CHUNK, (pos + CHUNK) % PLAN
        if model == "inline":
            inline.poll()  # type: ignore[union-attr]
    print(json.dumps(n / (clock() - t0)), flush=True)
    stop = time.monotonic() + seconds + 10
    while inline is not None and time.monotonic() < stop:  # followers finish their loop
        inline.poll(0.05)
    if inline is None:
        time.sleep(seconds + 1)


def tick() -> None:
    """What a watchdog costs: a wake-up (and the GIL) every millisecond."""
    while True:
        time.sleep(0.001)


def serve_thread(db: Any, conn: socket.socket) -> None:
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    unpacker = msgpack.Unpacker()
    while data := conn.recv(65536):
        unpacker.feed(data)
        for request in unpacker:
            conn.sendall(answer(db, request))


def one_round(model: str, followers: int, seconds: float, poll_us: float) -> list[float]:
    tmp = tempfile.mkdtemp(prefix="serving-models-")
    address = os.path.join(tmp, "socket")
    me = [sys.executable, os.path.abspath(__file__)]
    procs: list[subprocess.Popen[str]] = []

    def spawn(*args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen([*me, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        procs.append(proc)
        return proc

    def line(proc: subprocess.Popen[str], timeout: float) -> str:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"no answer from {proc.args!r} in {timeout} s")
        return proc.stdout.readline().strip()

    try:
        lead = spawn("leader", os.path.join(tmp, "db"), address, model, str(seconds),
                     str(followers), str(poll_us))
        deadline = time.monotonic() + 30
        while not os.path.exists(address):
            if time.monotonic() > deadline or lead.poll() is not None:
                raise RuntimeError("the leader did not listen")
            time.sleep(0.01)
        rest = [spawn("follower", address, str(i), str(seconds)) for i in range(followers)]
        for proc in [*rest, lead]:
            if line(proc, 60) != "ready":
                raise RuntimeError(f"{proc.args!r} did not start")
        for proc in [lead, *rest]:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        return [float(line(proc, seconds + 60)) for proc in [lead, *rest]]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--followers", type=int, default=3)
    ap.add_argument("--models", default="threads,inline,timed")
    ap.add_argument("--poll-us", type=float, default=50.0)
    args = ap.parse_args()
    models = args.models.split(",")
    totals: dict[str, list[float]] = {m: [] for m in models}
    print(f"{'model':8} {'total':>9} {'leader':>9}  followers (ops/s)")
    for _ in range(args.rounds):
        for model in models:  # interleaved: the machine's load drifts
            rates = one_round(model, args.followers, args.seconds, args.poll_us)
            totals[model].append(sum(rates))
            print(f"{model:8} {sum(rates):9,.0f} {rates[0]:9,.0f}  "
                  + " ".join(f"{r:7,.0f}" for r in rates[1:]), flush=True)
    for model, got in totals.items():
        print(f"median {model:8} {statistics.median(got):9,.0f} ops/s aggregate")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "leader":
        a = sys.argv[2:]
        leader(a[0], a[1], a[2], float(a[3]), int(a[4]), float(a[5]))
    elif len(sys.argv) > 1 and sys.argv[1] == "follower":
        follower(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    else:
        main()
