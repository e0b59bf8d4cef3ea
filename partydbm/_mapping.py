"""PartyDBM: the dbm + MutableMapping facade. Flags, key coercion, the read-only check;
every operation goes to the route of the process's engine for the database
(_routes.py), which also decides what a closed handle does (ClosedError)."""

from __future__ import annotations

import itertools
from collections.abc import ItemsView, Iterable, Iterator, Mapping, MutableMapping, ValuesView
from typing import Any

from . import _cursor, _registry
from . import _protocol as P
from ._engine import Engine
from ._errors import CLOSED_MESSAGE, READONLY_MESSAGE, ClosedError, ReadOnlyError
from ._routes import CLOSED

Key = bytes | str | bytearray | memoryview

UPDATE_CHUNK = 4096  # items per atomic batch in update()
UPDATE_CHUNK_BYTES = 8 << 20  # ...and bytes of keys and values (well under MAX_BATCH_BYTES)
GET_MANY_CHUNK = 4096  # keys per request in get_many()
_MISSING: Any = object()


def to_bytes(obj: Any, what: str = "keys") -> bytes:
    if type(obj) is bytes:
        return obj
    if isinstance(obj, str):
        return obj.encode("utf-8")
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj)
    raise TypeError(f"{what} must be bytes or str, not {type(obj).__name__}")


def _maybe_bytes(obj: Any) -> bytes | None:
    return None if obj is None else to_bytes(obj, "values")


class _Closed:
    """What a closed handle holds instead of its engine."""

    route = CLOSED
    leader_pid = 0


_CLOSED = _Closed()


class PartyDBM(MutableMapping[bytes, bytes]):
    """A handle on a partydbm database (create with partydbm.open)."""

    _engine: Engine | _Closed

    def __init__(self, engine: Engine, path: str, readonly: bool, sync: bool,
                 retry: bool, timeout: float | None, cached: bool = True) -> None:
        self._engine = engine
        self.name = path
        self._readonly = readonly
        self._sync = sync
        # The policy its route reads (_routes.Policy):
        self._retry = retry
        self._timeout = timeout
        self._cached = cached

    # -- the choke points: every request is one of these (or the hot get/put) -----------
    def _run(self, op: int, *args: Any) -> Any:
        return self._engine.route.run(op, args, self)

    def _write(self, op: int, *args: Any) -> Any:
        if self._readonly:
            self._writable()
        return self._engine.route.run(op, args, self)

    def _writable(self) -> None:
        """Raise unless the handle may write now (closed first, as every dbm does)."""
        if self._engine is _CLOSED:
            raise ClosedError(CLOSED_MESSAGE)
        if self._readonly:
            raise ReadOnlyError(READONLY_MESSAGE)

    # -- the mapping ---------------------------------------------------------------------
    def __getitem__(self, key: Key) -> bytes:
        value = self._engine.route.get(key if type(key) is bytes else to_bytes(key), self)
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key: Key, default: Any = None) -> Any:
        value = self._engine.route.get(to_bytes(key), self)
        return default if value is None else value

    def get_many(self, keys: Iterable[Key], default: Any = None) -> list[Any]:
        """The values of `keys`, in order, `default` for a missing one. A follower asks
        for GET_MANY_CHUNK keys per round trip (one request instead of one per key); each
        chunk is read from one LevelDB snapshot."""
        wanted = [to_bytes(k) for k in keys]
        out: list[Any] = []
        for i in range(0, max(len(wanted), 1), GET_MANY_CHUNK):
            values = self._run(P.GETMANY, wanted[i:i + GET_MANY_CHUNK])
            out.extend(default if v is None else v for v in values)
        return out

    def __setitem__(self, key: Key, value: Key) -> None:
        k = key if type(key) is bytes else to_bytes(key)
        v = value if type(value) is bytes else to_bytes(value, "values")
        if self._readonly:
            self._writable()
        if len(v) > P.MAX_VALUE or len(k) > P.MAX_KEY:  # the same limits in both roles
            P.check_put(k, v)
        self._engine.route.put(k, v, self._sync, self)

    def __delitem__(self, key: Key) -> None:
        if not self._write(P.DELETE, to_bytes(key), self._sync):
            raise KeyError(key)

    def pop(self, key: Key, default: Any = _MISSING) -> Any:
        """Remove `key` and return its value, atomically: of several processes or
        threads popping one key at once, exactly one gets its value."""
        value = self._write(P.POP, to_bytes(key), self._sync)
        if value is not None:
            return value
        if default is _MISSING:
            raise KeyError(key)
        return default

    def popitem(self) -> tuple[bytes, bytes]:
        """Remove and return the first (key, value) in key order, atomically (another
        process popping the same key meanwhile makes this one take the next)."""
        while True:
            key = self.firstkey()
            if key is None:
                raise KeyError("popitem(): database is empty")
            value = self._write(P.POP, key, self._sync)
            if value is not None:
                return key, value

    def setdefault(self, key: Key, default: Any = None) -> bytes:
        """The stored value of `key`; if missing, store `default` and return it as stored
        (bytes), atomically: of several racing for a missing key, one value is stored and
        every one of them gets it. A missing key with no default raises TypeError (None
        is no value)."""
        k = to_bytes(key)
        value: bytes | None = self._engine.route.get(k, self)
        if value is not None:
            return value
        stored = to_bytes(default, "values")
        P.check_put(k, stored)
        return self._write(P.SETDEFAULT, k, stored, self._sync)  # type: ignore[no-any-return]

    def compare_and_set(self, key: Key, expected: Key | None, new: Key | None) -> bool:
        """Atomically: if `key`'s value is `expected` (None: the key is absent), set it to
        `new` (None: delete it) and return True; else change nothing and return False.
        Like every write, applied exactly once across a leader's death."""
        k, new_value = to_bytes(key), _maybe_bytes(new)
        if new_value is not None:
            P.check_put(k, new_value)
        return bool(self._write(P.CAS, k, _maybe_bytes(expected), new_value, self._sync))

    def __contains__(self, key: object) -> bool:
        return bool(self._run(P.HAS, to_bytes(key)))

    def __len__(self) -> int:
        return int(self._run(P.LEN))

    def __bool__(self) -> bool:
        return self.firstkey() is not None

    def __iter__(self) -> Iterator[bytes]:
        return self._scan((None, True, None, False), False, "keys")

    def keys(self) -> list[bytes]:  # type: ignore[override]
        """All keys, in key order, as a list (as every dbm module returns)."""
        return list(self)

    def items(self) -> _ItemsView:
        return _ItemsView(self)

    def values(self) -> _ValuesView:
        return _ValuesView(self)

    def update(self, other: Any = (), /, **kwds: Any) -> None:
        """Store many pairs, in atomic chunks of at most UPDATE_CHUNK pairs and
        UPDATE_CHUNK_BYTES bytes (one round trip each). As with dict.update, when the
        pairs themselves fail (a bad pair, an iterator that raises), those before it
        are stored."""
        self._writable()  # before any pair is read
        pairs: Iterable[Any]
        if isinstance(other, Mapping):
            pairs = ((k, other[k]) for k in other)
        elif hasattr(other, "keys"):
            pairs = ((k, other[k]) for k in other.keys())  # noqa: SIM118 - dict protocol
        else:
            pairs = other
        chunk: list[bytes | None] = []  # flat: key, value, key, value...
        size = 0
        try:
            for key, value in itertools.chain(_pairs(pairs), kwds.items()):
                k, v = to_bytes(key), to_bytes(value, "values")
                chunk += (k, v)
                size += len(k) + len(v)
                if len(chunk) >= 2 * UPDATE_CHUNK or size >= UPDATE_CHUNK_BYTES:
                    flat, chunk, size = chunk, [], 0  # a failed write is not retried below
                    self._batch(flat)
        finally:
            if chunk:
                self._batch(chunk)

    def _batch(self, flat: list[bytes | None]) -> None:
        P.check_batch(list(zip(flat[::2], flat[1::2], strict=True)))  # type: ignore[arg-type]
        self._write(P.BATCH, flat, self._sync)

    def clear(self) -> None:
        """Delete every key, atomically."""
        self._write(P.CLEAR, self._sync)

    # -- dbm extras ------------------------------------------------------------------------
    def firstkey(self) -> bytes | None:
        for key in self.iterator(include_value=False):
            return key  # type: ignore[no-any-return]
        return None

    def nextkey(self, key: Key) -> bytes | None:
        for k in self.iterator(start=to_bytes(key), include_start=False, include_value=False):
            return k  # type: ignore[no-any-return]
        return None

    def sync(self) -> None:
        self._run(P.SYNC)

    def reorganize(self) -> None:
        self._write(P.COMPACT)

    def close(self) -> None:
        engine, self._engine = self._engine, _CLOSED
        if isinstance(engine, Engine):
            _registry.release(engine)

    def __enter__(self) -> PartyDBM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        route = self._engine.route
        state = "closed" if route is CLOSED else "leader" if route.is_leader else "follower"
        return f"<partydbm.PartyDBM {self.name!r} {state}>"

    # -- beyond dbm (plyvel names) ---------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        return self._engine.route.is_leader

    def iterator(self, *, start: Key | None = None, stop: Key | None = None,
                 prefix: Key | None = None, reverse: bool = False,
                 include_start: bool = True, include_stop: bool = False,
                 include_key: bool = True, include_value: bool = True) -> Iterator[Any]:
        """A range scan in key order: (key, value) pairs, or keys or values alone."""
        rng = _cursor.make_range(
            None if start is None else to_bytes(start), None if stop is None else to_bytes(stop),
            None if prefix is None else to_bytes(prefix), include_start, include_stop)
        if include_key and include_value:
            shape = "items"
        elif include_key:
            shape = "keys"
        elif include_value:
            shape = "values"
        else:
            raise ValueError("iterator() needs include_key or include_value")
        return self._scan(rng, reverse, shape)

    def _scan(self, rng: _cursor.Range, reverse: bool, shape: str) -> Iterator[Any]:
        if self._engine is _CLOSED:  # at once, not at the first next()
            raise ClosedError(CLOSED_MESSAGE)
        return _cursor.scan(lambda: self._engine.route, self, rng, reverse, shape)

    def write_batch(self) -> WriteBatch:
        self._writable()
        return WriteBatch(self)


def _pairs(pairs: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
    for pair in pairs:
        key, value = pair
        yield key, value


class WriteBatch:
    """Collects puts and deletes; applies them atomically when the `with` block ends
    without an exception (or on write())."""

    def __init__(self, db: PartyDBM) -> None:
        self._db = db
        self._ops: list[tuple[bytes, bytes | None]] = []

    def put(self, key: Key, value: Key) -> None:
        self._ops.append((to_bytes(key), to_bytes(value, "values")))

    def delete(self, key: Key) -> None:
        self._ops.append((to_bytes(key), None))

    def clear(self) -> None:
        self._ops.clear()

    def write(self) -> None:
        ops, self._ops = self._ops, []
        if ops:
            self._db._batch([x for op in ops for x in op])

    def __len__(self) -> int:
        return len(self._ops)

    def __enter__(self) -> WriteBatch:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.write()
        else:
            self._ops.clear()


class _ItemsView(ItemsView[bytes, bytes]):
    """items() that scans once instead of one lookup per key."""

    _mapping: PartyDBM

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return self._mapping.iterator()

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, tuple) or len(item) != 2:
            return False
        key, value = item
        got = self._mapping.get(key)
        return got is not None and got == value


class _ValuesView(ValuesView[bytes]):
    _mapping: PartyDBM

    def __iter__(self) -> Iterator[bytes]:
        return self._mapping.iterator(include_key=False)
