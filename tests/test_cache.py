"""Followers answer reads from a cache of their own, kept coherent by the leader's change
ring, and no read is ever stale: checked by a staleness checker across processes while
leaders are SIGKILLed one after the other, with seams at the worst moments of a
publication, and at the edges (wrap-around, a follower stopped past a whole ring, clear
from another process, values at the size limits).

The checker (tests/workers/stale.py `stale_check`): writers say on a shared board what they
issue before each write and what was acknowledged after it; readers check that every
value they read is at least what was acknowledged, and what any reader observed,
before the read began, and at most what was issued when it ended.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from partydbm import _cache
from partydbm import _ring as R
from partydbm._election import LockFile

from .procs import DEADLINE, Party, Worker, WorkerError, wait_for
from .wire import decode
from .workers.stale import Board

pytestmark = [pytest.mark.multiprocess, pytest.mark.heavy,
              pytest.mark.skipif(not R.ORDERED_MEMORY, reason="no ring on this machine")]

NKEYS = 24
NEVER_LEAD = {"PARTYDBM_NEVER_LEAD": "1"}


def _holder(path: Path) -> int | None:
    lock = LockFile(str(path))
    try:
        return lock.holder_pid()
    finally:
        lock.close()


def _led_by_another(path: Path, old: int | None) -> bool:
    return _holder(path) not in (None, old)


def _checker(party: Party, tmp_path: Path, *, hosts: int, writers: int, readers: int,
             seed: int, stale: bool = False, env: dict[str, str] | None = None
             ) -> tuple[list[Worker], list[Worker]]:
    """Start the checker's processes: `hosts` lead one after the other (and read), the
    writers and readers only ever follow. Returns (hosts, the others)."""
    path, board, bad = tmp_path / "db", tmp_path / "board", tmp_path / "violations"
    Board(str(board), NKEYS)
    host_workers = []
    for i in range(hosts):
        w = party.spawn("stale_check", path, board, "host", readers + i, NKEYS, writers,
                        bad, seed, env=env)
        w.expect("ready")  # in turn: the first one leads
        host_workers.append(w)
    others = [party.spawn("stale_check", path, board, "writer", i, NKEYS, writers, bad, seed,
                          env={**NEVER_LEAD, **(env or {})}) for i in range(writers)]
    others += [party.spawn("stale_check", path, board, "reader", i, NKEYS, writers, bad, seed,
                           "1" if stale else "0", env={**NEVER_LEAD, **(env or {})})
               for i in range(readers)]
    return host_workers, others


def _finish(tmp_path: Path, followers: list[Worker], hosts: list[Worker]
            ) -> tuple[list[dict[str, Any]], list[str]]:
    """Stop the followers, then the hosts; every report (followers first) and every
    violation."""
    board = Board(str(tmp_path / "board"), NKEYS)
    reports, failed = [], []
    board.stop("follower")
    for w in [*followers, None, *hosts]:
        if w is None:
            board.stop("host")
            continue
        try:
            line = w.readline(timeout=DEADLINE)
        except WorkerError as exc:
            failed.append(str(exc)[-3000:])
            continue
        if line is None or w.wait() != 0:
            failed.append(f"{w} (rc {w.proc.returncode}):\n{w.stderr()[-3000:]}")
        else:
            reports.append(decode(line))
    assert not failed, "\n".join(failed)
    bad = tmp_path / "violations"
    return reports, bad.read_text().splitlines() if bad.exists() else []


@pytest.mark.parametrize("kills", [pytest.param(3, id="3 kills"),
                                   pytest.param(12, id="12 kills", marks=pytest.mark.stress)])
def test_no_read_is_stale_while_leaders_are_killed(tmp_path: Path, kills: int) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    print(f"seed {seed}")
    path = tmp_path / "db"
    with Party() as party:
        hosts, others = _checker(party, tmp_path, hosts=kills + 1, writers=2, readers=2,
                                 seed=seed)
        by_pid = {h.pid: h for h in hosts}
        for _ in range(kills):
            time.sleep(0.3)
            pid = _holder(path)
            assert pid in by_pid, f"the LOCK is held by {pid}, not by a host"
            by_pid.pop(pid).kill()
            wait_for(functools.partial(_led_by_another, path, pid), what="a new leader")
        time.sleep(0.3)
        reports, violations = _finish(tmp_path, others, list(by_pid.values()))
    print(reports)
    assert not violations, f"{len(violations)} stale reads, e.g.:\n" + "\n".join(violations[:5])
    writes = sum(r["writes"] for r in reports)
    reads = [r for r in reports[2:4]]  # the followers that only read
    assert writes > 50 and all(r["reads"] > 50 for r in reads), reports
    # The cache answered most of the followers' reads (a miss goes to the leader).
    assert sum(r["misses"] for r in reads) < 0.5 * sum(r["reads"] for r in reads), reports


def test_the_checker_catches_a_cache_that_does_not_catch_up(tmp_path: Path) -> None:
    """The checker's own check: readers whose cache never applies the leader's changes
    must be caught."""
    with Party() as party:
        hosts, others = _checker(party, tmp_path, hosts=1, writers=2, readers=2, seed=1,
                                 stale=True)
        time.sleep(1.0)
        reports, violations = _finish(tmp_path, others, hosts)
    assert sum(r["violations"] for r in reports) > 0 and violations, reports


# -- the worst moments, one at a time ----------------------------------------------------
CACHED = "db._engine.route.cache.entries.get({key!r}, 'not cached')"


def _follow_and_cache(worker: Worker, path: Path, keys: list[bytes]) -> None:
    """Open as a follower and read `keys` once (so they are cached, as the test checks)."""
    assert worker.open(path) == "follower"
    worker.exec(f"for k in {keys!r}: db.get(k)")
    missing = worker.eval(f"[k for k in {keys!r} if k not in db._engine.route.cache.entries]")
    assert not missing, f"not cached: {missing}"


def test_a_follower_that_missed_its_leaders_death_stops_answering_from_its_cache(
        tmp_path: Path) -> None:
    """F's leader dies while F is idle (F does not notice: a cached read never touches
    the socket). The next leader must retire the old ring before it acknowledges any
    write, so F's next read does not answer the value that write replaced."""
    path = tmp_path / "db"
    with Party() as party:
        old, f, new = party.repl(), party.repl(NEVER_LEAD), party.repl()
        assert old.open(path) == "leader"
        old.exec("db[b'k'] = b'v1'")
        _follow_and_cache(f, path, [b"k"])
        old.kill()
        assert new.open(path) == "leader"
        new.exec("db[b'k'] = b'v2'")  # acknowledged
        assert f.eval("db[b'k']") == b"v2"


def test_the_leaders_own_readers_never_see_a_value_a_follower_would_not(
        tmp_path: Path) -> None:
    """A writer on the leader has written LevelDB and not yet published the new value
    (paused there for 2 s). A reader on the leader must not return it before it is
    published: a follower reading after that would still answer the old value from
    its cache. The leader's read waits for the publication; then both see it."""
    path = tmp_path / "db"
    with Party() as party:
        leader = party.repl({"PARTYDBM_PAUSE": "after_write:2"})
        f = party.repl(NEVER_LEAD)
        assert leader.open(path) == "leader"
        leader.exec("db[b'k'] = b'v1'")
        _follow_and_cache(f, path, [b"k"])
        leader.exec("import threading\n"
                    "w = threading.Thread(target=db.__setitem__, args=(b'k', b'v2'))\n"
                    "w.start()\n"
                    "while db[b'k'] != b'v2': time.sleep(0.001)\n"  # the leader sees v2
                    "result = w.is_alive()")
        assert f.eval("db[b'k']") == b"v2"
        leader.exec("w.join()")
        assert f.eval(CACHED.format(key=b"k")) == b"v2"  # cached again, up to date


@pytest.mark.parametrize("point", ["after_write", "mid_append"])
def test_a_leader_killed_while_publishing_leaves_nothing_to_trust_wrongly(
        tmp_path: Path, point: str) -> None:
    """The leader dies between LevelDB's write and the publication of its outcome, or
    in the middle of publishing a batch's changes: the write completes exactly once
    on the next leader and every follower reads its outcome."""
    path = tmp_path / "db"
    keys = [b"a", b"b"]
    with Party() as party:
        old = party.repl({"PARTYDBM_CRASH_AT": f"{point}:1"})
        f, w = party.repl(NEVER_LEAD), party.repl()
        assert old.open(path) == "leader"
        old.exec("db.update({b'a': b'1', b'b': b'1'})")  # no follower yet: not published
        _follow_and_cache(f, path, keys)
        assert w.open(path) == "follower"
        w.exec("with db.write_batch() as wb:\n wb.put(b'a', b'2')\n wb.put(b'b', b'2')")
        old.wait()  # it died in the middle; w's batch was applied once, by w itself
        assert w.eval("db.is_leader") is True
        assert f.eval("[db[b'a'], db[b'b']]") == [b"2", b"2"]
        assert f.eval("db.get_many([b'a', b'b'])") == [b"2", b"2"]


def test_a_leader_killed_while_taking_over_leaves_the_old_ring_retired(
        tmp_path: Path) -> None:
    path = tmp_path / "db"
    with Party() as party:
        first = party.repl()
        f = party.repl(NEVER_LEAD)
        taker = party.repl({"PARTYDBM_CRASH_AT": "promote"})
        assert first.open(path) == "leader"
        first.exec("db[b'k'] = b'v1'")
        _follow_and_cache(f, path, [b"k"])
        assert taker.open(path) == "follower"
        first.kill()
        taker.wait()  # took the LOCK, retired the ring, died before serving anything
        last = party.repl()
        assert last.open(path) == "leader"
        last.exec("db[b'k'] = b'v2'")
        assert f.eval("db[b'k']") == b"v2"


# -- the edges ---------------------------------------------------------------------------
SMALL_RING = "from partydbm import _ring\n_ring.SLOTS = 64\n"
TEN = [b"k%d" % i for i in range(10)]


def _small_ring(party: Party, path: Path) -> tuple[Worker, Worker]:
    """A leader whose ring has 64 slots, and a follower that has cached TEN."""
    leader, f = party.repl(), party.repl(NEVER_LEAD)
    leader.exec(SMALL_RING)
    assert leader.open(path) == "leader"
    leader.exec(f"db.update({{k: b'0' for k in {TEN!r}}})")
    _follow_and_cache(f, path, TEN)
    return leader, f


def test_a_ring_that_wraps_around_keeps_followers_exact(tmp_path: Path) -> None:
    """A ring of 64 slots (64 writes): a follower that reads between every few writes
    keeps its entries; one that falls a whole ring behind drops them; both read what
    was written last."""
    keys = TEN
    with Party() as party:
        leader, f = _small_ring(party, tmp_path / "db")
        for burst in (3, 5, 70, 7, 200):
            leader.exec(f"for n in range({burst}): db[b'k%d' % (n % 10)] = b'%d' % n")
            expected = leader.eval(f"[db[k] for k in {keys!r}]")
            assert f.eval(f"[db[k] for k in {keys!r}]") == expected, burst
        assert f.eval("db._engine.route.cache.resets") >= 2  # the 70 and the 200


def test_a_follower_stopped_past_a_whole_ring_reads_exactly_after(tmp_path: Path) -> None:
    keys = TEN
    with Party() as party:
        leader, f = _small_ring(party, tmp_path / "db")
        os.kill(f.pid, signal.SIGSTOP)
        try:
            leader.exec("for n in range(500): db[b'k%d' % (n % 10)] = b'x%d' % n")
        finally:
            os.kill(f.pid, signal.SIGCONT)
        assert f.eval(f"[db[k] for k in {keys!r}]") == leader.eval(f"[db[k] for k in {keys!r}]")


@pytest.mark.parametrize("how", ["clear", "flag n", "big update", "delete each"])
def test_emptying_or_rewriting_many_keys_from_another_process(tmp_path: Path,
                                                              how: str) -> None:
    path = tmp_path / "db"
    keys = [b"k%03d" % i for i in range(100)]
    with Party() as party:
        leader, f, w = party.repl(), party.repl(NEVER_LEAD), party.repl(NEVER_LEAD)
        assert leader.open(path) == "leader"
        leader.exec(f"db.update({{k: b'old' for k in {keys!r}}})")
        _follow_and_cache(f, path, keys)
        assert w.open(path) == "follower"
        w.exec({"clear": "db.clear()",
                "flag n": f"partydbm.open({str(path)!r}, 'n').close()",
                "big update": f"db.update({{k: b'new' for k in {keys!r}}})",
                "delete each": f"for k in {keys!r}: del db[k]"}[how])
        expected = [b"new" if how == "big update" else None] * len(keys)
        assert f.eval(f"[db.get(k) for k in {keys!r}]") == expected
        assert f.eval(f"db.get_many({keys!r})") == expected
        assert f.eval(f"[k in db for k in {keys[:5]!r}]") == [how == "big update"] * 5


@pytest.mark.parametrize("size", [
    R.PAYLOAD - 1, R.PAYLOAD, R.PAYLOAD + 1, _cache.VALUE_MAX, _cache.VALUE_MAX + 1])
def test_values_at_the_size_limits_are_read_exactly(tmp_path: Path, size: int) -> None:
    """A value that fits a slot travels in the ring; one that does not is dropped from
    caches and read again; one over VALUE_MAX is never cached."""
    path = tmp_path / "db"
    key = b"k"
    value = (b"%d-" % size * size)[:size - len(key)]  # key + value == size bytes
    with Party() as party:
        leader, f = party.repl(), party.repl(NEVER_LEAD)
        assert leader.open(path) == "leader"
        leader.exec("db[b'k'] = b'small'")
        _follow_and_cache(f, path, [key])
        leader.exec(f"db[b'k'] = {value!r}")
        assert f.eval("db[b'k']") == value
        cached = f.eval(CACHED.format(key=key))
        assert cached == (value if len(value) <= _cache.VALUE_MAX else "not cached")
        leader.exec("db[b'k'] = b'small again'")
        assert f.eval("db[b'k']") == b"small again"


def test_a_handle_with_cache_size_0_always_asks_the_leader(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with Party() as party:
        leader, f = party.repl(), party.repl(NEVER_LEAD)
        assert leader.open(path) == "leader"
        leader.exec("db[b'k'] = b'v'")
        assert f.open(path, cache_size=0) == "follower"
        assert f.eval("type(db._engine.route).__name__") == "RemoteRoute"
        f.exec(f"cached = partydbm.open({str(path)!r})")  # a later handle wants a cache
        assert f.eval("db[b'k']") == b"v"
        assert f.eval("db._engine.cache_size") == _cache.DEFAULT_SIZE
