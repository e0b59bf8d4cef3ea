"""Leader side: accept followers on the unix socket and serve their requests.

One daemon thread accepts; one daemon thread per follower connection reads requests,
applies them in arrival order and answers in the same order (so writes from one
follower are applied in the order it issued them). plyvel releases the GIL, so
connections are served in parallel with the leader's own threads.
"""

from __future__ import annotations

import os
import signal
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import _protocol as P
from . import _sockets
from ._backend import Backend
from ._election import remove_stale_socket
from ._errors import ProtocolError, to_wire

RECV_SIZE = 64 * 1024  # larger reads made glibc mmap/munmap per recv
RECENT_OUTCOMES = 64  # delete outcomes kept per follower for replayed deletes


@dataclass
class Peer:
    """Per-connection state: who the follower is and what of its writes is applied."""

    client: bytes | None = None
    applied: int = 0
    recent: dict[int, Any] = field(default_factory=dict)  # rid -> outcome, last deletes
    pid: int = 0
    uid: int = -1
    gid: int = -1
    groups: set[int] = field(default_factory=set)


def _crash_point() -> tuple[str, int] | None:
    """Test seam: PARTYDBM_CRASH_AT="point[:n]" SIGKILLs the leader at the n-th (default
    1st) passage through `point` (before_apply, after_apply, mid_scan)."""
    spec = os.environ.get("PARTYDBM_CRASH_AT")
    if not spec:
        return None
    point, _, n = spec.partition(":")
    return point, int(n or 1)


class Server:
    def __init__(self, backend: Backend, address: str | bytes, db_path: str) -> None:
        self.backend = backend
        self.address = address
        self.db_path = db_path
        self._lock = threading.Lock()
        self._conns: set[_sockets.Socket] = set()
        self._threads: set[threading.Thread] = set()
        self._listener: _sockets.Socket | None = None
        self._closing = False
        self.dispatcher = Dispatcher(backend)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Bind and serve. The caller holds the LOCK (only it may unlink and bind)."""
        remove_stale_socket(self.address)
        mode = stat.S_IMODE(os.stat(self.db_path).st_mode)
        self._listener = _sockets.listen(self.address, mode)
        t = threading.Thread(target=self._accept_loop, name="partydbm-accept", daemon=True)
        t.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, unlink the socket (still under the LOCK), hang up on every
        follower (they fail over) and wait for handlers to leave the backend."""
        with self._lock:
            self._closing = True
            listener, self._listener = self._listener, None
            conns = list(self._conns)
            threads = list(self._threads)
        if listener is not None:
            _sockets.hang_up(listener)
        remove_stale_socket(self.address)
        for sock in conns:
            _sockets.hang_up(sock)
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout)

    def forget_after_fork(self) -> None:
        """In a forked child: close our copies of the fds, end nothing for the parent."""
        if self._listener is not None:
            _sockets.drop(self._listener)
        for sock in self._conns:
            _sockets.drop(sock)
        self._listener = None
        self._conns = set()
        self._threads = set()

    def _accept_loop(self) -> None:
        while True:
            listener = self._listener
            if listener is None:
                return
            try:
                sock, _ = listener.accept()
            except OSError:
                if self._closing:
                    return
                continue
            with self._lock:
                if self._closing:
                    _sockets.hang_up(sock)
                    return
                t = threading.Thread(target=self._serve, args=(sock,),
                                     name="partydbm-serve", daemon=True)
                self._conns.add(sock)
                self._threads.add(t)
                t.start()  # under the lock: stop() must never see an unstarted thread

    # -- one follower --------------------------------------------------------------------
    def _serve(self, sock: _sockets.Socket) -> None:
        peer = Peer()
        decoder = P.Decoder()
        pack = P.packer()
        try:
            peer.pid, peer.uid, peer.gid = _sockets.peer_credentials(sock)
            if not self._may_access(peer):
                sock.sendall(P.pack([0, False, ["error",
                             f"uid {peer.uid} may not read and write {self.db_path!r}"]]))
                return
            while True:
                data = sock.recv(RECV_SIZE)
                if not data:
                    return
                decoder.feed(data)
                replies = [self._handle(peer, msg, pack) for msg in decoder.messages()]
                if replies:
                    sock.sendall(b"".join(replies))
        except P.DecodeError as exc:
            try:
                sock.sendall(P.pack([None, False, ["protocol", str(exc)]]))
            except OSError:
                pass
        except _ProtocolViolation as exc:
            try:
                sock.sendall(P.pack([exc.rid, False, ["protocol", str(exc)]]))
            except OSError:
                pass
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(sock)
                self._threads.discard(threading.current_thread())
            _sockets.hang_up(sock)

    def _may_access(self, peer: Peer) -> bool:
        """A follower may use the socket only if it could read and write the database
        files itself (the socket must not widen access)."""
        if peer.uid == 0 or peer.uid == os.geteuid():
            return True
        st = os.stat(self.db_path)
        if peer.uid == st.st_uid:
            bits = st.st_mode >> 6
        elif peer.gid == st.st_gid or st.st_gid in _groups_of(peer.uid):
            bits = st.st_mode >> 3
        else:
            bits = st.st_mode
        return bits & 0o7 == 0o7

    def _handle(self, peer: Peer, msg: Any, pack: Callable[[Any], bytes]) -> bytes:
        if not isinstance(msg, list) or len(msg) < 2 or not isinstance(msg[0], int):
            raise _ProtocolViolation(None, f"malformed request {msg!r:.80}")
        op, rid = msg[0], msg[1]
        if not isinstance(rid, int):
            raise _ProtocolViolation(None, f"malformed request id {rid!r:.40}")
        if peer.client is None:
            return self._hello(peer, rid, msg)
        try:
            return pack([rid, True, self.dispatcher.call(peer, op, rid, msg[2:])])
        except Exception as exc:
            return pack([rid, False, to_wire(exc)])

    def _hello(self, peer: Peer, rid: int, msg: list[Any]) -> bytes:
        if msg[0] != P.HELLO or len(msg) != 3 or not isinstance(msg[2], dict):
            raise _ProtocolViolation(rid, "the first message must be a hello")
        info = msg[2]
        if info.get("v") != P.VERSION:
            raise _ProtocolViolation(
                rid, f"protocol version {info.get('v')!r} not supported (leader speaks "
                f"{P.VERSION})")
        client = info.get("client")
        if not isinstance(client, bytes) or not client:
            raise _ProtocolViolation(rid, "hello without a client id")
        peer.client = client
        peer.applied, peer.recent = self.backend.applied(client)
        return P.pack([rid, True, {"v": P.VERSION, "pid": os.getpid()}])

class Dispatcher:
    """Applies one request to the backend: the table op -> operation, and the rule that a
    follower's write is applied at most once. Used by the server for every request and
    by a follower that becomes leader to replay its own unanswered requests."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._crash = _crash_point()
        self._passages: dict[str, int] = {}
        self._ops: dict[int, tuple[int, Callable[..., Any]]] = {
            P.GET: (1, lambda peer, rid, key: backend.get(key)),
            P.HAS: (1, lambda peer, rid, key: backend.get(key) is not None),
            P.GETMANY: (1, lambda peer, rid, keys: backend.get_many(keys)),
            P.LEN: (0, lambda peer, rid: backend.count()),
            P.SCAN: (8, self._scan),
            P.COMPACT: (0, lambda peer, rid: backend.compact()),
            P.SYNC: (0, lambda peer, rid: backend.sync()),
            P.PUT: (3, self._put),
            P.DELETE: (2, self._delete),
            P.CLEAR: (1, self._clear),
            P.BATCH: (2, self._batch),
        }

    def call(self, peer: Peer, op: int, rid: int, args: Any) -> Any:
        entry = self._ops.get(op)
        if entry is None:
            raise ProtocolError(f"unknown operation {op}")
        arity, fn = entry
        if len(args) != arity:
            raise ProtocolError(f"{P.OP_NAMES[op]} takes {arity} arguments")
        return fn(peer, rid, *args)

    # -- operations ----------------------------------------------------------------------
    def _seam(self, point: str) -> None:
        if self._crash is None or self._crash[0] != point:
            return
        n = self._passages[point] = self._passages.get(point, 0) + 1
        if n >= self._crash[1]:
            os.kill(os.getpid(), signal.SIGKILL)

    def _apply(self, peer: Peer, rid: int, ops: list[tuple[bytes, bytes | None]],
               sync: bool, result: Any = None) -> Any:
        assert peer.client is not None
        self._seam("before_apply")
        recent = peer.recent
        if result is not None:
            recent = {**recent, rid: result}
            while len(recent) > RECENT_OUTCOMES:
                del recent[min(recent)]
        self.backend.write(ops, bool(sync), (peer.client, rid, recent))
        peer.applied, peer.recent = rid, recent
        self._seam("after_apply")
        return result

    def _duplicate(self, peer: Peer, rid: int) -> bool:
        # A retried write the database already holds (the previous leader applied it
        # and died before answering): never apply it twice.
        return rid <= peer.applied

    def _put(self, peer: Peer, rid: int, key: bytes, value: bytes, sync: bool) -> None:
        if not self._duplicate(peer, rid):
            _check_bytes(key, value)
            self._apply(peer, rid, [(key, value)], sync)

    def _delete(self, peer: Peer, rid: int, key: bytes, sync: bool) -> bool:
        if self._duplicate(peer, rid):
            # Answer as the original did. Older than the last RECENT_OUTCOMES deletes
            # cannot still be in flight in practice; say it existed.
            return bool(peer.recent.get(rid, True))
        _check_bytes(key)
        existed = self.backend.get(key) is not None
        return bool(self._apply(peer, rid, [(key, None)] if existed else [], sync, existed))

    def _clear(self, peer: Peer, rid: int, sync: bool) -> None:
        if not self._duplicate(peer, rid):
            self._apply(peer, rid, self.backend.clear_ops(), sync)

    def _batch(self, peer: Peer, rid: int, flat: list[Any], sync: bool) -> None:
        if self._duplicate(peer, rid):
            return
        if not isinstance(flat, list) or len(flat) % 2:
            raise ProtocolError("batch wants a flat list of key, value pairs")
        ops = list(zip(flat[::2], flat[1::2], strict=True))
        for key, value in ops:
            _check_bytes(key) if value is None else _check_bytes(key, value)
        self._apply(peer, rid, ops, sync)

    def _scan(self, peer: Peer, rid: int, lo: bytes | None, lo_incl: bool,
              hi: bytes | None, hi_incl: bool, reverse: bool, keys_only: bool,
              limit: int, max_bytes: int) -> list[Any]:
        items, more = self.backend.scan((lo, bool(lo_incl), hi, bool(hi_incl)),
                                        bool(reverse), bool(keys_only), int(limit),
                                        int(max_bytes))
        self._seam("mid_scan")
        return [items, more]



class _ProtocolViolation(Exception):
    def __init__(self, rid: int | None, message: str) -> None:
        super().__init__(message)
        self.rid = rid


def _check_bytes(*items: Any) -> None:
    for item in items:
        if type(item) is not bytes:
            raise TypeError(f"keys and values must be bytes on the wire, not "
                            f"{type(item).__name__}")


def _groups_of(uid: int) -> set[int]:
    try:
        import pwd

        entry = pwd.getpwuid(uid)
        return set(os.getgrouplist(entry.pw_name, entry.pw_gid))
    except (KeyError, OSError):
        return set()


