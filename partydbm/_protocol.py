"""Sans-IO msgpack codec for the leader/follower protocol; the only msgpack importer.

Framing is msgpack's own (each message is one self-delimiting msgpack array), fed
through `Decoder.feed()` as bytes arrive. Shapes:

    request   [op, rid, *args]        op: small int (below), rid: request id
    response  [rid, ok, payload]      ok True: payload is the result;
                                      ok False: payload is [code, message]

The first request on a connection is HELLO [HELLO, 0, {"v": VERSION, "client": id,
"pid": pid}]; the leader answers [0, True, {"v": VERSION, "pid": pid}] or an error and
closes. A frame the receiver cannot decode is answered with an error (rid None) and
the connection is closed: no peer ever waits on a message that was dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack

VERSION = 1

# Requests. Writes are the ops a leader deduplicates by (client, rid) after failover.
HELLO, GET, PUT, DELETE, HAS, LEN, CLEAR, BATCH, SCAN, COMPACT, SYNC, GETMANY = range(12)
WRITES = frozenset({PUT, DELETE, CLEAR, BATCH})
OP_NAMES = {
    HELLO: "hello", GET: "get", PUT: "put", DELETE: "delete", HAS: "has", LEN: "len",
    CLEAR: "clear", BATCH: "batch", SCAN: "scan", COMPACT: "compact", SYNC: "sync",
    GETMANY: "getmany",
}

# A single message may not exceed this (a page is far smaller; a batch may be large).
MAX_MESSAGE = 256 * 1024 * 1024

def pack(obj: Any) -> bytes:
    """Encode one message (thread-safe: no packer state is shared)."""
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def packer() -> Callable[[Any], bytes]:
    """A reusable encoder, cheaper than pack(); for one thread (or under a lock)."""
    return msgpack.Packer(use_bin_type=True).pack  # type: ignore[no-any-return]


def unpack(data: bytes) -> Any:
    """Decode one complete message."""
    return msgpack.unpackb(data, raw=False)


class DecodeError(Exception):
    """The byte stream is not valid protocol framing."""


class Decoder:
    """Feed bytes, iterate complete messages. Raises DecodeError on garbage."""

    __slots__ = ("_unpacker",)

    def __init__(self) -> None:
        self._unpacker = msgpack.Unpacker(
            raw=False, use_list=True, max_buffer_size=MAX_MESSAGE, strict_map_key=True
        )

    def feed(self, data: bytes) -> None:
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull as exc:
            raise DecodeError("message larger than the protocol allows") from exc

    def messages(self) -> list[Any]:
        """Every complete message fed so far (a partial one stays buffered)."""
        try:
            return list(self._unpacker)
        except (msgpack.UnpackException, ValueError, TypeError) as exc:
            raise DecodeError(f"undecodable frame: {exc}") from exc
