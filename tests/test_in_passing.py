"""A busy leader answers its followers in passing (_passing.Passing.poll): the
application's thread answers small requests on its way into the database and the
serving threads park; big or slow requests go back to them, and when the application
stops calling, the watchdog hands every connection back. Checked against a model, with
the leader busy in one of its threads while followers work."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from partydbm import _protocol as P
from partydbm._dispatch import Peer
from partydbm._passing import Conn, Passing

from .procs import DEADLINE, Party, Worker, wait_for

pytestmark = [pytest.mark.multiprocess, pytest.mark.heavy]

BUSY = """
import threading, time
busy_stop = threading.Event()
def busy():
    while not busy_stop.is_set():
        try:
            {call}
        except partydbm.ClosedError:
            return
busy_thread = threading.Thread(target=busy, daemon=True)
busy_thread.start()
"""
IN_PASSING = "db._engine.server.passing.answered"


@pytest.fixture
def party() -> Iterator[Party]:
    with Party() as p:
        yield p


def _busy_leader(party: Party, path: Path, call: str = "db.get(b'busy')"
                 ) -> tuple[Worker, Worker]:
    """A leader with a thread that keeps making `call`, and a follower whose reads all
    go to the leader (no cache: what is under test is how the leader answers them)."""
    leader, follower = party.repl(), party.repl()
    assert leader.open(path) == "leader"
    assert follower.open(path, cache_size=0) == "follower"
    leader.exec(BUSY.format(call=call))
    return leader, follower


def _passes(leader: Worker, one_round: Callable[[], None], what: str) -> None:
    """Run one_round (which checks its own results) until the leader answered something
    of a round in passing. One round nearly always does; on a loaded machine the busy
    thread can look idle to the watchdog for a whole round, and its followers are then
    served by their threads (correctly, but not through the path under test)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        before = leader.eval(IN_PASSING)
        one_round()
        if leader.eval(IN_PASSING) > before:
            return
        assert time.monotonic() < deadline, f"{what}: nothing was answered in passing"


def test_a_busy_leader_answers_a_followers_threads_in_passing(party: Party,
                                                               tmp_path: Path) -> None:
    leader, follower = _busy_leader(party, tmp_path / "db")
    seed = int.from_bytes(os.urandom(4), "big")
    print(f"thread workload seed {seed}")
    outcome = follower.eval(f"thread_workload(db, {seed}, nops=400)", timeout=60)
    assert outcome["errors"] == [], "\n".join(outcome["errors"])
    assert leader.eval(IN_PASSING) > 0  # the path under test was taken
    leader.exec("busy_stop.set(); busy_thread.join()")
    assert follower.eval("dict(db.items())") == outcome["model"]
    assert leader.eval("dict(db.items())") == outcome["model"]


def test_big_requests_go_to_the_serving_thread_in_order(party: Party, tmp_path: Path) -> None:
    leader, follower = _busy_leader(party, tmp_path / "db")

    def one_round() -> None:  # the same writes again leave the same database
        got = follower.exec(
            "big = b'x' * 300_000\n"
            "db[b'a'] = b'1'\n"
            "db[b'big'] = big\n"  # more than one read's worth: the serving thread's job
            "db[b'b'] = b'2'\n"
            "db.update({b'u%04d' % i: b'%d' % i for i in range(2000)})\n"
            "del db[b'a']\n"
            "result = [db[b'big'] == big, db.get(b'a'), db[b'b'], len(db),\n"
            "          list(db.iterator(prefix=b'u', include_value=False))[-1]]")
        assert got == [True, None, b"2", 2002, b"u1999"]

    _passes(leader, one_round, "small requests among big ones")
    assert leader.eval("db[b'u0042']") == b"42"


def test_followers_are_served_when_the_leader_stops_calling(party: Party,
                                                            tmp_path: Path) -> None:
    """The serving threads parked while the application called; once it stops, every
    request is still answered (the watchdog hands the connections back), promptly."""
    leader, follower = _busy_leader(party, tmp_path / "db")
    follower.exec("for i in range(200): db[b'k%d' % i] = b'v'")
    leader.exec("busy_stop.set(); busy_thread.join()")
    before = leader.eval(IN_PASSING)
    t0 = time.monotonic()
    got = follower.exec("result = [db[b'k%d' % i] for i in range(200)]")
    assert got == [b"v"] * 200
    assert time.monotonic() - t0 < DEADLINE / 2
    assert leader.eval(IN_PASSING) == before  # nobody polled: the threads answered


def test_closing_a_busy_leader_hands_over_with_nothing_lost(party: Party,
                                                            tmp_path: Path) -> None:
    path = tmp_path / "db"
    leader, follower = _busy_leader(party, path)
    written = follower.exec("result = write_range(db, 'w%03d', 100, 'v%d')")
    follower.submit("exec", "result = write_range(db, 'x%04d', 3000, 'y%d')")
    leader.exec("time.sleep(0.05)\ndb.close()\npartydbm.let_go()\nbusy_thread.join()")
    more = follower.reply(timeout=60)
    assert follower.eval("dict(db.items())") == {**written, **more}
    assert follower.eval("db.is_leader") is True


INTERRUPT_ONCE = """
interrupted = []
passing = db._engine.server.passing
_handle = passing._handle
def _handle_then_interrupt(peer, msg, pack):
    out = _handle(peer, msg, pack)
    if threading.current_thread() is busy_thread and not interrupted and len(seen) >= 20:
        interrupted.append(msg[0])
        raise KeyboardInterrupt  # applied, its reply not sent
    seen.append(1) if threading.current_thread() is busy_thread else None
    return out
seen = []
passing._handle = _handle_then_interrupt
busy_stop = threading.Event()
def busy():
    while not busy_stop.is_set():
        try:
            db.get(b'busy')
        except KeyboardInterrupt:
            pass  # the application carries on
busy_thread = threading.Thread(target=busy, daemon=True)
busy_thread.start()
"""


def test_an_interrupt_while_answering_in_passing_loses_and_repeats_nothing(
        party: Party, tmp_path: Path) -> None:
    """KeyboardInterrupt reaches the application's thread after it applied a follower's
    request and before the reply: that connection ends, the follower sends the request
    again, and the model (deletes report whether the key existed) still holds."""
    path = tmp_path / "db"
    leader, follower = party.repl(), party.repl()
    assert leader.open(path) == "leader"
    assert follower.open(path) == "follower"
    leader.exec("import threading\n" + INTERRUPT_ONCE)
    deadline = time.monotonic() + DEADLINE
    # A round nearly always interrupts; on a loaded machine the busy thread may answer
    # fewer than 20 of its requests in passing (see _passes): start again, afresh.
    while True:
        seed = int.from_bytes(os.urandom(4), "big")
        print(f"thread workload seed {seed}")
        follower.exec("db.clear()")
        outcome = follower.eval(f"thread_workload(db, {seed}, nops=300)", timeout=60)
        assert outcome["errors"] == [], "\n".join(outcome["errors"])
        if leader.eval("interrupted"):
            break
        assert time.monotonic() < deadline, "never 20 requests answered in passing"
    assert len(leader.eval("interrupted")) == 1
    leader.exec("busy_stop.set(); busy_thread.join()")
    assert follower.eval("dict(db.items())") == outcome["model"]
    assert follower.eval("db.is_leader") is False


def test_synced_writes_are_never_answered_in_passing(party: Party, tmp_path: Path) -> None:
    """A follower's write with flag "s" waits for fsync: the application's thread must
    not pay for it, so it goes to the serving thread (the reads still pass)."""
    path = tmp_path / "db"
    leader, follower = _busy_leader(party, path)
    follower.exec(f"synced = partydbm.open({str(path)!r}, 'cs', cache_size=0)")
    follower.exec("for i in range(100): synced[b's%d' % i] = b'v'\n"
                  "for i in range(0, 100, 2): del synced[b's%d' % i]")
    assert leader.eval(IN_PASSING) == 0

    def reads() -> None:
        got = follower.eval("[synced.get(b's%d' % i) for i in range(4)]")
        assert got == [None, b"v"] * 2

    _passes(leader, reads, "the reads of a synced handle")


def test_a_process_that_only_serves_never_answers_in_passing(party: Party,
                                                             tmp_path: Path) -> None:
    path = tmp_path / "db"
    leader, follower = party.repl(), party.repl()
    assert leader.exec(f"from partydbm._open import open_to_serve\n"
                       f"db = open_to_serve({str(path)!r})\n"
                       "result = db.is_leader")
    assert follower.open(path) == "follower"
    leader.exec(BUSY.format(call="db.get(b'busy')"))
    follower.exec("for i in range(200): db[b'k%d' % i] = b'v'")
    assert follower.eval("[db[b'k%d' % i] for i in range(200)]") == [b"v"] * 200
    assert leader.eval(IN_PASSING) == 0
    assert leader.eval("db._engine.server.niceness") is None


def test_if_epoll_fails_the_serving_threads_take_everything_back(party: Party,
                                                                 tmp_path: Path) -> None:
    leader, follower = _busy_leader(party, tmp_path / "db")
    follower.exec("for i in range(50): db[b'k%d' % i] = b'v'")
    leader.exec("class Broken:\n"
                "    def poll(self, timeout): raise OSError(5, 'broken')\n"
                "    def close(self): pass\n"
                "    def unregister(self, fd): pass\n"
                "db._engine.server.passing._epoll = Broken()")
    got = follower.exec("result = [db[b'k%d' % i] for i in range(50)]")
    assert got == [b"v"] * 50
    # The busy thread finds epoll broken at its next poll; on a loaded machine the
    # serving threads may have answered every read before it ran again.
    wait_for(lambda: leader.eval("db._engine.server.passing.active") is False,
             what="answering in passing given up")


@pytest.mark.parametrize("call", ["db[b'k']", "db[b'k'] = b'v'", "b'k' in db",
                                  "db.pop(b'gone', None)", "db.firstkey()"])
def test_every_way_into_the_database_answers_in_passing(party: Party, tmp_path: Path,
                                                        call: str) -> None:
    """The hot paths that skip the engine (db[k], db[k] = v) poll too."""
    path = tmp_path / "db"
    leader, follower = party.repl(), party.repl()
    assert leader.open(path) == "leader"
    leader.exec("db[b'k'] = b'v'")
    assert follower.open(path, cache_size=0) == "follower"
    leader.exec(BUSY.format(call=call))

    def reads() -> None:
        assert follower.exec("result = [db[b'k'] for _ in range(300)]") == [b"v"] * 300

    _passes(leader, reads, call)


def test_a_connection_ended_in_passing_leaves_the_epoll_set_before_its_fd_comes_back() -> None:
    """poll() ends a connection when the application's thread is interrupted in the
    middle of its request. It must stop watching it before the hang-up frees its fd
    number: the next accepted connection can get that number, and the ended one's
    clean-up used to unwatch the newcomer instead (which then stayed parked while the
    application was busy)."""
    interrupted: list[bytes] = []

    def handle(peer: Peer, msg: Any, pack: Callable[[Any], bytes]) -> tuple[bytes, bool]:
        if not interrupted:
            interrupted.append(peer.client or b"")
            raise KeyboardInterrupt  # the application's, in the middle of a request
        return pack([msg[1], True, b"v"]), False

    now = [100.0]
    passing = Passing(handle, clock=lambda: now[0])
    a, a_far = socket.socketpair()
    b_far = None
    try:
        first = Conn(a)
        first.peer.client = b"first"
        passing.watch(first)
        fd = a.fileno()
        a_far.send(P.pack([P.GET, 1, b"k"]))
        with pytest.raises(KeyboardInterrupt):
            passing.poll()
        assert interrupted == [b"first"] and first.end
        b, b_far = socket.socketpair()
        if b.fileno() != fd:  # make sure the number comes back, as accept() may do
            os.dup2(b.fileno(), fd)
            b.close()
            b = socket.socket(fileno=fd)
        second = Conn(b)
        second.peer.client = b"second"
        passing.watch(second)
        passing.unwatch(first)  # what the first connection's thread does as it ends
        b_far.send(P.pack([P.GET, 2, b"k"]))
        b_far.settimeout(DEADLINE)
        now[0] += 1.0  # the next poll is due
        passing.poll()
        assert P.unpack(b_far.recv(64)) == [2, True, b"v"]
    finally:
        passing.stop()
        for s in (a_far, b_far):
            if s is not None:
                s.close()
