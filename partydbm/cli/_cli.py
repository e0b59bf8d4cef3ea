"""The `partydbm` command line (also `python -m partydbm`).

Every subcommand opens the database as any process does, so it works while other
processes have it open: it leads if nobody does, else it follows. Exit codes: 0 ok,
1 failure, 2 usage. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import dbm
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from .._election import shown_address
from .._engine import Engine
from .._errors import error
from .._mapping import PartyDBM
from .._open import open as party_open
from .._open import repair
from . import _formats as F
from . import _transfer as T
from ._errors import CliError, UsageError

DB_HELP = "the partydbm database (a directory)"


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"partydbm {args.command}"
    try:
        return int(args.run(args) or 0)
    except UsageError as exc:
        return _fail(prog, f"error: {exc} (see {prog} --help)", 2)
    except BrokenPipeError:
        # The reader went away (`partydbm keys db | head`): stop quietly. Point stdout at
        # /dev/null so the interpreter's final flush does not complain again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return _fail(prog, "interrupted", 130)
    except (CliError, error, OSError, KeyError, ValueError, *dbm.error) as exc:
        return _fail(prog, describe(exc), 1)
    except Exception as exc:  # a bug: still no traceback for the user, but say so
        return _fail(prog, f"internal error: {type(exc).__name__}: {exc}", 1)


def _fail(prog: str, message: str, code: int) -> int:
    try:
        sys.stdout.flush()  # what was printed before the error comes before it
    except OSError:
        pass
    print(f"{prog}: {message}".replace("\n", " "), file=sys.stderr, flush=True)
    return code


def describe(exc: BaseException) -> str:
    """One readable line for an exception (no "[Errno 2]" noise)."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{os.fsdecode(exc.filename)}: " if exc.filename is not None else ""
        return f"{where}{exc.strerror}"
    if isinstance(exc, KeyError):
        return f"no such key: {exc.args[0] if exc.args else ''}"
    text = str(exc) or type(exc).__name__
    if isinstance(exc, (CliError, error, ValueError)):
        return text
    return f"{type(exc).__name__}: {text}"


# -- the parser ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="partydbm", description="A dbm database many processes can open at "
                 "once. Every command joins the database as one more process: it leads "
                 "if nobody does, else it follows the leader.")
    ap.add_argument("--version", action="version", version=f"partydbm {_version()}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND",
                            parser_class=_Parser)
    common = _Parser(add_help=False)
    common.add_argument("--timeout", type=seconds, default=10.0, metavar="SECONDS",
                        help="how long to wait for a leader (default 10; 'none': forever)")
    fmt = _Parser(add_help=False)
    fmt.add_argument("-f", "--format", choices=F.FORMATS, default="text",
                     help="how keys and values are printed and how KEY/VALUE arguments "
                     "are read: text (UTF-8, \\\\ and \\xNN escapes; default), hex, "
                     'base64, json (a JSON string, or {"base64": ...} for non-UTF-8)')

    def add(name: str, run: Callable[[argparse.Namespace], int], help: str,
            parents: Sequence[_Parser] = (common,)) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help,
                                                    parents=list(parents))
        p.set_defaults(run=run)
        return p

    p = add("info", cmd_info, "show who leads, the socket, key count, size and LevelDB stats")
    p.add_argument("path", metavar="PATH", help=DB_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = add("get", cmd_get, "print the value of KEY (exit 1 if missing)", (common, fmt))
    p.add_argument("path", metavar="PATH", help=DB_HELP)
    p.add_argument("key", metavar="KEY")
    p = add("set", cmd_set, "store VALUE under KEY (creates the database if missing)",
            (common, fmt))
    p.add_argument("path", metavar="PATH", help=DB_HELP)
    p.add_argument("key", metavar="KEY")
    p.add_argument("value", metavar="VALUE")
    p = add("delete", cmd_delete, "delete KEY (exit 1 if missing)", (common, fmt))
    p.add_argument("path", metavar="PATH", help=DB_HELP)
    p.add_argument("key", metavar="KEY")

    for name, run, what in (("keys", cmd_keys, "keys, one per line"),
                            ("items", cmd_items, "keys and values, tab-separated per line "
                             "(JSON lines with --format json)")):
        p = add(name, run, f"print {what}, in key order", (common, fmt))
        p.add_argument("path", metavar="PATH", help=DB_HELP)
        p.add_argument("--prefix", help="only keys starting with PREFIX")
        p.add_argument("--start", help="first key (inclusive)")
        p.add_argument("--stop", help="end key (exclusive)")
        p.add_argument("--reverse", action="store_true", help="descending key order")
        p.add_argument("--limit", type=count, metavar="N", help="at most N lines")

    p = add("dump", cmd_dump, "write every key and value as JSON lines "
            '({"key": ..., "value": ...}) to stdout or FILE')
    p.add_argument("path", metavar="PATH", help=DB_HELP)
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE (replaced only "
                   "once complete) instead of stdout")
    p = add("load", cmd_load, "store every record of a dump file (FILE '-': stdin); keys "
            "already present are overwritten, others stay (creates the database)")
    p.add_argument("path", metavar="PATH", help=DB_HELP)
    p.add_argument("file", metavar="FILE", help="a dump file, or - for stdin")

    p = add("import", cmd_import, "copy a dbm file (dbm.dumb, dbm.gnu, dbm.ndbm, "
            "dbm.sqlite3 as this Python has them), a shelve file or another partydbm "
            "database into the partydbm database DEST")
    p.add_argument("src", metavar="SRC", help="a dbm or shelve file (its name as given to "
                   "dbm.open), or a partydbm database")
    p.add_argument("dest", metavar="DEST", help="the partydbm database to copy into")
    p.add_argument("--merge", action="store_true", help="copy into a non-empty DEST "
                   "(same keys are replaced, others stay); refused without it")
    p = add("export", cmd_export, "copy the database into a new standard dbm file DEST")
    p.add_argument("path", metavar="PATH", help=DB_HELP)
    p.add_argument("dest", metavar="DEST", help="the dbm file to create (its name as given "
                   "to dbm.open)")
    p.add_argument("--kind", choices=T.EXPORT_KINDS, default="dumb",
                   help="the dbm module to write with (default: dumb, in every Python)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty DEST of the same kind; refused without it")

    p = add("compact", cmd_compact, "compact the database (LevelDB compaction)")
    p.add_argument("path", metavar="PATH", help=DB_HELP)
    p = add("repair", cmd_repair, "repair a damaged database with LevelDB's repair (keeps "
            "every record it can still read); refused while any process has it open")
    p.add_argument("path", metavar="PATH", help=DB_HELP)
    p = add("serve", cmd_serve, "stay open as a dedicated leader until SIGINT/SIGTERM "
            "(waits as a follower, and takes over, if another process leads)")
    p.add_argument("path", metavar="PATH", help=DB_HELP)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log followers connecting and leaving")
    p = add("demo", cmd_demo, "a live demonstration: writers and a reader on one "
            "database while the leader is SIGKILLed; ends with PASS or FAIL", ())
    p.add_argument("path", nargs="?", metavar="PATH", help="a new or empty database "
                   "(default: a temporary one, removed afterwards)")
    p.add_argument("--short", action="store_true", help="a few seconds (for CI)")
    return ap


def _version() -> str:
    from .. import __version__
    return __version__


def seconds(text: str) -> float | None:
    if text.lower() == "none":
        return None
    value = float(text)
    if value < 0:
        raise ValueError(text)
    return value


def count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _arg(args: argparse.Namespace, text: str) -> bytes:
    try:
        return F.parse(text, args.format)
    except F.FormatError as exc:
        raise UsageError(str(exc)) from None


def _open(args: argparse.Namespace, flag: str, path: str | None = None) -> PartyDBM:
    return party_open(args.path if path is None else path, flag, timeout=args.timeout)


def _out(lines: Iterator[str]) -> None:
    out = sys.stdout.buffer
    for line in lines:
        out.write(line.encode("utf-8", "surrogateescape") + b"\n")
    out.flush()


# -- one key ---------------------------------------------------------------------------
def cmd_get(args: argparse.Namespace) -> int:
    key = _arg(args, args.key)
    with _open(args, "r") as db:
        value = db.get(key)
    if value is None:
        raise CliError(f"no such key: {F.show(key, args.format)}")
    _out(iter([F.show(value, args.format)]))
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    key, value = _arg(args, args.key), _arg(args, args.value)
    with _open(args, "c") as db:
        db[key] = value
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    key = _arg(args, args.key)
    with _open(args, "w") as db:
        try:
            del db[key]
        except KeyError:
            raise CliError(f"no such key: {F.show(key, args.format)}") from None
    return 0


# -- ranges ----------------------------------------------------------------------------
def _scan(args: argparse.Namespace, db: PartyDBM, include_value: bool) -> Iterator[Any]:
    if args.prefix is not None and (args.start is not None or args.stop is not None):
        raise UsageError("--prefix cannot be combined with --start or --stop")
    prefix, start, stop = (None if text is None else _arg(args, text)
                           for text in (args.prefix, args.start, args.stop))
    it = db.iterator(prefix=prefix, start=start, stop=stop, reverse=args.reverse,
                     include_value=include_value)
    return it if args.limit is None else itertools.islice(it, args.limit)


def cmd_keys(args: argparse.Namespace) -> int:
    with _open(args, "r") as db:
        _out(F.show(key, args.format) for key in _scan(args, db, False))
    return 0


def cmd_items(args: argparse.Namespace) -> int:
    fmt = args.format
    with _open(args, "r") as db:
        if fmt == "json":
            _out(F.record(k, v) for k, v in _scan(args, db, True))
        else:
            # Tab is safe as a separator: no format prints a tab inside a key.
            _out(f"{F.show(k, fmt)}\t{F.show(v, fmt)}" for k, v in _scan(args, db, True))
    return 0


# -- whole database ----------------------------------------------------------------------
def cmd_dump(args: argparse.Namespace) -> int:
    with _open(args, "r") as db:
        T.dump(db, args.output)
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    with _open(args, "c") as db:
        n = T.load(db, args.file)
    print(f"loaded {n} records into {args.path}", file=sys.stderr)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    n, kind = T.import_db(args.src, args.dest, args.merge, args.timeout)
    print(f"imported {n} items from {args.src} ({kind}) into {args.dest}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    T.export_kind_module(args.kind)  # fail before opening anything
    with _open(args, "r") as db:
        n = T.export_db(db, args.dest, args.kind, args.overwrite)
    print(f"exported {n} items from {args.path} to {args.dest} (dbm.{args.kind})",
          file=sys.stderr)
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    with _open(args, "w") as db:
        before = disk_usage(db.name)
        db.reorganize()
        after = disk_usage(db.name)
    print(f"compacted {args.path}: {F.human_size(before)} -> {F.human_size(after)}")
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    repair(args.path)
    with _open(args, "r") as db:
        n = len(db)
    print(f"repaired {args.path}: {n} keys readable")
    return 0


def disk_usage(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # LevelDB removed an old file meanwhile
                continue
    return total


# -- info --------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    with _open(args, "r") as db:
        facts = info(db)
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    leader_pid = facts["leader_pid"]
    if facts["role"] == "leader":
        role = "leader (no other process had it open: this command led it while it ran)"
        who = f"{leader_pid} (this command)"
    else:
        role = "follower (another process leads)"
        who = str(leader_pid)
    rows = [("path", facts["path"]), ("role of a new opener", role), ("leader pid", who),
            ("socket", facts["socket"]), ("keys", f"{facts['keys']:,}"),
            ("size on disk", f"{F.human_size(facts['size_bytes'])} "
                             f"({facts['size_bytes']:,} bytes)")]
    for name, value in rows:
        print(f"{name + ':':22}{value}")
    stats = facts["leveldb_stats"]
    if stats is None:
        print(f"{'leveldb stats:':22}n/a (held by leader pid {leader_pid}; LevelDB's own "
              "stats are only readable in the process that leads)")
    else:
        print("leveldb stats:")
        print("  " + stats.strip().replace("\n", "\n  "))
    return 0


def info(db: PartyDBM) -> dict[str, Any]:
    engine = db._engine
    assert isinstance(engine, Engine)
    address = engine.address
    stats = engine.stats()
    return {
        "path": db.name,
        "role": "leader" if db.is_leader else "follower",
        "leader_pid": engine.leader_pid,
        "socket": shown_address(engine.path, address),
        "keys": len(db),
        "size_bytes": disk_usage(db.name),
        "leveldb_stats": stats,
    }


# -- serve and demo --------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from ._serve import serve
    return serve(args.path, args.timeout, args.verbose)


def cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run
    return run(args.path, args.short)
