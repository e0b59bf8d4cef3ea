"""Range scans that page through the engine and resume after failover.

A scan keeps one bookmark: the last key it *yielded*. Each page is fetched as "the
original range, intersected with everything after (or, in reverse, before) the
bookmark", so a page lost with a dead leader is simply asked for again: no item twice,
none skipped, whatever the keys' bytes (no byte arithmetic on keys). Entries already
fetched are yielded before the next page is asked for, so nothing buffered is ever
fetched a second time. Pages are bounded in items and bytes: memory stays flat.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ._backend import Range
from ._errors import CLOSED_MESSAGE, ClosedError, LeaderLostError

if TYPE_CHECKING:
    from ._mapping import PartyDBM

FIRST_PAGE = 16  # items: a scan that stops early (firstkey, popitem) costs little
PAGE = 2048
PAGE_BYTES = 256 * 1024


def make_range(start: Any, stop: Any, prefix: Any, include_start: bool,
               include_stop: bool) -> Range:
    if prefix is not None:
        if start is not None or stop is not None:
            raise TypeError("'prefix' cannot be combined with 'start' or 'stop'")
        return prefix, True, _successor(prefix), False
    return start, include_start, stop, include_stop


def _successor(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with `prefix` (None: no bound)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


def scan(db: PartyDBM, rng: Range, reverse: bool, shape: str) -> Iterator[Any]:
    """Yield keys ("keys"), values ("values") or (key, value) pairs ("items")."""
    keys_only = shape == "keys"
    lo, lo_incl, hi, hi_incl = rng
    limit = FIRST_PAGE
    while True:
        engine = db._engine
        if engine is None:
            raise ClosedError(CLOSED_MESSAGE)
        generation = engine.generation
        page, more = engine.scan((lo, lo_incl, hi, hi_incl), reverse, keys_only, limit,
                                 PAGE_BYTES, db)
        limit = PAGE
        if keys_only:
            entries: Any = page
            last = page[-1] if page else None
        else:
            it = iter(page)
            entries = page[1::2] if shape == "values" else zip(it, it, strict=True)
            last = page[-2] if page else None
        if db._retry:
            for entry in entries:
                if db._engine is None:
                    raise ClosedError(CLOSED_MESSAGE)
                yield entry
        else:
            for entry in entries:
                _check(db, generation)
                yield entry
        if not more or last is None:
            return
        if reverse:
            hi, hi_incl = last, False
        else:
            lo, lo_incl = last, False


def _check(db: PartyDBM, generation: int) -> None:
    engine = db._engine
    if engine is None:
        raise ClosedError(CLOSED_MESSAGE)
    if not db._retry and (engine.generation != generation or not engine.route_alive()):
        raise LeaderLostError("the partydbm leader changed during this iteration "
                              "(retry=False)")
