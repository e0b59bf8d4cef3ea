"""The change ring and the follower cache, in one process: what a reader makes of every
state a slot can be in, and what the cache does with each change (the multi-process
behaviour is in test_cache.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from partydbm import _cache as C
from partydbm import _ring as R

pytestmark = pytest.mark.skipif(not R.ORDERED_MEMORY, reason="no ring on this machine")


@pytest.fixture
def ring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> R.Ring:
    monkeypatch.setattr(R, "SLOTS", 8)
    return R.Ring(str(tmp_path), 0o600)


def _view(ring: R.Ring, tmp_path: Path) -> R.View:
    return R.View(str(tmp_path), ring.epoch)


def test_a_reader_reads_back_every_kind_of_change(ring: R.Ring, tmp_path: Path) -> None:
    view = _view(ring, tmp_path)
    changes = [(R.PUT, b"a", b"0"), (R.PUT, b"a", b"1"), (R.DEL, b"b", b""),
               (R.DROP, b"c", b""), (R.ALL, b"", b""), (R.PUT, b"", b"")]
    ring.append(changes[:2])
    for change in changes[2:]:
        ring.one(*change)
    assert view.head() == ring.head == len(changes)
    assert [view.read(s) for s in range(1, 7)] == changes


def test_a_put_value_is_copied_only_for_the_keys_asked_about(ring: R.Ring,
                                                              tmp_path: Path) -> None:
    view = _view(ring, tmp_path)
    ring.one(R.PUT, b"k", b"value")
    assert view.read(1, {b"other"}) == (R.PUT, b"k", b"")
    assert view.read(1, {b"k"}) == (R.PUT, b"k", b"value")


def test_a_slot_reused_or_being_written_reads_as_fallen_behind(ring: R.Ring,
                                                               tmp_path: Path) -> None:
    view = _view(ring, tmp_path)
    for n in range(10):  # 8 slots: changes 1 and 2 are gone
        ring.one(R.PUT, b"k", b"%d" % n)
    assert view.read(1) is None and view.read(2) is None
    assert view.read(3) == (R.PUT, b"k", b"2")
    w = (R.HEADER + (10 - 1) % 8 * R.SLOT) >> 3
    ring._words[w] = 0  # the writer is in the middle of change 10's slot
    assert view.read(10) is None


def test_the_reader_refuses_another_epoch_or_a_retired_ring(ring: R.Ring,
                                                            tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        R.View(str(tmp_path), ring.epoch + 1)
    view = _view(ring, tmp_path)
    R.retire_at(str(tmp_path))  # what the next leader does first
    assert view.head() == R.RETIRED
    with pytest.raises(ValueError):
        _view(ring, tmp_path)


def test_a_new_ring_replaces_the_file_and_the_old_one_stays_retired(
        ring: R.Ring, tmp_path: Path) -> None:
    old = _view(ring, tmp_path)
    ring.retire()
    new_ring = R.Ring(str(tmp_path), 0o600)
    assert old.head() == R.RETIRED
    assert _view(new_ring, tmp_path).head() == 0


# -- the cache ------------------------------------------------------------------------------
def _cache(ring: R.Ring, tmp_path: Path, limit: int = 1 << 20) -> C.Cache:
    return C.Cache(_view(ring, tmp_path), limit)


def test_changes_update_the_keys_a_cache_holds_and_only_those(ring: R.Ring,
                                                              tmp_path: Path) -> None:
    cache = _cache(ring, tmp_path)
    cache.insert(b"a", b"1", 0)
    cache.insert(b"b", None, 0)
    ring.append([(R.PUT, b"a", b"2"), (R.PUT, b"z", b"9"), (R.PUT, b"b", b"3")])
    assert (cache.lookup(b"a"), cache.lookup(b"b"), cache.lookup(b"z")) == (
        b"2", b"3", C._MISS)
    ring.one(R.DEL, b"a")
    assert cache.lookup(b"a") is None
    ring.one(R.DROP, b"b")
    assert cache.lookup(b"b") is C._MISS
    ring.one(R.ALL, b"")
    assert cache.lookup(b"a") is C._MISS
    assert cache.entries == {} and cache.size == 0


@pytest.mark.parametrize(("changes", "expected"), [
    ([], b"old"),
    ([(R.PUT, b"k", b"new")], b"new"),
    ([(R.PUT, b"k", b"new"), (R.DEL, b"k", b"")], None),
    ([(R.DEL, b"k", b""), (R.PUT, b"k", b"again")], b"again"),
    ([(R.PUT, b"other", b"x")], b"old"),
    ([(R.DROP, b"k", b"")], "not cached"),
    ([(R.ALL, b"", b"")], "not cached"),
])
def test_a_value_fetched_on_a_miss_is_brought_up_to_date_before_it_is_cached(
        ring: R.Ring, tmp_path: Path, changes: list[Any], expected: Any) -> None:
    """The leader read b"old" at position 0; the changes after it, which the cache has
    already passed (the key was not cached then), are applied to it first."""
    cache = _cache(ring, tmp_path)
    if changes:
        ring.append(changes)
    assert cache.lookup(b"unrelated") is C._MISS  # the cache catches up first
    cache.insert(b"k", b"old", 0)
    assert cache.entries.get(b"k", "not cached") == expected


def test_a_value_fetched_too_long_ago_is_answered_but_not_cached(ring: R.Ring,
                                                                 tmp_path: Path) -> None:
    cache = _cache(ring, tmp_path)
    for n in range(20):
        ring.one(R.PUT, b"x", b"%d" % n)
    cache.lookup(b"x")
    cache.insert(b"k", b"old", 0)  # changes 1..12 are gone from an 8-slot ring
    assert b"k" not in cache.entries


def test_a_cache_a_whole_ring_behind_forgets_everything(ring: R.Ring, tmp_path: Path) -> None:
    cache = _cache(ring, tmp_path)
    cache.insert(b"a", b"1", 0)
    for n in range(9):
        ring.one(R.PUT, b"a", b"%d" % n)
    assert cache.lookup(b"a") is C._MISS and cache.resets == 1
    assert cache.applied == ring.head


def test_a_slot_overwritten_during_catch_up_forgets_everything(
        ring: R.Ring, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = _cache(ring, tmp_path)
    cache.insert(b"a", b"1", 0)
    ring.append([(R.PUT, b"a", b"2"), (R.PUT, b"a", b"3")])
    monkeypatch.setattr(cache.view, "read", lambda s, keys=None: None)  # lapped meanwhile
    assert cache.lookup(b"a") is C._MISS and cache.entries == {}
    assert cache.resets == 1 and cache.applied == ring.head


def test_a_retired_ring_kills_the_cache(ring: R.Ring, tmp_path: Path) -> None:
    cache = _cache(ring, tmp_path)
    cache.insert(b"a", b"1", 0)
    assert cache.lookup(b"a") == b"1"
    ring.retire()
    assert cache.lookup(b"a") is C._MISS and cache.dead
    cache.insert(b"b", b"2", ring.head)
    assert cache.entries == {}


def test_the_cache_stays_under_its_limit_dropping_the_oldest(ring: R.Ring,
                                                             tmp_path: Path) -> None:
    limit = 10 * (C.OVERHEAD + 1 + 100)
    cache = _cache(ring, tmp_path, limit)
    for i in range(30):
        cache.insert(b"%c" % (65 + i), b"v" * 100, 0)
    assert cache.size <= limit
    assert b"A" not in cache.entries and b"%c" % (65 + 29) in cache.entries
    cache.insert(b"big", b"v" * (C.VALUE_MAX + 1), 0)
    assert b"big" not in cache.entries


def test_a_slot_rewritten_while_it_is_copied_reads_as_fallen_behind(
        ring: R.Ring, tmp_path: Path) -> None:
    """The seqlock's second look: the writer laps the reader between its first check
    of the slot and the end of its copy."""
    view = _view(ring, tmp_path)
    ring.one(R.PUT, b"k", b"v")

    class Lapping:
        """The mapping, as seen by a reader that the writer laps while it copies."""

        def __init__(self, mm: Any) -> None:
            self.mm = mm

        def __getitem__(self, index: slice) -> bytes:
            data: bytes = self.mm[index]
            for n in range(R.SLOTS):
                ring.one(R.PUT, b"x", b"%d" % n)
            return data

    view._mm = Lapping(view._mm)  # type: ignore[assignment]
    assert view.read(1) is None
