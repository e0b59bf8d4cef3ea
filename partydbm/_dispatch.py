"""What a request does: the one table of operations, the checks on arguments that come
from another process, and the rule that a follower's write is applied at most once
(also across failover).

Used by the leader's server for every follower request, by a follower that becomes
leader to replay its own unanswered requests (`Dispatcher.call`), and by a request
that finds its own process leading by the time it runs (`run_local`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import _protocol as P
from . import _seams
from ._backend import Backend
from ._errors import ProtocolError, error
from ._store import Mark, Store

RECENT_OUTCOMES = 64
"""Read-modify-writes per follower whose outcomes are kept for a resent request."""


@dataclass
class Peer:
    """Per-connection state: who the follower is and what of its writes is applied."""

    client: bytes | None = None
    applied: int = 0
    kept: list[int] = field(default_factory=list)  # rids whose outcomes are stored
    inline: dict[int, Any] = field(default_factory=dict)  # outcomes in an old record
    attached: bool = False  # uses the leader's change ring (a Publisher counts it)
    pid: int = 0  # 0, uid None: the kernel cannot tell (see _sockets.peer_credentials)
    uid: int | None = None
    gid: int | None = None
    groups: set[int] | None = None
    after_reply: Callable[[], None] | None = None  # what to do once its replies are sent

    def load(self, store: Store, client: bytes) -> None:
        """Become `client`, with what the database says of its writes."""
        self.client = client
        self.applied, self.kept, self.inline = store.applied(client)


def brief(obj: Any) -> str:
    """A short description of something a peer sent (never the repr of all of it: a
    message can be 100 MB)."""
    if isinstance(obj, (bytes, str)):
        return f"{type(obj).__name__} of length {len(obj)} {obj[:32]!r}"
    if isinstance(obj, (list, dict)):
        return f"{type(obj).__name__} of length {len(obj)}"
    return repr(obj)[:80]


# -- argument checks: a request of the wrong shape is a ProtocolError, nothing else ------
def _key(key: Any) -> bytes:
    if type(key) is not bytes:
        raise ProtocolError(f"keys must be bytes on the wire, not {type(key).__name__}")
    return key


def _value(value: Any) -> bytes:
    if type(value) is not bytes:
        raise ProtocolError(f"values must be bytes on the wire, not {type(value).__name__}")
    return value


def _maybe_value(value: Any) -> bytes | None:
    return None if value is None else _value(value)


def _int(value: Any, what: str) -> int:
    if type(value) is not int:
        raise ProtocolError(f"{what} must be an integer, not {type(value).__name__}")
    return value


def _bound(value: Any) -> bytes | None:
    return None if value is None else _key(value)


def _keys(keys: Any) -> list[bytes]:
    if type(keys) is not list:
        raise ProtocolError("getmany wants a list of keys")
    for key in keys:
        _key(key)
    return keys


def _pairs(flat: Any) -> list[tuple[bytes, bytes | None]]:
    if type(flat) is not list or len(flat) % 2:
        raise ProtocolError("batch wants a flat list of key, value pairs")
    ops = list(zip(flat[::2], flat[1::2], strict=True))
    for key, value in ops:
        _key(key)
        _maybe_value(value)
    return ops


def _scan_args(lo: Any, lo_incl: Any, hi: Any, hi_incl: Any, reverse: Any, keys_only: Any,
               limit: Any, max_bytes: Any) -> tuple[Any, ...]:
    # Clamped: a page is built in memory whole, whatever the follower asked for.
    return (_bound(lo), bool(lo_incl), _bound(hi), bool(hi_incl), bool(reverse),
            bool(keys_only), min(max(_int(limit, "a page size"), 1), P.MAX_PAGE_ITEMS),
            min(max(_int(max_bytes, "a page size"), 1), P.MAX_PAGE_BYTES))


def _scan(store: Store, lo: bytes | None, lo_incl: bool, hi: bytes | None, hi_incl: bool,
          reverse: bool, keys_only: bool, limit: int, max_bytes: int) -> list[Any]:
    items, more = store.scan((lo, lo_incl, hi, hi_incl), reverse, keys_only, limit, max_bytes)
    _seams.passage("mid_scan")
    return [items, more]


def _put_args(key: Any, value: Any, sync: Any) -> tuple[Any, ...]:
    key, value = _key(key), _value(value)
    P.check_put(key, value)
    return key, value, bool(sync)


def _cas_args(key: Any, expected: Any, new: Any, sync: Any) -> tuple[Any, ...]:
    key, expected, new = _key(key), _maybe_value(expected), _maybe_value(new)
    if new is not None:
        P.check_put(key, new)
    return key, expected, new, bool(sync)


def _batch_args(flat: Any, sync: Any) -> tuple[Any, ...]:
    P.check_batch(_pairs(flat))
    return flat, bool(sync)


def _batch(store: Store, flat: list[bytes | None], sync: bool, mark: Mark = None) -> None:
    # Flat [key, value, key, value...] on the wire and locally alike (one form of the
    # request for both routes); None as a value is a delete.
    store.write(list(zip(flat[::2], flat[1::2], strict=True)), sync, mark)  # type: ignore[arg-type]


def _key_sync(key: Any, sync: Any) -> tuple[Any, ...]:
    return _key(key), bool(sync)


def _key_len(key: Any, max_len: Any) -> tuple[Any, ...]:
    return _key(key), _int(max_len, "a length")


def _keys_len(keys: Any, max_len: Any) -> tuple[Any, ...]:
    return _keys(keys), _int(max_len, "a length"), P.MAX_BATCH_BYTES


@dataclass(frozen=True)
class Op:
    check: Callable[..., tuple[Any, ...]]  # a follower's arguments, checked (ProtocolError)
    run: Callable[..., Any]  # (store, *checked arguments) -> result; writes take a mark too
    keep: bool = False  # a write whose outcome a resent request must get again


# Writes (P.WRITES) take a final `mark` argument; a follower's request gets one.
OPS: dict[int, Op] = {
    P.GET: Op(lambda key: (_key(key),), Store.get),
    P.HAS: Op(lambda key: (_key(key),), Store.has),
    P.GETMANY: Op(lambda keys: (_keys(keys), P.MAX_BATCH_BYTES), Store.get_many),
    P.LEN: Op(lambda: (), Store.count),
    P.SCAN: Op(_scan_args, _scan),
    P.COMPACT: Op(lambda: (), Store.compact),
    P.SYNC: Op(lambda: (), Store.sync),
    P.PUT: Op(_put_args, Store.put),
    P.DELETE: Op(_key_sync, Store.delete, keep=True),
    P.POP: Op(_key_sync, Store.pop, keep=True),
    P.SETDEFAULT: Op(_put_args, Store.setdefault, keep=True),
    P.CAS: Op(_cas_args, Store.compare_and_set, keep=True),
    P.CLEAR: Op(lambda sync: (bool(sync),), Store.clear),
    P.GETPOS: Op(_key_len, Store.get_at),
    P.GETMANYPOS: Op(_keys_len, Store.get_many_at),
    P.BATCH: Op(_batch_args, _batch),
}
assert set(OPS) == set(P.OP_NAMES) - {P.HELLO, P.RELEASE}, "every operation needs an entry"


def run_local(store: Store, op: int, args: tuple[Any, ...]) -> Any:
    """Run a request of this process's own on its own store (no checks, no dedup: it
    comes from this process, and nothing of it can have been applied by another
    leader)."""
    return OPS[op].run(store, *args)


class Dispatcher:
    """Applies one follower request to the store. Arguments come from another process:
    each is checked before anything is read or written, and a request of the wrong
    shape raises ProtocolError (nothing else), so it never changes what is stored."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def call(self, peer: Peer, op: int, rid: int, args: Any) -> Any:
        entry = OPS.get(op) if type(op) is int else None
        if entry is None:
            raise ProtocolError(f"unknown operation {brief(op)}")
        if not isinstance(args, (list, tuple)):
            raise ProtocolError(f"{P.OP_NAMES[op]} wants a list of arguments")
        try:
            args = entry.check(*args)
        except TypeError:
            raise ProtocolError(f"{P.OP_NAMES[op]}: wrong number of arguments "
                                f"({len(args)})") from None
        if op not in P.WRITES:
            return entry.run(self.store, *args)
        if rid <= peer.applied:
            # A retried write the database already holds (the previous leader applied it
            # and died before answering): never apply it twice; answer as it did.
            return self._outcome(peer, op, rid)
        return self._apply(peer, rid, entry, args)

    def _apply(self, peer: Peer, rid: int, entry: Op, args: Any) -> Any:
        client = peer.client
        assert client is not None
        kept = [*peer.kept, rid][-RECENT_OUTCOMES:] if entry.keep else peer.kept
        dropped = [r for r in peer.kept if r not in kept] if entry.keep else []

        def mark(outcome: Any) -> list[tuple[bytes, bytes | None]]:
            return Backend.mark_ops(client, rid, kept, dropped, outcome, entry.keep)

        _seams.passage("before_apply")
        result = entry.run(self.store, *args, mark)
        peer.applied, peer.kept = rid, kept
        _seams.passage("after_apply")
        return result

    def _outcome(self, peer: Peer, op: int, rid: int) -> Any:
        if not OPS[op].keep:
            return None  # puts, batches and clears answer None
        assert peer.client is not None
        if rid in peer.kept:
            found, outcome = self.store.outcome(peer.client, rid)
            if found:
                return outcome
        if rid in peer.inline:
            return peer.inline[rid]
        if op == P.DELETE:
            # Older than the last RECENT_OUTCOMES read-modify-writes: cannot still be in
            # flight in practice. Say it existed, as before outcomes were kept.
            return True
        raise error(f"the outcome of this {P.OP_NAMES[op]} (request {rid}) is no longer "
                    "known: it was applied, but more than "
                    f"{RECENT_OUTCOMES} later writes of this client came first")
