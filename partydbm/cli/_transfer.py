"""Moving data in and out: dump/load (JSON lines) and import/export (stdlib dbm files).

Everything streams: reads go through range scans or the source's own key iteration,
writes go through update() (atomic batches bounded in items and bytes), so memory
stays flat whatever the size of the database.
"""

from __future__ import annotations

import contextlib
import dbm
import importlib
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from typing import IO, Any

from .._mapping import PartyDBM
from .._open import open as party_open
from .._open import whichdb as party_whichdb
from . import _formats as F
from ._errors import CliError

EXPORT_KINDS = ("dumb", "gnu", "ndbm", "sqlite3")


def write_all(db: PartyDBM, pairs: Iterable[tuple[bytes, bytes]], progress: F.Progress
              ) -> int:
    """Store `pairs` with db.update() (atomic chunks bounded in items and bytes);
    returns how many were stored. If reading `pairs` raises, every pair read before is
    stored (a load stops at a bad line with everything before it in the database,
    nothing after)."""
    def counted() -> Iterator[tuple[bytes, bytes]]:
        for pair in pairs:
            yield pair
            progress.update()

    try:
        db.update(counted())
    finally:
        progress.close()
    return progress.count


# -- dump / load -------------------------------------------------------------------------
def dump(db: PartyDBM, out: str | None) -> int:
    """Write every pair as a JSON line to `out` (None or "-": stdout). A file is written
    beside its final name and renamed into place only when complete."""
    progress = F.Progress("dump")
    if progress.enabled:
        progress.total = len(db)
    if out is None or out == "-":
        return _dump_to(db, sys.stdout.buffer, progress)
    directory = os.path.dirname(os.path.abspath(out))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".partydbm-dump-", dir=directory)
    except OSError as exc:
        raise CliError(f"cannot write {out}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            n = _dump_to(db, f, progress)
        os.chmod(tmp, 0o666 & ~_umask())
        try:
            os.replace(tmp, out)
        except OSError as exc:
            raise CliError(f"cannot write {out}: {exc.strerror or exc}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return n


def _dump_to(db: PartyDBM, f: IO[bytes], progress: F.Progress) -> int:
    n = 0
    try:
        for key, value in db.iterator():
            f.write(F.record(key, value).encode("utf-8") + b"\n")
            n += 1
            progress.update()
        f.flush()
    finally:
        progress.close()
    return n


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load(db: PartyDBM, source: str) -> int:
    """Store every record of a dump file (`-`: stdin). Keys already in the database are
    overwritten; others stay."""
    progress = F.Progress("load")
    if source == "-":
        return write_all(db, _records(sys.stdin.buffer, "<stdin>"), progress)
    with open(source, "rb") as f:
        if progress.enabled and os.path.isfile(source):
            progress.total_bytes = os.fstat(f.fileno()).st_size
        return write_all(db, _records(f, source, progress), progress)


def _records(f: IO[bytes], name: str, progress: F.Progress | None = None
             ) -> Iterator[tuple[bytes, bytes]]:
    for lineno, line in enumerate(f, 1):
        if progress is not None:
            progress.done_bytes += len(line)
        if not line.strip():
            continue
        try:
            yield F.parse_record(line)
        except F.FormatError as exc:
            raise CliError(f"{name}, line {lineno}: {exc} (every record before this line "
                           "was loaded, none after)") from None


# -- import / export ---------------------------------------------------------------------
def import_db(src: str, dest: str, merge: bool, timeout: float | None) -> tuple[int, str]:
    """Copy the database at `src` (anything dbm.open can read, a shelve file, or a
    partydbm database) into the partydbm database `dest`; (items copied, source kind)."""
    if _same_path(src, dest):
        raise CliError("source and destination are the same database")
    source, kind = _open_source(src, timeout)
    try:
        with party_open(dest, "c", timeout=timeout) as db:
            if not merge and db.firstkey() is not None:
                raise CliError(f"{dest} is not empty: add --merge to copy into it (keys "
                               f"in {src} replace the same keys; other keys stay)")
            progress = F.Progress(f"import {kind}")
            if progress.enabled:
                progress.total = len(source)
            return write_all(db, _source_items(source), progress), kind
    finally:
        source.close()


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _open_source(src: str, timeout: float | None) -> tuple[Any, str]:
    if party_whichdb(src) == "partydbm":
        return party_open(src, "r", timeout=timeout), "partydbm"
    kind = dbm.whichdb(src)
    if not kind:
        # dbm.dumb keeps NAME.dat and NAME.dir: accept either file's name for NAME.
        stem, ext = os.path.splitext(src)
        if ext in (".dat", ".dir", ".bak") and dbm.whichdb(stem) == "dbm.dumb":
            src, kind = stem, "dbm.dumb"
    if kind is None:
        raise CliError(f"no database at {src} (or it cannot be read)")
    if kind == "":
        raise CliError(f"{src} is not a database the dbm module recognises")
    try:
        return dbm.open(src, "r"), kind
    except dbm.error as exc:  # e.g. dbm.gnu files on a Python built without _gdbm
        raise CliError(f"cannot open {src} ({kind}): {exc}") from None


def _source_items(source: Any) -> Iterator[tuple[bytes, bytes]]:
    if isinstance(source, PartyDBM):
        yield from source.iterator()
        return
    for key in _source_keys(source):
        yield key, source[key]


def _source_keys(source: Any) -> Iterator[bytes]:
    if hasattr(source, "firstkey") and hasattr(source, "nextkey"):  # dbm.gnu: streams
        key = source.firstkey()
        while key is not None:
            yield key
            key = source.nextkey(key)
        return
    try:
        keys: Iterable[bytes] = iter(source)  # dbm.dumb, dbm.sqlite3 (a cursor)
    except TypeError:
        keys = source.keys()  # dbm.ndbm: no iteration
    yield from keys


def export_kind_module(kind: str) -> Any:
    """The stdlib module for an export kind; CliError if this Python lacks it."""
    try:
        return importlib.import_module(f"dbm.{kind}")
    except ImportError:
        raise CliError(f"dbm.{kind} is not available in this Python "
                       f"({sys.version.split()[0]}); available: "
                       f"{', '.join(available_kinds())}") from None


def available_kinds() -> list[str]:
    kinds = []
    for kind in EXPORT_KINDS:
        try:
            importlib.import_module(f"dbm.{kind}")
        except ImportError:
            continue
        kinds.append(kind)
    return kinds


def export_db(db: PartyDBM, dest: str, kind: str, overwrite: bool) -> int:
    """Copy every pair into a new standard dbm file at `dest`."""
    module = export_kind_module(kind)
    _check_export_target(dest, kind, overwrite)
    progress = F.Progress(f"export dbm.{kind}")
    if progress.enabled:
        progress.total = len(db)
    out = module.open(dest, "n")
    n = 0
    try:
        for key, value in db.iterator():
            out[key] = value
            n += 1
            progress.update()
    finally:
        progress.close()
        out.close()
    return n


def _check_export_target(dest: str, kind: str, overwrite: bool) -> None:
    if os.path.isdir(dest):
        raise CliError(f"{dest} is a directory")
    existing = dbm.whichdb(dest)
    if existing is None:
        return
    if existing == "":
        raise CliError(f"{dest} exists and is not a dbm database: not replacing it")
    if existing != f"dbm.{kind}":
        raise CliError(f"{dest} is a {existing} database: export with --kind "
                       f"{existing.removeprefix('dbm.')}, or remove it first")
    try:
        with dbm.open(dest, "r") as old:
            count = len(old)
    except dbm.error as exc:
        raise CliError(f"cannot read the existing {dest} ({existing}): {exc}") from None
    if count and not overwrite:
        raise CliError(f"{dest} is a {existing} database with {count} keys: add "
                       "--overwrite to replace it")
