"""One engine per database per process: who leads, and the route every handle's
requests take (_routes.py).

An engine leads (it holds LevelDB's LOCK, owns the Store and serves other processes
through a Server: a LocalRoute) or follows (its requests travel over one Connection
to the leader: a RemoteRoute). It switches from follower to leader when its process
wins the LOCK, and from one leader to the next on failover, by swapping its route:
its handles never notice.

Invariants:
- A follower's requests are answered in the order they were issued, across failover:
  unanswered requests are resent (or replayed locally, on promotion) oldest first,
  before any newer request can take the new route.
- Only one thread reroutes at a time (`_rerouting`); the others wait for it.
- Lock order: the registry's lock before an engine's `_cond` before a connection's
  locks (_client.py) before a server's (_server.py).
"""

from __future__ import annotations

import itertools
import os
import random
import stat
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from . import _ring, _seams, _sockets
from ._backend import LockHeld, LockTainted, open_db
from ._cache import Cache, CachedRoute
from ._client import Connection, Slot
from ._dispatch import Dispatcher, Peer
from ._election import LockFile, no_leader, socket_address
from ._errors import CLOSED_MESSAGE, ClosedError, LeaderLostError, Timeout, error
from ._helper import Helper
from ._publish import Publisher
from ._remote import RemoteRoute, Unrouted
from ._routes import CLOSED, ClosedRoute, LocalRoute
from ._server import Observer, Server
from ._store import Store

MAX_BACKOFF = 0.005
shutting_down = False  # set by _registry at interpreter exit
tainted: set[str] = set()  # paths whose LevelDB lock table we inherited (docs/TRAPS.md, trap 2)
leftovers: list[Any] = []  # backends inherited through fork: never closed, never freed

Route = LocalRoute | RemoteRoute | Unrouted | ClosedRoute


class Keeper(Protocol):
    """What an engine tells the registry that keeps it (_registry)."""

    def lock_acquired(self, path: str, lockfile: LockFile) -> None:
        """The LOCK's waiter thread got the lock for this process."""

    def hung_up(self, engine: Engine, conn: Connection) -> None:
        """The leader at the other end of `conn`, the engine's route, hung up."""

    def let_go(self, engine: Engine) -> Callable[[], None] | None:
        """Another process asks this leader to give the database up (to repair it): only
        an engine in its grace period with no other follower does (_grace.py). What
        ends that period (called once the answer is sent), or None. Never blocks."""


class Engine:
    def __init__(self, path: str, lockfile: LockFile, keeper: Keeper) -> None:
        self.path = path
        self.address = socket_address(path)
        self.refs = 0
        self.idle_until: float | None = None  # in its grace period until then (_registry)
        self.closed = False
        self.serve_only = False  # set before start(): this process only serves
        self.cache_size = 0  # bytes a follower caches (the largest any handle asked for)
        self.route: Route = Unrouted(self)
        self.server: Server | None = None
        self._lockfile = lockfile
        self._keeper = keeper
        self._cond = threading.Condition(threading.RLock())
        self._started = False
        self._observer: Observer | None = None  # given to each server this engine starts
        self._rerouting = False
        self._lock_won = False
        # A process forked from a leader can never open LevelDB itself (docs/TRAPS.md,
        # trap 2): it leads through a helper process (one for a whole crowd of them).
        self._helper = Helper(path)
        self._refused = ""  # why the last thing at our address was not talked to
        self._new_identity()

    def _new_identity(self) -> None:
        # A client id names one stream of ordered requests for the leader's dedup
        # records; a forked child must not share its parent's.
        self.client = os.urandom(16)
        self._rids = itertools.count(1)

    @property
    def leader_pid(self) -> int:
        route = self.route
        if isinstance(route, LocalRoute):
            return os.getpid()
        return route.conn.leader_pid if isinstance(route, RemoteRoute) else 0

    def stats(self) -> str | None:
        """LevelDB's own statistics, as text, when this process leads (else None)."""
        route = self.route
        return route.store.stats() if isinstance(route, LocalRoute) else None

    def observe(self, observer: Observer | None) -> int:
        """Have `observer(event, pid, count)` told of followers connecting ("connected")
        and leaving ("left") while this process leads, now and after any takeover.
        Returns how many followers are connected now (0 when following)."""
        with self._cond:
            self._observer = observer
            server = self.server
            if server is None:
                return 0
            server.observer = observer
            return server.followers()

    # -- becoming ready --------------------------------------------------------------------
    def start(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if self.closed:
                raise ClosedError(CLOSED_MESSAGE)
            if self._started:
                if isinstance(self.route, Unrouted):  # forked, or a takeover failed
                    self.recover(None, deadline)
                return
            if self.path not in tainted and not _seams.never_lead and self._lockfile.try_lock():
                try:
                    self._promote([])
                except LockTainted:
                    self._lockfile.unlock()
                    tainted.add(self.path)
                except LockHeld:  # cannot happen with a current LockFile; follow anyway
                    self._lockfile.unlock()
                except BaseException:
                    self._lockfile.unlock()  # let another process lead
                    raise
            if not isinstance(self.route, LocalRoute):
                self.recover(None, deadline)
            self._started = True

    def _promote(self, slots: list[Slot]) -> None:
        """Take the database: open LevelDB (we hold the LOCK), replay our own unanswered
        requests in order (writes the old leader applied are recognised and skipped),
        then serve, then let the handles' requests take the local route. Raises with
        the LOCK still held: the caller gives it back."""
        backend = open_db(self.path)
        try:
            # Before anything is read or written: a follower that has not noticed the
            # old leader's death must stop answering from its cache (_cache.py).
            _ring.retire_at(self.path)
            _seams.passage("promote")  # the old ring is retired; nothing served yet
            mode = stat.S_IMODE(os.stat(self.path).st_mode)
            store = Store(backend, Publisher(self.path, mode))
        except BaseException:
            # Closed before the caller gives the LOCK back: giving back the process's
            # lock with LevelDB still open would let a second process open it.
            backend.close()
            raise
        server: Server | None = None
        try:
            if _seams.resend_delay and slots:
                time.sleep(_seams.resend_delay)
            peer = Peer()
            peer.load(store, self.client)
            dispatcher = Dispatcher(store)
            for slot in slots:
                try:
                    slot.finish(dispatcher.call(peer, slot.op, slot.rid, slot.args))
                except Exception as exc:
                    slot.finish(exc=exc)
            store.prune_applied()
            server = Server(store, self.address, self.path, self._observer, self.serve_only)
            server.let_go = lambda: self._keeper.let_go(self)
            server.start()
        except BaseException:
            if server is not None:
                server.stop()  # its socket and threads, if it got that far
            store.close()
            raise
        self.server = server
        self.route = LocalRoute(store, server.passing)
        self._cond.notify_all()

    def lock_won(self) -> None:
        """This process got the LOCK while following: lead now (the old leader is gone)."""
        with self._cond:
            if isinstance(self.route, LocalRoute) or self.closed:
                return
            self._lock_won = True
            if self._rerouting:
                self._cond.notify_all()  # the rerouting thread promotes
                return
            old = self.route.conn if isinstance(self.route, RemoteRoute) else None
            slots = self._carry_over(old)
            self._lock_won = False
            try:
                self._promote(slots)
            except BaseException as exc:
                self._lockfile.unlock()
                self.route = Unrouted(self)  # the next request looks for a leader again
                for slot in slots:
                    if not slot.done:
                        slot.finish(exc=self._takeover_failed(exc))

    def _takeover_failed(self, exc: BaseException) -> error:
        """What a request waiting on a takeover that failed raises: the cause's errno
        kept (ENOSPC stays ENOSPC), so that callers can tell what went wrong."""
        message = f"could not take over {self.path!r}: "
        if isinstance(exc, OSError) and exc.errno is not None:
            return error(exc.errno, message + str(exc.strerror), self.path)
        return error(message + str(exc))

    def _carry_over(self, old: Connection | None) -> list[Slot]:
        """Unanswered requests of a dead connection: those that may be retried, oldest
        first; the rest fail with LeaderLostError."""
        if old is None:
            return []
        old.kill(LeaderLostError("the partydbm leader went away"))
        keep = []
        for slot in old.take_pending():
            if slot.retry:
                keep.append(slot)
            else:
                slot.finish(exc=LeaderLostError(
                    f"the partydbm leader of {self.path!r} went away with this request "
                    "in flight (retry=False)"))
        return keep

    def recover(self, dead: Connection | None, deadline: float | None) -> Route:
        """Find the next route after `dead` (None: no route yet) and move its unanswered
        requests there; the route now. Only one thread reroutes; the others wait."""
        with self._cond:
            while self._rerouting:
                if not self._cond.wait(_remaining(deadline)):
                    raise self._timeout_error()
            if self.closed:
                raise ClosedError(CLOSED_MESSAGE)
            route = self.route
            if isinstance(route, LocalRoute) or (
                    isinstance(route, RemoteRoute) and route.conn is not dead):
                return route  # somebody else found it meanwhile
            self._rerouting = True
            slots: list[Slot] = []
            try:
                slots = self._carry_over(dead)
                self.route = Unrouted(self)
                self._find_route(slots, deadline)
            except BaseException as exc:
                for slot in slots:
                    if not slot.done:
                        slot.finish(exc=exc)
                raise
            finally:
                self._rerouting = False
                self._cond.notify_all()
            return self.route

    def _find_route(self, slots: list[Slot], deadline: float | None) -> None:
        """Connect to the leader, or become it. Called with `_cond` held; waits on the
        LOCK (through the waiter thread) rather than polling it."""
        backoff, start = 0.0002, time.monotonic()
        while True:
            if self.closed:
                raise ClosedError(CLOSED_MESSAGE)
            if self._lock_won:
                self._lock_won = False
                try:
                    self._promote(slots)
                except BaseException:
                    # Holding the LOCK while serving nothing would make every other
                    # process time out: give it back and let the next one lead.
                    self._lockfile.unlock()
                    raise
                return
            conn = self._try_connect(deadline)
            if conn is not None:
                if _seams.resend_delay and slots:
                    time.sleep(_seams.resend_delay)
                conn.resend(slots)
                self.route = self._follow(conn)
                threading.Thread(target=self._watch, args=(conn,), daemon=True,
                                 name=f"partydbm-hangup-watch {self.path}").start()
                return
            self._contend()
            remaining = _remaining(deadline)
            if remaining is not None and remaining <= 0:
                raise self._timeout_error()
            pause = random.uniform(backoff / 2, backoff)  # a crowd must not poll in step
            self._cond.wait(pause if remaining is None else min(pause, remaining))
            # Doubling up to MAX_BACKOFF, and beyond it to a tenth of the time waited so
            # far: hundreds of processes polling every 5 ms for a leader that is slow to
            # appear (a helper starting) took the CPU it needed to start.
            backoff = min(backoff * 2, max(MAX_BACKOFF, (time.monotonic() - start) / 10))

    def _follow(self, conn: Connection) -> RemoteRoute:
        """The route through `conn`: with a cache if the leader offered its change ring
        and this process wants one."""
        epoch = conn.ring_epoch
        if epoch is not None and self.cache_size > 0:
            try:
                return CachedRoute(self, conn, Cache(_ring.View(self.path, epoch),
                                                     self.cache_size))
            except (OSError, ValueError):
                pass  # replaced or retired meanwhile: read from the leader
        return RemoteRoute(self, conn)

    def want_cache(self, size: int) -> None:
        """A handle asks for a follower cache of `size` bytes: the process's cache (one
        per database) holds the largest size asked for, from its next leader on (and
        from now on if it has one already)."""
        with self._cond:
            self.cache_size = max(self.cache_size, size)
            route = self.route
            if isinstance(route, CachedRoute):
                route.cache.limit = self.cache_size

    def _contend(self) -> None:
        """Make sure this process competes for leadership: a thread blocked on the LOCK
        (the kernel hands it to one waiter the moment the holder dies), or, in a process
        that inherited LevelDB's lock table through fork, a helper process that can."""
        if self.path in tainted:
            self._helper.ensure()
        elif not _seams.never_lead:
            path, lockfile, keeper = self.path, self._lockfile, self._keeper
            lockfile.wait_in_background(lambda: keeper.lock_acquired(path, lockfile))

    def _watch(self, conn: Connection) -> None:
        """Per follower connection: when the leader hangs up, contend for the LOCK at
        once, even if no request is waiting (an idle follower must be able to lead).
        The waiter starts only then, so a follower that closes while its leader is
        alive leaves no thread blocked on the LOCK (and its fd can be closed)."""
        _sockets.wait_hangup(conn.sock)
        if shutting_down or self.closed:  # at exit: take no lock (see _registry)
            return
        self._keeper.hung_up(self, conn)  # an engine in grace closes instead

    def contend_after(self, conn: Connection) -> None:
        """Compete for the LOCK if `conn`, whose leader hung up, is still our route."""
        with self._cond:
            route = self.route
            if self.closed or not (isinstance(route, RemoteRoute) and route.conn is conn):
                return
            self._contend()

    def _try_connect(self, deadline: float | None) -> Connection | None:
        remaining = _remaining(deadline)
        try:
            conn = Connection.open(self.address, self.client, self._rids,
                                   None if remaining is None else max(remaining, 0.001),
                                   self.path, ring=self.cache_size > 0 and _ring.ORDERED_MEMORY)
        except _sockets.Busy as exc:  # it retried until our deadline: say why we failed
            raise Timeout(f"no partydbm leader answered for {self.path!r} in time: "
                          f"{exc.strerror}") from exc
        except _sockets.Refused as exc:  # not a leader we talk to: wait for a real one
            self._refused = str(exc)
            return None
        except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError,
                BrokenPipeError, LeaderLostError):
            return None
        except TimeoutError:
            return None
        self._refused = ""
        return conn

    def _timeout_error(self) -> Timeout:
        return no_leader(self.path, self.address, self._lockfile, self._refused)

    # -- closing and forking -----------------------------------------------------------------
    def close(self) -> None:
        """Close for good: every later request raises ClosedError; a leader waits for
        the requests inside LevelDB to leave, then hands over (socket removed, LOCK
        released); a follower's requests in flight fail with ClosedError."""
        with self._cond:
            if self.closed:
                return
            self.closed = True
            route, self.route = self.route, CLOSED
            server, self.server = self.server, None
            try:
                if server is not None:
                    server.stop()
            finally:
                if isinstance(route, LocalRoute):
                    route.store.close()  # releases the LOCK: the next leader takes over
            if isinstance(route, RemoteRoute):
                conn = route.conn
                conn.kill(ClosedError(CLOSED_MESSAGE))
                for slot in conn.take_pending():
                    slot.finish(exc=ClosedError(CLOSED_MESSAGE))
            self._helper.close()
            self._cond.notify_all()

    def after_fork_in_child(self) -> None:
        self._cond = threading.Condition(threading.RLock())
        route = self.route
        if isinstance(route, LocalRoute):
            # The child inherited LevelDB's in-process lock table: it can never open this
            # database itself, and must never close or free the parent's handle.
            tainted.add(self.path)
            leftovers.append(route.store)
        if self.server is not None:
            self.server.forget_after_fork()
            self.server = None
        if isinstance(route, RemoteRoute):
            route.conn.forget_after_fork()
        self.route = Unrouted(self)  # the next request finds a route of its own
        self._helper.forget_after_fork()
        self._rerouting = False
        self._lock_won = False
        self._new_identity()


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()
