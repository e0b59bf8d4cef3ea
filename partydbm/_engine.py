"""One engine per database per process: the route every handle's requests take.

An engine is either the leader (it holds LevelDB's LOCK, owns the Backend and serves
other processes through a Server) or a follower (its requests travel over one
Connection to the leader). It switches from follower to leader when its process wins
the LOCK, and from one leader to the next on failover, without its handles noticing.

Invariants:
- One engine per real path per process, found through `_engines` (DESIGN.md trap 1).
- A follower's requests are answered in the order they were issued, across failover:
  unanswered requests are resent (or replayed locally, on promotion) oldest first,
  before any newer request can take the new route.
- Lock order: `_registry` before an engine's `_cond` before a connection's locks.
"""

from __future__ import annotations

import atexit
import errno
import functools
import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from . import _protocol as P
from . import _seams, _sockets
from ._backend import Backend, LockHeld, LockTainted, Range, open_db
from ._client import Connection, Slot
from ._dispatch import Dispatcher, Peer
from ._election import LockFile, shown_address, socket_address
from ._errors import ClosedError, LeaderLostError, Timeout, error
from ._server import Observer, Server

_registry = threading.RLock()
_engines: dict[str, Engine] = {}
_lockfiles: dict[str, LockFile] = {}
_tainted: set[str] = set()  # paths whose LevelDB lock table this process inherited
_leftovers: list[Any] = []  # backends inherited through fork: never closed, never freed
_shutting_down = False

MAX_BACKOFF = 0.005


class Policy(Protocol):
    """What a handle tells the engine about how to treat its requests."""

    _retry: bool
    _timeout: float | None


def acquire(path: str, timeout: float | None) -> Engine:
    """The process's engine for `path` (real path), started; one more reference."""
    with _registry:
        engine = _engines.get(path)
        if engine is None:
            lockfile = _lockfiles.get(path)
            if lockfile is not None and lockfile.is_stale():
                lockfile.retire()
                lockfile = None
            if lockfile is None:
                lockfile = _lockfiles[path] = LockFile(path)
            engine = _engines[path] = Engine(path, lockfile)
        engine.refs += 1
    try:
        engine.start(timeout)
    except BaseException:
        release(engine)
        raise
    return engine


def release(engine: Engine) -> None:
    """Drop one reference; the last one closes the engine (a leader hands over)."""
    if _shutting_down:
        # _shutdown() closed every engine already. Take no lock now: a daemon thread
        # frozen by interpreter finalization may hold it forever.
        return
    with _registry:
        engine.refs -= 1
        if engine.refs > 0:
            return
        if _engines.get(engine.path) is engine:
            del _engines[engine.path]
        engine.close()
        _forget_lockfile(engine.path, engine._lockfile)


def _forget_lockfile(path: str, lockfile: LockFile) -> None:
    """Close a database's LOCK fd once nothing in this process needs it. Called with
    `_registry` held, after the engine closed (so LevelDB holds no lock here). A waiter
    still blocked on the fd keeps it open; its callback closes it later."""
    if path in _engines or lockfile.waiting():
        return
    if _lockfiles.get(path) is lockfile:
        del _lockfiles[path]
    lockfile.close()


def _lock_acquired(path: str, lockfile: LockFile) -> None:
    """Called by a LockFile's waiter thread when this process got the LOCK."""
    with _registry:
        if lockfile.fd < 0:
            # Closed between the grant and this call (release() saw no waiter left, or
            # retire()): closing the fd gave the lock back already; it is no one's here.
            return
        if lockfile.retired:  # a lock on a deleted LOCK file: it guards nothing
            lockfile.close()
            return
        engine = _engines.get(path)
        if engine is None or _shutting_down:
            # Nobody here wants the database any more: pass the lock on. Safe because no
            # engine for `path` exists, so LevelDB does not hold it in this process.
            lockfile.unlock()
            if engine is None:
                _forget_lockfile(path, lockfile)
            return
        engine.lock_won()


class Engine:
    def __init__(self, path: str, lockfile: LockFile) -> None:
        self.path = path
        self.address = socket_address(path)
        self.refs = 0
        self.closed = False
        self.backend: Backend | None = None
        self.generation = 0  # bumped whenever the route changes
        self._lockfile = lockfile
        self._cond = threading.Condition(threading.RLock())
        self._started = False
        self.server: Server | None = None
        self._observer: Observer | None = None  # given to each server this engine starts
        self._conn: Connection | None = None
        self._rerouting = False
        self._lock_won = False
        self._helper: subprocess.Popen[bytes] | None = None
        self._refused = ""  # why the last thing at our address was not talked to
        self._new_identity()

    def _new_identity(self) -> None:
        # A client id names one stream of ordered requests for the leader's dedup
        # records; a forked child must not share its parent's.
        self.client = os.urandom(16)
        self._rids = itertools.count(1)

    @property
    def leader_pid(self) -> int:
        if self.backend is not None:
            return os.getpid()
        conn = self._conn
        return conn.leader_pid if conn is not None else 0

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

    def route_alive(self) -> bool:
        """Whether the current route is still up (a cheap check, no round trip)."""
        if self.backend is not None:
            return True
        conn = self._conn
        return conn is not None and conn.alive()

    # -- becoming ready --------------------------------------------------------------------
    def start(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if self.closed:
                raise ClosedError("DBM object has already been closed")
            if self._started:
                if self.backend is None and self._conn is None:
                    self._recover(None, deadline)
                return
            if self.path not in _tainted and not _seams.never_lead and self._lockfile.try_lock():
                try:
                    self._promote([])
                except LockTainted:
                    self._lockfile.unlock()
                    _tainted.add(self.path)
                except LockHeld:  # cannot happen with a current LockFile; follow anyway
                    self._lockfile.unlock()
            if self.backend is None:
                self._recover(None, deadline)
            self._started = True

    def _promote(self, slots: list[Slot]) -> None:
        """Take the database: open LevelDB (we hold the LOCK), replay our own unanswered
        requests in order (writes the old leader applied are recognised and skipped),
        then serve, then let the fast local path see the backend."""
        backend = open_db(self.path)
        try:
            if _seams.resend_delay and slots:
                time.sleep(_seams.resend_delay)
            peer = Peer(client=self.client)
            peer.applied, peer.recent = backend.applied(self.client)
            dispatcher = Dispatcher(backend)
            for slot in slots:
                try:
                    slot.finish(dispatcher.call(peer, slot.op, slot.rid, slot.args))
                except Exception as exc:
                    slot.finish(exc=exc)
            backend.prune_applied()
            server = Server(backend, self.address, self.path, self._observer)
            server.start()
        except BaseException:
            backend.close()
            raise
        self.server = server
        self.backend = backend
        self.generation += 1
        self._cond.notify_all()

    def lock_won(self) -> None:
        """This process got the LOCK while following: lead now (the old leader is gone)."""
        with self._cond:
            if self.backend is not None or self.closed:
                return
            self._lock_won = True
            if self._rerouting:
                self._cond.notify_all()  # the rerouting thread promotes
                return
            old, self._conn = self._conn, None
            slots = self._carry_over(old)
            self._lock_won = False
            try:
                self._promote(slots)
            except BaseException as exc:
                self._lockfile.unlock()
                for slot in slots:
                    if not slot.done:
                        slot.finish(exc=error(f"could not take over {self.path!r}: {exc}"))

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

    def _recover(self, dead: Connection | None, deadline: float | None) -> None:
        """Find the next route after `dead` (None: no route yet) and move its unanswered
        requests there. Only one thread reroutes; the others wait for it."""
        with self._cond:
            while self._rerouting:
                if not self._cond.wait(_remaining(deadline)):
                    raise self._timeout_error(deadline)
            if self.closed:
                raise ClosedError("DBM object has already been closed")
            if self.backend is not None or (self._conn is not dead and self._conn is not None):
                return
            self._rerouting = True
            slots: list[Slot] = []
            try:
                slots = self._carry_over(dead)
                self._conn = None
                self._route(slots, deadline)
            except BaseException as exc:
                for slot in slots:
                    if not slot.done:
                        slot.finish(exc=exc)
                raise
            finally:
                self._rerouting = False
                self._cond.notify_all()

    def _route(self, slots: list[Slot], deadline: float | None) -> None:
        """Connect to the leader, or become it. Called with `_cond` held; waits on the
        LOCK (through the waiter thread) rather than polling it."""
        backoff = 0.0002
        while True:
            if self._lock_won:
                self._lock_won = False
                self._promote(slots)
                return
            conn = self._try_connect(deadline)
            if conn is not None:
                if _seams.resend_delay and slots:
                    time.sleep(_seams.resend_delay)
                conn.resend(slots)
                self._conn = conn
                self.generation += 1
                threading.Thread(target=self._watch, args=(conn,), daemon=True,
                                 name="partydbm-watch").start()
                return
            self._contend()
            remaining = _remaining(deadline)
            if remaining is not None and remaining <= 0:
                raise self._timeout_error(deadline)
            self._cond.wait(backoff if remaining is None else min(backoff, remaining))
            backoff = min(backoff * 2, MAX_BACKOFF)

    def _contend(self) -> None:
        """Make sure this process competes for leadership: a thread blocked on the LOCK
        (the kernel hands it to one waiter the moment the holder dies), or, in a process
        that inherited LevelDB's lock table through fork, a helper process that can."""
        if self.path in _tainted:
            self._ensure_helper()
        elif not _seams.never_lead:
            lockfile = self._lockfile
            lockfile.wait_in_background(functools.partial(_lock_acquired, self.path,
                                                          lockfile))

    def _watch(self, conn: Connection) -> None:
        """Per follower connection: when the leader hangs up, contend for the LOCK at
        once, even if no request is waiting (an idle follower must be able to lead).
        The waiter starts only then, so a follower that closes while its leader is
        alive leaves no thread blocked on the LOCK (and its fd can be closed)."""
        _sockets.wait_hangup(conn.sock)
        if _shutting_down or self.closed:
            return
        with self._cond:
            if self.closed or self._conn is not conn:
                return
            self._contend()

    def _try_connect(self, deadline: float | None) -> Connection | None:
        remaining = _remaining(deadline)
        try:
            conn = Connection.open(self.address, self.client, self._rids,
                                   None if remaining is None else max(remaining, 0.001),
                                   self.path)
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

    def _timeout_error(self, deadline: float | None) -> Timeout:
        if self._refused:
            return Timeout(f"no partydbm leader answered for {self.path!r} in time; "
                           f"refused: {self._refused}")
        pid = self._lockfile.holder_pid()
        if pid is None:
            return Timeout(
                f"no partydbm leader answered for {self.path!r} in time, and no process "
                "holds LevelDB's LOCK now (the leader changed while we waited: try again)")
        where = shown_address(self.path, self.address)
        return Timeout(
            f"no partydbm leader answered for {self.path!r} in time: LevelDB's LOCK is "
            f"held by process {pid}, which does not answer on {where!r} (a plain "
            "LevelDB user, a hung leader, or a leader still starting)")

    def _ensure_helper(self) -> None:
        """A process forked from a leader can never open LevelDB itself (trap 2): it
        leads through a fresh helper process that lives as long as it does."""
        if self._helper is not None and self._helper.poll() is None:
            return
        self._helper = subprocess.Popen(
            [sys.executable, "-m", "partydbm._helper", self.path],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, close_fds=True)

    # -- requests --------------------------------------------------------------------------
    def call(self, op: int, args: tuple[Any, ...], h: Policy) -> Any:
        """Run one request on the leader, wherever it is (the remote path)."""
        timeout = h._timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        slot = Slot(op, args, h._retry)
        while True:
            if self.backend is not None:
                return self._local(op, args)
            conn = self._conn
            if conn is None or conn.dead is not None:
                self._recover(conn, deadline)
                continue
            if conn.submit(slot, deadline):
                break
        while not slot.done:
            conn = slot.conn
            assert conn is not None
            conn.wait(slot, deadline)
            if not slot.done and conn.dead is not None:
                self._recover(conn, deadline)
        return slot.result()

    def _local(self, op: int, args: tuple[Any, ...]) -> Any:
        backend = self.backend
        if backend is None:
            raise ClosedError("DBM object has already been closed")
        return _LOCAL[op](backend, *args)

    def serve_followers(self) -> None:
        """On the leader's way into the database: answer what followers have sent, now
        and then (Server.poll: cheaper than waking a serving thread per request)."""
        s = self.server
        if s is not None and s.inline:
            s.poll()

    def get(self, key: bytes, h: Policy) -> bytes | None:
        b = self.backend
        if b is not None:
            s = self.server
            if s is not None and s.inline:  # serve_followers(), inline on a hot path
                s.poll()
            return b.get(key)
        return self.call(P.GET, (key,), h)  # type: ignore[no-any-return]

    def has(self, key: bytes, h: Policy) -> bool:
        b = self.backend
        if b is not None:
            self.serve_followers()
            return b.get(key) is not None
        return bool(self.call(P.HAS, (key,), h))

    def delete(self, key: bytes, sync: bool, h: Policy) -> bool:
        b = self.backend
        if b is not None:
            self.serve_followers()
            return b.delete(key, sync)
        return bool(self.call(P.DELETE, (key, sync), h))

    def batch(self, ops: list[tuple[bytes, bytes | None]], sync: bool, h: Policy) -> None:
        P.check_batch(ops)  # in both roles: a handle behaves the same whichever it has
        b = self.backend
        if b is not None:
            self.serve_followers()
            b.write(ops, sync)
        else:
            flat = [x for op in ops for x in op]
            self.call(P.BATCH, (flat, sync), h)

    def scan(self, rng: Range, reverse: bool, keys_only: bool, limit: int, max_bytes: int,
             h: Policy) -> tuple[list[bytes], bool]:
        b = self.backend
        if b is not None:
            self.serve_followers()
            return b.scan(rng, reverse, keys_only, limit, max_bytes)
        items, more = self.call(P.SCAN, (*rng, reverse, keys_only, limit, max_bytes), h)
        return items, more

    def simple(self, op: int, h: Policy, *args: Any) -> Any:
        """len, clear, compact, sync, getmany: local or remote."""
        if self.backend is not None:
            self.serve_followers()
            return self._local(op, args)
        return self.call(op, args, h)

    # -- closing and forking -----------------------------------------------------------------
    def close(self) -> None:
        if self.closed:  # without the lock: see release()
            return
        with self._cond:
            if self._closed_meanwhile():
                return
            self.closed = True
            try:
                if self.server is not None:
                    server, self.server = self.server, None
                    server.stop()
            finally:
                if self.backend is not None:
                    backend, self.backend = self.backend, None
                    backend.close()  # releases the LOCK: the next leader takes over
            if self._conn is not None:
                conn, self._conn = self._conn, None
                conn.kill(ClosedError("DBM object has already been closed"))
                for slot in conn.take_pending():
                    slot.finish(exc=ClosedError("DBM object has already been closed"))
            if self._helper is not None and self._helper.stdin is not None:
                self._helper.stdin.close()
            self._cond.notify_all()

    def _closed_meanwhile(self) -> bool:
        return self.closed

    def after_fork_in_child(self) -> None:
        self._cond = threading.Condition(threading.RLock())
        if self.backend is not None:
            # The child inherited LevelDB's in-process lock table: it can never open this
            # database itself, and must never close or free the parent's handle.
            _tainted.add(self.path)
            _leftovers.append(self.backend)
            self.backend = None
        if self.server is not None:
            self.server.forget_after_fork()
            self.server = None
        if self._conn is not None:
            self._conn.forget_after_fork()
            self._conn = None
        self._helper = None
        self._rerouting = False
        self._lock_won = False
        self.generation += 1
        self._new_identity()


_LOCAL: dict[int, Callable[..., Any]] = {
    P.GET: Backend.get,
    P.HAS: lambda b, key: b.get(key) is not None,
    P.GETMANY: Backend.get_many,
    P.LEN: Backend.count,
    P.COMPACT: Backend.compact,
    P.SYNC: Backend.sync,
    P.CLEAR: lambda b, sync: b.write(b.clear_ops(), sync),
    P.PUT: Backend.put,
    P.DELETE: Backend.delete,
    P.BATCH: lambda b, flat, sync: b.write(list(zip(flat[::2], flat[1::2], strict=True)), sync),
    P.SCAN: lambda b, lo, lo_incl, hi, hi_incl, *rest: b.scan((lo, lo_incl, hi, hi_incl), *rest),
}
assert set(_LOCAL) == set(P.OP_NAMES) - {P.HELLO}, "every operation needs a local form"


def exclusively(path: str, fn: Callable[[], Any]) -> Any:
    """Run `fn` while holding the database's LOCK with nobody having it open, this
    process included (for LevelDB's repair, which takes no lock itself). Raises error
    (EBUSY) when anybody has it open. `_registry` is held throughout, so this process
    cannot open the database meanwhile; a lock taken on a second fd of LOCK here would
    be dropped with it (trap 1), hence the check of this process's own engines first."""
    with _registry:
        if path in _engines or path in _lockfiles:
            raise error(errno.EBUSY, "the database is open in this process", path)
        lockfile = LockFile(path)
        try:
            if not lockfile.try_lock():
                pid = lockfile.holder_pid()
                raise error(errno.EBUSY, "the database is open (process "
                            f"{pid if pid is not None else '?'} holds LevelDB's LOCK)", path)
            return fn()
        finally:
            lockfile.close()  # also releases the lock


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def _after_fork_in_child() -> None:
    global _registry
    _registry = threading.RLock()
    for lockfile in _lockfiles.values():
        lockfile.reset_after_fork()
    for engine in _engines.values():
        engine.after_fork_in_child()


def _shutdown() -> None:
    """At interpreter exit: leaders hand over cleanly (socket removed, LOCK released)."""
    global _shutting_down
    with _registry:
        _shutting_down = True
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        try:
            engine.close()
        except Exception:
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_shutdown)

__all__ = ["Engine", "LockHeld", "acquire", "release"]
