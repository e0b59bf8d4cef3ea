"""Worker scripts for the multi-process tests: `python tests/workers.py NAME ARGS...`.

Started through `mp_util.Party`, which gives each one a deadline and SIGKILLs it (and
whatever it started) at the end of the test. Results go to stdout, one JSON line
(`mp_util.encode`) at a time; stderr is kept for the test's failure message.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import select
import socket
import sys
import threading
import time
import traceback
from typing import Any

from mp_util import decode, encode

import partydbm
from partydbm import _seams

DEADLINE = 30.0

# Module globals, not locals: a handle a worker leaves open must stay open until the
# interpreter exits (a local would be closed by its __del__ when the function returns).
NS: dict[str, Any] = {}
db: Any = None


def report(obj: Any) -> None:
    """One JSON line, in one write(2): forked children share stdout, and a pipe write
    of one small buffer is never interleaved with another."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (encode(obj) + "\n").encode())


# -- repl: run the test's Python, one JSON line per request --------------------------------
def repl() -> None:
    """Requests {"op": "exec"|"eval", "code": ...}; answers {"ok": value} or {"exc": [type,
    mro, message, traceback]}. Falls off the end when stdin closes, leaving any handle
    the test opened (in NS) open: interpreter exit, no explicit close."""
    NS.update(partydbm=partydbm, os=os, sys=sys, time=time, threading=threading,
              random=random, wait_file=wait_file, thread_workload=thread_workload,
              write_range=write_range, write_through=write_through, race=race)
    while True:
        line = sys.stdin.readline()
        if not line:
            return
        req = decode(line)
        try:
            if req["op"] == "exec":
                NS.pop("result", None)
                exec(req["code"], NS)
                reply = {"ok": NS.pop("result", None)}
            else:
                reply = {"ok": eval(req["code"], NS)}
        except BaseException as exc:
            reply = {"exc": [type(exc).__name__, [c.__name__ for c in type(exc).__mro__],
                             str(exc), traceback.format_exc()]}
        report(reply)


def wait_file(path: str, timeout: float = DEADLINE) -> None:
    """A barrier across processes: return once `path` exists."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout}s")
        time.sleep(0.001)


def write_range(handle: Any, fmt: str, n: int, value_fmt: str) -> dict[bytes, bytes]:
    """Write keys fmt % j -> value_fmt % j for j < n; return what was written."""
    written = {}
    for j in range(n):
        key, value = (fmt % j).encode(), (value_fmt % j).encode()
        handle[key] = value
        written[key] = value
    return written


def write_through(handle: Any, fmt: str, started: str | None, flag: str, extra: int = 100,
                  timeout: float = DEADLINE) -> dict[bytes, bytes]:
    """Write fmt % j -> j for j = 0, 1, ...; touch `started` after 20 writes; once `flag`
    exists, write `extra` more and return everything written."""
    written: dict[bytes, bytes] = {}
    j, stop_at = 0, None
    deadline = time.monotonic() + timeout
    while stop_at is None or j < stop_at:
        key, value = (fmt % j).encode(), b"%d" % j
        handle[key] = value
        written[key] = value
        j += 1
        if j == 20 and started:
            open(started, "w").close()
        if stop_at is None and os.path.exists(flag):
            stop_at = j + extra
        if time.monotonic() > deadline:
            raise TimeoutError(f"{j} writes and {flag} still missing")
    return written


def thread_workload(handle: Any, seed: int, nthreads: int = 4, nops: int = 300,
                    nkeys: int = 20, started: str | None = None) -> dict[str, Any]:
    """`nthreads` threads share one handle; each owns the keys under its prefix and
    checks every read against its own model. Thread 0 touches `started` after 50
    operations. Returns the errors and the merged model."""
    errors: list[str] = []
    models: list[dict[bytes, bytes]] = [{} for _ in range(nthreads)]
    barrier = threading.Barrier(nthreads, timeout=DEADLINE)

    def run(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        model = models[i]
        prefix = b"t%d-" % i
        n = -1
        try:
            barrier.wait()
            for n in range(nops):
                _thread_step(handle, rng, model, prefix, i, n, nkeys)
                if started and i == 0 and n == 50:
                    open(started, "w").close()
        except BaseException:
            errors.append(f"thread {i} op {n} (seed {seed}):\n{traceback.format_exc()}")

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(nthreads)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + DEADLINE
    for t in threads:
        t.join(max(deadline - time.monotonic(), 0.001))
    errors += [f"{t.name} still running at the deadline" for t in threads if t.is_alive()]
    merged: dict[bytes, bytes] = {}
    for model in models:
        merged.update(model)
    return {"errors": errors, "model": merged}


def _thread_step(h: Any, rng: random.Random, model: dict[bytes, bytes], prefix: bytes,
                 i: int, n: int, nkeys: int) -> None:
    key = prefix + b"%02d" % rng.randrange(nkeys)
    roll = rng.random()
    if roll < 0.35:
        value = b"%d-%d" % (i, n)
        h[key] = value
        model[key] = value
    elif roll < 0.5:
        try:
            del h[key]
            existed = True
        except KeyError:
            existed = False
        assert existed == (key in model), (key, existed)
        model.pop(key, None)
    elif roll < 0.7:
        assert h.get(key) == model.get(key), key
    elif roll < 0.78:
        assert (key in h) == (key in model), key
    elif roll < 0.86:
        other = prefix + b"%02d" % rng.randrange(nkeys)
        value = b"b%d-%d" % (i, n)
        with h.write_batch() as wb:
            wb.put(key, value)
            wb.delete(other)
        model[key] = value
        if other != key:
            model.pop(other, None)
        else:
            model.pop(key)
    elif roll < 0.93:
        got = list(h.iterator(prefix=prefix))
        assert got == sorted(model.items()), (got, sorted(model.items()))
    else:
        assert h.pop(key, None) == model.pop(key, None), key


# -- races over the same keys ----------------------------------------------------------------
def race(handle: Any, op: str, keys: list[bytes], seed: int, start: str,
         nthreads: int = 2, count: int = 0) -> list[list[Any]]:
    """`nthreads` threads each apply `op` to every key of `keys` in the same order (so that
    they meet on every key: the most contention), all starting once the file `start`
    exists (a barrier across processes). `seed` is unused by the ops listed here.
    Returns [key, outcome] pairs for every attempt. `op`:
      pop        -> the value popped, or None (missing)
      del        -> True if `del` succeeded, False on KeyError
      setdefault -> what setdefault(key, b"<pid>-<thread>") returned
      popitem    -> [key, value] for every popitem() until KeyError (keys unused)
      incr       -> `count` increments of each key by compare_and_set; the outcome is
                    the number of attempts (a retry when another writer got there first)
    """
    out: list[list[Any]] = []
    errors: list[str] = []
    me = os.getpid()

    def one(key: bytes, t: int) -> Any:
        if op == "pop":
            return handle.pop(key, None)
        if op == "del":
            try:
                del handle[key]
                return True
            except KeyError:
                return False
        if op == "setdefault":
            return handle.setdefault(key, b"%d-%d" % (me, t))
        if op == "incr":
            attempts = 0
            for _ in range(count):
                while True:
                    attempts += 1
                    old = handle.get(key)
                    new = b"%d" % (int(old or 0) + 1)
                    if handle.compare_and_set(key, old, new):
                        break
            return attempts
        raise ValueError(op)

    def run(t: int) -> None:
        try:
            wait_file(start)
            if op == "popitem":
                while True:
                    try:
                        out.append(list(handle.popitem()))
                    except KeyError:
                        return
            for key in keys:
                out.append([key, one(key, t)])
        except BaseException:
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(nthreads)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + DEADLINE
    for t in threads:
        t.join(max(deadline - time.monotonic(), 0.001))
    if errors or any(t.is_alive() for t in threads):
        raise AssertionError(f"race {op}: {errors or 'threads still running'}")
    return out


# -- closing a handle under its threads ---------------------------------------------------------
def close_under_threads(path: str, rounds: str, seed: str) -> None:
    """Each round: open `path`, start four threads that read, iterate, write and list
    keys through the one handle, close it from this thread after a few milliseconds,
    and check that every thread ended with ClosedError (or had finished). A crash of
    the process (SIGSEGV) is the test's exit status; anything else is reported."""
    rng = random.Random(int(seed))
    problems: list[str] = []
    leader_rounds = 0
    for r in range(int(rounds)):
        handle = partydbm.open(path, timeout=DEADLINE)
        leader_rounds += handle.is_leader
        if r == 0:
            handle.update({b"k%04d" % i: b"v" * 50 for i in range(2000)})
        problems += [f"round {r}: {p}" for p in _close_round(handle, rng)]
    report({"problems": problems, "leader_rounds": leader_rounds, "rounds": int(rounds)})


def _close_round(handle: Any, rng: random.Random) -> list[str]:
    ended: list[str] = []
    problems: list[str] = []

    def work(kind: str) -> None:
        try:
            while True:
                if kind == "read":
                    handle.get(b"k%04d" % rng.randrange(2000))
                elif kind == "iterate":
                    for _ in handle.items():
                        pass
                elif kind == "write":
                    handle[b"k%04d" % rng.randrange(2000)] = b"w" * 50
                else:
                    handle.keys()
        except partydbm.ClosedError:
            ended.append(kind)
        except BaseException:
            problems.append(f"{kind}: {traceback.format_exc()}")

    threads = [threading.Thread(target=work, args=(k,), daemon=True)
               for k in ("read", "iterate", "write", "keys")]
    for t in threads:
        t.start()
    time.sleep(rng.uniform(0.001, 0.01))
    handle.close()
    for t in threads:
        t.join(DEADLINE)
    if any(t.is_alive() for t in threads):
        problems.append("a thread still runs after close()")
    elif sorted(ended) != ["iterate", "keys", "read", "write"] and not problems:
        problems.append(f"threads ended {sorted(ended)}")
    return problems


# -- the staleness checker ---------------------------------------------------------------------
class Board:
    """Shared memory (a mapped file of aligned 8-byte words) where writers say what they
    issued and what was acknowledged, and readers what they observed, per key."""

    READERS = 16

    def __init__(self, path: str, nkeys: int) -> None:
        import mmap

        self.nkeys = nkeys
        size = 8 * (8 + (2 + self.READERS) * nkeys)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.w = memoryview(self._mm).cast("q")

    def stopped(self, role: str) -> bool:
        """Followers stop first (word 0), the hosts that lead after (word 1): a follower
        in the middle of a request when the last leader left would wait for another."""
        return self.w[1 if role == "host" else 0] != 0

    def stop(self, role: str) -> None:
        self.w[1 if role == "host" else 0] = 1

    def issued(self, k: int) -> int:
        return self.w[8 + k]  # type: ignore[no-any-return]

    def acked(self, k: int) -> int:
        return self.w[8 + self.nkeys + k]  # type: ignore[no-any-return]

    def observed(self, k: int) -> int:
        base = 8 + 2 * self.nkeys + k
        return max(self.w[base + r * self.nkeys] for r in range(self.READERS))

    def observe(self, r: int, k: int, v: int) -> None:
        i = 8 + 2 * self.nkeys + r * self.nkeys + k
        if v > self.w[i]:
            self.w[i] = v

    def write(self, k: int, seq: int, ack: bool) -> None:
        self.w[8 + (self.nkeys if ack else 0) + k] = seq


def stale_check(path: str, board_path: str, role: str, index: str, nkeys: str,
                nwriters: str, violations: str, seed: str, stale: str = "0") -> None:
    """One process of the staleness checker. Writers ("writer") own the keys k with
    k % nwriters == index and write increasing numbers to them, saying on the board
    what they issue before each write and what was acknowledged after it. Readers
    ("reader", and "host": the processes that lead, killed one after the other) check
    every value they read: at least what was acknowledged, and what any reader had
    observed, before the read began; at most what was issued when it ended. Each
    violation is appended to `violations` at once (a host may be SIGKILLed next).
    `stale` = "1" installs a cache that never catches up (the checker's own check)."""
    board = Board(board_path, int(nkeys))
    rng = random.Random(int(seed) * 100 + int(index) + (1000 if role == "writer" else 0))
    if stale == "1":
        _make_caches_stale()
    handle = partydbm.open(path, timeout=DEADLINE)
    if role == "host":
        print("ready", flush=True)
    counts = {"reads": 0, "writes": 0, "violations": 0}
    fd = os.open(violations, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        while not board.stopped(role):
            if role == "writer":
                _stale_write(handle, board, rng, int(index), int(nwriters), int(nkeys))
                counts["writes"] += 1
            else:
                bad = _stale_read(handle, board, rng, int(index), int(nkeys))
                counts["reads"] += 1
                if bad:
                    counts["violations"] += 1
                    os.write(fd, f"{role} {index} pid {os.getpid()}: {bad}\n".encode())
    finally:
        os.close(fd)
    route = handle._engine.route
    cache = getattr(route, "cache", None)
    counts["misses"] = -1 if cache is None else cache.misses
    report(counts)


def _stale_write(handle: Any, board: Board, rng: random.Random, w: int, nwriters: int,
                 nkeys: int) -> None:
    own = [k for k in range(nkeys) if k % nwriters == w]
    picked = rng.sample(own, 2 if rng.random() < 0.2 and len(own) > 1 else 1)
    seqs = [board.issued(k) + 1 for k in picked]
    for k, seq in zip(picked, seqs, strict=True):
        board.write(k, seq, ack=False)
    if len(picked) == 1:
        handle[b"key%d" % picked[0]] = b"%d" % seqs[0]
    else:
        with handle.write_batch() as wb:
            for k, seq in zip(picked, seqs, strict=True):
                wb.put(b"key%d" % k, b"%d" % seq)
    for k, seq in zip(picked, seqs, strict=True):
        board.write(k, seq, ack=True)


def _stale_read(handle: Any, board: Board, rng: random.Random, r: int, nkeys: int) -> str:
    ks = rng.sample(range(nkeys), 3) if rng.random() < 0.2 else [rng.randrange(nkeys)]
    floors = [max(board.acked(k), board.observed(k)) for k in ks]
    how = rng.random()
    if len(ks) > 1:
        got = handle.get_many([b"key%d" % k for k in ks], b"0")
    elif how < 0.4:
        got = [handle.get(b"key%d" % ks[0], b"0")]
    elif how < 0.8:
        try:
            got = [handle[b"key%d" % ks[0]]]
        except KeyError:
            got = [b"0"]
    else:
        got = [b"1" if b"key%d" % ks[0] in handle else b"0"]
        if got == [b"1"]:  # present: only says it was written at least once
            floors = [min(floors[0], 1)]
    ceilings = [board.issued(k) for k in ks]
    for k, value, floor, ceiling in zip(ks, got, floors, ceilings, strict=True):
        v = int(value)
        if not floor <= v <= ceiling:
            return f"key{k}: read {v}, acknowledged/observed before {floor}, issued {ceiling}"
        if how < 0.8 or len(ks) > 1:
            board.observe(r, k, v)
    return ""


def _make_caches_stale() -> None:
    """The checker's own check: a follower cache that answers what it holds without
    ever catching up with the leader's changes."""
    from partydbm import _cache

    def lookup(self: Any, key: bytes) -> Any:
        return self.entries.get(key, _cache._MISS)

    _cache.Cache.lookup = lookup  # type: ignore[method-assign]


# -- one-shot workers ----------------------------------------------------------------------
def turnover(path: str, key: str, value: str, how: str) -> None:
    """Open, write one key, read it back, and close (how == "close") or just exit."""
    global db
    db = partydbm.open(path, timeout=DEADLINE)
    db[key] = value
    assert db[key] == value.encode()
    if how == "close":
        db.close()


def plain_leveldb(path: str) -> None:
    """A plain LevelDB user: holds the LOCK and never serves the socket."""
    import plyvel

    handle = plyvel.DB(path)
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes stdin (or kills us)
    handle.close()


def uid_probe(uid: str, path: str, address_hex: str) -> None:
    """Drop to `uid` and try the database through the API and through the raw socket."""
    from partydbm import _protocol as P
    from partydbm._election import socket_address

    address: str | bytes = bytes.fromhex(address_hex)
    if not address.startswith(b"\0"):
        address = os.fsdecode(address)
    os.setgroups([])
    os.setgid(int(uid))
    os.setuid(int(uid))
    if not address:  # the way partydbm itself reaches a deep database's socket
        address = socket_address(path)
    out: dict[str, Any] = {"uid": os.getuid()}
    try:
        handle = partydbm.open(path, "w", timeout=2)
    except BaseException as exc:
        out["api"] = f"{type(exc).__name__}: {exc}"
        out["api_error_is_partydbm_error"] = isinstance(exc, partydbm.error)
    else:
        out["api"] = "opened"
        for name, fn in (("api_put", lambda: handle.__setitem__("secret", "pwned")),
                         ("api_get", lambda: handle.get("secret"))):
            try:
                out[name] = fn()
            except BaseException as exc:
                out[name] = f"{type(exc).__name__}: {exc}"
    replies: list[Any] = []
    out["raw"] = replies
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(3)
        sock.connect(address)
        hello = {"v": P.VERSION, "client": os.urandom(16), "pid": os.getpid()}
        sock.sendall(P.pack([P.HELLO, 0, hello]))
        sock.sendall(P.pack([P.PUT, 1, b"secret", b"pwned", False])
                     + P.pack([P.GET, 2, b"secret"]))
        decoder = P.Decoder()
        while True:
            data = sock.recv(65536)
            if not data:
                break
            decoder.feed(data)
            replies.extend(decoder.messages())
    except BaseException as exc:
        replies.append(f"{type(exc).__name__}: {exc}")
    report(out)


# -- fork (multiprocessing's fork start method, and os.fork) -------------------------------
def _recv(conn: Any, timeout: float = DEADLINE) -> Any:
    try:
        if not conn.poll(timeout):
            return {"error": f"no message within {timeout}s"}
        return decode(conn.recv())
    except EOFError:
        return {"error": "the child went away without a message"}


def _join(procs: list[Any], timeout: float = DEADLINE) -> list[int | None]:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0.001))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    return [p.exitcode for p in procs]


def _guarded(conn: Any, fn: Any, *args: Any) -> None:
    """Run a child's body; whatever happens, the parent gets one message."""
    try:
        conn.send(encode(fn(*args)))
    except BaseException:
        conn.send(encode({"error": traceback.format_exc()}))


def _inherited_use(handle: Any, i: int, n: int) -> dict[str, Any]:
    res: dict[str, Any] = {"is_leader": handle.is_leader, "parent": handle.get("parent")}
    write_range(handle, f"c{i}-%03d", n, f"v{i}-%d")
    res["own"] = dict(handle.iterator(prefix=f"c{i}-"))
    res["is_leader_after"] = handle.is_leader
    return res


def fork_from_leader(path: str) -> None:
    """The parent leads; two forked children use the inherited handle."""
    ctx = multiprocessing.get_context("fork")
    handle = partydbm.open(path)
    out: dict[str, Any] = {"parent_leader": handle.is_leader}
    handle["parent"] = "p"
    conns, procs = [], []
    for i in range(2):
        mine, theirs = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_guarded, args=(theirs, _inherited_use, handle, i, 50))
        p.start()
        theirs.close()
        conns.append(mine)
        procs.append(p)
    out["children"] = [_recv(c) for c in conns]
    out["exitcodes"] = _join(procs)
    out["parent_leader_after"] = handle.is_leader
    out["items"] = dict(handle.items())
    handle.close()
    report(out)


def _write_through_close(handle: Any, i: int, conn: Any) -> dict[str, Any]:
    """Keep writing; once told the parent closed, write 100 more."""
    j, closed_at = 0, None
    deadline = time.monotonic() + DEADLINE
    while closed_at is None or j < closed_at + 100:
        handle[b"c%d-%04d" % (i, j)] = b"v%d" % j
        j += 1
        if j == 20:
            conn.send("started")
        if closed_at is None and conn.poll():
            conn.recv()
            closed_at = j
        if time.monotonic() > deadline:
            raise TimeoutError(f"child {i}: {j} writes, parent closed at {closed_at}")
        time.sleep(0.001)
    own = dict(handle.iterator(prefix=b"c%d-" % i))
    return {"n": j, "closed_at": closed_at, "own_ok": own == {
        b"c%d-%04d" % (i, k): b"v%d" % k for k in range(j)}, "late": _late_writes(handle, i)}


def _late_writes(handle: Any, i: int) -> dict[bytes, bytes]:
    """Child 1 writes again after child 0 (and anything child 0 started) has gone."""
    if i != 1:
        return {}
    time.sleep(0.5)
    return write_range(handle, "late-%02d", 10, "l%d")


def fork_outlive_close(path: str) -> None:
    """The parent leads, forks two writers, and closes its handle while they write."""
    ctx = multiprocessing.get_context("fork")
    handle = partydbm.open(path)
    out: dict[str, Any] = {"parent_leader": handle.is_leader}
    handle["parent"] = "p"
    conns, procs = [], []
    for i in range(2):
        mine, theirs = ctx.Pipe()
        p = ctx.Process(target=_guarded_duplex, args=(theirs, i, handle))
        p.start()
        conns.append(mine)
        procs.append(p)
    out["started"] = [_recv_raw(c) for c in conns]
    handle.close()
    for c in conns:
        c.send("closed")
    out["children"] = [_recv(c) for c in conns]
    out["exitcodes"] = _join(procs)
    report(out)


def _guarded_duplex(conn: Any, i: int, handle: Any) -> None:
    try:
        conn.send(encode(_write_through_close(handle, i, conn)))
    except BaseException:
        conn.send(encode({"error": traceback.format_exc()}))


def _recv_raw(conn: Any, timeout: float = DEADLINE) -> Any:
    if not conn.poll(timeout):
        return f"nothing within {timeout}s"
    return conn.recv()


def fork_outlive_exit(path: str) -> None:
    """The parent leads, forks two children (os.fork) and exits without closing; the
    children wait for the parent to be gone (EOF on a pipe only it holds), then write."""
    global db
    db = partydbm.open(path)
    db["parent"] = "p"
    sys.stdout.flush()
    r, w = os.pipe()
    pids = []
    for i in range(2):
        pid = os.fork()
        if pid == 0:
            os.close(w)
            _exit_child(db, i, r)
        pids.append(pid)
    os.close(r)
    db["parent-last"] = "x"
    report({"parent": os.getpid(), "leader": db.is_leader, "children": pids})
    # Falls off the end with the handle open: interpreter exit hands over.


def _exit_child(handle: Any, i: int, r: int) -> None:
    code = 1
    try:
        handle[f"c{i}-early"] = "e"
        ready, _, _ = select.select([r], [], [], DEADLINE)
        if not ready or os.read(r, 1) != b"":
            raise TimeoutError("the parent did not exit")
        written = write_range(handle, f"c{i}-%03d", 50, f"v{i}-%d")
        own = dict(handle.iterator(prefix=f"c{i}-"))
        report({"child": i, "ok": own == {**written, f"c{i}-early".encode(): b"e"},
                "parent": handle.get("parent"), "parent_last": handle.get("parent-last"),
                "late": _late_writes(handle, i)})
        code = 0
    except BaseException:
        report({"child": i, "error": traceback.format_exc()})
    finally:
        os._exit(code)


def fork_from_follower(path: str) -> None:
    """The parent follows (the test's leader L leads); its forked child uses the inherited
    handle, the parent closes, the test kills L, and the child must become the leader
    itself."""
    ctx = multiprocessing.get_context("fork")
    handle = partydbm.open(path)
    out: dict[str, Any] = {"parent_leader": handle.is_leader}
    handle["parent-before"] = "b"
    mine, theirs = ctx.Pipe()
    p = ctx.Process(target=_follower_child, args=(handle, theirs))
    p.start()
    out["child_first"] = _recv(mine)
    handle["parent-after-fork"] = "a"
    out["parent_sees_child"] = handle.get("child-1")
    handle.close()
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("expected go")
    mine.send("go")
    out["child_second"] = _recv(mine)
    out["exitcodes"] = _join([p])
    report(out)


def _follower_child(handle: Any, conn: Any) -> None:
    try:
        first = {"is_leader": handle.is_leader, "parent": handle.get("parent-before")}
        handle["child-1"] = "1"
        conn.send(encode(first))
        if not conn.poll(DEADLINE):
            raise TimeoutError("no go")
        conn.recv()
        written = write_range(handle, "child-2-%02d", 20, "%d")
        conn.send(encode({"is_leader": handle.is_leader, "written_ok": all(
            handle[k] == v for k, v in written.items()), "items": dict(handle.items())}))
    except BaseException:
        conn.send(encode({"error": traceback.format_exc()}))


def fork_leader_returns(path: str) -> None:
    """The parent leads, forks a child, closes, and leads again at once (before the
    helper the child started for itself is up); then the parent leaves for good."""
    ctx = multiprocessing.get_context("fork")
    handle = partydbm.open(path)
    out: dict[str, Any] = {"parent_leader": handle.is_leader}
    mine, theirs = ctx.Pipe()
    p = ctx.Process(target=_returning_child, args=(handle, theirs))
    p.start()
    out["forked"] = _recv(mine)
    handle.close()
    mine.send("write")  # no leader now: the child starts its helper
    time.sleep(0.01)
    handle = partydbm.open(path)  # ...and the parent is back (usually) first
    out["parent_leads_again"] = handle.is_leader
    out["second"] = _recv(mine)
    time.sleep(1.0)  # the child's helper comes up meanwhile, and follows the parent
    handle.close()  # the parent leaves for good
    mine.send("write")
    out["third"] = _recv(mine)
    out["exitcodes"] = _join([p])
    report(out)


def _returning_child(handle: Any, conn: Any) -> None:
    try:
        for n in range(3):
            if n:
                if not conn.poll(DEADLINE):
                    raise TimeoutError("the parent said nothing")
                conn.recv()
            written = write_range(handle, f"c{n}-%02d", 5, "%d")
            conn.send(encode({"ok": all(handle[k] == v for k, v in written.items()),
                              "is_leader": handle.is_leader}))
    except BaseException:
        conn.send(encode({"error": traceback.format_exc()}))


WORKERS = {f.__name__: f for f in (repl, turnover, close_under_threads, stale_check,
                                     plain_leveldb,
                                     uid_probe, fork_from_leader, fork_outlive_close,
                                     fork_outlive_exit, fork_from_follower,
                                     fork_leader_returns)}

if __name__ == "__main__":
    _seams.load(os.environ)  # a test's env={"PARTYDBM_...": ...} for this worker
    WORKERS[sys.argv[1]](*sys.argv[2:])
