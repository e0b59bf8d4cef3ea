"""RemoteRoute: how a follower's requests reach the leader, across failover.

A request becomes a Slot on the route's Connection. If the connection dies before the
request goes out, or while it waits for its answer, the engine finds the next route
(`Engine.recover`): the slot is then resent to the next leader with its original id
(a write the dead leader applied is recognised there and not applied again), or
replayed locally when this process takes over.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from . import _protocol as P
from ._client import Connection, Slot
from ._routes import Policy

if TYPE_CHECKING:
    from ._engine import Engine


class _ThroughRun:
    """A route whose get and put are requests like any other (the leader's answer)."""

    is_leader = False

    def get(self, key: bytes, h: Policy) -> bytes | None:
        return self.run(P.GET, (key,), h)  # type: ignore[no-any-return]

    def put(self, key: bytes, value: bytes, sync: bool, h: Policy) -> None:
        self.run(P.PUT, (key, value, sync), h)

    def run(self, op: int, args: tuple[Any, ...], h: Policy) -> Any:
        raise NotImplementedError


class RemoteRoute(_ThroughRun):
    def __init__(self, engine: Engine, conn: Connection) -> None:
        self.engine = engine
        self.conn = conn

    def alive(self) -> bool:
        return self.conn.alive()

    def run(self, op: int, args: tuple[Any, ...], h: Policy) -> Any:
        timeout = h._timeout
        return self._run(op, args, h, None if timeout is None else time.monotonic() + timeout)

    def _run(self, op: int, args: tuple[Any, ...], h: Policy, deadline: float | None) -> Any:
        slot = Slot(op, args, h._retry)
        if not self.conn.submit(slot, deadline):
            # Dead before the request went out: it runs on whatever route comes next.
            route = self.engine.recover(self.conn, deadline)
            if isinstance(route, RemoteRoute):
                return route._run(op, args, h, deadline)
            return route.run(op, args, h)
        while not slot.done:
            conn = slot.conn
            assert conn is not None
            conn.wait(slot, deadline)
            if not slot.done and conn.dead is not None:
                self.engine.recover(conn, deadline)  # takes the slot along
        return slot.result()


class Unrouted(_ThroughRun):
    """The route of an engine that has none yet (before it starts, after a fork, after
    a failed takeover, while another thread reroutes): every request first has the
    engine find one, then takes it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def alive(self) -> bool:
        return False

    def run(self, op: int, args: tuple[Any, ...], h: Policy) -> Any:
        timeout = h._timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        route = self.engine.recover(None, deadline)
        if isinstance(route, RemoteRoute):
            return route._run(op, args, h, deadline)
        return route.run(op, args, h)
