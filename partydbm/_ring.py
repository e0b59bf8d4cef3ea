"""The change ring: a file in the database directory that the leader appends every
change to and every follower maps, so followers can keep a cache of their own coherent
(_cache.py). Only the leader writes it; followers map it read-only.

Layout (every word an aligned 8-byte integer, read and written whole):

    header (HEADER bytes)  MAGIC, VERSION, epoch, slots, slot size, leader pid, head
    slot i (SLOT bytes)    seq, meta (kind | key length << 8 | value length << 32),
                           then the key and the value

Change number s (s = 1, 2, ...) lives in slot (s - 1) % slots. `head` is the number of
the last change published; RETIRED (-1) there means the ring is dead for good (its
leader closed or died, or it stopped publishing): nothing in it may be trusted from
then on, and a follower drops whatever it cached from it.

A writer fills a slot as a seqlock would: seq = 0, meta, key and value, seq = s, and
only then head. A reader checks that the slot's seq is s before and after copying it;
anything else means the slot was reused under it (it fell a whole ring behind).

Ordering: the leader's stores must reach other processes in program order, and a
follower's loads must happen in program order. Python has no memory fences, but each
of these stores and loads is a separate call through the interpreter (no compiler
reorders across it) and x86-64 keeps stores in order and loads in order (TSO). On
other architectures (ARM: Apple silicon, Graviton) that does not hold, so there the
ring is never created and followers read from the leader (ORDERED_MEMORY).

Kinds of change (each published after LevelDB's write, before it is acknowledged):
    PUT    the key now holds the value
    DEL    the key is now absent
    DROP   forget the key (its new value is too big for a slot, or its write failed)
    ALL    forget every key (clear, a large batch)
"""

from __future__ import annotations

import mmap
import os
import platform
import threading
from collections.abc import Container, Iterable

from . import _seams

NAME = "partydbm.ring"
MAGIC = int.from_bytes(b"PDBMRING", "little")
VERSION = 1
HEADER = 4096
SLOT = 512
SLOTS = 32768  # 16 MiB (sparse) of changes: the last 32,768 writes
KEY_MAX = 256
"""Longest key a follower caches (longer keys are never in a ring: their changes need
no entry)."""
PAYLOAD = SLOT - 16  # key and value bytes a slot holds
RETIRED = -1

PUT, DEL, DROP, ALL = 1, 2, 3, 4

# header words
_MAGIC, _VERSION, _EPOCH, _SLOTS, _SLOT, _PID, _HEAD = range(7)

ORDERED_MEMORY = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
"""Whether this machine keeps stores in order and loads in order (x86: TSO), which the
ring's seqlock relies on (see above)."""


def ring_path(db_path: str) -> str:
    return os.path.join(db_path, NAME)


def retire_at(db_path: str) -> None:
    """Mark whatever ring sits in the database directory as dead (a new leader does this
    before it reads or writes anything: a follower that has not yet noticed the old
    leader's death must stop trusting its cache), and remove rings a leader was still
    making when it died. Nothing there: nothing to do. Call only holding the LOCK."""
    try:
        for name in os.listdir(db_path):
            if name.startswith(NAME + "."):
                os.unlink(os.path.join(db_path, name))
    except OSError:
        pass
    try:
        fd = os.open(ring_path(db_path), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        if os.fstat(fd).st_size < HEADER:
            return
        with mmap.mmap(fd, HEADER) as mm:
            words = memoryview(mm).cast("q")
            try:
                if words[_MAGIC] == MAGIC:
                    words[_HEAD] = RETIRED
            finally:
                words.release()
    finally:
        os.close(fd)


def remove(db_path: str, epoch: int) -> None:
    """Unlink the ring of `epoch` from the database directory (a leader handing over
    cleanly; followers keep their mapping of it, retired). Call only holding the LOCK."""
    path = ring_path(db_path)
    try:
        with open(path, "rb") as f:
            words = f.read(8 * (_EPOCH + 1))
        if int.from_bytes(words[8 * _EPOCH:], "little", signed=True) == epoch:
            os.unlink(path)
    except OSError:
        pass


class Ring:
    """The leader's side: creates a ring (a new file replacing the one at the path:
    followers of an older one keep their mapping of it, marked retired) and appends
    changes. Callers hold the stripe locks of the keys they publish; `_lock` orders
    appends from different stripes."""

    def __init__(self, db_path: str, mode: int) -> None:
        self.epoch = int.from_bytes(os.urandom(7), "big") | 1
        path = ring_path(db_path)
        tmp = f"{path}.{os.getpid()}.{self.epoch:x}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode & 0o666)
        try:
            size = HEADER + SLOTS * SLOT
            os.ftruncate(fd, size)  # sparse: pages are used as changes reach them
            self._mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        self._words = memoryview(self._mm).cast("q")
        w = self._words
        w[_VERSION], w[_EPOCH], w[_SLOTS], w[_SLOT] = VERSION, self.epoch, SLOTS, SLOT
        w[_PID], w[_HEAD] = os.getpid(), 0
        w[_MAGIC] = MAGIC
        os.replace(tmp, path)  # followers told of this epoch find it here
        self._lock = threading.Lock()
        self._head = 0
        self.retired = False

    def _slot(self, s: int, kind: int, key: bytes, value: bytes = b"") -> None:
        """Fill the slot of change `s` (called with `_lock` held)."""
        i = (s - 1) % SLOTS
        base = HEADER + i * SLOT
        w = (base >> 3)
        words = self._words
        words[w] = 0  # torn from here on, for a reader
        words[w + 1] = kind | len(key) << 8 | len(value) << 32
        self._mm[base + 16:base + 16 + len(key) + len(value)] = key + value
        words[w] = s

    def append(self, changes: Iterable[tuple[int, bytes, bytes]]) -> None:
        """Publish changes (kind, key, value) as one step: a reader sees all or none."""
        with self._lock:
            if self.retired:
                return
            s = self._head
            for kind, key, value in changes:
                if s > self._head and _seams.crash_at is not None:
                    _seams.passage("mid_append")  # some slots filled, head not moved
                s += 1
                self._slot(s, kind, key, value)
            self._head = self._words[_HEAD] = s

    def one(self, kind: int, key: bytes, value: bytes = b"") -> None:
        with self._lock:
            if self.retired:
                return
            s = self._head + 1
            self._slot(s, kind, key, value)
            self._head = self._words[_HEAD] = s

    @property
    def head(self) -> int:
        return self._head

    def retire(self) -> None:
        """Dead for good: no append lands after this (followers drop their caches)."""
        with self._lock:
            if not self.retired:
                self.retired = True
                self._words[_HEAD] = RETIRED

    def close(self) -> None:
        self.retire()
        self._words.release()
        self._mm.close()


class View:
    """A follower's read-only map of the ring its leader named (by epoch)."""

    def __init__(self, db_path: str, epoch: int) -> None:
        """Raises OSError or ValueError if the file is not that ring (or is dead)."""
        fd = os.open(ring_path(db_path), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            size = os.fstat(fd).st_size
            if size < HEADER:
                raise ValueError("not a ring")
            self._mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self.words = memoryview(self._mm).cast("q")
        w = self.words
        if (w[_MAGIC], w[_VERSION], w[_EPOCH]) != (MAGIC, VERSION, epoch) or \
                w[_SLOT] != SLOT or size != HEADER + w[_SLOTS] * SLOT or w[_HEAD] < 0:
            self.close()
            raise ValueError("not the ring our leader named, or retired")
        self.slots = w[_SLOTS]
        self.head_index = _HEAD

    def head(self) -> int:
        return self.words[_HEAD]

    def read(self, s: int, keys: Container[bytes] | None = None
             ) -> tuple[int, bytes, bytes] | None:
        """Change `s` as (kind, key, value), or None if its slot no longer holds it (the
        reader fell a ring behind). With `keys` (a container), the value of a PUT is
        copied only for a key in it (b"" otherwise)."""
        i = (s - 1) % self.slots
        base = HEADER + i * SLOT
        w = base >> 3
        words = self.words
        if words[w] != s:
            return None
        meta = words[w + 1]
        kind, klen, vlen = meta & 0xFF, (meta >> 8) & 0xFFFFFF, meta >> 32
        start = base + 16
        if klen + vlen > PAYLOAD:
            return None  # torn meta: the seq check below would fail too
        key = self._mm[start:start + klen]
        value = b""
        if kind == PUT and (keys is None or key in keys):
            value = self._mm[start + klen:start + klen + vlen]
        if words[w] != s:
            return None
        return kind, key, value

    def close(self) -> None:
        self.words.release()
        self._mm.close()
