"""Leader side: accept followers on the unix socket and serve their requests.

One daemon thread accepts; one daemon thread per follower connection reads requests,
applies them in arrival order and answers in the same order (so writes from one
follower are applied in the order it issued them). plyvel releases the GIL, so
connections are served in parallel with the leader's own threads.

While the application keeps calling the database, its own thread answers the small
requests that have arrived on its way in (Server.poll, at most every INLINE_EVERY) and
the serving threads park: waking a thread per request costs the busy leader two GIL
hand-offs and their context switches, more than the request itself. Whoever reads a
connection holds its lock, so requests stay in order; large or slow requests, a
message in pieces, and replies the follower does not take at once go back to the
connection's thread, and when the application stops calling, a watchdog hands every
connection back within about WATCHDOG_EVERY.

A follower is a process of somebody else's, so nothing it sends may hurt the leader or
the other followers: frames are bounded (see the limits in _protocol), a request the
leader cannot accept gets an error reply and ends the connection, a half message
followed by silence ends it after MESSAGE_TIMEOUT, a follower that stops reading its
replies is dropped after SEND_TIMEOUT, and every handler thread catches what it raises.
Each connection has its own thread, so a stalled one only ever stalls itself.

The serving threads run below the application's own threads (SERVE_NICENESS) when the
process may use more than one CPU. Serving needs the GIL several times a request (the
read, the LevelDB call and the reply each release it); a serving thread woken on the
CPU where the application's thread runs used to preempt it while it held the GIL, and
both then waited for each other's wake-ups (the convoy effect). A niced serving thread
does not preempt it and moves to another CPU instead, so on 2 CPUs followers are served
as fast as before while the leader's own operations stop collapsing (bench/: 4 busy
processes, README). On a single CPU there is nowhere else to go: there a niced server
would get a tenth of the CPU against a busy application, so it keeps its priority.
"""

from __future__ import annotations

import errno
import os
import select
import stat
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from . import _protocol as P
from . import _sockets
from ._backend import Backend
from ._dispatch import Dispatcher, Peer, brief
from ._election import may_access, remove_stale_socket
from ._errors import ProtocolError, to_wire

RECV_SIZE = 64 * 1024  # larger reads made glibc mmap/munmap per recv
FLUSH_BYTES = 256 * 1024  # replies to one read are sent in pieces of about this much
MAX_ERROR_TEXT = 4096  # characters of an error message sent to a follower
ACCEPT_BACKOFF = 0.05  # seconds between accept() attempts while out of file descriptors
INLINE_EVERY = 100e-6
"""Seconds between two looks of the application's thread at the followers' sockets
(Server.poll) while it keeps calling the database: the trade between the leader's own
speed and its followers' (bench/, 6 interleaved rounds: every 50 us gave followers 25%
more and a writing leader 45% less than every 100 us)."""
INLINE_BUSY = 200e-6
"""A serving thread parks while the application's thread looked within this many
seconds; after that the watchdog hands its connection back to it."""
WATCHDOG_EVERY = 1e-3  # seconds between the watchdog's checks while a thread is parked
INLINE_OPS = frozenset({P.GET, P.HAS, P.PUT, P.DELETE})  # small: answered in passing
ANSWER_IN_PASSING = True
"""Whether the application's threads answer small requests on their way into the
database (Server.poll). Off in a process that exists only to serve (serve_only())."""
SERVE_NICENESS = 10
"""How much nicer the serving threads run than the thread that takes the lead (Linux:
niceness is per thread; only with 2 CPUs or more). 0 in a process that exists only to
serve (serve_only())."""


def serve_only() -> None:
    """Called first by a process whose only job is serving (`partydbm serve`, the fork
    helper, the bench's holder): its serving threads have no application thread to give
    way to, and none that would answer in passing, so they keep their priority and
    never park (and its connections stay out of an epoll set nobody polls)."""
    global ANSWER_IN_PASSING, SERVE_NICENESS
    ANSWER_IN_PASSING = False
    SERVE_NICENESS = 0


Observer = Callable[[str, int, int], None]  # (event, follower pid, followers connected)


class _Conn:
    """One follower's connection. `lock` is held by whoever reads from or writes to it:
    its serving thread, or an application thread answering in passing (Server.poll).
    What the one leaves to the other: `outbox` (reply bytes not sent yet), `msgs` and
    `bad` (requests decoded, not answered; a decode error after them), `end` (over)."""

    __slots__ = ("bad", "decoder", "end", "fd", "lock", "msgs", "outbox", "pack", "peer",
                 "sock", "wake")

    def __init__(self, sock: _sockets.Socket) -> None:
        self.sock = sock
        self.fd = -1  # in the server's epoll set under this fd (-1: not)
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


class Server:
    def __init__(self, backend: Backend, address: str, db_path: str,
                 observer: Observer | None = None) -> None:
        self.backend = backend
        # Told "connected"/"left" for each follower that passed the access check (from the
        # connection's thread, outside the server's lock); it must not block.
        self.observer = observer
        self.address = address
        self.db_path = db_path
        self._lock = threading.Lock()
        self._conns: set[_sockets.Socket] = set()
        self._threads: set[threading.Thread] = set()
        self._listener: _sockets.Socket | None = None
        self._closing = False
        self.dispatcher = Dispatcher(backend)
        self.niceness = _serving_niceness()
        # Answering in passing (poll): the connections by fd, watched by one epoll set.
        self.inline = False  # whether poll() has anything to look at (read without lock)
        self._epoll = select.epoll() if ANSWER_IN_PASSING and hasattr(select, "epoll") else None
        self._by_fd: dict[int, _Conn] = {}
        self._polling = threading.Lock()  # one application thread polls at a time
        self._due = 0.0  # when the next poll looks
        self._seen = 0.0  # when an application thread last polled
        self._parked: set[_Conn] = set()
        self._watch = threading.Condition(threading.Lock())
        self.in_passing = 0  # requests answered by an application thread (tests, stats)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Bind and serve. The caller holds the LOCK (only it may unlink and bind)."""
        remove_stale_socket(self.address)
        mode = stat.S_IMODE(os.stat(self.db_path).st_mode)
        self._listener = _sockets.listen(self.address, mode)
        t = threading.Thread(target=self._accept_loop, name="partydbm-accept", daemon=True)
        t.start()
        if self._epoll is not None:
            w = threading.Thread(target=self._watchdog, name="partydbm-watch", daemon=True)
            with self._lock:
                self._threads.add(w)
            w.start()

    def stop(self) -> None:
        """Stop accepting, unlink the socket (still under the LOCK), hang up on every
        follower (they fail over) and wait for every handler to leave the backend.

        The wait has no timeout on purpose: after the hang-ups a handler can only still
        be inside a LevelDB call (a large batch on a slow disk), and closing the database
        under it could corrupt it or crash the process."""
        with self._lock:
            self._closing = True
            self.inline = False
            listener, self._listener = self._listener, None
            conns = list(self._conns)
            threads = list(self._threads)
        if listener is not None:
            _sockets.hang_up(listener)
        remove_stale_socket(self.address)
        for sock in conns:
            _sockets.hang_up(sock)
        with self._polling:
            pass  # an application thread answering in passing has left the backend
        self._unpark_all(closing=True)
        for t in threads:
            if t is not threading.current_thread():
                t.join()
        if self._epoll is not None:
            self._epoll.close()

    def forget_after_fork(self) -> None:
        """In a forked child: close our copies of the fds, end nothing for the parent."""
        if self._listener is not None:
            _sockets.drop(self._listener)
        for sock in self._conns:
            _sockets.drop(sock)
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        self.inline = False
        self._listener = None
        self._conns = set()
        self._threads = set()
        self._by_fd = {}
        self._parked = set()

    def _accept_loop(self) -> None:
        _give_way(self.niceness)  # the handler threads it starts inherit it (Linux)
        while True:
            listener = self._listener
            if listener is None:
                return
            try:
                sock, _ = listener.accept()
            except OSError as exc:
                if self._closing:
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # The connection waits in the backlog; retrying at once would spin a
                    # core until some handler gives an fd back.
                    time.sleep(ACCEPT_BACKOFF)
                continue
            with self._lock:
                if self._closing:
                    _sockets.hang_up(sock)
                    return
                if len(self._conns) >= P.MAX_CONNECTIONS:
                    _refuse_now(sock, f"the partydbm leader serves {len(self._conns)} "
                                "followers already (partydbm._protocol.MAX_CONNECTIONS)")
                    continue
                t = threading.Thread(target=self._serve, args=(sock,),
                                     name="partydbm-serve", daemon=True)
                self._conns.add(sock)
                self._threads.add(t)
                try:
                    t.start()  # under the lock: stop() must never see an unstarted thread
                except RuntimeError:  # the interpreter is exiting: 3.12 starts no thread
                    self._conns.discard(sock)
                    self._threads.discard(t)
                    _sockets.hang_up(sock)
                    return

    # -- one follower --------------------------------------------------------------------
    def _serve(self, sock: _sockets.Socket) -> None:
        conn = _Conn(sock)
        peer = conn.peer
        observed = False
        try:
            _sockets.serve_options(sock)
            peer.pid, peer.uid, peer.gid, peer.groups = _sockets.peer_credentials(sock)
            if not may_access(self.db_path, peer.uid, peer.gid, peer.groups):
                _send(sock, P.pack([0, False, ["error",
                      f"uid {peer.uid} may not read and write {self.db_path!r}"]]))
                return
            observed = self._notify("connected", peer.pid)
            self._watch_fd(conn)
            while True:
                with conn.lock:
                    if conn.left() and not self._catch_up(conn):  # left by poll()
                        break
                    if not self._serve_some(conn):
                        break
                # Park between messages only: the rest of a message in pieces, and its
                # MESSAGE_TIMEOUT, are this thread's to wait for.
                seen = self._seen  # 0.0 until an application thread polls
                if (seen and self.inline and not conn.decoder.pending()
                        and time.monotonic() - seen < INLINE_BUSY):
                    self._park(conn)
        except OSError:
            pass  # the follower left, or stopped reading its replies (TimeoutError)
        except Exception as exc:  # a bug of ours: tell the follower, keep the leader up
            _send_quietly(sock, P.pack([None, False, _wire(exc)]))
        finally:
            with conn.lock:
                conn.end = True
                self._unwatch_fd(conn)
                with self._lock:
                    self._conns.discard(sock)
                    self._threads.discard(threading.current_thread())
                _sockets.hang_up(sock)
            if observed:
                self._notify("left", peer.pid)

    def followers(self) -> int:
        """How many follower connections are open."""
        with self._lock:
            return len(self._conns)

    def _notify(self, event: str, pid: int) -> bool:
        observer = self.observer
        if observer is None:
            return False
        try:
            observer(event, pid, len(self._conns))
        except Exception:
            pass  # an observer's bug must not take a follower's connection down
        return True

    def _serve_some(self, conn: _Conn) -> bool:
        """Read what has arrived and answer every complete request in it, in order.
        False when the connection is over."""
        sock, decoder = conn.sock, conn.decoder
        if decoder.pending() and not _sockets.readable(sock, P.MESSAGE_TIMEOUT):
            _send_quietly(sock, P.pack([None, False, ["protocol",
                          f"no byte of the rest of a message for {P.MESSAGE_TIMEOUT}s"]]))
            return False
        data = sock.recv(RECV_SIZE)
        if not data:
            return False
        try:
            msgs, bad = decoder.decode(data), None
        except P.DecodeError as exc:  # answer what came before the bad frame first
            msgs, bad = exc.messages, exc
        return self._answer(conn, msgs, bad)

    def _catch_up(self, conn: _Conn) -> bool:
        """Finish what an application thread left for this connection's own thread.
        False when the connection is over."""
        if conn.outbox:
            out, conn.outbox = conn.outbox, b""
            _send(conn.sock, out)
        if conn.msgs or conn.bad is not None:
            msgs, bad, conn.msgs, conn.bad = conn.msgs, conn.bad, [], None
            return self._answer(conn, msgs, bad)
        return not conn.end

    def _answer(self, conn: _Conn, msgs: list[Any], bad: P.DecodeError | None) -> bool:
        """Answer `msgs` in order, then report `bad`. False when the connection is over."""
        replies: list[bytes] = []
        size = 0
        for msg in msgs:
            reply, fatal = self._handle(conn.peer, msg, conn.pack)
            replies.append(reply)
            size += len(reply)
            if fatal:
                _send(conn.sock, b"".join(replies))
                return False
            if size >= FLUSH_BYTES:  # many replies to one read: never hold them all
                _send(conn.sock, b"".join(replies))
                replies, size = [], 0
        if bad is not None:
            replies.append(P.pack([None, False, ["protocol", _text(str(bad))]]))
        if replies:
            _send(conn.sock, b"".join(replies))
        return bad is None

    # -- answering in passing ----------------------------------------------------------
    # A serving thread woken for each request must take the GIL from the application's
    # thread, which then waits for it back: on a busy leader those hand-offs cost more
    # than the requests. So while the application keeps calling the database, its own
    # thread answers what has arrived every INLINE_EVERY (poll), and the serving threads
    # park instead of waiting on their sockets; when it stops calling, the watchdog
    # hands the connections back to them within a few WATCHDOG_EVERY.

    def poll(self) -> None:
        """Called by the application's thread on its way into the database: answer the
        small requests that have arrived (anything else wakes the connection's thread).
        Never raises, never blocks on a follower."""
        now = time.monotonic()
        if now < self._due:
            return
        self._due = now + INLINE_EVERY
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
                    self._answer_in_passing(conn)
                except BaseException as exc:
                    # A bug of ours, or the application's KeyboardInterrupt in the middle
                    # of a request: its reply may be lost, so end the connection and the
                    # follower sends it again (on a write, at most once: its rid).
                    conn.end = True
                    _sockets.hang_up(conn.sock)
                    self._unpark(conn)
                    if not isinstance(exc, Exception):
                        raise
                finally:
                    conn.lock.release()
        except (OSError, ValueError):  # epoll_wait failed (it should not): give up
            with self._lock:  # answering in passing; the serving threads take it all
                self._epoll = None
                self.inline = False
            self._unpark_all()
        finally:
            self._polling.release()

    def _answer_in_passing(self, conn: _Conn) -> None:
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
                type(m) is list and len(m) > 2 and type(m[0]) is int and m[0] in INLINE_OPS
                and not (m[0] in P.WRITES and m[-1]) for m in msgs):
            conn.msgs = msgs  # large, slow (a synced write: fsync), or part of one
            self._unpark(conn)
            return
        replies = []
        self.in_passing += len(msgs)
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

    def _watch_fd(self, conn: _Conn) -> None:
        if self._epoll is None:
            return
        fd = conn.sock.fileno()
        with self._lock:
            if self._closing:
                return
            self._epoll.register(fd, select.EPOLLIN)
            self._by_fd[fd] = conn
            conn.fd = fd
            self.inline = True

    def _unwatch_fd(self, conn: _Conn) -> None:
        with self._lock:
            fd, conn.fd = conn.fd, -1
            if fd < 0:
                return
            del self._by_fd[fd]
            self.inline = bool(self._by_fd) and not self._closing
            try:
                if self._epoll is not None:
                    self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass  # closed already (stop() hung up; closing an fd leaves the set)

    def _park(self, conn: _Conn) -> None:
        """Wait until poll() leaves work or the watchdog hands the connection back."""
        with self._watch:
            if conn.wake.is_set() or self._closing:
                conn.wake.clear()
                return
            self._parked.add(conn)
            self._watch.notify()
        conn.wake.wait()
        conn.wake.clear()

    def _unpark(self, conn: _Conn) -> None:
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

    def _watchdog(self) -> None:
        """While a serving thread is parked: every WATCHDOG_EVERY, if the application
        has not polled within INLINE_BUSY, wake every parked thread."""
        while True:
            with self._watch:
                while not self._parked and not self._closing:
                    self._watch.wait()
            if self._closing:
                self._unpark_all()
                return
            time.sleep(WATCHDOG_EVERY)
            if time.monotonic() - self._seen >= INLINE_BUSY:
                self._unpark_all()

    def _handle(self, peer: Peer, msg: Any, pack: Callable[[Any], bytes]
                ) -> tuple[bytes, bool]:
        """The reply to one request, and whether the connection must end after it (the
        request broke the protocol: whatever follows cannot be trusted)."""
        if (type(msg) is list and len(msg) == 3 and type(msg[0]) is int and msg[0] == P.GET
                and type(msg[1]) is int and type(msg[2]) is bytes and peer.client is not None):
            # Most requests are one get: answered without the general dispatch (the
            # leader's GIL is what every follower and the application queue for).
            try:
                return pack([msg[1], True, self.backend.get(msg[2])]), False
            except Exception as exc:
                return pack([msg[1], False, _wire(exc)]), False
        if (type(msg) is not list or len(msg) < 2 or type(msg[0]) is not int
                or type(msg[1]) is not int):
            rid = msg[1] if type(msg) is list and len(msg) > 1 and type(msg[1]) is int else None
            return pack([rid, False, ["protocol", f"malformed request {brief(msg)}"]]), True
        op, rid = msg[0], msg[1]
        if peer.client is None:
            return self._hello(peer, rid, msg, pack)
        try:
            return pack([rid, True, self.dispatcher.call(peer, op, rid, msg[2:])]), False
        except ProtocolError as exc:
            return pack([rid, False, _wire(exc)]), True
        except Exception as exc:
            return pack([rid, False, _wire(exc)]), False

    def _hello(self, peer: Peer, rid: int, msg: list[Any], pack: Callable[[Any], bytes]
               ) -> tuple[bytes, bool]:
        def refuse(text: str) -> tuple[bytes, bool]:
            return pack([rid, False, ["protocol", text]]), True

        if msg[0] != P.HELLO or len(msg) != 3 or type(msg[2]) is not dict:
            return refuse("the first message must be a hello")
        info = msg[2]
        if info.get("v") != P.VERSION:
            return refuse(f"protocol version {brief(info.get('v'))} not supported (leader "
                          f"speaks {P.VERSION})")
        client = info.get("client")
        if type(client) is not bytes or not 0 < len(client) <= P.MAX_CLIENT_ID:
            return refuse("hello without a valid client id")
        peer.client = client
        peer.applied, peer.recent = self.backend.applied(client)
        return pack([rid, True, {"v": P.VERSION, "pid": os.getpid()}]), False


PER_THREAD_NICENESS = sys.platform.startswith("linux") and hasattr(os, "setpriority")
"""Whether setpriority() on a native thread id sets that thread's niceness (Linux). On
macOS and the BSDs that id is no pid, and a process has one niceness for all its
threads: there the serving threads keep the application's priority."""


def _serving_niceness() -> int | None:
    """The niceness for this process's serving threads: SERVE_NICENESS above the calling
    thread's, or None (leave them as they are) on one CPU or where it cannot be known."""
    if not SERVE_NICENESS or not PER_THREAD_NICENESS:
        return None
    try:
        if _usable_cpus() < 2:
            return None
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + SERVE_NICENESS
    except OSError:
        return None


def _usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the system tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _give_way(niceness: int | None) -> None:
    """Run the calling thread (only it: Linux) at `niceness`. Best effort: if the system
    refuses, nothing changes."""
    if niceness is None:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(niceness, 19))
    except OSError:
        pass


def _send(sock: _sockets.Socket, data: bytes) -> None:
    _sockets.send_all(sock, data, None, P.SEND_TIMEOUT)


def _send_quietly(sock: _sockets.Socket, data: bytes) -> None:
    try:
        _send(sock, data)
    except OSError:
        pass


def _refuse_now(sock: _sockets.Socket, text: str) -> None:
    """Answer a connection's hello with an error and hang up, without a thread (the
    reply is small and the socket new: it never blocks)."""
    try:
        sock.send(P.pack([0, False, ["error", text]]), _sockets.DONTWAIT)
    except OSError:
        pass
    _sockets.hang_up(sock)


def _text(text: str) -> str:
    return text if len(text) <= MAX_ERROR_TEXT else text[:MAX_ERROR_TEXT] + "..."


def _wire(exc: BaseException) -> list[str]:
    code, text = to_wire(exc)
    return [code, _text(text)]
