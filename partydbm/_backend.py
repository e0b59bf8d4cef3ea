"""LevelDB storage through plyvel; the only importer of a LevelDB binding.

Two bindings with the same API are accepted: plyvel-next (module `plyvel_next`, LevelDB
1.23, wheels for CPython 3.12+ on Linux, macOS and Windows) and plyvel 1.5.1 (wheels for
CPython up to 3.12 on Linux x86_64 only). pyproject.toml asks for exactly one of them
per interpreter. Where both are installed, plyvel_next is used, always: the choice
depends on nothing but what is installed. `plyvel` below is whichever was chosen.

Key layout: user keys live under the prefix b"k" (so user key K is stored as b"k"+K),
partydbm's own records under b"m". Users never see b"m" keys: every user-facing scan
is bounded to [b"k", b"l").

Records under b"m":
  b"ma" + client_id -> msgpack [rid, unix_time, kept]: the highest write rid of that
      follower client the database has applied, and the rids of its last few
      read-modify-writes whose outcomes are kept (below). Written in the same WriteBatch
      as the write itself: it survives a crash exactly when the write does.
  b"mo" + client_id + rid (8 bytes, big-endian) -> msgpack outcome of that
      read-modify-write (whether a delete found its key, the value a pop took...), so
      a request resent after failover answers as the original did. The fixed-size rid
      at the end keeps the keys of clients of different lengths apart.
  b"ms"             -> scratch key written with sync=True by sync().
"""

from __future__ import annotations

import errno
import importlib
import os
import stat
import time
from collections.abc import Iterable
from typing import Any

from ._errors import error
from ._protocol import pack, too_big, unpack

BINDINGS = ("plyvel_next", "plyvel")  # in the order of preference


def _binding() -> Any:
    """The first of BINDINGS that is installed. One that is installed but fails to
    import (a broken build) raises: quietly taking the other would hide it."""
    for name in BINDINGS:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    raise ModuleNotFoundError(
        "partydbm needs a LevelDB binding: pip install plyvel-next (Python 3.12+) or "
        "plyvel (Python 3.10, 3.11)", name=BINDINGS[-1])


plyvel = _binding()

USER = b"k"
USER_END = b"l"
APPLIED = b"ma"
OUTCOME = b"mo"
SYNC_KEY = b"ms"
APPLIED_TTL = 24 * 3600.0  # records older than this are pruned when a leader starts


class LockHeld(Exception):
    """Another process holds LevelDB's LOCK."""


class LockTainted(Exception):
    """This process inherited LevelDB's lock table through fork (docs/TRAPS.md, trap 2)."""


Range = tuple[bytes | None, bool, bytes | None, bool]  # (lo, lo_incl, hi, hi_incl), user keys


# What plyvel raises for a failed LevelDB operation (disk full, I/O error, corruption):
# the Store catches it and raises storage_error(exc).
StorageError = plyvel.Error

# Files of LevelDB's own that prove a database was stored here.
_DATA_SUFFIXES = (".ldb", ".sst", ".log")
REPAIR_HINT = "partydbm.repair(path) (the command `partydbm repair PATH`) may recover it"


def open_db(path: str) -> Backend:
    """Open the LevelDB at `path` (a directory that exists). Raises LockHeld/LockTainted,
    or error naming the cause (corruption, I/O, a missing CURRENT)."""
    try:
        db = plyvel.DB(path, create_if_missing=_is_new(path))
    except plyvel.IOError as exc:
        msg = exc.args[0] if exc.args else b""
        kind = lock_failure(msg) if isinstance(msg, bytes) else None
        if kind is not None:
            raise kind(path) from exc
        raise storage_error(exc, f"cannot open LevelDB at {path!r}") from exc
    except plyvel.Error as exc:
        raise storage_error(exc, f"cannot open LevelDB at {path!r}") from exc
    narrow_logs(path)
    return Backend(db)


# LevelDB (1.22 in plyvel's wheels, 1.23 in plyvel-next's) words a failed lock as
# "IO error: lock <path>/LOCK: <why>": its own table of this process's locks says
# "already held by process"; fcntl(F_SETLK) on a LOCK another process holds fails with
# EAGAIN, or EACCES where POSIX lets a system choose (strerror's text either way).
# Failing to open the LOCK file has no "lock " before the path, and is no lock failure.
_LOCK_PREFIX = b"IO error: lock "
_TAINTED = b": already held by process"
_HELD = tuple(b": " + os.strerror(e).encode() for e in (errno.EAGAIN, errno.EACCES))


def lock_failure(msg: bytes) -> type[LockHeld] | type[LockTainted] | None:
    """Which lock failure LevelDB's message for a failed open names, if any."""
    if not msg.startswith(_LOCK_PREFIX):
        return None
    if msg.endswith(_TAINTED):
        return LockTainted
    return LockHeld if msg.endswith(_HELD) else None


def narrow_logs(path: str) -> None:
    """LevelDB creates its info LOG with 0666 less the umask (its data files 0644, which
    the directory's bits keep no wider than the database's mode): make the LOGs no
    wider than the directory allows (its bits less x). Through an fd opened without
    following symlinks; a LOG of another user's stays as it is."""
    limit = os.stat(path).st_mode & 0o666
    for name in ("LOG", "LOG.old"):
        try:
            fd = os.open(os.path.join(path, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            bits = stat.S_IMODE(os.fstat(fd).st_mode)
            if bits & ~limit:
                os.fchmod(fd, bits & limit)
        except OSError:
            pass
        finally:
            os.close(fd)


def _is_new(path: str) -> bool:
    """Whether LevelDB may create a database at `path`. Not when CURRENT is missing but
    data files are there: LevelDB would then start an empty database and delete the
    tables it does not know, silently losing what was stored."""
    if os.path.exists(os.path.join(path, "CURRENT")):
        return False
    names = os.listdir(path)
    if any(n.endswith(_DATA_SUFFIXES) or n.startswith("MANIFEST-") for n in names):
        raise error(errno.EIO, f"LevelDB's CURRENT file is missing but the database holds "
                    f"data files; refusing to open it as a new database. {REPAIR_HINT}",
                    path)
    return True


def repair(path: str) -> None:
    """LevelDB's repair: rebuild the MANIFEST (and CURRENT) from the table and log files
    at `path`, keeping every record it can read. The caller must hold the LOCK and
    nobody may have the database open (LevelDB's repair takes no lock itself)."""
    try:
        plyvel.repair_db(path)
    except plyvel.Error as exc:
        raise storage_error(exc, f"cannot repair LevelDB at {path!r}") from exc
    narrow_logs(path)


def _text(exc: BaseException) -> str:
    arg = exc.args[0] if exc.args else ""
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)


_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
           errno.ENOENT, errno.EMFILE)


def storage_error(exc: BaseException, doing: str = "LevelDB failed") -> error:
    """A partydbm.error for a plyvel error, naming LevelDB's cause (and with the errno
    when LevelDB's text names one: a full disk is ENOSPC)."""
    text = _text(exc).replace(" descriptor", " descriptor (MANIFEST)")  # LevelDB's name
    code = next((c for c in _ERRNOS if os.strerror(c) in text), errno.EIO)
    hint = f" ({REPAIR_HINT})" if isinstance(exc, plyvel.CorruptionError) else ""
    return error(code, f"{doing}: {text}{hint}")


class Backend:
    """One open LevelDB: the key layout and what each operation reads and writes.
    Thread-safe as LevelDB is. Used only through a Store (_store.py), which serializes
    the writes to a key, never closes LevelDB under a call, and turns plyvel's errors
    (StorageError) into partydbm.error."""

    def __init__(self, db: Any) -> None:
        self._db = db
        # Bound methods looked up once: the Store's hot path calls them with USER + key.
        self._get = self.raw_get = db.get
        self.raw_put = db.put

    def get_many(self, keys: Iterable[bytes], max_bytes: int | None = None
                 ) -> list[bytes | None]:
        """Values of many user keys, all read from one snapshot. With `max_bytes`, an
        answer over that many value bytes raises partydbm.error (EFBIG) as soon as it
        is (the same big value asked for many times is a request for unbounded memory)."""
        out: list[bytes | None] = []
        total = 0
        snap = self._db.snapshot()
        try:
            get = snap.get
            for k in keys:
                value = get(USER + k)
                if max_bytes is not None and value is not None:
                    total += len(value)
                    if total > max_bytes:
                        raise too_big("a getmany answer", total, max_bytes,
                                      "MAX_BATCH_BYTES")
                out.append(value)
        finally:
            snap.close()
        return out

    # -- writes from followers: applied atomically with their dedup record ------------
    def applied(self, client: bytes) -> tuple[int, list[int], dict[int, Any]]:
        """(highest rid applied, rids whose outcomes are kept under their own keys,
        outcomes kept inline by records of an earlier format)."""
        raw = self._get(APPLIED + client)
        if raw is None:
            return 0, [], {}
        rid, _when, recent = unpack(raw)
        kept = [r for r in recent if type(r) is int]
        inline = {r[0]: r[1] for r in recent if type(r) is list and len(r) == 2}
        return int(rid), kept, inline

    def outcome(self, client: bytes, rid: int) -> tuple[bool, Any]:
        """(found, the outcome kept for that request)."""
        raw = self._get(_outcome_key(client, rid))
        return (False, None) if raw is None else (True, unpack(raw))

    @staticmethod
    def mark_ops(client: bytes, rid: int, kept: list[int], dropped: Iterable[int],
                 outcome: Any = None, keep: bool = False) -> list[tuple[bytes, bytes | None]]:
        """Raw records marking a follower's request `rid` applied: the client's record
        (with `kept`, the rids whose outcomes are kept), the outcome itself if `keep`,
        and deletes of the outcomes no longer kept."""
        ops: list[tuple[bytes, bytes | None]] = [
            (APPLIED + client, pack([rid, time.time(), kept]))]
        if keep:
            ops.append((_outcome_key(client, rid), pack(outcome)))
        ops.extend((_outcome_key(client, r), None) for r in dropped)
        return ops

    def write(
        self,
        ops: Iterable[tuple[bytes, bytes | None]],
        sync: bool = False,
        meta: Iterable[tuple[bytes, bytes | None]] = (),
    ) -> None:
        """Apply puts (value bytes) and deletes (value None) of user keys atomically,
        with `meta`: raw records of partydbm's own (mark_ops), in the same batch."""
        # Filled first, written last: if filling raises (a KeyboardInterrupt included),
        # nothing is written (cheaper than plyvel's transaction mode). LevelDB writes the
        # batch as one log record, so a process killed during write() leaves all of it
        # or none.
        wb = self._db.write_batch(sync=sync)
        for key, value in ops:
            if value is None:
                wb.delete(USER + key)
            else:
                wb.put(USER + key, value)
        for key, value in meta:
            if value is None:
                wb.delete(key)
            else:
                wb.put(key, value)
        wb.write()

    def clear_ops(self) -> list[tuple[bytes, bytes | None]]:
        """Deletes for every user key (one atomic batch: a replayed half-clear could
        delete keys others wrote in between)."""
        n = len(USER)
        return [(k[n:], None) for k in self._db.iterator(start=USER, stop=USER_END,
                                                         include_value=False)]

    def prune_applied(self, now: float | None = None) -> int:
        """Drop dedup records (and their outcomes) no retry can still need."""
        cutoff = (time.time() if now is None else now) - APPLIED_TTL
        n = len(APPLIED)
        stale = []
        for key, raw in self._db.iterator(prefix=APPLIED):
            _rid, when, recent = unpack(raw)
            if when < cutoff:
                stale.append(key)
                stale.extend(_outcome_key(key[n:], r) for r in recent if type(r) is int)
        if stale:
            with self._db.write_batch() as wb:
                for key in stale:
                    wb.delete(key)
        return len(stale)

    # -- whole-database operations ----------------------------------------------------
    def count(self) -> int:
        n = 0
        for _ in self._db.iterator(start=USER, stop=USER_END, include_value=False):
            n += 1
        return n

    def sync(self) -> None:
        self.raw_put(SYNC_KEY, b"", sync=True)

    def compact(self) -> None:
        self._db.compact_range()

    def stats(self) -> str | None:
        """LevelDB's own statistics (compactions, files per level), as text."""
        raw = self._db.get_property(b"leveldb.stats")
        return raw.decode("utf-8", "replace") if raw is not None else None

    def close(self) -> None:
        self._db.close()

    # -- range scans -------------------------------------------------------------------
    def scan(
        self, rng: Range, reverse: bool, keys_only: bool, limit: int, max_bytes: int
    ) -> tuple[list[bytes], bool]:
        """One page of a range scan: a flat list (keys, or key, value, key, value...)
        and whether more may follow. Stops after `limit` items or `max_bytes` bytes."""
        lo, lo_incl, hi, hi_incl = rng
        slo = USER + lo if lo is not None else USER
        shi = USER + hi if hi is not None else USER_END
        if hi is None:
            hi_incl = False
        if lo is None:
            lo_incl = True
        if shi < slo or (shi == slo and not (lo_incl and hi_incl)):
            return [], False
        if reverse:
            items = self._scan_reverse(slo, lo_incl, shi, hi_incl, keys_only)
        else:
            items = self._db.iterator(start=slo, stop=shi, include_start=lo_incl,
                                      include_stop=hi_incl, include_value=not keys_only)
        return _page(items, keys_only, limit, max_bytes)

    def _scan_reverse(
        self, lo: bytes, lo_incl: bool, hi: bytes, hi_incl: bool, keys_only: bool
    ) -> Iterable[Any]:
        # The reverse iterator() of plyvel 1.5.1 and plyvel-next 2.1.2 misses a one-key
        # range (docs/TRAPS.md, trap 3): walk a raw iterator backwards instead.
        it = self._db.raw_iterator()
        try:
            it.seek(hi)
            if not it.valid():
                it.seek_to_last()
            elif not (hi_incl and it.key() == hi):
                it.prev()
            while it.valid():
                key = it.key()
                if key < lo or (key == lo and not lo_incl):
                    return
                yield key if keys_only else (key, it.value())
                it.prev()
        finally:
            it.close()


def _outcome_key(client: bytes, rid: int) -> bytes:
    return OUTCOME + client + rid.to_bytes(8, "big")


def _page(items: Iterable[Any], keys_only: bool, limit: int, max_bytes: int
          ) -> tuple[list[bytes], bool]:
    out: list[bytes] = []
    size = 0
    n = 0
    cut = len(USER)
    try:
        if keys_only:
            for key in items:
                k = key[cut:]
                out.append(k)
                n += 1
                size += len(k) + 8
                if n >= limit or size >= max_bytes:
                    return out, True
        else:
            for key, value in items:
                k = key[cut:]
                out.append(k)
                out.append(value)
                n += 1
                size += len(k) + len(value) + 16
                if n >= limit or size >= max_bytes:
                    return out, True
        return out, False
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()
