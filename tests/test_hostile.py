"""Bytes that are not our protocol on the leader's socket: each gets an error reply where
one can be sent, then the connection ends; the leader serves everyone else meanwhile and
what is stored never changes.

The leader is this process (a handle opened first); the hostile and the well-behaved
clients are raw sockets (tests/hostile.py), so the server's deadlines can be shortened
with monkeypatch.
"""

from __future__ import annotations

import random
import resource
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import partydbm
from partydbm import _protocol as P
from partydbm._engine import Engine
from partydbm._passing import Conn

from .hostile import Raw, is_error, served
from .procs import DEADLINE

MODEL = {b"a": b"1", b"b": b"2", b"big": b"x" * 300_000}


@pytest.fixture(params=["idle", "busy"])
def leader(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[partydbm.PartyDBM]:
    """The leader, idle (its serving threads read every request) or busy: one of its
    threads keeps calling the database, so small requests are answered in passing by
    that thread (_passing.Passing.poll) and everything else is handed back."""
    db = partydbm.open(tmp_path / "db")
    assert db.is_leader
    db.update(MODEL)
    stop = threading.Event()
    busy = threading.Thread(target=_keep_calling, args=(db, stop), daemon=True)
    if request.param == "busy":
        busy.start()
    try:
        yield db
    finally:
        stop.set()
        if busy.is_alive():
            busy.join(DEADLINE)
        try:
            assert dict(db.items()) == MODEL, "a hostile client changed what is stored"
        finally:
            db.close()


def _keep_calling(db: partydbm.PartyDBM, stop: threading.Event) -> None:
    while not stop.is_set():
        assert db.get(b"a") == b"1"


@pytest.fixture
def fast_deadlines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "MESSAGE_TIMEOUT", 0.5)
    monkeypatch.setattr(P, "SEND_TIMEOUT", 1.0)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


# -- garbage ---------------------------------------------------------------------------------
GARBAGE = {
    "random": random.Random(7).randbytes(4096),
    "never-used-byte": b"\xc1" * 16,
    "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "nul": b"\0" * 64,
}


@pytest.mark.parametrize("after_hello", [False, True])
@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_gets_an_error_reply_then_the_connection_closes(
        leader: partydbm.PartyDBM, fast_deadlines: None, name: str, after_hello: bool) -> None:
    raw = Raw(leader.name)
    if after_hello:
        assert raw.hello()[1] is True
    raw.send(GARBAGE[name])
    replies = raw.until_closed()
    assert replies and is_error(replies[-1], "protocol"), replies
    assert served(leader.name, b"a") == b"1"


@pytest.mark.parametrize("seed", range(20))
def test_random_garbage_of_any_length_never_hurts_the_leader(
        leader: partydbm.PartyDBM, fast_deadlines: None, seed: int) -> None:
    rng = random.Random(seed)
    print("seed", seed)
    raw = Raw(leader.name)
    if rng.random() < 0.5:
        raw.hello()
    try:
        raw.send(rng.randbytes(rng.randint(1, 20000)))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the leader hung up already
    replies = raw.until_closed()
    assert all(is_error(r) or r[1] is True for r in replies), replies
    assert served(leader.name, b"b") == b"2"


WRONG_SHAPES: list[Any] = [
    42, "hello", b"bytes", None, True, 1.5, {}, {"v": 1}, [], [1], ["get", 1],
    [1, "rid"], [P.GET, None, b"a"], [[P.GET], 1], [P.GET, 1.0, b"a"],
]


@pytest.mark.parametrize("shape", WRONG_SHAPES, ids=repr)
@pytest.mark.parametrize("after_hello", [False, True])
def test_valid_msgpack_of_the_wrong_shape_is_refused(
        leader: partydbm.PartyDBM, shape: Any, after_hello: bool) -> None:
    raw = Raw(leader.name)
    if after_hello:
        assert raw.hello()[1] is True
    raw.send(P.pack(shape))
    replies = raw.until_closed()
    assert len(replies) == 1 and is_error(replies[0], "protocol"), replies


BAD_REQUESTS: list[Any] = [
    [P.GET, 1],                          # missing the key
    [P.GET, 1, "a str key"],
    [P.GET, 1, 5],
    [P.PUT, 1, b"k", "a str value", False],
    [P.PUT, 1, b"k", None, False],
    [P.PUT, 1, [b"k"], b"v", False],
    [P.DELETE, 1, {"k": 1}, False],
    [P.BATCH, 1, [b"k"], False],         # odd length
    [P.BATCH, 1, [b"k", 5], False],
    [P.BATCH, 1, b"kv", False],
    [P.BATCH, 1, [b"a", b"1", 7, b"2"], False],
    [P.GETMANY, 1, b"ab"],
    [P.GETMANY, 1, [b"a", None]],
    [P.SCAN, 1, 5, True, None, False, False, False, 10, 1000],
    [P.SCAN, 1, None, True, None, False, False, False, "10", 1000],
    [P.SCAN, 1, None, True, None, False, False, False, 10, None],
    [P.LEN, 1, b"extra"],
    [P.HELLO, 1, {"v": P.VERSION, "client": b"c"}],  # a second hello
    [99, 1],                             # unknown operations
    [-1, 1, b"a"],
    [2**63, 1],
]


@pytest.mark.parametrize("request_", BAD_REQUESTS, ids=repr)
def test_a_request_the_leader_cannot_accept_gets_an_error_with_its_rid_then_close(
        leader: partydbm.PartyDBM, request_: list[Any]) -> None:
    raw = Raw(leader.name)
    assert raw.hello()[1] is True
    raw.send(P.pack(request_))
    replies = raw.until_closed()
    assert len(replies) == 1 and is_error(replies[0], "protocol"), replies
    assert replies[0][0] == 1, "the error names the request it answers"


def test_unknown_operation_is_named_in_the_error(leader: partydbm.PartyDBM) -> None:
    raw = Raw(leader.name)
    raw.hello()
    raw.send(P.pack([77, 5]))
    (reply,) = raw.until_closed()
    assert reply[0] == 5 and "unknown operation 77" in reply[2][1]


@pytest.mark.parametrize("version", [0, P.VERSION - 1, P.VERSION + 1, P.VERSION + 100, "1",
                                     None, [1]])
def test_wrong_protocol_version_is_refused_with_the_version_named(
        leader: partydbm.PartyDBM, version: Any) -> None:
    raw = Raw(leader.name)
    raw.send(P.pack([P.HELLO, 0, {"v": version, "client": b"c" * 16, "pid": 1}]))
    (reply,) = raw.until_closed()
    assert is_error(reply, "protocol") and "version" in reply[2][1], reply
    assert str(P.VERSION) in reply[2][1]


@pytest.mark.parametrize("client", [b"", "str", None, b"c" * (P.MAX_CLIENT_ID + 1)],
                         ids=["empty", "str", "none", "too-long"])
def test_hello_with_a_bad_client_id_is_refused(leader: partydbm.PartyDBM, client: Any) -> None:
    raw = Raw(leader.name)
    raw.send(P.pack([P.HELLO, 0, {"v": P.VERSION, "client": client, "pid": 1}]))
    (reply,) = raw.until_closed()
    assert is_error(reply, "protocol"), reply


# -- sizes ---------------------------------------------------------------------------------
HUGE_HEADERS = {
    "bin32-4GiB": b"\xc6\xff\xff\xff\xff",
    "str32-4GiB": b"\xdb\xff\xff\xff\xff",
    "array32-4G-items": b"\xdd\xff\xff\xff\xff",
    "map32-4G-entries": b"\xdf\xff\xff\xff\xff",
    "nested-arrays": b"\x93\x02\x01" + b"\xdd\x0f\xff\xff\xff" * 50,
    "ext32": b"\xc9\x7f\xff\xff\xff\x01",
}


@pytest.mark.parametrize("name", sorted(HUGE_HEADERS))
def test_a_tiny_frame_claiming_a_huge_size_is_refused_without_allocating(
        leader: partydbm.PartyDBM, fast_deadlines: None, name: str) -> None:
    """Arrays and maps are refused at their header (msgpack would preallocate them);
    bin, str and ext wait for their bytes (nothing is allocated before they arrive)
    and are dropped after MESSAGE_TIMEOUT."""
    raw = Raw(leader.name)
    raw.hello()
    before = _rss()
    raw.send(HUGE_HEADERS[name])
    replies = raw.until_closed(timeout=5.0)
    assert replies and is_error(replies[-1], "protocol"), replies
    assert _rss() - before < 64 << 20


def test_a_frame_longer_than_the_message_limit_ends_the_connection(
        leader: partydbm.PartyDBM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "MAX_MESSAGE", 1 << 20)  # new connections' decoders use it
    raw = Raw(leader.name)
    raw.hello()
    frame = P.pack([P.PUT, 1, b"k", b"v" * (2 << 20), False])
    try:
        raw.send(frame)
    except (BrokenPipeError, ConnectionResetError):
        pass
    replies = raw.until_closed()
    assert replies and is_error(replies[-1], "protocol")
    assert "larger than the protocol allows" in replies[-1][2][1]


def test_a_put_over_the_value_limit_is_an_error_and_the_connection_lives(
        leader: partydbm.PartyDBM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "MAX_VALUE", 1000)
    raw = Raw(leader.name)
    raw.hello()
    _rid, ok, payload = raw.request(P.PUT, b"k", b"v" * 1001, False)
    assert ok is False and payload[0] == "error" and "MAX_VALUE" in payload[1]
    _rid, ok, payload = raw.request(P.GET, b"a")
    assert ok is True and payload == b"1"


def test_scan_page_size_asked_by_a_follower_is_clamped(
        leader: partydbm.PartyDBM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "MAX_PAGE_ITEMS", 2)
    raw = Raw(leader.name)
    raw.hello()
    _rid, ok, (items, more) = raw.request(P.SCAN, None, True, None, False, False, True,
                                          2**62, 2**62)
    assert ok is True and items == [b"a", b"b"] and more is True


def test_getmany_answer_is_bounded(leader: partydbm.PartyDBM,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "MAX_BATCH_BYTES", 1 << 20)
    raw = Raw(leader.name)
    raw.hello()
    _rid, ok, payload = raw.request(P.GETMANY, [b"big"] * 100)  # 30 MB asked for
    assert ok is False and "getmany" in payload[1]
    _rid, ok, payload = raw.request(P.GETMANY, [b"a", b"nope"])
    assert ok is True and payload == [b"1", None]


# -- stalls ----------------------------------------------------------------------------------
def test_half_a_message_then_silence_is_dropped_and_others_are_served_meanwhile(
        leader: partydbm.PartyDBM, fast_deadlines: None) -> None:
    raw = Raw(leader.name)
    raw.hello()
    frame = P.pack([P.PUT, 1, b"a", b"changed", False])
    raw.send(frame[:-3])
    assert served(leader.name, b"a", timeout=2.0) == b"1"  # not held up by the stall
    replies = raw.until_closed(timeout=10.0)
    assert len(replies) == 1 and is_error(replies[0], "protocol"), replies
    assert "rest of a message" in replies[0][2][1]


def test_a_half_sent_hello_is_dropped_too(leader: partydbm.PartyDBM,
                                          fast_deadlines: None) -> None:
    raw = Raw(leader.name)
    raw.send(P.pack([P.HELLO, 0, {"v": P.VERSION, "client": b"c" * 16, "pid": 1}])[:5])
    replies = raw.until_closed(timeout=10.0)
    assert len(replies) == 1 and is_error(replies[0], "protocol")


def test_an_idle_follower_between_messages_is_never_dropped(
        leader: partydbm.PartyDBM, fast_deadlines: None) -> None:
    raw = Raw(leader.name)
    raw.hello()
    time.sleep(4 * P.MESSAGE_TIMEOUT)
    assert raw.request(P.GET, b"a")[1:] == [True, b"1"]


def test_a_message_trickling_in_byte_by_byte_is_served(
        leader: partydbm.PartyDBM, fast_deadlines: None) -> None:
    raw = Raw(leader.name)
    raw.hello()
    for byte in P.pack([P.GET, 1, b"b"]):
        raw.send(bytes([byte]))
        time.sleep(0.02)
    assert raw.reply() == [1, True, b"2"]


def test_a_client_that_never_reads_its_replies_is_dropped_and_others_are_served(
        leader: partydbm.PartyDBM, fast_deadlines: None) -> None:
    """It floods GETs of a 300 kB value and reads nothing: the leader's replies fill its
    socket buffer, the handler's send makes no progress for SEND_TIMEOUT, and the leader
    hangs up. Everyone else is served meanwhile."""
    raw = Raw(leader.name, rcvbuf=4096)
    raw.hello()
    raw.sock.setblocking(False)
    flood = b"".join(P.pack([P.GET, rid, b"big"]) for rid in range(1, 2000))
    sent = 0
    deadline = time.monotonic() + 10
    while sent < len(flood) and time.monotonic() < deadline:
        try:
            sent += raw.sock.send(flood[sent:])
        except BlockingIOError:
            time.sleep(0.05)  # the leader stopped reading: it is stuck sending to us
            assert served(leader.name, b"a", timeout=2.0) == b"1"
        except (BrokenPipeError, ConnectionResetError):
            break
    stalled_until = time.monotonic() + 3 * P.SEND_TIMEOUT
    while time.monotonic() < stalled_until:  # we read nothing; others are served
        assert served(leader.name, b"a", timeout=2.0) == b"1"
        time.sleep(0.1)
    # The leader gives up on us: once what it did send is drained, the socket ends.
    raw.sock.setblocking(True)
    start = time.monotonic()
    got = 0
    raw.sock.settimeout(15)
    while True:
        try:
            data = raw.sock.recv(1 << 20)
        except (ConnectionResetError, TimeoutError):
            data = b""
        if not data:
            break
        got += len(data)
        assert time.monotonic() - start < 15, "the leader never dropped the stalled client"
    assert got < 1999 * 300_000, "every reply was sent: the client was never dropped"


def test_requests_before_a_bad_frame_are_answered_first(leader: partydbm.PartyDBM) -> None:
    raw = Raw(leader.name)
    raw.hello()
    raw.send(P.pack([P.GET, 1, b"a"]) + P.pack([P.GET, 2, b"b"]) + b"\xc1")
    replies = raw.until_closed()
    assert replies[:2] == [[1, True, b"1"], [2, True, b"2"]]
    assert len(replies) == 3 and is_error(replies[2], "protocol") and replies[2][0] is None


@pytest.mark.parametrize("left", ["bad", "msgs", "outbox", "end"])
def test_nothing_is_read_in_passing_while_the_connections_thread_has_work(
        leader: partydbm.PartyDBM, left: str) -> None:
    """What an application thread handed back (a bad frame, requests, unsent replies, the
    end) is the connection's own thread's: bytes after it, as after a bad frame, must
    not be read and answered in passing before it."""
    assert isinstance(leader._engine, Engine)
    server = leader._engine.server
    assert server is not None
    mine, theirs = socket.socketpair()
    try:
        conn = Conn(mine)
        conn.peer.client = b"client"
        handed = {"bad": ("bad", P.DecodeError("undecodable frame")),
                  "msgs": ("msgs", [[P.GET, 1, b"a"]]), "outbox": ("outbox", b"\x90"),
                  "end": ("end", True)}[left]
        setattr(conn, *handed)
        waiting = P.pack([P.GET, 2, b"b"])
        theirs.send(waiting)
        before = server.passing.answered
        server.passing._answer(conn)
        assert mine.recv(64, socket.MSG_PEEK | socket.MSG_DONTWAIT) == waiting
        assert getattr(conn, handed[0]) is handed[1]
        assert server.passing.answered == before
        assert conn.wake.is_set()  # its thread is told
    finally:
        mine.close()
        theirs.close()


def test_too_many_connections_are_refused_with_an_error_at_the_hello(
        leader: partydbm.PartyDBM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "MAX_CONNECTIONS", 3)
    conns = [Raw(leader.name) for _ in range(3)]
    for c in conns:
        assert c.hello()[1] is True
    extra = Raw(leader.name)
    try:
        extra.send(P.pack([P.HELLO, 0, {"v": P.VERSION, "client": b"c" * 16, "pid": 1}]))
    except (BrokenPipeError, ConnectionResetError):
        pass
    replies = extra.until_closed()
    assert replies and is_error(replies[0], "error") and "MAX_CONNECTIONS" in replies[0][2][1]
    conns.pop().close()
    deadline = time.monotonic() + 10
    while True:  # the handler of the closed one leaves shortly
        try:
            assert served(leader.name, b"a") == b"1"
            break
        except (AssertionError, OSError):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    for c in conns:
        c.close()


def test_a_connection_that_closes_mid_reply_does_not_hurt_the_leader(
        leader: partydbm.PartyDBM) -> None:
    for _ in range(20):
        raw = Raw(leader.name)
        raw.hello()
        raw.send(b"".join(P.pack([P.GET, rid, b"big"]) for rid in range(1, 50)))
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        raw.close()
    assert served(leader.name, b"a") == b"1"
