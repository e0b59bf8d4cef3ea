"""open(), whichdb() and install(): paths, flags, creation."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from typing import Any, NoReturn

from . import _backend as B
from . import _registry
from ._cache import DEFAULT_SIZE as DEFAULT_CACHE_SIZE
from ._errors import BadFlagError, error
from ._mapping import PartyDBM

MARKER = "PARTYDBM"  # the file that makes a directory a partydbm database
MARKER_TEXT = b"partydbm database, format 1\n"
open_flags = "rwcnfsu"


def _parse_flag(flag: Any) -> tuple[str, bool]:
    if (not isinstance(flag, str) or not flag or flag[0] not in "rwcn"
            or any(c not in "fsu" for c in flag[1:])):
        raise BadFlagError(f"Flag must be one of 'r', 'w', 'c', or 'n', not {flag!r}")
    return flag[0], "s" in flag[1:]


def _is_db(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def whichdb(file: Any) -> str | None:
    """'partydbm' if `file` is a partydbm database, else None."""
    try:
        return "partydbm" if _is_db(os.fsdecode(os.fspath(file))) else None
    except (TypeError, ValueError):
        return None


def _create(path: str, mode: int) -> None:
    """Make `path` a partydbm database (several processes may race to do it)."""
    if os.path.isdir(path) and not _is_db(path):
        # Listed after the check: another process may have created the marker (and then
        # LevelDB's files) meanwhile. LevelDB's files only ever follow the marker, so a
        # listing without the marker but with other files is not a database of ours.
        names = set(os.listdir(path))
        if MARKER not in names and names - {"LOCK", "LOG"}:
            raise error(errno.EEXIST, "exists and is not a partydbm database", path)
    # Directories need x wherever the mode grants r, or nobody could open the files.
    os.makedirs(path, _dir_bits(mode), exist_ok=True)
    try:
        fd = os.open(os.path.join(path, MARKER), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                     mode & 0o666)
    except FileExistsError:
        return
    try:
        _narrow_dir(path, os.fstat(fd).st_mode)
        os.write(fd, MARKER_TEXT)
    finally:
        os.close(fd)


def _dir_bits(mode: int) -> int:
    return (mode | ((mode & 0o444) >> 2)) & 0o777


def _narrow_dir(path: str, marker_mode: int) -> None:
    """The directory is what keeps LevelDB's files (created 0644 less the umask, whatever
    `mode` says) no wider than `mode`: a directory that existed before (empty) loses the
    bits the marker (created with `mode` less the umask) did not get. Never widened."""
    st = os.stat(path)
    if st.st_uid != os.geteuid():
        return
    bits = stat.S_IMODE(st.st_mode)
    narrowed = bits & (_dir_bits(marker_mode & 0o666) | 0o7000)
    if narrowed != bits:
        os.chmod(path, narrowed)


def repair(file: str | os.PathLike[str]) -> None:
    """Repair a damaged database (a corrupt or missing CURRENT or MANIFEST, damaged
    tables) with LevelDB's repair, which keeps every record it can still read.

    Refuses with partydbm.error (EBUSY) while any process has the database open: it
    takes LevelDB's LOCK first, as a leader would, and repairs only while holding it.
    An engine that only lingers after its last close (its grace period) is closed here,
    or asked to let go in another process, first."""
    shown, path = _resolve(file)
    with _os_errors("repair", shown):
        if not _is_db(path):
            _no_db(path, shown)
        _registry.exclusively(path, lambda: B.repair(path))


def let_go(file: str | os.PathLike[str] | None = None) -> None:
    """Give the database at `file` (every database, if None) up now instead of at the end
    of its grace period: after the last handle of this process closes, its leader keeps
    LevelDB open, and a follower its connection, for a short while (README, "Opening per
    operation"). No effect while a handle of this process has it open."""
    _registry.let_go(None if file is None else _resolve(file)[1])


def _resolve(file: Any) -> tuple[Any, str]:
    """(the path as the caller gave it, for messages; its real path)."""
    shown = os.fspath(file)
    if not shown:
        raise error(errno.ENOENT, "an empty path names no database", shown)
    return shown, os.path.realpath(os.fsdecode(shown))


def _no_db(path: str, shown: Any) -> NoReturn:
    if os.path.exists(path):
        raise error(errno.EINVAL, "Not a partydbm database", shown)
    raise error(errno.ENOENT, "No such partydbm database", shown)


@contextlib.contextmanager
def _os_errors(doing: str, shown: Any) -> Iterator[None]:
    """Every OSError (permissions and the like) leaves as a partydbm.error."""
    try:
        yield
    except error:
        raise
    except OSError as exc:
        raise error(exc.errno, f"cannot {doing} partydbm database: "
                    f"{exc.strerror or exc}", shown) from exc


def open(file: Any, flag: str = "c", mode: int = 0o666, *, retry: bool = True,
         timeout: float | None = 10.0, cache_size: int = DEFAULT_CACHE_SIZE) -> PartyDBM:
    """Open (or create) the partydbm database at `file`; see the README.
    `cache_size`: bytes of reads a follower process may answer from its own cache (one
    per database and process: the largest any of its handles asks for); 0: this
    handle always reads from the leader."""
    return _opened(file, flag, mode, retry, timeout, False, cache_size)


def open_to_serve(file: Any, flag: str = "c", timeout: float | None = None) -> PartyDBM:
    """open() for a process whose only job is to serve the database (`partydbm serve`,
    the fork helper): when it leads, its serving threads keep its priority and never
    park, since no application thread of its own calls the database."""
    return _opened(file, flag, 0o666, True, timeout, True, DEFAULT_CACHE_SIZE)


def _opened(file: Any, flag: str, mode: int, retry: bool, timeout: float | None,
            serve_only: bool, cache_size: int) -> PartyDBM:
    kind, sync = _parse_flag(flag)
    shown, path = _resolve(file)
    if timeout is not None and timeout < 0:
        raise ValueError("timeout must be None or >= 0")
    if type(cache_size) is not int or cache_size < 0:
        raise ValueError(f"cache_size must be an int >= 0, not {cache_size!r}")
    with _os_errors("open", shown):
        return _open(path, shown, kind, sync, mode, retry, timeout, serve_only, cache_size)


def _open(path: str, shown: Any, kind: str, sync: bool, mode: int, retry: bool,
          timeout: float | None, serve_only: bool, cache_size: int) -> PartyDBM:
    if not _is_db(path):
        if kind in "rw":
            _no_db(path, shown)
        if os.path.lexists(path) and not os.path.isdir(path):
            if kind != "n":
                raise error(errno.EEXIST, "exists and is not a partydbm database", shown)
            os.unlink(path)  # 'n' replaces a plain file
        _create(path, mode)
    engine = _registry.acquire(path, timeout, serve_only, cache_size)
    db = PartyDBM(engine, path, readonly=kind == "r", sync=sync, retry=retry,
                  timeout=timeout, cached=cache_size > 0)
    if kind == "n":
        try:
            db.clear()
        except BaseException:
            db.close()
            raise
    return db


_installed: dict[str, Any] = {}


def install() -> None:
    """Make dbm.open(), dbm.whichdb() and shelve.open() know partydbm databases, and
    create new databases as partydbm. Opt-in and idempotent; uninstall() undoes it."""
    import dbm
    import sys

    if _installed:
        return
    module = sys.modules[__package__ or "partydbm"]
    original = dbm.whichdb

    def patched_whichdb(filename: Any) -> str | None:
        if whichdb(filename) == "partydbm":
            return "partydbm"
        return original(filename)

    if dbm._defaultmod is None:  # type: ignore[attr-defined]
        # dbm.open() fills dbm._modules with the stdlib backends only while _defaultmod
        # is None; do it first, or dbm.open() could no longer open dumb/gnu/sqlite3 files.
        import importlib

        for name in dbm._names:  # type: ignore[attr-defined]
            try:
                dbm._modules[name] = importlib.import_module(name)  # type: ignore[attr-defined]
            except ImportError:
                continue
    _installed.update(whichdb=original, defaultmod=dbm._defaultmod)  # type: ignore[attr-defined]
    dbm.whichdb = patched_whichdb
    dbm._modules["partydbm"] = module  # type: ignore[attr-defined]
    dbm._defaultmod = module  # type: ignore[attr-defined]


def uninstall() -> None:
    """Undo install()."""
    import dbm

    if not _installed:
        return
    dbm.whichdb = _installed["whichdb"]
    dbm._defaultmod = _installed["defaultmod"]  # type: ignore[attr-defined]
    dbm._modules.pop("partydbm", None)  # type: ignore[attr-defined]
    _installed.clear()
