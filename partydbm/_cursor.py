"""Range scans that page through the engine and resume after failover.

A scan keeps one bookmark: the last key it *yielded*. Each page is fetched as "the
original range, intersected with everything after (or, in reverse, before) the
bookmark", so a page lost with a dead leader is simply asked for again: no item twice,
none skipped, whatever the keys' bytes (no byte arithmetic on keys). Entries already
fetched are yielded before the next page is asked for, so nothing buffered is ever
fetched a second time. Pages are bounded in items and bytes: memory stays flat.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from . import _protocol as P
from ._backend import Range
from ._errors import CLOSED_MESSAGE, ClosedError, LeaderLostError
from ._routes import CLOSED, Policy

FIRST_PAGE = 16  # items: a scan that stops early (firstkey, popitem) costs little
PAGE = 2048
PAGE_BYTES = 256 * 1024

__all__ = ["Range", "make_range", "scan"]


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


def scan(route_of: Callable[[], Any], h: Policy, rng: Range, reverse: bool, shape: str
         ) -> Iterator[Any]:
    """Yield keys ("keys"), values ("values") or (key, value) pairs ("items").
    `route_of()`: the handle's route now (CLOSED once it is closed); `h`: its policy.
    With retry=False, a change of route (failover) ends the scan with LeaderLostError."""
    keys_only = shape == "keys"
    lo, lo_incl, hi, hi_incl = rng
    limit = FIRST_PAGE
    while True:
        route = route_of()
        page, more = route.run(P.SCAN, (lo, lo_incl, hi, hi_incl, reverse, keys_only, limit,
                                        PAGE_BYTES), h)
        limit = PAGE
        if keys_only:
            entries: Any = page
            last = page[-1] if page else None
        else:
            it = iter(page)
            entries = page[1::2] if shape == "values" else zip(it, it, strict=True)
            last = page[-2] if page else None
        if h._retry:
            for entry in entries:
                if route_of() is CLOSED:
                    raise ClosedError(CLOSED_MESSAGE)
                yield entry
        else:
            for entry in entries:
                _check(route_of(), route)
                yield entry
        if not more or last is None:
            return
        if reverse:
            hi, hi_incl = last, False
        else:
            lo, lo_incl = last, False


def _check(now: Any, route: Any) -> None:
    if now is CLOSED:
        raise ClosedError(CLOSED_MESSAGE)
    if now is not route or not route.alive():
        raise LeaderLostError("the partydbm leader changed during this iteration "
                              "(retry=False)")
