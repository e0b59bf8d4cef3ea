"""Follower side of one connection: request ids, pipelining, replies matched by id.

Any number of threads may have requests in flight on one Connection. There is no
reader thread: a waiting caller takes `recv_lock` and reads replies for everybody
until its own arrives, then hands the role on (cheaper than a thread hop per reply).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from . import _protocol as P
from . import _sockets
from ._election import may_access, relink
from ._errors import LeaderLostError, ProtocolError, Timeout, from_wire

RECV_SIZE = 64 * 1024  # larger reads made glibc mmap/munmap per recv


def _check_leader(sock: _sockets.Socket, address: str, db_path: str) -> None:
    """Send nothing to a process that could not use the database files itself (another
    user's socket planted in the directory): it would get our writes and could forge
    our reads. Where the kernel cannot say who is at the other end, the owner of the
    socket file stands for the leader (it ran as that uid when it bound the file)."""
    try:
        pid, uid, gid, groups = _sockets.peer_credentials(sock)
        if uid is None:
            pid, uid, gid, groups = _sockets.file_owner(address)
        trusted = uid is not None and may_access(db_path, uid, gid, groups)
    except BaseException:
        _sockets.hang_up(sock)
        raise
    if not trusted:
        _sockets.hang_up(sock)
        who = f"process {pid}" if pid else "the process"  # 0: the kernel did not say
        raise _sockets.Refused(
            f"{who} (uid {uid}) serves {address!r} but could not read and write "
            f"{db_path!r} itself: not a partydbm leader we trust")


class Slot:
    """One request: what to resend after failover, and where its answer lands."""

    __slots__ = ("args", "conn", "done", "event", "exc", "op", "retry", "rid", "value")

    def __init__(self, op: int, args: tuple[Any, ...], retry: bool) -> None:
        self.op = op
        self.args = args
        self.retry = retry
        self.rid = 0
        self.conn: Connection | None = None
        self.done = False
        self.value: Any = None
        self.exc: BaseException | None = None
        # Made only when a second thread must wait for this answer (most requests are
        # read back by their own thread, and an Event costs as much as a syscall).
        self.event: threading.Event | None = None

    def frame(self, pack: Callable[[Any], bytes] = P.pack) -> bytes:
        return pack([self.op, self.rid, *self.args])

    def finish(self, value: Any = None, exc: BaseException | None = None) -> None:
        self.value, self.exc, self.done = value, exc, True
        # `done` is set before `event` is read; a waiter sets `event` before reading
        # `done`: one of the two always sees the other.
        event = self.event
        if event is not None:
            event.set()

    def nudge(self) -> None:
        event = self.event
        if event is not None:
            event.set()

    def result(self) -> Any:
        if self.exc is not None:
            raise self.exc
        return self.value


def _done(slot: Slot) -> bool:
    return slot.done


class Connection:
    def __init__(self, sock: _sockets.Socket, rids: Iterator[int]) -> None:
        self.sock = sock
        self.rids = rids
        self.send_lock = threading.RLock()  # _die() may run while a sender holds it
        self.recv_lock = threading.Lock()
        self.pending: dict[int, Slot] = {}
        self.decoder = P.Decoder()
        self.dead: BaseException | None = None
        self.leader_pid = 0
        self.ring_epoch: int | None = None  # the leader's change ring, if it offered one
        self._pack = P.packer()  # used under send_lock only

    @classmethod
    def open(cls, address: str, client: bytes, rids: Iterator[int],
             timeout: float | None, db_path: str | None = None, ring: bool = False
             ) -> Connection:
        """Connect and say hello, both within `timeout`. Raises OSError (no leader there;
        _sockets.Refused: a process that could not use `db_path` itself serves the
        address; _sockets.Busy: its backlog stayed full throughout) or error. `ring`:
        ask for the leader's change ring (its epoch lands in `ring_epoch`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        relink(address)
        sock = _sockets.connect(address, deadline)
        if db_path is not None:
            _check_leader(sock, address, db_path)
        conn = cls(sock, rids)
        hello = Slot(P.HELLO, ({"v": P.VERSION, "client": client, "pid": os.getpid(),
                                "ring": ring},), True)
        with conn.send_lock:
            hello.rid = 0
            hello.conn = conn
            conn.pending[0] = hello
            try:
                _sockets.send_all(sock, hello.frame(), deadline)
            except BaseException:
                _sockets.hang_up(sock)
                raise
        conn.wait(hello, deadline)
        if conn.dead is not None and not hello.done:
            _sockets.hang_up(sock)
            raise ConnectionResetError("the leader hung up during the hello")
        info = hello.result()
        if isinstance(info, dict):
            conn.leader_pid = int(info.get("pid", 0))
            epoch = info.get("ring")
            conn.ring_epoch = epoch if type(epoch) is int else None
        return conn

    # -- sending -------------------------------------------------------------------------
    def submit(self, slot: Slot, deadline: float | None) -> bool:
        """Give `slot` an id and send it. False if this connection is already dead (the
        slot was not taken). A send that fails kills the connection with the slot
        pending, so failover resends it."""
        with self.send_lock:
            if self.dead is not None:
                return False
            slot.rid = next(self.rids)
            slot.conn = self
            self.pending[slot.rid] = slot
            try:
                _sockets.send_all(self.sock, slot.frame(self._pack), deadline)
            except OSError as exc:  # TimeoutError too: a frame may be cut, start over
                self._die(exc)
        return True

    def resend(self, slots: list[Slot]) -> None:
        """Send requests carried over from a dead connection, in their original order
        and with their original ids (so a leader can recognise writes it has applied)."""
        if not slots:
            return
        with self.send_lock:
            for slot in slots:
                slot.conn = self
                self.pending[slot.rid] = slot
            try:
                _sockets.send_all(self.sock, b"".join(s.frame(self._pack) for s in slots),
                                  None)
            except OSError as exc:
                self._die(exc)

    # -- receiving -----------------------------------------------------------------------
    def wait(self, slot: Slot, deadline: float | None) -> None:
        """Return when `slot` is done or its connection is dead; raise Timeout at the
        deadline (the request stays unanswered: a late reply is dropped)."""
        while not slot.done:
            conn = slot.conn
            if conn is None or conn.dead is not None:
                return
            if conn._read_for(slot, deadline):
                continue
            # Another thread is reading. Sleep on an Event (made only now: most requests
            # never need one), but first look again: the reader may have left between
            # our try and the Event's existence, nudging nobody.
            event = slot.event
            if event is None:
                event = slot.event = threading.Event()
            event.clear()
            if _done(slot):
                return
            if not conn._read_for(slot, deadline):
                remaining = None if deadline is None else deadline - time.monotonic()
                expired = remaining is not None and remaining <= 0
                if (expired or not event.wait(remaining)) and not slot.done:
                    self._expire(conn, slot)

    def _read_for(self, slot: Slot, deadline: float | None) -> bool:
        """Take the reader role if free and read until `slot` is answered (or the
        connection dies). False if another thread is the reader."""
        if not self.recv_lock.acquire(blocking=False):
            return False
        try:
            self._read_until(slot, deadline)
        finally:
            self.recv_lock.release()
            self._wake_waiters()
        return True

    def _expire(self, conn: Connection, slot: Slot) -> None:
        with conn.send_lock:
            conn.pending.pop(slot.rid, None)
        raise Timeout(f"no answer from the partydbm leader (pid {conn.leader_pid}) in time")

    def _read_until(self, slot: Slot, deadline: float | None) -> None:
        sock = self.sock
        while not slot.done and self.dead is None:
            try:
                data = _sockets.recv_some(sock, RECV_SIZE, deadline)
            except TimeoutError:
                self._expire(self, slot)
            except OSError as exc:
                self._die(exc)
                return
            if not data:
                self._die(LeaderLostError("the partydbm leader closed the connection"))
                return
            try:
                for msg in self.decoder.decode(data):
                    self._dispatch(msg)
            except (P.DecodeError, ProtocolError) as exc:
                self._die(ProtocolError(f"bad reply from the partydbm leader: {exc}"),
                          fatal=True)
                return

    def _dispatch(self, msg: Any) -> None:
        if not isinstance(msg, list) or len(msg) != 3:
            raise ProtocolError(f"malformed reply {msg!r:.80}")
        rid, ok, payload = msg
        if rid is None:  # the leader could not parse what we sent
            raise ProtocolError(str(from_wire(payload)))
        with self.send_lock:
            slot = self.pending.pop(rid, None)
        if slot is None:
            return  # the caller timed out and left
        if ok:
            slot.finish(payload)
        else:
            slot.finish(exc=from_wire(payload))

    def _wake_waiters(self) -> None:
        # Whoever waits next must take over reading.
        if not self.pending:
            return
        with self.send_lock:
            slots = list(self.pending.values())
        for s in slots:
            s.nudge()

    def alive(self) -> bool:
        """False once the leader's end is known to be closed (peeks, never consumes)."""
        if self.dead is not None:
            return False
        return _sockets.peer_open(self.sock)

    # -- death ---------------------------------------------------------------------------
    def _die(self, exc: BaseException, fatal: bool = False) -> None:
        """Mark the connection dead. Pending requests stay for failover to take over,
        unless `fatal` (a protocol breach: retrying would only repeat it)."""
        if self.dead is None:
            self.dead = exc
        _sockets.hang_up(self.sock)
        if fatal:
            for s in self.take_pending(wait=False):
                s.finish(exc=exc)
        self._wake_waiters()

    def kill(self, exc: BaseException) -> None:
        self._die(exc)

    def take_pending(self, wait: bool = True) -> list[Slot]:
        """Remove and return the unanswered requests, oldest first (after making sure no
        reader is still dispatching replies)."""
        got = self.recv_lock.acquire(timeout=5.0) if wait else False
        try:
            with self.send_lock:
                if self.dead is None:
                    self.dead = LeaderLostError("connection abandoned")
                slots = sorted(self.pending.values(), key=lambda s: s.rid)
                self.pending.clear()
        finally:
            if got:
                self.recv_lock.release()
        return slots

    def forget_after_fork(self) -> None:
        _sockets.drop(self.sock)
        self.dead = LeaderLostError("connection inherited through fork")
        self.pending.clear()


def ask_to_let_go(address: str, db_path: str, timeout: float) -> int | None:
    """Ask the leader at `address` to give the database up if no handle of its process
    has it open (it lingers in its grace period): its pid if it agreed, else None (no
    leader there, a leader in use, or one that does not know the request)."""
    deadline = time.monotonic() + timeout
    try:  # partydbm's errors are OSErrors too
        conn = Connection.open(address, os.urandom(16), itertools.count(1), timeout, db_path)
    except OSError:
        return None
    try:
        slot = Slot(P.RELEASE, (), False)
        conn.submit(slot, deadline)
        conn.wait(slot, deadline)
        agreed = slot.done and slot.exc is None and slot.value is True
        return conn.leader_pid if agreed else None
    except OSError:
        return None
    finally:
        conn.kill(LeaderLostError("done asking"))
