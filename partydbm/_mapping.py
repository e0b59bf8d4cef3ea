"""PartyDBM: the dbm + MutableMapping facade. Flags, key coercion and closed checks
live here; every operation goes to the process's engine for the database."""

from __future__ import annotations

import itertools
from collections.abc import ItemsView, Iterable, Iterator, Mapping, MutableMapping, ValuesView
from typing import Any

from . import _cursor
from . import _engine as E
from . import _protocol as P
from ._backend import USER, StorageError, storage_error
from ._errors import CLOSED_MESSAGE, READONLY_MESSAGE, ClosedError, ReadOnlyError

Key = bytes | str | bytearray | memoryview

UPDATE_CHUNK = 4096  # items per atomic batch in update()
UPDATE_CHUNK_BYTES = 8 << 20  # ...and bytes of keys and values (well under MAX_BATCH_BYTES)
GET_MANY_CHUNK = 4096  # keys per request in get_many()


def to_bytes(obj: Any, what: str = "keys") -> bytes:
    if type(obj) is bytes:
        return obj
    if isinstance(obj, str):
        return obj.encode("utf-8")
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj)
    raise TypeError(f"{what} must be bytes or str, not {type(obj).__name__}")


class PartyDBM(MutableMapping[bytes, bytes]):
    """A handle on a partydbm database (create with partydbm.open)."""

    _engine: E.Engine | None

    def __init__(self, engine: E.Engine, path: str, readonly: bool, sync: bool,
                 retry: bool, timeout: float | None) -> None:
        self._engine = engine
        self.name = path
        self._readonly = readonly
        self._sync = sync
        self._retry = retry
        self._timeout = timeout

    # -- the choke points ------------------------------------------------------------------
    def _e(self) -> E.Engine:
        engine = self._engine
        if engine is None:
            raise ClosedError(CLOSED_MESSAGE)
        return engine

    def _w(self) -> E.Engine:
        engine = self._e()
        if self._readonly:
            raise ReadOnlyError(READONLY_MESSAGE)
        return engine

    # -- the mapping ---------------------------------------------------------------------
    # The three hot operations take the leader's local path inline (one Python call
    # less than going through the engine: the leader's get must stay close to plyvel's).
    def __getitem__(self, key: Key) -> bytes:
        k = key if type(key) is bytes else to_bytes(key)
        engine = self._engine
        if engine is None:
            raise ClosedError(CLOSED_MESSAGE)
        backend = engine.backend
        value: bytes | None
        if backend is not None:
            server = engine.server
            if server is not None and server.inline:  # engine.serve_followers(), inline
                server.poll()
            try:
                value = backend.raw_get(USER + k)
            except StorageError as exc:
                raise storage_error(exc) from exc
        else:
            value = engine.call(P.GET, (k,), self)
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key: Key, default: Any = None) -> Any:
        value = self._e().get(to_bytes(key), self)
        return default if value is None else value

    def get_many(self, keys: Iterable[Key], default: Any = None) -> list[Any]:
        """The values of `keys`, in order, `default` for a missing one. A follower asks
        for GET_MANY_CHUNK keys per round trip (one request instead of one per key); each
        chunk is read from one LevelDB snapshot."""
        engine = self._e()
        wanted = [to_bytes(k) for k in keys]
        out: list[Any] = []
        for i in range(0, len(wanted), GET_MANY_CHUNK):
            values = engine.simple(P.GETMANY, self, wanted[i:i + GET_MANY_CHUNK])
            out.extend(default if v is None else v for v in values)
        return out

    def setdefault(self, key: Key, default: Any = None) -> bytes:
        """The stored value of `key`; if missing, store `default` and return it as stored
        (bytes). A missing key with no default raises TypeError (None is no value)."""
        value: bytes | None = self.get(key)
        if value is not None:
            return value
        stored = to_bytes(default, "values")
        self[key] = stored
        return stored

    def __setitem__(self, key: Key, value: Key) -> None:
        k = key if type(key) is bytes else to_bytes(key)
        v = value if type(value) is bytes else to_bytes(value, "values")
        engine = self._engine
        if engine is None:
            raise ClosedError(CLOSED_MESSAGE)
        if self._readonly:
            raise ReadOnlyError(READONLY_MESSAGE)
        if len(v) > P.MAX_VALUE or len(k) > P.MAX_KEY:  # the same limits in both roles
            P.check_put(k, v)
        backend = engine.backend
        if backend is not None:
            server = engine.server
            if server is not None and server.inline:  # engine.serve_followers(), inline
                server.poll()
            try:
                backend.raw_put(USER + k, v, sync=self._sync)
            except StorageError as exc:  # a full disk: partydbm.error naming the cause
                raise storage_error(exc) from exc
        else:
            engine.call(P.PUT, (k, v, self._sync), self)

    def __delitem__(self, key: Key) -> None:
        if not self._w().delete(to_bytes(key), self._sync, self):
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return self._e().has(to_bytes(key), self)

    def __len__(self) -> int:
        return int(self._e().simple(P.LEN, self))

    def __bool__(self) -> bool:
        return self.firstkey() is not None

    def __iter__(self) -> Iterator[bytes]:
        self._e()
        return _cursor.scan(self, (None, True, None, False), False, "keys")

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
        engine = self._w()
        pairs: Iterable[Any]
        if isinstance(other, Mapping):
            pairs = ((k, other[k]) for k in other)
        elif hasattr(other, "keys"):
            pairs = ((k, other[k]) for k in other.keys())  # noqa: SIM118 - dict protocol
        else:
            pairs = other
        chunk: list[tuple[bytes, bytes | None]] = []
        size = 0
        try:
            for key, value in itertools.chain(_pairs(pairs), kwds.items()):
                k, v = to_bytes(key), to_bytes(value, "values")
                chunk.append((k, v))
                size += len(k) + len(v)
                if len(chunk) >= UPDATE_CHUNK or size >= UPDATE_CHUNK_BYTES:
                    ops, chunk, size = chunk, [], 0  # a failed write is not retried below
                    engine.batch(ops, self._sync, self)
        finally:
            if chunk:
                engine.batch(chunk, self._sync, self)

    def clear(self) -> None:
        """Delete every key, atomically."""
        self._w().simple(P.CLEAR, self, self._sync)

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
        self._e().simple(P.SYNC, self)

    def reorganize(self) -> None:
        self._w().simple(P.COMPACT, self)

    def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            E.release(engine)

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
        state = "closed" if self._engine is None else (
            "leader" if self._engine.backend is not None else "follower")
        return f"<partydbm.PartyDBM {self.name!r} {state}>"

    # -- beyond dbm (plyvel names) ---------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        return self._e().backend is not None

    def iterator(self, *, start: Key | None = None, stop: Key | None = None,
                 prefix: Key | None = None, reverse: bool = False,
                 include_start: bool = True, include_stop: bool = False,
                 include_key: bool = True, include_value: bool = True) -> Iterator[Any]:
        """A range scan in key order: (key, value) pairs, or keys or values alone."""
        self._e()
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
        return _cursor.scan(self, rng, reverse, shape)

    def write_batch(self) -> WriteBatch:
        self._w()
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
            self._db._w().batch(ops, self._db._sync, self._db)

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
