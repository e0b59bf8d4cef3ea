"""The routes a handle's requests take: one object per role, chosen when the engine
starts and swapped by it on failover, so no call decides the role again.

- LocalRoute: this process leads. LevelDB through the Store; on the way in, the
  application's thread answers what followers have sent (_passing.py).
- RemoteRoute (_remote.py): this process follows. The connection to the leader.
- ClosedRoute: the handle (or its engine) is closed. Every request raises ClosedError:
  the facade never checks for itself.

Every route takes requests the same three ways: `get` and `put` (the hot pair, one
call each from the facade) and `run(op, args, h)` for the rest, through the one table
of operations (_dispatch.OPS). `h` is the handle (its retry and timeout policy).
"""

from __future__ import annotations

from typing import Any, NoReturn, Protocol

from ._dispatch import run_local
from ._errors import CLOSED_MESSAGE, ClosedError
from ._passing import Passing
from ._store import Store


class Policy(Protocol):
    """What a handle tells its route about how to treat its requests."""

    _retry: bool
    _timeout: float | None
    _cached: bool  # may read from the follower cache


class LocalRoute:
    is_leader = True

    def __init__(self, store: Store, passing: Passing) -> None:
        self.store = store
        self.passing = passing
        # The hot pair are the Store's own application entries (they answer followers
        # in passing first): no frame of ours in between.
        self.get, self.put = store.application_entries(passing)

    def alive(self) -> bool:
        return not self.store.closed

    def run(self, op: int, args: tuple[Any, ...], h: Policy) -> Any:
        passing = self.passing
        if passing.active:
            passing.poll()
        return run_local(self.store, op, args)


class ClosedRoute:
    @property
    def is_leader(self) -> bool:
        raise ClosedError(CLOSED_MESSAGE)

    def alive(self) -> bool:
        return False

    def get(self, key: bytes, h: Policy) -> NoReturn:
        raise ClosedError(CLOSED_MESSAGE)

    def put(self, key: bytes, value: bytes, sync: bool, h: Policy) -> NoReturn:
        raise ClosedError(CLOSED_MESSAGE)

    def run(self, op: int, args: tuple[Any, ...], h: Policy) -> NoReturn:
        raise ClosedError(CLOSED_MESSAGE)


CLOSED = ClosedRoute()
