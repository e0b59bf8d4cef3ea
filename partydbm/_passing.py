"""Answering in passing: while the leader's application keeps calling the database, its
own thread answers the small requests its followers have sent, on its way in.

A serving thread woken for each request must take the GIL from the application's
thread, which then waits for it back: on a busy leader those hand-offs cost more than
the requests (README, "How the leader serves"). So while the application keeps calling,
`Passing.poll()` (at most every EVERY) reads every connection that has something, and
answers what is small; the serving threads park instead of waiting on their sockets.
When the application stops calling, the watchdog hands every connection back to its
thread within a few WATCHDOG_EVERY.

Rules that keep a connection's requests in order and its replies whole:
- Whoever reads or writes a connection holds its `lock` (its serving thread, or the
  application's thread in poll(), which only ever tries the lock).
- What poll() cannot finish goes back to the connection's thread, and until that thread
  has dealt with it (`Conn.left()`), nothing more is read in passing: large or slow
  requests (a synced write waits for fsync), the hello, a message in pieces (its
  MESSAGE_TIMEOUT is the thread's), a decode error, replies the follower does not take
  at once, the end of the connection.
- A serving thread parks only between messages, and only while the application polled
  within BUSY.

Lock order: `_polling` before a connection's `lock` before `_lock` before `_watch`.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable
from typing import Any

from . import _protocol as P
from . import _sockets
from ._dispatch import Peer

EVERY = 100e-6
"""Seconds between two looks of the application's thread at the followers' sockets
while it keeps calling the database: the trade between the leader's own speed and its
followers' (bench/, 6 interleaved rounds: every 50 us gave followers 25% more and a
writing leader 45% less than every 100 us)."""
BUSY = 200e-6
"""A serving thread parks while the application's thread looked within this many
seconds; after that the watchdog hands its connection back to it."""
WATCHDOG_EVERY = 1e-3  # seconds between the watchdog's checks while a thread is parked
SMALL_OPS = frozenset({P.GET, P.GETPOS, P.HAS, P.PUT, P.DELETE})  # answered in passing

RECV_SIZE = 64 * 1024  # larger reads made glibc mmap/munmap per recv

Handler = Callable[[Peer, Any, Callable[[Any], bytes]], tuple[bytes, bool]]
"""(peer, request, pack) -> (reply, whether the connection must end after it)."""


class Conn:
    """One follower's connection, as its serving thread and poll() share it. `lock` is
    held by whichever of them reads from or writes to it. What poll() leaves to the
    thread: `outbox` (reply bytes not sent yet), `msgs` and `bad` (requests decoded and
    not answered, a decode error after them), `end` (the connection is over)."""

    __slots__ = ("bad", "decoder", "end", "fd", "lock", "msgs", "outbox", "pack", "peer",
                 "sock", "wake")

    def __init__(self, sock: _sockets.Socket) -> None:
        self.sock = sock
        self.fd = -1  # in the epoll set under this fd (-1: not)
        self.peer = Peer()
        self.decoder = P.Decoder()
        self.pack = P.packer()
        self.lock = threading.Lock()
        self.wake = threading.Event()  # set: the parked serving thread has work
        self.outbox = b""
        self.msgs: list[Any] = []
        self.bad: P.DecodeError | None = None
        self.end = False

    def left(self) -> bool:
        """Whether something waits for the connection's own thread: until it has been
        dealt with, nothing more may be read from the socket in passing."""
        return bool(self.outbox or self.msgs or self.bad or self.end)


class Passing:
    """The state of answering in passing for one server: the epoll set of its
    connections, the parked threads and the watchdog. Disabled (`enabled=False`: in a
    process that only serves, nothing polls) it is inert: `active` stays False."""

    def __init__(self, handle: Handler, enabled: bool = True, name: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`name`: what the watchdog thread's name says (the database's path)."""
        self._handle = handle
        self._name = name
        self._clock = clock
        self.active = False  # whether poll() has anything to look at (read without lock)
        self.answered = 0  # requests answered in passing (tests, stats)
        self._epoll = select.epoll() if enabled and hasattr(select, "epoll") else None
        self._by_fd: dict[int, Conn] = {}
        self._lock = threading.Lock()  # _by_fd, active, _closing
        self._closing = False
        self._polling = threading.Lock()  # one application thread polls at a time
        self._due = 0.0  # when the next poll looks
        self._seen = 0.0  # when an application thread last polled
        self._parked: set[Conn] = set()
        self._watch = threading.Condition(threading.Lock())
        self._watchdog: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self._epoll is not None

    def start(self) -> None:
        if self._epoll is not None:
            self._watchdog = threading.Thread(target=self._watchdog_loop, daemon=True,
                                              name=f"partydbm-watchdog {self._name}")
            self._watchdog.start()

    def stop(self) -> None:
        """Wait for a poller to leave the database, hand every connection back, stop
        the watchdog. The connections themselves are the server's to end."""
        with self._lock:
            self._closing = True
            self.active = False
        with self._polling:
            pass  # an application thread answering in passing has left the database
        self._unpark_all(closing=True)
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join()
        if self._epoll is not None:
            self._epoll.close()

    def forget_after_fork(self) -> None:
        """In a forked child: nothing here is ours (the parent polls its own set)."""
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        self.active = False
        self._by_fd = {}
        self._parked = set()

    # -- the connections ----------------------------------------------------------------
    def watch(self, conn: Conn) -> None:
        """Let poll() look at `conn` (after its hello: the thread answers that)."""
        if self._epoll is None:
            return
        fd = conn.sock.fileno()
        with self._lock:
            if self._closing:
                return
            self._epoll.register(fd, select.EPOLLIN)
            self._by_fd[fd] = conn
            conn.fd = fd
            self.active = True

    def unwatch(self, conn: Conn) -> None:
        """Stop looking at `conn`. Before its socket is closed: once closed, its fd
        number can come back with the next accept()."""
        with self._lock:
            fd, conn.fd = conn.fd, -1
            if fd < 0 or self._by_fd.get(fd) is not conn:
                return
            del self._by_fd[fd]
            self.active = bool(self._by_fd) and not self._closing
            try:
                if self._epoll is not None:
                    self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass  # the epoll set is closed already (stop())

    def should_park(self, conn: Conn) -> bool:
        """Whether `conn`'s thread, between two messages, should leave it to poll()."""
        seen = self._seen  # 0.0 until an application thread polls
        return bool(seen and self.active and not conn.decoder.pending()
                    and self._clock() - seen < BUSY)

    def park(self, conn: Conn) -> None:
        """Called by `conn`'s thread: wait until poll() leaves it work or the watchdog
        hands the connection back."""
        with self._watch:
            if conn.wake.is_set() or self._closing:
                conn.wake.clear()
                return
            self._parked.add(conn)
            self._watch.notify()
        conn.wake.wait()
        conn.wake.clear()

    def _unpark(self, conn: Conn) -> None:
        with self._watch:
            self._parked.discard(conn)
            conn.wake.set()

    def _unpark_all(self, closing: bool = False) -> None:
        with self._watch:
            for conn in self._parked:
                conn.wake.set()
            self._parked.clear()
            if closing:
                self._watch.notify()

    def _watchdog_loop(self) -> None:
        """While a serving thread is parked: every WATCHDOG_EVERY, if the application
        has not polled within BUSY, wake every parked thread."""
        while True:
            with self._watch:
                while not self._parked and not self._closing:
                    self._watch.wait()
            if self._closing:
                self._unpark_all()
                return
            time.sleep(WATCHDOG_EVERY)
            if self._clock() - self._seen >= BUSY:
                self._unpark_all()

    # -- the application's side ---------------------------------------------------------
    def poll(self) -> None:
        """Called by the application's thread on its way into the database: answer the
        small requests that have arrived (anything else wakes the connection's thread).
        Never raises, never blocks on a follower."""
        now = self._clock()
        if now < self._due:
            return
        self._due = now + EVERY
        self._seen = now
        epoll = self._epoll
        if epoll is None or not self._polling.acquire(blocking=False):
            return
        try:
            if self._closing:
                return
            for fd, _ in epoll.poll(0):
                conn = self._by_fd.get(fd)
                if conn is None or not conn.lock.acquire(blocking=False):
                    continue  # its thread has it (blocked in recv, or answering)
                try:
                    self._answer(conn)
                except BaseException as exc:
                    # A bug of ours, or the application's KeyboardInterrupt in the middle
                    # of a request: its reply may be lost, so end the connection and the
                    # follower sends it again (on a write, at most once: its rid).
                    conn.end = True
                    self.unwatch(conn)
                    _sockets.hang_up(conn.sock)
                    self._unpark(conn)
                    if not isinstance(exc, Exception):
                        raise
                finally:
                    conn.lock.release()
        except (OSError, ValueError):  # epoll_wait failed (it should not): give up
            with self._lock:  # answering in passing; the serving threads take it all
                self._epoll = None
                self.active = False
            self._unpark_all()
        finally:
            self._polling.release()

    def _answer(self, conn: Conn) -> None:
        peer, decoder = conn.peer, conn.decoder
        if conn.left() or peer.client is None or decoder.pending():
            self._unpark(conn)  # its thread's job (the hello, a message in pieces)
            return
        try:
            data = conn.sock.recv(RECV_SIZE, _sockets.DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            conn.end = True
            self._unpark(conn)
            return
        try:
            msgs = decoder.decode(data)
        except P.DecodeError as exc:
            conn.bad, conn.msgs = exc, exc.messages
            self._unpark(conn)
            return
        if decoder.pending() or len(data) > P.FAST_DECODE_BYTES or not all(
                type(m) is list and len(m) > 2 and type(m[0]) is int and m[0] in SMALL_OPS
                and not (m[0] in P.WRITES and m[-1]) for m in msgs):
            conn.msgs = msgs  # large, slow (a synced write: fsync), or part of one
            self._unpark(conn)
            return
        replies = []
        self.answered += len(msgs)
        for msg in msgs:
            reply, fatal = self._handle(peer, msg, conn.pack)
            replies.append(reply)
            if fatal:
                conn.end = True
                break
        out = b"".join(replies)
        try:
            sent = conn.sock.send(out, _sockets.DONTWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent, conn.end = len(out), True
        if sent < len(out) or conn.end:
            conn.outbox = out[sent:]  # the follower reads slowly: its thread sends the rest
            self._unpark(conn)
