"""Sans-IO msgpack codec for the leader/follower protocol; the only msgpack importer.

Framing is msgpack's own (each message is one self-delimiting msgpack array), fed
through `Decoder.feed()` as bytes arrive. Shapes:

    request   [op, rid, *args]        op: small int (below), rid: request id
    response  [rid, ok, payload]      ok True: payload is the result;
                                      ok False: payload is [code, message] or
                                      [code, message, errno, filename] (_errors)

The first request on a connection is HELLO [HELLO, 0, {"v": VERSION, "client": id,
"pid": pid, "ring": bool}]; the leader answers [0, True, {"v": VERSION, "pid": pid,
"ring": epoch or None}] (the change ring a follower that asked may map: _ring.py) or
an error and closes. A frame the receiver cannot decode is answered with an error (rid None) and
the connection is closed: no peer ever waits on a message that was dropped. A request
the leader can decode but not accept (not a list, unknown op, wrong arguments) gets an
error reply with its rid, and the connection is closed too. Sizes and deadlines are
bounded by the limits below.
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from ._errors import error

VERSION = 2  # 2: pop, setdefault, cas; getpos and getmanypos for the followers' cache

# Requests. Writes are the ops a leader deduplicates by (client, rid) after failover.
(HELLO, GET, PUT, DELETE, HAS, LEN, CLEAR, BATCH, SCAN, COMPACT, SYNC, GETMANY, POP,
 SETDEFAULT, CAS, GETPOS, GETMANYPOS, RELEASE) = range(18)
# RELEASE [RELEASE, rid]: let go of the database if no handle of the leader's process has
# it open (it lingers in its grace period, _grace.py) and no other follower is connected;
# answered True if it will, at once. A leader that predates it answers with a protocol
# error: "no".
WRITES = frozenset({PUT, DELETE, CLEAR, BATCH, POP, SETDEFAULT, CAS})
OP_NAMES = {
    HELLO: "hello", GET: "get", PUT: "put", DELETE: "delete", HAS: "has", LEN: "len",
    CLEAR: "clear", BATCH: "batch", SCAN: "scan", COMPACT: "compact", SYNC: "sync",
    GETMANY: "getmany", POP: "pop", SETDEFAULT: "setdefault", CAS: "cas",
    GETPOS: "getpos", GETMANYPOS: "getmanypos", RELEASE: "release",
}

# -- limits ----------------------------------------------------------------------------
# The leader runs inside somebody's application and reads frames from other processes:
# nothing a peer sends may make it allocate much more than the bytes it actually sent.
# These bound what a handle may store (in both roles, so a handle behaves the same
# whether its process leads or follows) and what a frame may claim.

MAX_KEY = 1 << 20
"""Longest key a write may store (1 MiB). Longer keys raise `partydbm.error`."""

MAX_VALUE = 128 << 20
"""Longest value a write may store (128 MiB). Larger values raise `partydbm.error`."""

MAX_BATCH_OPS = 1 << 20
"""Most puts and deletes in one atomic batch (write_batch(), update() chunk): 1 Mi."""

MAX_BATCH_BYTES = 128 << 20
"""Most key and value bytes in one atomic batch (128 MiB): a batch crosses the socket as
one message, which the leader holds in memory whole while it applies it."""

MAX_MESSAGE = 160 << 20
"""Largest frame either side accepts (160 MiB): the largest batch (MAX_BATCH_BYTES plus
up to 10 bytes of framing per operation) or a put of MAX_KEY + MAX_VALUE fits; anything
larger is a protocol error and ends the connection."""

MAX_STR = 1 << 20
"""Longest msgpack str in a frame (error messages, hello fields): 1 MiB."""

MAX_MAP = 64
"""Most entries of a msgpack map in a frame (only the hello carries one)."""

MAX_ARRAY = 2 * MAX_BATCH_OPS + 16
"""Most items of one msgpack array: a batch's flat [key, value, key, value...] list.
msgpack preallocates an array from its header, so this is what stops a 5-byte frame
from claiming gigabytes."""

MAX_CLIENT_ID = 64
"""Longest client id a hello may carry (it becomes part of a LevelDB key)."""

MAX_PAGE_ITEMS = 1 << 16
MAX_PAGE_BYTES = 16 << 20
"""A scan page the leader builds is clamped to these (a page always holds at least one
item, so a reply stays under MAX_KEY + MAX_VALUE + MAX_PAGE_BYTES + framing)."""

MESSAGE_TIMEOUT = 20.0
"""Seconds a leader waits for the next byte of a message it has begun to receive before
it gives up on the connection (a half message followed by silence). Silence *between*
messages is fine: followers stay connected while idle."""

SEND_TIMEOUT = 20.0
"""Seconds a leader's reply may make no progress (the follower's socket buffer stays
full because it stopped reading) before the leader drops the connection."""

MAX_CONNECTIONS = 1024
"""Followers one leader serves at once (one thread each); more are refused with an
error at the hello."""

RESET_DECODER_AFTER = 4 << 20
"""A decoder that has buffered this many bytes starts afresh when its buffer is empty:
msgpack's buffer grows to the largest message seen and never shrinks."""


def too_big(what: str, size: int, limit: int, name: str) -> error:
    return error(errno.EFBIG, f"{what} of {size} bytes is over partydbm's limit of {limit} "
                 f"bytes (partydbm._protocol.{name})")


def check_put(key: bytes, value: bytes) -> None:
    """Raise partydbm.error if a put is over the limits (the same in both roles)."""
    if len(key) > MAX_KEY:
        raise too_big("a key", len(key), MAX_KEY, "MAX_KEY")
    if len(value) > MAX_VALUE:
        raise too_big("a value", len(value), MAX_VALUE, "MAX_VALUE")


def check_batch(ops: Sequence[tuple[bytes, bytes | None]]) -> None:
    """Raise partydbm.error if an atomic batch is over the limits."""
    if len(ops) > MAX_BATCH_OPS:
        raise error(errno.EFBIG, f"a batch of {len(ops)} operations is over partydbm's "
                    f"limit of {MAX_BATCH_OPS} (partydbm._protocol.MAX_BATCH_OPS)")
    total = 0
    for key, value in ops:
        if value is None:
            if len(key) > MAX_KEY:
                raise too_big("a key", len(key), MAX_KEY, "MAX_KEY")
            total += len(key)
        else:
            check_put(key, value)
            total += len(key) + len(value)
    if total > MAX_BATCH_BYTES:
        raise too_big("a batch", total, MAX_BATCH_BYTES, "MAX_BATCH_BYTES")


def pack(obj: Any) -> bytes:
    """Encode one message (thread-safe: no packer state is shared)."""
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def packer() -> Callable[[Any], bytes]:
    """A reusable encoder, cheaper than pack(); for one thread (or under a lock)."""
    return msgpack.Packer(use_bin_type=True).pack  # type: ignore[no-any-return]


def unpack(data: bytes) -> Any:
    """Decode one complete message."""
    return msgpack.unpackb(data, raw=False)


FAST_DECODE_BYTES = 4096  # larger reads are rarely one whole message: straight to the stream


class DecodeError(Exception):
    """The byte stream is not valid protocol framing. `messages`: the complete messages
    decoded before the bad frame (they deserve their answers)."""

    def __init__(self, text: str, messages: list[Any] | None = None) -> None:
        super().__init__(text)
        self.messages = messages or []


class Decoder:
    """Feed bytes, iterate complete messages. Raises DecodeError on garbage, on a frame
    larger than MAX_MESSAGE, and on a container or string beyond the limits above (at
    its header, before anything is allocated for it)."""

    __slots__ = ("_end", "_fed", "_unpacker")

    def __init__(self) -> None:
        self._unpacker = _unpacker()
        self._fed = 0  # bytes fed to the current unpacker
        self._end = 0  # stream offset where the last complete message ended

    def decode(self, data: bytes) -> list[Any]:
        """feed(data), then messages(). The common case, `data` is exactly one small
        whole message and nothing is buffered (one synchronous request or its reply), is
        decoded in one call, at 60% of the stream's cost; anything else (several
        messages, part of one, garbage) goes through the stream from the start, so
        errors and limits are the stream's."""
        if self._fed == self._end and len(data) <= FAST_DECODE_BYTES:
            try:
                return [_unpackb(data)]
            except (msgpack.UnpackException, ValueError, TypeError):
                pass  # ExtraData, incomplete input, a bad frame: the stream decides
        self.feed(data)
        return self.messages()

    def feed(self, data: bytes) -> None:
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull as exc:
            raise DecodeError(
                f"message larger than the protocol allows ({MAX_MESSAGE} bytes)") from exc
        self._fed += len(data)

    def messages(self) -> list[Any]:
        """Every complete message fed so far (a partial one stays buffered)."""
        unpacker = self._unpacker
        out: list[Any] = []
        try:
            for msg in unpacker:
                out.append(msg)
                # tell() also counts the bytes of a message parsed halfway: note where
                # each complete one ends, so pending() can tell the two apart.
                self._end = unpacker.tell()
        except (msgpack.UnpackException, ValueError, TypeError) as exc:
            raise DecodeError(f"undecodable frame: {exc}", out) from exc
        if self._fed >= RESET_DECODER_AFTER and self._end == self._fed:
            self._unpacker = _unpacker()  # give back a buffer a big message grew
            self._fed = self._end = 0
        return out

    def pending(self) -> int:
        """Bytes of an incomplete message received (0 between messages)."""
        return self._fed - self._end


_LIMITS: dict[str, Any] = dict(
    raw=False, use_list=True, strict_map_key=True, max_bin_len=MAX_VALUE + MAX_KEY,
    max_str_len=MAX_STR, max_array_len=MAX_ARRAY, max_map_len=MAX_MAP, max_ext_len=0)
_unpackb = functools.partial(msgpack.unpackb, **_LIMITS)


def _unpacker() -> Any:
    return msgpack.Unpacker(max_buffer_size=MAX_MESSAGE, **_LIMITS)
