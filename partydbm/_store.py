"""The leader's one way into LevelDB: every read and write of the process that leads,
its own and its followers', goes through its Store.

Invariants enforced here:
- Every write to a key holds that key's stripe lock (STRIPES locks, chosen by the key's
  hash) for its read and its write, so a read-modify-write (delete, pop, setdefault,
  compare_and_set) is atomic with respect to every other write to the key, from any
  thread: the application's, a follower's serving thread, one answering in passing.
  Plain puts take the lock too: that is what makes compare_and_set atomic against them.
  A write of several keys takes their stripes in ascending order (no deadlock).
- Nothing closes LevelDB while a call is inside it (docs/TRAPS.md, trap 5: plyvel
  checks that the database is open and then releases the GIL; a close from another
  thread in that window frees what the call uses, and the process dies of SIGSEGV).
  Every call passes the gate: it counts itself in, and once `close()` has begun, a
  call that has not yet passed raises ClosedError; close() waits until none is in.
- While followers' caches are on (a ring: _publish.py), a write publishes what it
  changed after LevelDB's write, and its stripes are `_busy` in between: a read of
  this process that finds its key's stripe busy after reading reads again under the
  stripe's lock, so it never returns a value that followers' caches do not have yet.
- plyvel's errors leave as partydbm.error (storage_error), here and nowhere else.

The gate counts with a list (append and pop are each one atomic step under the GIL)
instead of a lock: a call appends and then looks at `closed`; close() sets `closed`
and then looks at the list. Whatever the interleaving, either the call sees `closed`
or close() sees the call.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from . import _publish, _seams
from ._backend import USER, Backend, Range, StorageError, storage_error
from ._errors import CLOSED_MESSAGE, ClosedError
from ._publish import Publisher

STRIPES = 64

Ops = list[tuple[bytes, bytes | None]]  # (user key, value) puts and (key, None) deletes
Mark = Callable[[Any], Ops] | None
"""For a follower's write: given the write's outcome, the raw records (Backend.mark_ops)
that mark it applied, written in the same LevelDB batch as the write itself."""

_P = ParamSpec("_P")
_R = TypeVar("_R")


AppGet = Callable[[bytes, object], "bytes | None"]  # (key, handle)
AppPut = Callable[[bytes, bytes, bool, object], None]  # (key, value, sync, handle)


class Poller(Protocol):
    """Answering in passing, as the application's entries see it."""

    active: bool

    def poll(self) -> None: ...


def _gated(method: Callable[Concatenate[Store, _P], _R]) -> Callable[Concatenate[Store, _P], _R]:
    """Run `method` inside the gate, with plyvel's errors as partydbm.error."""
    @functools.wraps(method)
    def wrapper(self: Store, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        inside = self._inside
        inside.append(None)
        try:
            if self.closed:
                raise ClosedError(CLOSED_MESSAGE)
            return method(self, *args, **kwargs)
        except StorageError as exc:
            raise storage_error(exc) from exc
        finally:
            inside.pop()
    return wrapper  # type: ignore[return-value]


class Store:
    def __init__(self, backend: Backend, publisher: Publisher) -> None:
        self.backend = backend
        self.publisher = publisher
        self._raw_get = backend.raw_get
        self._raw_put = backend.raw_put
        self._locks = [threading.Lock() for _ in range(STRIPES)]
        self._busy = [False] * STRIPES  # written by a stripe's lock holder only
        self._inside: list[None] = []
        self.closed = False
        self._closing = threading.Lock()  # makes the backend's close happen once

    # -- the hot pair, gated inline (one Python call less than @_gated) -----------------
    # The application's own get and put (application_entries) are the same code with
    # answering in passing first: a copy, not a call, because one Python frame more is
    # measurable on the leader's hot path, which must stay within 1.5x plyvel.
    def get(self, key: bytes) -> bytes | None:
        inside = self._inside
        inside.append(None)
        try:
            if self.closed:
                raise ClosedError(CLOSED_MESSAGE)
            value: bytes | None = self._raw_get(USER + key)
            # Looked at after the read (see above): a write of the key between LevelDB
            # and its publication holds the stripe; read again once it is published.
            if self.publisher.ring is not None and self._busy[hash(key) % STRIPES]:
                value = self._read_settled(key)
            return value
        except StorageError as exc:
            raise storage_error(exc) from exc
        finally:
            inside.pop()

    def _read_settled(self, key: bytes) -> bytes | None:
        """What `key` holds once the write of it now between LevelDB and its
        publication is published (it holds the key's stripe until then)."""
        with self._locks[hash(key) % STRIPES]:
            return self._raw_get(USER + key)  # type: ignore[no-any-return]

    def put(self, key: bytes, value: bytes, sync: bool = False, mark: Mark = None) -> None:
        inside = self._inside
        inside.append(None)
        try:
            if self.closed:
                raise ClosedError(CLOSED_MESSAGE)
            i = hash(key) % STRIPES
            lock = self._locks[i]
            lock.acquire()  # not `with`: twice as fast
            try:
                if mark is None and self.publisher.ring is None:
                    self._raw_put(USER + key, value, sync=sync)
                else:
                    self._write([(key, value)], sync, mark, stripes=(i,))
            finally:
                lock.release()
        except StorageError as exc:
            raise storage_error(exc) from exc
        finally:
            inside.pop()

    def application_entries(self, passing: Poller) -> tuple[AppGet, AppPut]:
        """The application's get and put (a LocalRoute's): get() and put() with answering
        followers in passing first, taking the handle as a last argument they ignore.
        Closures, not methods: their names resolve as cells, not attributes, and no
        bound method is made per call (30 ns of a 450 ns get, bench/)."""
        inside, raw_get, raw_put = self._inside, self._raw_get, self._raw_put
        locks, busy, publisher, user, read_settled, write = (
            self._locks, self._busy, self.publisher, USER, self._read_settled, self._write)
        store = self

        def get(key: bytes, h: object = None) -> bytes | None:
            if passing.active:
                passing.poll()
            inside.append(None)
            try:
                if store.closed:
                    raise ClosedError(CLOSED_MESSAGE)
                value: bytes | None = raw_get(user + key)
                if publisher.ring is not None and busy[hash(key) % STRIPES]:
                    value = read_settled(key)
                return value
            except StorageError as exc:
                raise storage_error(exc) from exc
            finally:
                inside.pop()

        def put(key: bytes, value: bytes, sync: bool, h: object = None) -> None:
            if passing.active:
                passing.poll()
            inside.append(None)
            try:
                if store.closed:
                    raise ClosedError(CLOSED_MESSAGE)
                i = hash(key) % STRIPES
                lock = locks[i]
                lock.acquire()
                try:
                    if publisher.ring is None:
                        raw_put(user + key, value, sync=sync)
                    else:
                        write([(key, value)], sync, None, stripes=(i,))
                finally:
                    lock.release()
            except StorageError as exc:
                raise storage_error(exc) from exc
            finally:
                inside.pop()

        return get, put

    # -- reads -------------------------------------------------------------------------
    def has(self, key: bytes) -> bool:
        return self.get(key) is not None

    @_gated
    def get_many(self, keys: list[bytes], max_bytes: int | None = None
                 ) -> list[bytes | None]:
        values = self.backend.get_many(keys, max_bytes)
        if self.publisher.ring is not None and any(
                self._busy[hash(key) % STRIPES] for key in keys):
            with self._stripes([(key, None) for key in keys]):
                values = self.backend.get_many(keys, max_bytes)
        return values

    # -- a follower's miss: the value and the ring position it is valid at --------------
    @_gated
    def get_at(self, key: bytes, max_len: int) -> list[Any]:
        """[value (None: absent; True: longer than `max_len`), ring position]: the
        position read under the key's lock before LevelDB, so no change of the key
        falls between the two (see _cache.py)."""
        with self._locks[hash(key) % STRIPES]:
            pos = self.publisher.position()
            value = self._raw_get(USER + key)
        return [True if value is not None and len(value) > max_len else value, pos]

    @_gated
    def get_many_at(self, keys: list[bytes], max_len: int, max_bytes: int | None = None
                    ) -> list[Any]:
        """get_at for many keys: one snapshot, one position (all their stripes held)."""
        with self._stripes([(key, None) for key in keys]):
            pos = self.publisher.position()
            values = self.backend.get_many(keys, max_bytes)
        return [[True if v is not None and len(v) > max_len else v for v in values], pos]

    @_gated
    def scan(self, rng: Range, reverse: bool, keys_only: bool, limit: int, max_bytes: int
             ) -> tuple[list[bytes], bool]:
        return self.backend.scan(rng, reverse, keys_only, limit, max_bytes)

    @_gated
    def count(self) -> int:
        return self.backend.count()

    # -- writes: each holds the stripes of the keys it writes --------------------------
    def _write(self, ops: Ops, sync: bool, mark: Mark, outcome: Any = None,
               stripes: Sequence[int] | None = None) -> None:
        """Apply `ops` (with a follower's mark, which is written even when `ops` is
        empty: the request's outcome must be found again if it is resent), publishing
        them to followers' caches around the write when a ring is on (_publish.py).
        Called with the stripes of `ops` held (`stripes`, if the caller has them)."""
        ring = self.publisher.current()
        if ring is None or not ops:
            if mark is not None:
                self.backend.write(ops, sync, mark(outcome))
            elif ops:
                self.backend.write(ops, sync)
            return
        busy = self._busy
        if stripes is None:
            stripes = self._stripe_ids(ops)
        for i in stripes:
            busy[i] = True
        try:
            if mark is None and len(ops) == 1 and ops[0][1] is not None:
                self._raw_put(USER + ops[0][0], ops[0][1], sync=sync)  # one record: no batch
            else:
                self.backend.write(ops, sync, () if mark is None else mark(outcome))
            if _seams.crash_at is not None or _seams.pauses:
                _seams.passage("after_write")  # written, not yet published
                _seams.pause("after_write")
            try:
                _publish.after(ring, ops)
            except BaseException:
                # Written and not published (an interrupt in the middle): followers'
                # caches can no longer be trusted. They read from here from now on.
                ring.retire()
                raise
        finally:
            for i in stripes:
                busy[i] = False

    @_gated
    def delete(self, key: bytes, sync: bool = False, mark: Mark = None) -> bool:
        """Delete `key`; whether it existed (decided under the key's lock)."""
        with self._locks[hash(key) % STRIPES]:
            existed = self._raw_get(USER + key) is not None
            _seams.pause("rmw")
            self._write([(key, None)] if existed else [], sync, mark, existed)
        return existed

    @_gated
    def pop(self, key: bytes, sync: bool = False, mark: Mark = None) -> bytes | None:
        """Delete `key` and return its value (None: it did not exist)."""
        with self._locks[hash(key) % STRIPES]:
            value: bytes | None = self._raw_get(USER + key)
            _seams.pause("rmw")
            self._write([(key, None)] if value is not None else [], sync, mark, value)
        return value

    @_gated
    def setdefault(self, key: bytes, default: bytes, sync: bool = False, mark: Mark = None
                   ) -> bytes:
        """The value of `key`, storing `default` first if it has none."""
        with self._locks[hash(key) % STRIPES]:
            value: bytes | None = self._raw_get(USER + key)
            _seams.pause("rmw")
            if value is None:
                value = default
                self._write([(key, default)], sync, mark, value)
            else:
                self._write([], sync, mark, value)
        return value

    @_gated
    def compare_and_set(self, key: bytes, expected: bytes | None, new: bytes | None,
                        sync: bool = False, mark: Mark = None) -> bool:
        """Set `key` to `new` (None: delete it) if its value is `expected` (None: absent).
        Whether it did."""
        with self._locks[hash(key) % STRIPES]:
            ok = bool(self._raw_get(USER + key) == expected)
            _seams.pause("rmw")
            self._write([(key, new)] if ok else [], sync, mark, ok)
        return ok

    @_gated
    def write(self, ops: Ops, sync: bool = False, mark: Mark = None) -> None:
        """Apply puts and deletes atomically."""
        with self._stripes(ops):
            self._write(ops, sync, mark)

    @_gated
    def clear(self, sync: bool = False, mark: Mark = None) -> None:
        """Delete every key, atomically (one batch: a replayed half-clear could delete
        keys written in between)."""
        with self._stripes(None):
            self._write(self.backend.clear_ops(), sync, mark)

    def _stripes(self, ops: Sequence[tuple[bytes, Any]] | None) -> _Stripes:
        return _Stripes([self._locks[i] for i in self._stripe_ids(ops)])

    @staticmethod
    def _stripe_ids(ops: Sequence[tuple[bytes, Any]] | None) -> Sequence[int]:
        """The stripes of the keys in `ops` (None: all), in ascending order."""
        if ops is None or len(ops) >= STRIPES:
            return range(STRIPES)
        if len(ops) == 1:
            return (hash(ops[0][0]) % STRIPES,)
        return sorted({hash(key) % STRIPES for key, _ in ops})

    # -- whole-database ----------------------------------------------------------------
    @_gated
    def sync(self) -> None:
        self.backend.sync()

    @_gated
    def compact(self) -> None:
        self.backend.compact()

    @_gated
    def applied(self, client: bytes) -> tuple[int, list[int], dict[int, Any]]:
        return self.backend.applied(client)

    @_gated
    def outcome(self, client: bytes, rid: int) -> tuple[bool, Any]:
        return self.backend.outcome(client, rid)

    @_gated
    def prune_applied(self) -> int:
        return self.backend.prune_applied()

    @_gated
    def stats(self) -> str | None:
        return self.backend.stats()

    # -- closing -----------------------------------------------------------------------
    def close(self) -> None:
        """Refuse every call from now on, wait for those inside LevelDB to leave, retire
        the ring, then close LevelDB (which gives up its LOCK). Called by a finalizer in
        the middle of one of our own calls (a handle's __del__ run by the garbage
        collector), it cannot wait for itself: a thread closes LevelDB once it left."""
        self.closed = True
        if _called_from_inside(self):
            threading.Thread(target=self._close_when_left, daemon=True,
                             name="partydbm-close").start()
            return
        self._close_when_left()

    def _close_when_left(self) -> None:
        # No timeout: closing under a call would crash the process. The calls inside
        # are LevelDB calls (and their stripe locks): they end. A poll, not a wake-up
        # from the last call out: that would cost every call a check.
        pause = 0.0001
        while self._inside:
            time.sleep(pause)
            pause = min(pause * 2, 0.005)
        with self._closing:
            if self.backend is not None:
                backend, self.backend = self.backend, None  # type: ignore[assignment]
                self.publisher.close()  # still under the LOCK: the file is ours
                backend.close()


class _Stripes:
    """Several stripe locks, taken in ascending order and given back in reverse."""

    __slots__ = ("_locks",)

    def __init__(self, locks: list[threading.Lock]) -> None:
        self._locks = locks

    def __enter__(self) -> None:
        for lock in self._locks:
            lock.acquire()

    def __exit__(self, *exc: object) -> None:
        for lock in reversed(self._locks):
            lock.release()


def _called_from_inside(store: Store) -> bool:
    """Whether the calling thread is in the middle of a call of `store` (its frames say
    so: this module's code running with `store` as self)."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename == __file__ and frame.f_locals.get("self") is store \
                and frame.f_code.co_name not in ("close", "_close_when_left"):
            return True
        frame = frame.f_back
    return False
