"""Leader side: accept followers on the unix socket and serve their requests.

One daemon thread accepts; one daemon thread per follower connection reads requests,
applies them in arrival order and answers in the same order (so writes from one
follower are applied in the order it issued them). plyvel releases the GIL, so
connections are served in parallel with the leader's own threads.

While the application keeps calling the database, its own thread answers the small
requests that have arrived on its way in, and the serving threads park (_passing.py).

A follower is a process of somebody else's, so nothing it sends may hurt the leader or
the other followers: frames are bounded (see the limits in _protocol), a request the
leader cannot accept gets an error reply and ends the connection, a half message
followed by silence ends it after MESSAGE_TIMEOUT, a follower that stops reading its
replies is dropped after SEND_TIMEOUT, and every handler thread catches what it raises.
Each connection has its own thread, so a stalled one only ever stalls itself.

The serving threads run below the application's own threads (SERVE_NICENESS) when the
process may use more than one CPU (not in a process that only serves: `serve_only`).
Serving needs the GIL several times a request (the
read, the LevelDB call and the reply each release it); a serving thread woken on the
CPU where the application's thread runs used to preempt it while it held the GIL, and
both then waited for each other's wake-ups (the convoy effect). A niced serving thread
does not preempt it and moves to another CPU instead, so on 2 CPUs followers are served
as fast as before while the leader's own operations stop collapsing (bench/: 4 busy
processes, README). On a single CPU there is nowhere else to go: there a niced server
would get a tenth of the CPU against a busy application, so it keeps its priority.

Lock order: a connection's `lock` before the server's `_lock` (and _passing's order).
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from . import _protocol as P
from . import _sockets
from ._dispatch import Dispatcher, Peer, brief
from ._election import may_access, remove_own_socket, remove_stale_socket, socket_identity
from ._errors import ProtocolError, to_wire
from ._passing import RECV_SIZE, Conn, Passing
from ._store import Store

FLUSH_BYTES = 256 * 1024  # replies to one read are sent in pieces of about this much
MAX_ERROR_TEXT = 4096  # characters of an error message sent to a follower
ACCEPT_BACKOFF = 0.05  # seconds between accept() attempts while out of fds or threads
FD_SPARE = 64  # fds a leader keeps free (raising its soft limit) for LevelDB and the app
SERVE_NICENESS = 10
"""How much nicer the serving threads run than the thread that takes the lead (Linux:
niceness is per thread; only with 2 CPUs or more)."""

Observer = Callable[[str, int, int], None]  # (event, follower pid, followers connected)


class Server:
    def __init__(self, store: Store, address: str, db_path: str,
                 observer: Observer | None = None, serve_only: bool = False) -> None:
        """`serve_only`: this process only serves (`partydbm serve`, the fork helper):
        nothing in it polls, so its serving threads never park, and none of them give
        way to an application thread."""
        self.store = store
        # Told "connected"/"left" for each follower that passed the access check (from the
        # connection's thread, outside the server's lock); it must not block.
        self.observer = observer
        self.address = address
        self.db_path = db_path
        self._lock = threading.Lock()  # _conns, _threads, _listener, _closing
        self._conns: set[_sockets.Socket] = set()
        self._threads: set[threading.Thread] = set()
        self._listener: _sockets.Socket | None = None
        self._bound: tuple[int, int] | None = None  # the socket file bound (socket_identity)
        self._closing = False
        self.dispatcher = Dispatcher(store)
        self.niceness = None if serve_only else _serving_niceness()
        self.passing = Passing(self._handle, enabled=not serve_only, name=db_path)
        # Asked by a RELEASE: whether the process lets go of the database, as what ends
        # its engine's grace period (None: it will not). Run once the reply is sent: the
        # close hangs up on every follower, the one asking included.
        self.let_go: Callable[[], Callable[[], None] | None] | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Bind and serve. The caller holds the LOCK (only it may unlink and bind)."""
        remove_stale_socket(self.address)
        mode = stat.S_IMODE(os.stat(self.db_path).st_mode)
        self._listener = _sockets.listen(self.address, mode)
        self._bound = socket_identity(self.address)
        threading.Thread(target=self._accept_loop, name=f"partydbm-accept {self.db_path}",
                         daemon=True).start()
        self.passing.start()

    def stop(self) -> None:
        """Stop accepting, unlink the socket (still under the LOCK), hang up on every
        follower (they fail over) and wait for every handler to leave the database.

        The wait has no timeout on purpose: after the hang-ups a handler can only still
        be inside a LevelDB call (a large batch on a slow disk), and the Store would wait
        for it anyway before closing LevelDB under it."""
        with self._lock:
            self._closing = True
            listener, self._listener = self._listener, None
            conns = list(self._conns)
            threads = list(self._threads)
        if listener is not None:
            _sockets.hang_up(listener)
        remove_own_socket(self.address, self._bound)
        for sock in conns:
            _sockets.hang_up(sock)
        self.passing.stop()
        for t in threads:
            if t is not threading.current_thread():
                t.join()

    def forget_after_fork(self) -> None:
        """In a forked child: close our copies of the fds, end nothing for the parent."""
        if self._listener is not None:
            _sockets.drop_accepted(self._listener)
            _sockets.drop(self._listener)
        for sock in self._conns:
            _sockets.drop(sock)
        self.passing.forget_after_fork()
        self._listener = None
        self._conns = set()
        self._threads = set()

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
                # The connection waits in the backlog. Out of this process's quota of fds,
                # take more (a crowd of followers must not wait for fds that may never
                # come back); at the hard limit, or short of anything else, retrying at
                # once would spin a core until some handler gives its fd back.
                if exc.errno == errno.EMFILE and _sockets.more_files(None, FD_SPARE):
                    continue
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    time.sleep(ACCEPT_BACKOFF)
                continue
            # Connections must never take the fds LevelDB needs (it keeps the error of a
            # compaction that could not create its file and fails every later write
            # with it): keep FD_SPARE of them free.
            _sockets.more_files(sock.fileno(), FD_SPARE)
            while not self._hand_over(sock):
                time.sleep(ACCEPT_BACKOFF)  # no thread to be had: the follower waits

    def _hand_over(self, sock: _sockets.Socket) -> bool:
        """Start the thread that serves `sock` (or turn it away). False if the system
        would not start a thread now (a limit on tasks: try again later)."""
        with self._lock:
            if self._closing:
                _sockets.hang_up(sock)
                return True
            if len(self._conns) >= P.MAX_CONNECTIONS:
                _refuse_now(sock, f"the partydbm leader serves {len(self._conns)} "
                            "followers already (partydbm._protocol.MAX_CONNECTIONS)")
                return True
            t = threading.Thread(target=self._serve, args=(sock,), daemon=True,
                                 name=f"partydbm-serve fd {sock.fileno()} {self.db_path}")
            self._conns.add(sock)
            self._threads.add(t)
            try:
                t.start()  # under the lock: stop() must never see an unstarted thread
            except RuntimeError:  # "can't start new thread"; on 3.12+ also once the
                # interpreter exits: then a later try finds the server stopped (atexit)
                # and hangs up, or the exit itself ends the connection
                self._conns.discard(sock)
                self._threads.discard(t)
                return False
            return True

    # -- one follower --------------------------------------------------------------------
    def _serve(self, sock: _sockets.Socket) -> None:
        conn = Conn(sock)
        peer = conn.peer
        passing = self.passing
        observed = False
        try:
            _sockets.serve_options(sock)
            peer.pid, peer.uid, peer.gid, peer.groups = _sockets.peer_credentials(sock)
            # Unique while it runs (as the fd is): py-spy and threading show whom it serves.
            threading.current_thread().name = (
                f"partydbm-serve pid {peer.pid} fd {sock.fileno()} {self.db_path}")
            if not may_access(self.db_path, peer.uid, peer.gid, peer.groups):
                _send(sock, P.pack([0, False, ["error",
                      f"uid {peer.uid} may not read and write {self.db_path!r}"]]))
                return
            observed = self._notify("connected", peer.pid)
            passing.watch(conn)
            while True:
                with conn.lock:
                    if conn.left() and not self._catch_up(conn):  # left by poll()
                        break
                    if not self._serve_some(conn):
                        break
                # Park between messages only: the rest of a message in pieces, and its
                # MESSAGE_TIMEOUT, are this thread's to wait for.
                if passing.should_park(conn):
                    passing.park(conn)
        except OSError:
            pass  # the follower left, or stopped reading its replies (TimeoutError)
        except Exception as exc:  # a bug of ours: tell the follower, keep the leader up
            _send_quietly(sock, P.pack([None, False, _wire(exc)]))
        finally:
            if peer.attached:
                self.store.publisher.detach()
            with conn.lock:
                conn.end = True
                passing.unwatch(conn)  # before the hang-up frees the fd number
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

    def _serve_some(self, conn: Conn) -> bool:
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

    def _catch_up(self, conn: Conn) -> bool:
        """Finish what an application thread left for this connection's own thread.
        False when the connection is over."""
        if conn.outbox:
            out, conn.outbox = conn.outbox, b""
            _send(conn.sock, out)
        if conn.msgs or conn.bad is not None:
            msgs, bad, conn.msgs, conn.bad = conn.msgs, conn.bad, [], None
            return self._answer(conn, msgs, bad)
        return not conn.end

    def _answer(self, conn: Conn, msgs: list[Any], bad: P.DecodeError | None) -> bool:
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
        if conn.peer.after_reply is not None:
            then, conn.peer.after_reply = conn.peer.after_reply, None
            then()
        return bad is None

    def _handle(self, peer: Peer, msg: Any, pack: Callable[[Any], bytes]
                ) -> tuple[bytes, bool]:
        """The reply to one request, and whether the connection must end after it (the
        request broke the protocol: whatever follows cannot be trusted)."""
        if (type(msg) is list and len(msg) == 3 and type(msg[0]) is int and msg[0] == P.GET
                and type(msg[1]) is int and type(msg[2]) is bytes and peer.client is not None):
            # Most requests are one get: answered without the general dispatch (the
            # leader's GIL is what every follower and the application queue for).
            try:
                return pack([msg[1], True, self.store.get(msg[2])]), False
            except Exception as exc:
                return pack([msg[1], False, _wire(exc)]), False
        if (type(msg) is not list or len(msg) < 2 or type(msg[0]) is not int
                or type(msg[1]) is not int):
            rid = msg[1] if type(msg) is list and len(msg) > 1 and type(msg[1]) is int else None
            return pack([rid, False, ["protocol", f"malformed request {brief(msg)}"]]), True
        op, rid = msg[0], msg[1]
        if peer.client is None:
            return self._hello(peer, rid, msg, pack)
        if op == P.RELEASE:
            peer.after_reply = self.let_go() if self.let_go is not None else None
            return pack([rid, True, peer.after_reply is not None]), False
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
        peer.load(self.store, client)
        epoch = None
        if info.get("ring") is True and not peer.attached:
            epoch = self.store.publisher.attach()
            peer.attached = epoch is not None
        return pack([rid, True, {"v": P.VERSION, "pid": os.getpid(), "ring": epoch}]), False


PER_THREAD_NICENESS = sys.platform.startswith("linux") and hasattr(os, "setpriority")
"""Whether setpriority() on a native thread id sets that thread's niceness (Linux). On
macOS and the BSDs that id is no pid, and a process has one niceness for all its
threads: there the serving threads keep the application's priority."""


def _serving_niceness() -> int | None:
    """The niceness for this process's serving threads: SERVE_NICENESS above the calling
    thread's, or None (leave them as they are) on one CPU or where it cannot be known."""
    if not PER_THREAD_NICENESS:
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


def _wire(exc: BaseException) -> list[Any]:
    wire = to_wire(exc)
    wire[1] = _text(wire[1])
    return wire
