"""Read-modify-write operations are atomic across processes and threads.

Four processes with two threads each race over the same keys at the same instant, with
one of them leading ("leader races") or all of them following a fifth process that only
leads ("followers only"). Each race is checked against what a dict would allow: every
key popped (or deleted) by exactly one racer, every setdefault of a key answering with
the one value finally stored, a counter incremented by compare_and_set ending exact.

Every process has the `rmw` pause seam on: the leader sleeps between the read and the
write of each read-modify-write, widening a window of a few microseconds, so that
each race fails every time when the operation is not atomic. The `stress` marker runs
the same races over ten times more keys (`pytest -m stress`).
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any

import pytest

import partydbm
from partydbm import _protocol as P
from partydbm._dispatch import RECENT_OUTCOMES, Dispatcher, Peer

from .procs import Party, Worker, all_replies
from .wire import decode

pytestmark = [pytest.mark.multiprocess, pytest.mark.heavy]

RACERS = 4
THREADS = 2
SIZES = [pytest.param(300, id="300"),
         pytest.param(3000, id="3000", marks=pytest.mark.stress)]
LAYOUTS = ["leader races", "followers only"]
PAUSE = {"PARTYDBM_PAUSE": "rmw:0.0002"}  # partydbm._seams: between read and write


def _racers(party: Party, path: Path, layout: str, fill: dict[bytes, bytes],
            env: dict[str, str] | None = None) -> list[Worker]:
    if layout == "followers only":
        host = party.repl(env)
        assert host.open(path) == "leader"
    racers = [party.repl(env) for _ in range(RACERS)]
    roles = [w.open(path) for w in racers]
    assert roles == (["leader"] if layout == "leader races" else ["follower"]) + [
        "follower"] * (RACERS - 1)
    racers[0].exec(f"db.update({fill!r})")
    return racers


def _race(racers: list[Worker], tmp_path: Path, op: str, keys: list[bytes],
          count: int = 0) -> list[list[Any]]:
    """Start `op` on every racer, let them all go at once, return every outcome."""
    start = tmp_path / f"start-{op}"
    for i, w in enumerate(racers):
        w.submit("eval", f"race(db, {op!r}, {keys!r}, {i}, {str(start)!r}, {THREADS}, "
                         f"{count})")
    start.touch()
    return [pair for reply in all_replies(racers, timeout=60) for pair in reply]


def _keys(n: int) -> dict[bytes, bytes]:
    return {b"k%05d" % i: b"v%05d" % i for i in range(n)}


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_key_is_popped_exactly_once(tmp_path: Path, layout: str, n: int) -> None:
    fill = _keys(n)
    with Party() as party:
        racers = _racers(party, tmp_path / "db", layout, fill, PAUSE)
        outcomes = _race(racers, tmp_path, "pop", list(fill))
        popped = collections.Counter(k for k, v in outcomes if v is not None)
        twice = [k for k, c in popped.items() if c > 1]
        assert not twice, f"{len(twice)} keys popped more than once, e.g. {twice[:3]}"
        assert set(popped) == set(fill)
        assert all(v == fill[k] for k, v in outcomes if v is not None)
        assert racers[1].eval("len(db)") == 0


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_key_is_deleted_exactly_once(tmp_path: Path, layout: str, n: int) -> None:
    fill = _keys(n)
    with Party() as party:
        racers = _racers(party, tmp_path / "db", layout, fill, PAUSE)
        outcomes = _race(racers, tmp_path, "del", list(fill))
        deleted = collections.Counter(k for k, ok in outcomes if ok)
        assert sum(deleted.values()) == n, f"{sum(deleted.values())} deletes for {n} keys"
        assert set(deleted) == set(fill)
        assert racers[2].eval("len(db)") == 0


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_setdefault_answers_the_value_finally_stored(tmp_path: Path, layout: str,
                                                      n: int) -> None:
    keys = list(_keys(n))
    with Party() as party:
        racers = _racers(party, tmp_path / "db", layout, {}, PAUSE)
        outcomes = _race(racers, tmp_path, "setdefault", keys)
        final = racers[3].eval("dict(db.items())")
        assert set(final) == set(keys)
        wrong = [(k, v, final[k]) for k, v in outcomes if v != final[k]]
        assert not wrong, f"{len(wrong)} of {len(outcomes)} answers differ from the value " \
                          f"stored, e.g. {wrong[:3]}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_popitem_hands_every_item_to_exactly_one_racer(tmp_path: Path, layout: str) -> None:
    fill = _keys(200)
    with Party() as party:
        racers = _racers(party, tmp_path / "db", layout, fill, PAUSE)
        outcomes = _race(racers, tmp_path, "popitem", [])
        assert len(outcomes) == len(fill), f"{len(outcomes)} items for {len(fill)} keys"
        assert dict((k, v) for k, v in outcomes) == fill


@pytest.mark.parametrize("count", [pytest.param(60, id="60"),
                                   pytest.param(600, id="600", marks=pytest.mark.stress)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_counter_incremented_by_compare_and_set_ends_exact(
        tmp_path: Path, layout: str, count: int) -> None:
    keys = [b"counter-a", b"counter-b"]
    with Party() as party:
        racers = _racers(party, tmp_path / "db", layout, {}, PAUSE)
        outcomes = _race(racers, tmp_path, "incr", keys, count)
        expected = RACERS * THREADS * count
        assert racers[0].eval("[db[k] for k in (b'counter-a', b'counter-b')]") == [
            b"%d" % expected] * 2
        assert sum(a for _, a in outcomes) >= 2 * expected


# -- close() while other threads use the handle ---------------------------------------------
@pytest.mark.parametrize("rounds", [pytest.param(15, id="15"),
                                    pytest.param(200, id="200", marks=pytest.mark.stress)])
@pytest.mark.parametrize("role", ["leader", "follower"])
def test_closing_a_handle_under_its_threads_ends_them_with_ClosedError(
        tmp_path: Path, role: str, rounds: int) -> None:
    """Four threads read, iterate, write and list keys through one handle while another
    thread closes it: each must end with ClosedError, and the process must live (it
    used to die of SIGSEGV: LevelDB closed under a call that had released the GIL).
    The last handle's close is also the engine's: a leader hands over meanwhile."""
    path = tmp_path / "db"
    seed = int.from_bytes(os.urandom(4), "big")
    print(f"seed {seed}")
    with Party() as party:
        if role == "follower":
            host = party.repl()
            assert host.open(path) == "leader"
        worker = party.spawn("close_under_threads", path, rounds, seed)
        line = worker.readline(timeout=120)
        code = worker.wait()
        assert code == 0, f"exit status {code} (-11: SIGSEGV); stderr:\n{worker.stderr()}"
        assert line is not None
        outcome = decode(line)
        assert outcome["problems"] == [], "\n".join(outcome["problems"])
        assert outcome["leader_rounds"] == (rounds if role == "leader" else 0)


# -- what a leader keeps to answer a resent read-modify-write -----------------------------
def test_a_followers_outcomes_are_kept_for_its_last_requests_only(tmp_path: Path) -> None:
    """The outcome of each read-modify-write (what a pop took...) is written with the
    write, for a resend after failover; only the last RECENT_OUTCOMES per follower are
    kept, so a work queue of pops does not grow the database."""
    with partydbm.open(tmp_path / "db") as db:
        db.update({b"k%03d" % i: b"v%03d" % i for i in range(1, 101)})
        store = db._engine.route.store  # type: ignore[union-attr]
        dispatcher, peer = Dispatcher(store), Peer()
        peer.load(store, b"client")
        for rid in range(1, 101):
            assert dispatcher.call(peer, P.POP, rid, [b"k%03d" % rid, False]) == b"v%03d" % rid
        kept = list(range(101 - RECENT_OUTCOMES, 101))
        stored = [k for k, _ in store.backend._db.iterator(prefix=b"mo" + b"client")]
        assert [int.from_bytes(k[-8:], "big") for k in stored] == kept
        assert dispatcher.call(peer, P.POP, 100, [b"k100", False]) == b"v100"  # resent
        with pytest.raises(partydbm.error, match="no longer known"):
            dispatcher.call(peer, P.POP, 5, [b"k005", False])
        again = Peer()
        again.load(store, b"client")  # what the next leader reads at the hello
        assert (again.applied, again.kept) == (100, kept)
        assert len(db) == 0


def test_a_close_from_inside_a_call_does_not_wait_for_itself(tmp_path: Path) -> None:
    """A handle's __del__ run by the garbage collector in the middle of one of the
    store's own calls closes the store from inside that call: it cannot wait for the
    call to leave (it would wait for ever). LevelDB is closed once the call has left."""
    import threading
    import time

    db = partydbm.open(tmp_path / "db")
    db[b"k"] = b"v"
    store = db._engine.route.store  # type: ignore[union-attr]
    real_get = store._raw_get

    def get_and_close(key: bytes) -> bytes | None:
        value: bytes | None = real_get(key)
        store.close()  # what a finalizer closing the last handle would do
        assert store.backend is not None  # not under this very call
        return value

    store._raw_get = get_and_close
    done: list[bytes | None] = []
    t = threading.Thread(target=lambda: done.append(store.get(b"k")))
    t.start()
    t.join(10)
    assert not t.is_alive() and done == [b"v"]
    deadline = time.monotonic() + 10
    while store.backend is not None:
        assert time.monotonic() < deadline, "LevelDB was never closed"
        time.sleep(0.001)
    with pytest.raises(partydbm.ClosedError):
        store.get(b"k")
    db.close()
