"""The staleness checker's processes: writers, readers and hosts on a shared board."""

from __future__ import annotations

import os
import random
from typing import Any

import partydbm

from . import DEADLINE, report


class Board:
    """Shared memory (a mapped file of aligned 8-byte words) where writers say what they
    issued and what was acknowledged, and readers what they observed, per key."""

    READERS = 16

    def __init__(self, path: str, nkeys: int) -> None:
        import mmap

        self.nkeys = nkeys
        size = 8 * (8 + (2 + self.READERS) * nkeys)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.w = memoryview(self._mm).cast("q")

    def stopped(self, role: str) -> bool:
        """Followers stop first (word 0), the hosts that lead after (word 1): a follower
        in the middle of a request when the last leader left would wait for another."""
        return self.w[1 if role == "host" else 0] != 0

    def stop(self, role: str) -> None:
        self.w[1 if role == "host" else 0] = 1

    def issued(self, k: int) -> int:
        return self.w[8 + k]

    def acked(self, k: int) -> int:
        return self.w[8 + self.nkeys + k]

    def observed(self, k: int) -> int:
        base = 8 + 2 * self.nkeys + k
        return max(self.w[base + r * self.nkeys] for r in range(self.READERS))

    def observe(self, r: int, k: int, v: int) -> None:
        i = 8 + 2 * self.nkeys + r * self.nkeys + k
        if v > self.w[i]:
            self.w[i] = v

    def write(self, k: int, seq: int, ack: bool) -> None:
        self.w[8 + (self.nkeys if ack else 0) + k] = seq


def stale_check(path: str, board_path: str, role: str, index: str, nkeys: str,
                nwriters: str, violations: str, seed: str, stale: str = "0") -> None:
    """One process of the staleness checker. Writers ("writer") own the keys k with
    k % nwriters == index and write increasing numbers to them, saying on the board
    what they issue before each write and what was acknowledged after it. Readers
    ("reader", and "host": the processes that lead, killed one after the other) check
    every value they read: at least what was acknowledged, and what any reader had
    observed, before the read began; at most what was issued when it ended. Each
    violation is appended to `violations` at once (a host may be SIGKILLed next).
    `stale` = "1" installs a cache that never catches up (the checker's own check)."""
    board = Board(board_path, int(nkeys))
    rng = random.Random(int(seed) * 100 + int(index) + (1000 if role == "writer" else 0))
    if stale == "1":
        _make_caches_stale()
    handle = partydbm.open(path, timeout=DEADLINE)
    if role == "host":
        print("ready", flush=True)
    counts = {"reads": 0, "writes": 0, "violations": 0}
    fd = os.open(violations, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        while not board.stopped(role):
            if role == "writer":
                _stale_write(handle, board, rng, int(index), int(nwriters), int(nkeys))
                counts["writes"] += 1
            else:
                bad = _stale_read(handle, board, rng, int(index), int(nkeys))
                counts["reads"] += 1
                if bad:
                    counts["violations"] += 1
                    os.write(fd, f"{role} {index} pid {os.getpid()}: {bad}\n".encode())
    finally:
        os.close(fd)
    route = handle._engine.route
    cache = getattr(route, "cache", None)
    counts["misses"] = -1 if cache is None else cache.misses
    report(counts)


def _stale_write(handle: Any, board: Board, rng: random.Random, w: int, nwriters: int,
                 nkeys: int) -> None:
    own = [k for k in range(nkeys) if k % nwriters == w]
    picked = rng.sample(own, 2 if rng.random() < 0.2 and len(own) > 1 else 1)
    seqs = [board.issued(k) + 1 for k in picked]
    for k, seq in zip(picked, seqs, strict=True):
        board.write(k, seq, ack=False)
    if len(picked) == 1:
        handle[b"key%d" % picked[0]] = b"%d" % seqs[0]
    else:
        with handle.write_batch() as wb:
            for k, seq in zip(picked, seqs, strict=True):
                wb.put(b"key%d" % k, b"%d" % seq)
    for k, seq in zip(picked, seqs, strict=True):
        board.write(k, seq, ack=True)


def _stale_read(handle: Any, board: Board, rng: random.Random, r: int, nkeys: int) -> str:
    ks = rng.sample(range(nkeys), 3) if rng.random() < 0.2 else [rng.randrange(nkeys)]
    floors = [max(board.acked(k), board.observed(k)) for k in ks]
    how = rng.random()
    if len(ks) > 1:
        got = handle.get_many([b"key%d" % k for k in ks], b"0")
    elif how < 0.4:
        got = [handle.get(b"key%d" % ks[0], b"0")]
    elif how < 0.8:
        try:
            got = [handle[b"key%d" % ks[0]]]
        except KeyError:
            got = [b"0"]
    else:
        got = [b"1" if b"key%d" % ks[0] in handle else b"0"]
        if got == [b"1"]:  # present: only says it was written at least once
            floors = [min(floors[0], 1)]
    ceilings = [board.issued(k) for k in ks]
    for k, value, floor, ceiling in zip(ks, got, floors, ceilings, strict=True):
        v = int(value)
        if not floor <= v <= ceiling:
            return f"key{k}: read {v}, acknowledged/observed before {floor}, issued {ceiling}"
        if how < 0.8 or len(ks) > 1:
            board.observe(r, k, v)
    return ""


def _make_caches_stale() -> None:
    """The checker's own check: a follower cache that answers what it holds without
    ever catching up with the leader's changes."""
    from partydbm import _cache

    def lookup(self: Any, key: bytes) -> Any:
        return self.entries.get(key, _cache._MISS)

    _cache.Cache.lookup = lookup  # type: ignore[method-assign]
