"""Hypothesis against the codec (Decoder) and the leader's dispatch: whatever arrives,
the decoder yields messages or raises DecodeError, the dispatcher answers or raises a
partydbm.error, the server's request handler always produces one well-formed reply, and
a request that is refused never changes what is stored."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import partydbm
from partydbm import _protocol as P
from partydbm._dispatch import Dispatcher, Peer
from partydbm._routes import LocalRoute
from partydbm._server import Server
from partydbm._store import Store

FUZZ = settings(max_examples=400, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# msgpack values as a peer could send them (what the decoder can produce).
leaves = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
          | st.binary(max_size=40) | st.text(max_size=20))
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=6)
    | st.dictionaries(st.text(max_size=8) | st.binary(max_size=8), inner, max_size=4),
    max_leaves=20)
ops = st.sampled_from(sorted(P.OP_NAMES)) | st.integers(-5, 40) | values


def _chunks(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    last = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        yield data[last:cut]
        last = cut
    yield data[last:]


# -- the codec -------------------------------------------------------------------------------
@FUZZ
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 2000), max_size=8))
def test_decoder_on_arbitrary_bytes_yields_messages_or_raises_DecodeError(
        data: bytes, cuts: list[int]) -> None:
    decoder = P.Decoder()
    try:
        for chunk in _chunks(data, cuts):
            decoder.feed(chunk)
            decoder.messages()
    except P.DecodeError:
        pass
    assert decoder.pending() >= 0


@FUZZ
@given(msgs=st.lists(values, min_size=1, max_size=5),
       cuts=st.lists(st.integers(0, 5000), max_size=10))
def test_decoder_gives_back_exactly_what_was_packed_however_it_is_cut(
        msgs: list[Any], cuts: list[int]) -> None:
    data = b"".join(P.pack(m) for m in msgs)
    decoder = P.Decoder()
    out: list[Any] = []
    for chunk in _chunks(data, cuts):
        decoder.feed(chunk)
        out.extend(decoder.messages())
    assert decoder.pending() == 0
    assert [P.pack(m) for m in out] == [P.pack(m) for m in msgs]  # NaN-proof equality


def _stream_outcome(decode: Any, chunks: list[bytes]) -> tuple[list[bytes], str | None]:
    out: list[bytes] = []
    for chunk in chunks:
        try:
            out.extend(P.pack(m) for m in decode(chunk))
        except P.DecodeError as exc:
            return out + [P.pack(m) for m in exc.messages], "DecodeError"
    return out, None


@FUZZ
@given(msgs=st.lists(values, max_size=4), garbage=st.binary(max_size=40),
       cuts=st.lists(st.integers(0, 3000), max_size=6))
def test_decode_in_one_call_is_feed_then_messages(msgs: list[Any], garbage: bytes,
                                                   cuts: list[int]) -> None:
    # decode() takes a shortcut for one whole small message: it must never differ from
    # the stream, on valid frames, cut frames and garbage alike.
    data = b"".join(P.pack(m) for m in msgs) + garbage
    chunks = list(_chunks(data, cuts))
    fast, slow = P.Decoder(), P.Decoder()

    def stream(chunk: bytes) -> list[Any]:
        slow.feed(chunk)
        return slow.messages()

    assert _stream_outcome(fast.decode, chunks) == _stream_outcome(stream, chunks)
    assert fast.pending() == slow.pending()


def test_decode_of_one_whole_request_or_several() -> None:
    one, two = P.pack([P.GET, 1, b"k"]), P.pack([P.GET, 2, b"j"])
    decoder = P.Decoder()
    assert decoder.decode(one) == [[P.GET, 1, b"k"]]
    assert decoder.decode(one + two) == [[P.GET, 1, b"k"], [P.GET, 2, b"j"]]
    assert decoder.decode(one[:2]) == [] and decoder.pending() == 2
    assert decoder.decode(one[2:] + two) == [[P.GET, 1, b"k"], [P.GET, 2, b"j"]]
    assert decoder.pending() == 0
    with pytest.raises(P.DecodeError):
        decoder.decode(b"\xc1")  # never valid in msgpack


def test_decoder_fed_one_byte_at_a_time_knows_a_half_message() -> None:
    frame = P.pack([P.PUT, 7, b"key", b"value" * 100, False])
    decoder = P.Decoder()
    for i, byte in enumerate(frame[:-1]):
        decoder.feed(bytes([byte]))
        assert decoder.messages() == []
        assert decoder.pending() == i + 1
    decoder.feed(frame[-1:])
    assert decoder.messages() == [[P.PUT, 7, b"key", b"value" * 100, False]]
    assert decoder.pending() == 0


def test_decoder_gives_back_the_buffer_a_big_message_grew() -> None:
    decoder = P.Decoder()
    big = P.pack([P.PUT, 1, b"k", b"v" * (P.RESET_DECODER_AFTER + 10), False])
    old = decoder._unpacker
    decoder.feed(big)
    assert len(decoder.messages()) == 1
    assert decoder._unpacker is not old and decoder.pending() == 0
    decoder.feed(P.pack([P.GET, 2, b"k"]))
    assert decoder.messages() == [[P.GET, 2, b"k"]]


# -- the dispatcher --------------------------------------------------------------------------
@pytest.fixture
def leader(tmp_path: Path) -> Iterator[partydbm.PartyDBM]:
    db = partydbm.open(tmp_path / "db")
    db.update({b"a": b"1", b"b": b"2"})
    try:
        yield db
    finally:
        db.close()


def _store(db: partydbm.PartyDBM) -> Store:
    route = db._engine.route
    assert isinstance(route, LocalRoute), "not the leader"
    return route.store


def _stored(db: partydbm.PartyDBM) -> dict[bytes, bytes]:
    return dict(db.items())


@FUZZ
@given(op=ops, rid=st.integers(1, 2**40), args=st.lists(values, max_size=10))
def test_dispatch_of_arbitrary_requests_answers_or_raises_a_partydbm_error(
        leader: partydbm.PartyDBM, op: Any, rid: int, args: list[Any]) -> None:
    dispatcher = Dispatcher(_store(leader))
    peer = Peer(client=b"fuzz-client")
    before = _stored(leader)
    try:
        dispatcher.call(peer, op, rid, args)
    except partydbm.error:
        assert _stored(leader) == before, "a refused request changed what is stored"
    else:
        if op not in P.WRITES:
            assert _stored(leader) == before
    if _stored(leader) != before:  # a valid write: start the next example afresh
        leader.clear()
        leader.update({b"a": b"1", b"b": b"2"})


@FUZZ
@given(msg=values | st.lists(values, max_size=10).map(lambda rest: [P.GET, 1, *rest])
       | st.tuples(ops, values, st.lists(values, max_size=9)).map(
           lambda t: [t[0], t[1], *t[2]]),
       hello=st.booleans())
def test_the_servers_request_handler_always_produces_one_well_formed_reply(
        leader: partydbm.PartyDBM, msg: Any, hello: bool) -> None:
    server = Server(_store(leader), "unused", leader.name)  # never started
    peer = Peer(client=b"fuzz-client" if hello else None)
    before = _stored(leader)
    reply, fatal = server._handle(peer, msg, P.pack)
    decoded = P.unpack(reply)
    assert isinstance(decoded, list) and len(decoded) == 3
    rid, ok, payload = decoded
    assert rid is None or isinstance(rid, int)
    if ok is False:
        assert isinstance(payload, list) and len(payload) in (2, 4)
        assert all(isinstance(x, str) for x in payload[:2])
        assert len(payload) == 2 or (type(payload[2]) is int
                                     and isinstance(payload[3], (str, type(None))))
        assert _stored(leader) == before, "a refused request changed what is stored"
    else:
        assert ok is True and not fatal
    if _stored(leader) != before:
        leader.clear()
        leader.update({b"a": b"1", b"b": b"2"})
