"""Benchmark worker: one process that opens one system and runs one task.

Run by bench.py as `python worker.py '<task json>'`; prints its result as one JSON line.
Top-level imports are standard library only, so the dbm.sqlite3 tasks can run under a
bare Python 3.13. Tasks:

    session   put, get, ordered iteration, per-op latency (one process)
    bulk      load many keys (update()/write_batch where the system has one); peak RSS
    iterbulk  iterate everything a bulk task loaded; peak memory before/after
    mp        one of several processes: "ready", wait for "go", run a get/put mix for a
              fixed time, print the counts, wait for stdin to close, close the store
    sockserver  the bare msgpack-over-unix-socket server (a dict), for socket-rtt
"""

from __future__ import annotations

import json
import os
import random
import select
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

KEY = b"%016d"  # 16-byte keys
VALUE_SIZE = 100
GET_MANY_KEYS = 100  # keys per get_many() call in the single session
CHUNK = 4096  # items per batch for systems that batch (partydbm's update() uses the same)
STEP = 512  # ops between budget checks
PERMUTE = 7919  # prime: i -> i * PERMUTE % n visits 0..n-1 once when n % 7919 != 0


FIELDS = {"VmHWM:": "hwm_mb", "VmRSS:": "rss_mb", "RssAnon:": "anon_mb", "RssFile:": "file_mb"}


def mem(pid: int | str = "self") -> dict[str, float]:
    """Memory of a process in MB: peak resident (VmHWM), resident now (VmRSS), and of
    that, anonymous (heap: what a process really holds) and file-backed (mmapped files,
    e.g. LevelDB's tables: page cache the kernel can drop)."""
    out: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name = FIELDS.get(line.split(maxsplit=1)[0])
                if name:
                    out[name] = int(line.split()[1]) / 1024
    except OSError:
        if pid == "self":
            import resource

            out["hwm_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


class Peak:
    """Samples the anonymous RSS now and then (the kernel keeps no peak of it)."""

    def __init__(self) -> None:
        self.start = mem()
        self.anon_mb = self.start.get("anon_mb", 0.0)

    def sample(self) -> None:
        self.anon_mb = max(self.anon_mb, mem().get("anon_mb", 0.0))

    def report(self, res: dict[str, Any]) -> dict[str, Any]:
        end = mem()
        self.anon_mb = max(self.anon_mb, end.get("anon_mb", 0.0))
        res.update(mem_before=self.start, mem=end, peak_anon_mb=self.anon_mb,
                   anon_growth_mb=self.anon_mb - self.start.get("anon_mb", 0.0),
                   hwm_growth_mb=end.get("hwm_mb", 0.0) - self.start.get("hwm_mb", 0.0))
        return res


# -- systems ----------------------------------------------------------------------------
class Store:
    """One system behind the same handful of calls. `get`/`put` are the system's own
    callables (no wrapper), so the loops measure exactly what a user would call."""

    def __init__(self, get: Callable[..., Any], put: Callable[..., Any],
                 keys: Callable[[], Iterable[bytes]] | None = None,
                 bulk: Callable[[Iterable[tuple[bytes, bytes]]], Any] | None = None,
                 close: Callable[[], Any] | None = None, flush: Callable[[], Any] | None = None,
                 checkpoint: Callable[[], Any] | None = None, ordered: bool = True,
                 role: str = "", note: str = "",
                 get_many: Callable[[list[bytes]], list[Any]] | None = None,
                 misses: Callable[[], int | None] | None = None) -> None:
        self.get, self.put = get, put
        self.misses = misses or (lambda: None)  # a partydbm follower's cache misses
        self.get_many = get_many
        self.scan = keys or _no_keys
        self.bulk = bulk or (lambda pairs: _put_each(put, pairs))
        self.close = close or (lambda: None)
        self.checkpoint = checkpoint  # wait for queued writes (sqlitedict's thread)
        self.flush = flush or checkpoint or (lambda: None)
        self.ordered, self.role, self.note = ordered, role, note


def _no_keys() -> Iterable[bytes]:
    raise NotImplementedError("this system cannot iterate")


def _put_each(put: Callable[..., Any], pairs: Iterable[tuple[bytes, bytes]]) -> None:
    for k, v in pairs:
        put(k, v)


def _chunks(pairs: Iterable[tuple[bytes, bytes]]) -> Iterator[list[tuple[bytes, bytes]]]:
    chunk: list[tuple[bytes, bytes]] = []
    for pair in pairs:
        chunk.append(pair)
        if len(chunk) >= CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def open_store(system: str, path: str, task: dict[str, Any]) -> Store:
    if system == "plyvel":
        from partydbm._backend import plyvel  # plyvel or plyvel-next, as partydbm

        db = plyvel.DB(path, create_if_missing=True)

        def bulk(pairs: Iterable[tuple[bytes, bytes]]) -> None:
            for chunk in _chunks(pairs):
                with db.write_batch() as wb:
                    for k, v in chunk:
                        wb.put(k, v)
        return Store(db.get, db.put, lambda: db.iterator(include_value=False), bulk,
                     db.close)
    if system.startswith("party"):
        import partydbm

        # cache_size=0 in the paired follower run: what it measures is the round trip
        pdb = partydbm.open(path, "c", **({"cache_size": task["cache_size"]}
                                          if "cache_size" in task else {}))
        role = "leader" if pdb.is_leader else "follower"
        if task.get("role") and role != task["role"]:
            pdb.close()
            raise RuntimeError(f"expected to be the {task['role']}, opened as the {role}")
        def misses() -> int | None:  # reads its cache sent to the leader (None: no cache)
            cache = getattr(pdb._engine.route, "cache", None)
            return None if cache is None else cache.misses

        return Store(pdb.__getitem__, pdb.__setitem__, pdb.__iter__, pdb.update, pdb.close,
                     role=role, note="update()", get_many=pdb.get_many, misses=misses)
    if system == "dbm.dumb":
        import dbm.dumb

        ddb = dbm.dumb.open(os.path.join(path, "db"), "c")  # noqa: SIM115
        return Store(ddb.__getitem__, ddb.__setitem__, ddb.__iter__, None, ddb.close,
                     flush=ddb.sync, ordered=False, note="no batch API: one put per key")
    if system == "dbm.sqlite3":
        import dbm.sqlite3

        sdb = dbm.sqlite3.open(os.path.join(path, "db.sqlite3"), "c")  # noqa: SIM115
        # SELECT key FROM Dict has no ORDER BY: not ordered
        return Store(sdb.__getitem__, sdb.__setitem__, sdb.__iter__, None, sdb.close,
                     ordered=False, note="no batch API: one autocommit per key")
    if system == "sqlitedict":
        from sqlitedict import SqliteDict

        def same(x: Any) -> Any:
            return x

        sd = SqliteDict(os.path.join(path, "db.sqlite"), autocommit=True, encode=same,
                        decode=same)

        def sd_bulk(pairs: Iterable[tuple[bytes, bytes]]) -> None:
            for chunk in _chunks(pairs):
                sd.update(chunk)  # one executemany + commit per chunk
        # iteration is ORDER BY rowid (insertion order)
        return Store(sd.__getitem__, sd.__setitem__, sd.__iter__, sd_bulk, sd.close,
                     checkpoint=sd.commit, ordered=False, note="update() per 4096")
    if system == "diskcache":
        import diskcache

        cache = diskcache.Cache(os.path.join(path, "cache"))

        def dc_bulk(pairs: Iterable[tuple[bytes, bytes]]) -> None:
            for chunk in _chunks(pairs):
                with cache.transact():
                    for k, v in chunk:
                        cache.set(k, v)
        return Store(cache.get, cache.set, cache.iterkeys, dc_bulk, cache.close,
                     note="set() in transact() per 4096")
    if system == "socket-rtt":
        client = SockClient(task["address"])
        return Store(client.get, client.put, close=client.close)
    if system == "lmdb":
        return _lmdb(path)
    if system == "lmdbm":
        from lmdbm import Lmdb

        ldb = Lmdb.open(os.path.join(path, "db"), "c", map_size=1 << 30)  # its defaults else
        return Store(ldb.__getitem__, ldb.__setitem__, ldb.keys, ldb.update, ldb.close,
                     note="its defaults (sync on commit); update()")
    raise ValueError(f"unknown system {system!r}")


def _lmdb(path: str) -> Store:
    """py-lmdb with sync=False (LevelDB's durability: the OS writes back), one
    transaction per get or put, as a user of the plain API would."""
    import lmdb

    env = lmdb.open(path, map_size=4 << 30, sync=False)
    begin = env.begin

    def get(key: bytes) -> bytes | None:
        with begin() as txn:
            value: bytes | None = txn.get(key)  # Any where lmdb is not installed
            return value

    def put(key: bytes, value: bytes) -> None:
        with begin(write=True) as txn:
            txn.put(key, value)

    def keys() -> Iterator[bytes]:
        with begin() as txn:
            yield from txn.cursor().iternext(keys=True, values=False)

    def bulk(pairs: Iterable[tuple[bytes, bytes]]) -> None:
        for chunk in _chunks(pairs):
            with begin(write=True) as txn:
                for k, v in chunk:
                    txn.put(k, v)
    return Store(get, put, keys, bulk, env.close, note="sync=False; a txn per op")


# -- the bare socket round trip ---------------------------------------------------------
class SockClient:
    """Blocking sendall/recv of [id, key] (get) or [id, key, value] (put)."""

    def __init__(self, address: str) -> None:
        import socket

        import msgpack

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(address)
        self.unpacker = msgpack.Unpacker(raw=False)
        self.packb = msgpack.packb
        self.rid = 0

    def _call(self, msg: list[Any]) -> Any:
        self.sock.sendall(self.packb(msg))
        unpacker = self.unpacker
        while True:
            for reply in unpacker:
                if reply[0] == msg[0]:
                    return reply[1]
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("socket-rtt server hung up")
            unpacker.feed(data)

    def get(self, key: bytes) -> Any:
        self.rid += 1
        return self._call([self.rid, key])

    def put(self, key: bytes, value: bytes) -> None:
        self.rid += 1
        self._call([self.rid, key, value])

    def close(self) -> None:
        self.sock.close()


def sockserver(task: dict[str, Any]) -> dict[str, Any]:
    import socket

    import msgpack

    data: dict[bytes, bytes] = {}
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(task["address"])
    listener.listen(8)
    print("ready", flush=True)
    packb = msgpack.packb
    while True:  # one client at a time; bench.py terminates us
        conn, _ = listener.accept()
        unpacker = msgpack.Unpacker(raw=False)
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            unpacker.feed(chunk)
            out = []
            for msg in unpacker:
                if len(msg) == 3:
                    data[msg[1]] = msg[2]
                    out.append(packb([msg[0], None]))
                else:
                    out.append(packb([msg[0], data.get(msg[1])]))
            conn.sendall(b"".join(out))
        conn.close()


# -- measuring --------------------------------------------------------------------------
def _rate(ops: int, seconds: float, wanted: int, **extra: Any) -> dict[str, Any]:
    out = {"ops": ops, "seconds": seconds, "us_per_op": seconds / ops * 1e6 if ops else None,
           "ops_per_s": ops / seconds if seconds > 0 else None, **extra}
    if ops < wanted:
        out["partial"] = f"{ops} of {wanted} in the time budget"
    return out


def _loop(fn: Callable[..., Any], args: list[tuple[Any, ...]], budget: float,
          checkpoint: Callable[[], Any] | None) -> tuple[int, float]:
    t0 = time.perf_counter()
    end = t0 + budget
    done = 0
    while done < len(args):
        for a in args[done:done + STEP]:
            fn(*a)
        done = min(done + STEP, len(args))
        if checkpoint is not None:
            checkpoint()
        if time.perf_counter() > end:
            break
    return done, time.perf_counter() - t0


def _latency(fn: Callable[..., Any], args: list[tuple[Any, ...]],
             after: Callable[[], Any] | None) -> dict[str, Any]:
    clock = time.perf_counter_ns
    out = []
    for a in args:
        t = clock()
        fn(*a)
        if after is not None:
            after()
        out.append(clock() - t)
    out.sort()
    n = len(out)
    return {"ops": n, "p50_us": out[n // 2] / 1e3, "p99_us": out[min(n - 1, n * 99 // 100)] / 1e3,
            "max_us": out[-1] / 1e3, "us_per_op": sum(out) / n / 1e3}


def session(s: Store, task: dict[str, Any]) -> dict[str, Any]:
    n, budget = task["n"], task["budget"]
    rnd = random.Random(1)
    order = list(range(n))
    rnd.shuffle(order)
    keys = [KEY % i for i in order]
    values = [rnd.randbytes(VALUE_SIZE) for _ in range(n)]
    res: dict[str, Any] = {}
    t0 = time.perf_counter()
    done, _ = _loop(s.put, list(zip(keys, values, strict=True)), budget, s.checkpoint)
    s.flush()
    res["put"] = _rate(done, time.perf_counter() - t0, n)
    if s.checkpoint is not None:
        res["put"]["note"] = "queued to sqlitedict's thread; waited for every 512 puts"
    stored = dict(zip(keys[:done], values[:done], strict=True))
    gets = list(stored)
    rnd.shuffle(gets)
    got, t = _loop(s.get, [(k,) for k in gets], budget, None)
    res["get"] = _rate(got, t, len(gets))
    # A second pass over the same keys: a partydbm follower's first read of a key is a
    # round trip, the next ones come from its cache (other systems read the same pages)
    again = gets[:got]
    rnd.shuffle(again)
    got, t = _loop(s.get, [(k,) for k in again], budget, None)
    res["get_again"] = _rate(got, t, len(again))
    bad = [k for k in gets[:100] if s.get(k) != stored[k]]
    if bad:
        raise RuntimeError(f"get returned a wrong value for {bad[0]!r}")
    if s.get_many is not None:  # the same random gets, GET_MANY_KEYS per call
        calls = [(gets[i:i + GET_MANY_KEYS],) for i in range(0, len(gets), GET_MANY_KEYS)]
        ncalls, t = _loop(s.get_many, calls, budget, None)
        res["get_many"] = _rate(min(ncalls * GET_MANY_KEYS, len(gets)), t, len(gets))
        if s.get_many(gets[:100]) != [stored[k] for k in gets[:100]]:
            raise RuntimeError("get_many returned wrong values")
    if task["system"] != "socket-rtt":
        t0 = time.perf_counter()
        end, count = t0 + budget, 0
        for _ in s.scan():
            count += 1
            if not count & 4095 and time.perf_counter() > end:
                break
        res["iter"] = _rate(count, time.perf_counter() - t0, len(stored))
        listed = list(s.scan())
        if sorted(listed) != sorted(stored):
            raise RuntimeError(f"iteration gave {len(listed)} keys, {len(stored)} stored")
        res["iter"]["ordered"] = listed == sorted(listed)
    m = task["lat_n"]
    res["lat_get"] = _latency(s.get, [(k,) for k in gets[:m]], None)
    fresh = [(KEY % (n + i), values[i]) for i in range(min(m, n))]  # new keys, as in put
    res["lat_put"] = _latency(s.put, fresh, s.checkpoint)
    return res


def bulk_pairs(n: int, budget: float, state: dict[str, Any],
               peak: Peak) -> Iterator[tuple[bytes, bytes]]:
    """n keys in a scattered order, random values made on the fly (memory stays flat);
    stops early when the budget runs out."""
    randbytes = random.Random(2).randbytes
    end = time.perf_counter() + budget
    for i in range(n):
        if not i & 16383 and i:
            peak.sample()
            if time.perf_counter() > end:
                return
        state["n"] = i + 1
        yield KEY % (i * PERMUTE % n), randbytes(VALUE_SIZE)


def bulk(s: Store, task: dict[str, Any]) -> dict[str, Any]:
    n = task["n"]
    peak = Peak()
    state = {"n": 0}
    t0 = time.perf_counter()
    s.bulk(bulk_pairs(n, task["budget"], state, peak))
    s.flush()
    t = time.perf_counter() - t0
    return {"bulk": peak.report(_rate(state["n"], t, n, note=s.note))}


def iterbulk(s: Store, task: dict[str, Any]) -> dict[str, Any]:
    peak = Peak()
    t0 = time.perf_counter()
    end = t0 + task["budget"]
    count = 0
    for _ in s.scan():
        count += 1
        if not count & 16383:
            peak.sample()
            if time.perf_counter() > end:
                break
    t = time.perf_counter() - t0
    return {"iter_bulk": peak.report(_rate(count, t, task["n"]))}


# How long a process that is ready waits for the others' warm-up: 8 followers reading
# 1,000,000 keys each, one round trip per key, take minutes on 2 CPUs.
WARM_WAIT = 1800.0


def _stdin_line(timeout: float) -> str:
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    return sys.stdin.readline() if ready else ""


def mp(s: Store, task: dict[str, Any]) -> dict[str, Any]:
    n, role, seed = task["n"], task["mp_role"], task["seed"]
    rnd = random.Random(seed)
    value = rnd.randbytes(VALUE_SIZE)
    kinds = [role == "reader" or (role == "mixed" and rnd.random() < 0.9)
             or (role == "read99" and rnd.random() < 0.99) for _ in range(8192)]
    # Keys drawn from the whole database, as many as it holds (up to 2**20): the working
    # set is the database, so a cache smaller than it shows (a plan of 8,192 keys used
    # to make every run at 1,000,000 keys a run over 8,192).
    keys = [KEY % rnd.randrange(n) for _ in range(-(-max(8192, min(n, 1 << 20)) // 64) * 64)]
    get, put, checkpoint = s.get, s.put, s.checkpoint
    # Every process reads every key once before the clock starts, whatever the system:
    # the runs measure the steady state of long-lived processes (a partydbm follower's
    # cache warm, SQLite's and LMDB's pages in memory). What the warm-up took is kept.
    t0 = time.perf_counter()
    for i in range(n):
        get(KEY % i)
    warm_s = time.perf_counter() - t0
    print("ready", flush=True)
    if _stdin_line(WARM_WAIT).strip() != "go":
        raise RuntimeError("no 'go' from bench.py")
    gets = puts = pos = kpos = 0
    errors: dict[str, int] = {}
    misses = s.misses()
    t0 = time.perf_counter()
    end = t0 + task["duration"]
    while time.perf_counter() < end:
        for k, is_get in zip(keys[kpos:kpos + 64], kinds[pos:pos + 64], strict=True):
            try:
                if is_get:
                    get(k)
                    gets += 1
                else:
                    put(k, value)
                    puts += 1
            except Exception as exc:
                name = type(exc).__name__
                errors[name] = errors.get(name, 0) + 1
                if sum(errors.values()) > 1000:
                    raise
        pos, kpos = (pos + 64) % len(kinds), (kpos + 64) % len(keys)
        if checkpoint is not None and puts:
            checkpoint()
    t = time.perf_counter() - t0
    res = {"gets": gets, "puts": puts, "seconds": t, "ops_per_s": (gets + puts) / t,
           "errors": errors, "role": role, "db_role": s.role, "warm_s": warm_s}
    after = s.misses()
    if misses is not None and after is not None:
        res["cache_misses"] = after - misses  # of `gets`, during the timed run
    return res


def paired(s: Store, task: dict[str, Any]) -> dict[str, Any]:
    """partydbm and its floor in one process, in alternating blocks of the same keys, so
    both see the same machine load: the leader against raw plyvel, the follower against
    the bare socket round trip. Per op: the sum of block times over the ops.

    A round trip costs very different amounts depending on whether the two processes
    share a CPU (a direct hand-over: the software cost) or not (a cross-CPU wake-up,
    which on a VM dominates), and the scheduler picks either at random. So a follower is
    measured pinned both ways: "same" (every process on one CPU) and "split"."""
    ref = open_store("plyvel" if s.role == "leader" else "socket-rtt", task["ref_path"], task)
    mine = os.sched_getaffinity(0)
    servers = [task[k] for k in ("leader_pid", "server_pid") if task.get(k)]
    placements: dict[str, tuple[set[int], set[int]] | None] = {"free": None}
    cpus = sorted(mine)
    if s.role == "follower" and len(cpus) >= 2:
        placements = {"same": ({cpus[0]}, {cpus[0]}), "split": ({cpus[0]}, {cpus[1]})}
    res: dict[str, Any] = {}
    try:
        for name, pins in placements.items():
            if pins is not None:
                _pin([os.getpid()], pins[0])
                _pin(servers, pins[1])
            res[name] = _alternate(s, ref, task["n"])
        res.update(res["same" if "same" in res else "free"])
        res["us_per_op"] = res["get"]["us_per_op"]  # what picks the median round
        return {"paired": res}
    finally:
        _pin([os.getpid(), *servers], mine)
        ref.close()


def _pin(pids: list[int], cpus: set[int]) -> None:
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(int(tid), cpus)
            except OSError:
                pass


def _alternate(s: Store, ref: Store, n: int) -> dict[str, Any]:
    block = PAIR_BLOCK
    rnd = random.Random(3)
    order = list(range(n))
    rnd.shuffle(order)
    keys = [KEY % i for i in order]
    values = [rnd.randbytes(VALUE_SIZE) for _ in range(n)]
    res: dict[str, Any] = {}
    for op in ("put", "get"):
        if op == "get":
            rnd.shuffle(keys)
        fns = {"party": s.put if op == "put" else s.get,
               "floor": ref.put if op == "put" else ref.get}
        spent = {"party": 0.0, "floor": 0.0}
        for j in range(0, n, block):
            args = (list(zip(keys[j:j + block], values[j:j + block], strict=True))
                    if op == "put" else [(k,) for k in keys[j:j + block]])
            for who in (("party", "floor") if j // block % 2 else ("floor", "party")):
                fn = fns[who]
                t0 = time.perf_counter()
                for a in args:
                    fn(*a)
                spent[who] += time.perf_counter() - t0
        res[op] = _rate(n, spent["party"], n)
        res[op + "_floor"] = _rate(n, spent["floor"], n)
        res[op + "_ratio"] = spent["party"] / spent["floor"]
    return res


PAIR_BLOCK = 500
TASKS = {"session": session, "bulk": bulk, "iterbulk": iterbulk, "mp": mp, "paired": paired}


def main() -> int:
    task = json.loads(sys.argv[1])
    if task["task"] == "sockserver":
        sockserver(task)
        return 0
    s = open_store(task["system"], task["path"], task)
    try:
        result = TASKS[task["task"]](s, task)
        result["_role"] = s.role
        result["_python"] = sys.version.split()[0]
        print(json.dumps(result), flush=True)
        if task["task"] == "mp":
            _stdin_line(WARM_WAIT)  # stay open (a leader keeps serving) until everyone is done
    finally:
        s.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
