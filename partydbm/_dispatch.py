"""What a follower's request does: the table of operations, the checks on arguments that
come from another process, and the rule that a follower's write is applied at most
once (also across failover). Used by the leader's server for every request and by a
follower that becomes leader to replay its own unanswered requests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import _protocol as P
from . import _seams
from ._backend import Backend
from ._errors import ProtocolError

RECENT_OUTCOMES = 64  # delete outcomes kept per follower for replayed deletes


@dataclass
class Peer:
    """Per-connection state: who the follower is and what of its writes is applied."""

    client: bytes | None = None
    applied: int = 0
    recent: dict[int, Any] = field(default_factory=dict)  # rid -> outcome, last deletes
    pid: int = 0
    uid: int = -1
    gid: int = -1
    groups: set[int] | None = None


def brief(obj: Any) -> str:
    """A short description of something a peer sent (never the repr of all of it: a
    message can be 100 MB)."""
    if isinstance(obj, (bytes, str)):
        return f"{type(obj).__name__} of length {len(obj)} {obj[:32]!r}"
    if isinstance(obj, (list, dict)):
        return f"{type(obj).__name__} of length {len(obj)}"
    return repr(obj)[:80]


class Dispatcher:
    """Applies one request to the backend: the table op -> operation, and the rule that a
    follower's write is applied at most once. Used by the server for every request and
    by a follower that becomes leader to replay its own unanswered requests.

    Arguments come from another process: each is checked before anything is read or
    written, and a request of the wrong shape raises ProtocolError (nothing else), so
    it never changes what is stored."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._ops: dict[int, tuple[int, Callable[..., Any]]] = {
            P.GET: (1, self._get),
            P.HAS: (1, lambda peer, rid, key: self._get(peer, rid, key) is not None),
            P.GETMANY: (1, self._get_many),
            P.LEN: (0, lambda peer, rid: backend.count()),
            P.SCAN: (8, self._scan),
            P.COMPACT: (0, lambda peer, rid: backend.compact()),
            P.SYNC: (0, lambda peer, rid: backend.sync()),
            P.PUT: (3, self._put),
            P.DELETE: (2, self._delete),
            P.CLEAR: (1, self._clear),
            P.BATCH: (2, self._batch),
        }

    def call(self, peer: Peer, op: int, rid: int, args: Any) -> Any:
        entry = self._ops.get(op) if type(op) is int else None
        if entry is None:
            raise ProtocolError(f"unknown operation {brief(op)}")
        arity, fn = entry
        if not isinstance(args, (list, tuple)) or len(args) != arity:
            raise ProtocolError(f"{P.OP_NAMES[op]} takes {arity} arguments")
        return fn(peer, rid, *args)

    # -- operations ----------------------------------------------------------------------
    def _apply(self, peer: Peer, rid: int, ops: list[tuple[bytes, bytes | None]],
               sync: bool, result: Any = None) -> Any:
        assert peer.client is not None
        _seams.passage("before_apply")
        recent = peer.recent
        if result is not None:
            recent = {**recent, rid: result}
            while len(recent) > RECENT_OUTCOMES:
                del recent[min(recent)]
        self.backend.write(ops, bool(sync), (peer.client, rid, recent))
        peer.applied, peer.recent = rid, recent
        _seams.passage("after_apply")
        return result

    def _duplicate(self, peer: Peer, rid: int) -> bool:
        # A retried write the database already holds (the previous leader applied it
        # and died before answering): never apply it twice.
        return rid <= peer.applied

    def _get(self, peer: Peer, rid: int, key: Any) -> bytes | None:
        _check_key(key)
        return self.backend.get(key)

    def _get_many(self, peer: Peer, rid: int, keys: Any) -> list[bytes | None]:
        if type(keys) is not list:
            raise ProtocolError("getmany wants a list of keys")
        for key in keys:
            _check_key(key)
        return self.backend.get_many(keys, P.MAX_BATCH_BYTES)

    def _put(self, peer: Peer, rid: int, key: Any, value: Any, sync: Any) -> None:
        _check_key(key)
        _check_value(value)
        if not self._duplicate(peer, rid):
            P.check_put(key, value)
            self._apply(peer, rid, [(key, value)], sync)

    def _delete(self, peer: Peer, rid: int, key: Any, sync: Any) -> bool:
        _check_key(key)
        if self._duplicate(peer, rid):
            # Answer as the original did. Older than the last RECENT_OUTCOMES deletes
            # cannot still be in flight in practice; say it existed.
            return bool(peer.recent.get(rid, True))
        existed = self.backend.get(key) is not None
        return bool(self._apply(peer, rid, [(key, None)] if existed else [], sync, existed))

    def _clear(self, peer: Peer, rid: int, sync: Any) -> None:
        if not self._duplicate(peer, rid):
            self._apply(peer, rid, self.backend.clear_ops(), sync)

    def _batch(self, peer: Peer, rid: int, flat: Any, sync: Any) -> None:
        if type(flat) is not list or len(flat) % 2:
            raise ProtocolError("batch wants a flat list of key, value pairs")
        ops = list(zip(flat[::2], flat[1::2], strict=True))
        for key, value in ops:
            _check_key(key)
            if value is not None:
                _check_value(value)
        if not self._duplicate(peer, rid):
            P.check_batch(ops)
            self._apply(peer, rid, ops, sync)

    def _scan(self, peer: Peer, rid: int, lo: Any, lo_incl: Any, hi: Any, hi_incl: Any,
              reverse: Any, keys_only: Any, limit: Any, max_bytes: Any) -> list[Any]:
        rng = (_check_bound(lo), bool(lo_incl), _check_bound(hi), bool(hi_incl))
        # Clamped: a page is built in memory whole, whatever the follower asked for.
        limit = min(max(_check_int(limit, "a page size"), 1), P.MAX_PAGE_ITEMS)
        max_bytes = min(max(_check_int(max_bytes, "a page size"), 1), P.MAX_PAGE_BYTES)
        items, more = self.backend.scan(rng, bool(reverse), bool(keys_only), limit, max_bytes)
        _seams.passage("mid_scan")
        return [items, more]


def _check_key(key: Any) -> None:
    if type(key) is not bytes:
        raise ProtocolError(f"keys must be bytes on the wire, not {type(key).__name__}")


def _check_value(value: Any) -> None:
    if type(value) is not bytes:
        raise ProtocolError(f"values must be bytes on the wire, not {type(value).__name__}")


def _check_int(value: Any, what: str) -> int:
    if type(value) is not int:
        raise ProtocolError(f"{what} must be an integer, not {type(value).__name__}")
    return value


def _check_bound(value: Any) -> bytes | None:
    if value is not None:
        _check_key(value)
    return value  # type: ignore[no-any-return]
