"""What the leader publishes to its followers' caches, and when (_ring.py, _cache.py).

Publishing is on while at least one follower that can use a ring is connected: the
first one's hello creates a ring (a new file, a new epoch); after the last one leaves,
the first write more than RING_LINGER later retires it. So a leader without followers
pays one attribute load per write.

Each write publishes what it changed (PUT with the new value, DROP if too big for a
slot, DEL; ALL for a clear or a large batch) after LevelDB's write and before it is
acknowledged, holding the stripe locks of its keys throughout. Between the two, the
Store marks those stripes busy: the leader's own reads of them wait for the
publication, so nobody can see a value that a follower's cache would not answer yet.
Keys longer than KEY_MAX are never cached, so they are never published.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from . import _ring as R

BATCH_INLINE = 64
"""A batch of more operations than this is published as ALL (followers forget every
key) instead of one change per key: a large update would otherwise push the whole
ring past slow readers, and cost the leader more than the write."""

RING_LINGER = 5.0
"""Seconds a ring outlives its last follower (as long as a follower's grace period,
_grace.FOLLOWER): a follower that connects within them (a process that opens the
database for each operation, a run of short commands) finds it. A new ring costs the
follower's hello milliseconds (the first write into a new file's pages: ~3 ms on ext4
here); keeping one costs the leader's writes meanwhile their publication."""

Changes = list[tuple[int, bytes, bytes]]
_ALL: Changes = [(R.ALL, b"", b"")]


class Publisher:
    """The ring of one leader incarnation, while followers use it."""

    def __init__(self, db_path: str, mode: int) -> None:
        self.db_path = db_path
        self.mode = mode
        self.ring: R.Ring | None = None  # read without the lock: on every write
        self._lock = threading.Lock()  # `ring` changes, `_attached`
        self._attached = 0
        self._unused_since: float | None = None  # when the last follower left the ring
        self._closed = False

    def attach(self) -> int | None:
        """A follower joins: publish from now on. The ring's epoch, or None if this
        machine cannot share one (see _ring.ORDERED_MEMORY) or it could not be made."""
        if not R.ORDERED_MEMORY:
            return None
        with self._lock:
            if self._closed:
                return None
            if self.ring is None:
                try:
                    self.ring = R.Ring(self.db_path, self.mode)
                except OSError:
                    return None  # a full disk, say: followers read from us instead
            self._attached += 1
            self._unused_since = None
            return self.ring.epoch

    def detach(self) -> None:
        """A follower that attached has left; after the last one the ring lingers."""
        with self._lock:
            self._attached -= 1
            if self._attached == 0 and self.ring is not None:
                self._unused_since = time.monotonic()

    def current(self) -> R.Ring | None:
        """The ring a write publishes to (None: nobody to publish to). One that no
        follower has used for RING_LINGER is retired first: nobody reads it, and a
        follower that comes later gets a new one. Called with the write's stripes held
        (no stripe is ever taken under `_lock`)."""
        ring, since = self.ring, self._unused_since
        if ring is None or since is None or time.monotonic() - since < RING_LINGER:
            return ring
        with self._lock:
            if self._attached == 0 and self.ring is ring:
                self.ring, self._unused_since = None, None
                ring.retire()
            return self.ring

    def position(self) -> int:
        """The last change published (-1: not publishing): read under the key's lock,
        before LevelDB, for a follower's miss."""
        ring = self.ring
        return -1 if ring is None else ring.head

    def close(self) -> None:
        """The leader hands over: retire the ring for good (before the LOCK goes)."""
        with self._lock:
            self._closed = True
            ring, self.ring = self.ring, None
        if ring is not None:
            ring.close()
            R.remove(self.db_path, ring.epoch)


def after(ring: R.Ring, ops: Sequence[tuple[bytes, bytes | None]]) -> None:
    """Publish what a write of `ops` changed (it is in LevelDB now)."""
    if len(ops) == 1:  # the common case, without the list
        key, value = ops[0]
        if len(key) <= R.KEY_MAX:
            if value is None:
                ring.one(R.DEL, key)
            elif len(key) + len(value) <= R.PAYLOAD:
                ring.one(R.PUT, key, value)
            else:
                ring.one(R.DROP, key)
        return
    if len(ops) > BATCH_INLINE:
        ring.append(_ALL)
        return
    changes: Changes = []
    for key, value in ops:
        if len(key) > R.KEY_MAX:
            continue
        if value is None:
            changes.append((R.DEL, key, b""))
        elif len(key) + len(value) <= R.PAYLOAD:
            changes.append((R.PUT, key, value))
        else:
            changes.append((R.DROP, key, b""))
    if changes:
        ring.append(changes)
