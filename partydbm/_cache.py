"""A follower's cache of single-key reads, kept coherent by the leader's change ring
(_ring.py), and CachedRoute: a RemoteRoute that answers reads from it.

What a read promises, in every process and across failover (linearizable single-key
reads): a read that begins after a write was acknowledged to anyone returns that
write or a later one, never an older value, never one not yet written.

How the cache keeps it:
- Every entry is what the key held as of `applied`: before a cached answer, the reader
  loads the ring's head and, if the leader published changes since, applies them to
  the keys it holds (values, not only invalidations: a rewritten key stays cached).
- The leader publishes a change before it acknowledges the write, so a read that
  begins after the acknowledgement sees it in the ring; and between LevelDB's write
  and the publication, the leader's own reads of the key wait (_store.py), so nobody
  can have seen a new value that a follower would still answer with the old one.
- A value fetched on a miss comes with the ring position the leader read under the
  key's lock, before LevelDB: the changes after it are applied on top before the value
  is cached. One that cannot be brought up to date (the ring moved on too far) is
  answered but not cached.
- A ring that is retired (its leader closed, died or stopped publishing) or that this
  reader fell a whole ring behind on makes it drop every entry: after a failover the
  new leader retires the old ring before it serves anything.

Memory: entries are counted in bytes (key, value and OVERHEAD); past the limit the
oldest go first, in the order they were fetched (a hit does not move an entry: that
would cost every cached read a call). Values above VALUE_MAX are never cached.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from . import _protocol as P
from . import _ring as R
from ._remote import RemoteRoute
from ._routes import Policy

if TYPE_CHECKING:
    from ._client import Connection
    from ._engine import Engine

DEFAULT_SIZE = 32 << 20
"""Bytes a process caches per database by default (open(..., cache_size=...))."""
VALUE_MAX = 64 << 10
"""Values longer than this are never cached (a read of one goes to the leader)."""
OVERHEAD = 120  # bytes an entry costs beyond its key and value (dict slot, objects)

_MISS: Any = object()  # not cached


class Cache:
    """Entries key -> value (bytes) or None (known absent), as of `applied`."""

    def __init__(self, view: R.View, limit: int) -> None:
        self.view = view
        self._head = view.words  # the ring's words: head is read on every cached answer
        self._head_at = view.head_index
        self.limit = limit
        self.entries: OrderedDict[bytes, Any] = OrderedDict()
        self.size = 0
        self.applied = view.head()
        self.dead = False  # the ring was retired: this cache answers nothing more
        self.lock = threading.Lock()
        self.misses = self.resets = 0  # reads that went to the leader; caches dropped

    def lookup(self, key: bytes) -> Any:
        """The cached answer for `key` (bytes or None), or _MISS. Lock-free when the
        ring has not moved since the last catch-up (the common case)."""
        if self._head[self._head_at] == self.applied:
            value = self.entries.get(key, _MISS)
        else:
            with self.lock:
                self._catch_up()
                value = self.entries.get(key, _MISS)
        return value

    def _catch_up(self) -> None:
        """Apply the changes published since `applied` (called with `lock` held)."""
        view = self.view
        head = view.head()
        if head < 0:
            self._drop(dead=True)
            return
        s = self.applied
        if head - s > view.slots:
            self._drop()
            self.applied = head
            return
        entries = self.entries
        while s < head:
            s += 1
            change = view.read(s, entries)
            if change is None:  # overwritten under us: a whole ring behind
                self._drop()
                self.applied = view.head()
                if self.applied < 0:
                    self._drop(dead=True)
                return
            self._apply(*change)
        self.applied = head

    def _apply(self, kind: int, key: bytes, value: bytes) -> None:
        entries = self.entries
        if kind == R.ALL:
            self._drop()
            return
        old = entries.get(key, _MISS)
        if old is _MISS:
            return  # not a key we hold
        if kind == R.PUT:
            self._set(key, value, old)
        elif kind == R.DEL:
            self._set(key, None, old)
        else:  # DROP
            del entries[key]
            self.size -= _cost(key, old)

    def _set(self, key: bytes, value: Any, old: Any) -> None:
        self.entries[key] = value
        self.size += _cost(key, value) - (0 if old is _MISS else _cost(key, old))
        if self.size > self.limit:
            self._evict()

    def _evict(self) -> None:
        entries = self.entries
        while self.size > self.limit * 0.9 and entries:
            key, value = entries.popitem(last=False)
            self.size -= _cost(key, value)

    def _drop(self, dead: bool = False) -> None:
        self.entries.clear()
        self.size = 0
        self.resets += 1
        if dead:
            self.dead = True

    def insert(self, key: bytes, value: bytes | None, pos: int) -> None:
        """Cache `value`, which the leader read as of ring position `pos` (under the
        key's lock): bring it up to date with the changes after `pos` first."""
        if (value is not None and len(value) > VALUE_MAX) or len(key) > R.KEY_MAX:
            return
        with self.lock:
            self._catch_up()
            if self.dead:
                return
            state = self._replay(key, value, pos)
            if state is not _MISS:
                old = self.entries.get(key, _MISS)
                self._set(key, state, old)
                self.entries.move_to_end(key)

    def _replay(self, key: bytes, value: Any, pos: int) -> Any:
        """What `key` holds as of `applied`, given `value` as of `pos`: the ring's changes
        of it in between applied in order (_MISS: unknown, do not cache)."""
        view, state = self.view, value
        if pos > self.applied:
            return _MISS  # cannot happen (pos was read before our head); be safe
        if self.applied - pos > view.slots:
            return _MISS
        one = (key,)
        for s in range(pos + 1, self.applied + 1):
            change = view.read(s, one)
            if change is None:
                return _MISS
            kind, k, v = change
            if kind == R.ALL:
                return _MISS
            if k != key:
                continue
            state = v if kind == R.PUT else None if kind == R.DEL else _MISS  # DROP
            if state is _MISS:
                return _MISS
        return state

    def lookup_many(self, keys: list[bytes]) -> list[Any]:
        """The cached answers for `keys` (_MISS where unknown), all as of one position."""
        with self.lock:
            self._catch_up()
            get = self.entries.get
            return [get(k, _MISS) for k in keys]

    def merge(self, keys: list[bytes], missing: list[int], values: list[Any], pos: int
              ) -> list[Any] | None:
        """The answers for `keys`, all as of the position the cache reaches now: the
        cached ones read again, the ones the leader read as of `pos` (at `missing`)
        brought up to it (and cached). None if some answer cannot be known."""
        if pos < 0:
            return None
        with self.lock:
            self._catch_up()
            if self.dead:
                return None
            fetched = dict(zip(missing, values, strict=True))
            out: list[Any] = []
            known = True
            for i, key in enumerate(keys):
                if i in fetched:
                    value = fetched[i]
                    state = _MISS if value is True else self._replay(key, value, pos)
                    if state is not _MISS and (value is None or len(value) <= VALUE_MAX):
                        self._set(key, state, self.entries.get(key, _MISS))
                else:
                    state = self.entries.get(key, _MISS)
                known = known and state is not _MISS
                out.append(state)
            return out if known else None


def _cost(key: bytes, value: Any) -> int:
    return len(key) + (len(value) if type(value) is bytes else 0) + OVERHEAD


class CachedRoute(RemoteRoute):
    """A RemoteRoute whose single-key reads come from the process's cache when it can
    answer them, and otherwise from the leader (GETPOS: the value and the ring position
    it is valid at), which then caches them. Writes and scans go to the leader as
    before; a handle opened with cache_size=0 never reads from the cache."""

    def __init__(self, engine: Engine, conn: Connection, cache: Cache) -> None:
        super().__init__(engine, conn)
        self.cache = cache

    def get(self, key: bytes, h: Policy) -> bytes | None:
        cache = self.cache
        if h._cached and not cache.dead:
            value = cache.lookup(key)
            if value is not _MISS:
                return value  # type: ignore[no-any-return]
            if len(key) <= R.KEY_MAX:
                cache.misses += 1
                value, pos = self.run(P.GETPOS, (key, VALUE_MAX), h)
                if value is True:  # exists, too long to cache: ask for it as it is
                    return super().get(key, h)
                cache.insert(key, value, pos)
                return value  # type: ignore[no-any-return]
        return super().get(key, h)

    def run(self, op: int, args: tuple[Any, ...], h: Policy) -> Any:
        if op == P.HAS:
            cache = self.cache
            if h._cached and not cache.dead and len(args[0]) <= R.KEY_MAX:
                value = cache.lookup(args[0])
                if value is not _MISS:
                    return value is not None
                cache.misses += 1
                value, pos = super().run(P.GETPOS, (args[0], VALUE_MAX), h)
                if value is not True:
                    cache.insert(args[0], value, pos)
                return value is not None
        elif op == P.GETMANY and h._cached and not self.cache.dead:
            return self._get_many(args[0], h)
        return super().run(op, args, h)

    def _get_many(self, keys: list[bytes], h: Policy) -> list[bytes | None]:
        """Cached keys from the cache, the rest in one request (GETMANYPOS), all brought
        to one ring position: the values of one moment, as get_many promises (one
        snapshot). When that cannot be had, all of them from the leader (GETMANY)."""
        cache = self.cache
        if any(len(k) > R.KEY_MAX for k in keys):  # never published: cannot be brought up
            return super().run(P.GETMANY, (keys,), h)  # type: ignore[no-any-return]
        out = cache.lookup_many(keys)
        missing = [i for i, v in enumerate(out) if v is _MISS]
        if not missing:
            return out
        cache.misses += len(missing)
        values, pos = super().run(P.GETMANYPOS, ([keys[i] for i in missing], VALUE_MAX), h)
        merged = cache.merge(keys, missing, values, pos)
        if merged is None:
            return super().run(P.GETMANY, (keys,), h)  # type: ignore[no-any-return]
        return merged
