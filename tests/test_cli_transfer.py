"""The `partydbm` command line, called in-process: dump, load, import and export.

Most tests run twice: the command leading the database, and following a Holder process.
"""

from __future__ import annotations

import dbm
import dbm.dumb
import importlib
import json
import os
import re
import shelve
import sys
from pathlib import Path
from typing import Any

import pytest

import partydbm
from partydbm.cli import _formats as F

from .cli_run import contents, fails, fill, ok, with_tty_stderr

# -- dump / load -----------------------------------------------------------------------------------
BINARY = {b"": b"empty key", b"\x00\xff": b"\x80\x81", b"text": "ünïcode ✓".encode(),
          b"nl\n": b"tab\t", **{b"bulk%05d" % i: os.urandom(i % 50) for i in range(9000)}}


def test_dump_and_load_round_trip_any_bytes(dbpath: Path, tmp_path: Path) -> None:
    fill(dbpath, BINARY)
    out = ok("dump", dbpath).stdout
    lines = out.decode().splitlines()
    assert len(lines) == len(BINARY)
    assert json.loads(lines[0]) == {"key": "", "value": "empty key"}
    assert json.loads(lines[1]) == {"key": {"base64": "AP8="}, "value": {"base64": "gIE="}}
    ok("dump", dbpath, "-o", tmp_path / "d.jsonl")
    assert (tmp_path / "d.jsonl").read_bytes() == out
    ok("load", tmp_path / "copy", tmp_path / "d.jsonl")  # creates the database
    assert contents(tmp_path / "copy") == BINARY
    ok("load", tmp_path / "piped", "-", input=out)
    assert contents(tmp_path / "piped") == BINARY


def test_load_into_a_database_another_process_leads(dbpath: Path, tmp_path: Path) -> None:
    fill(dbpath, {b"keep": b"1", b"text": b"old"})
    dump = b"".join(F.record(k, v).encode() + b"\n" for k, v in BINARY.items())
    (tmp_path / "d.jsonl").write_bytes(dump)
    r = ok("load", dbpath, tmp_path / "d.jsonl")
    assert r.stderr.decode().strip() == f"loaded {len(BINARY)} records into {dbpath}"
    assert contents(dbpath) == {**BINARY, b"keep": b"1"}


def test_load_stops_at_a_bad_line_with_everything_before_it_loaded(tmp_path: Path) -> None:
    good = [F.record(b"k%05d" % i, b"v") for i in range(5000)]
    text = "\n".join([*good, "", '{"key": "x", "value": 3}', F.record(b"after", b"v")])
    (tmp_path / "d.jsonl").write_text(text)
    fails(1, "load", tmp_path / "db", tmp_path / "d.jsonl", says="line 5002")
    assert contents(tmp_path / "db") == {b"k%05d" % i: b"v" for i in range(5000)}


def test_progress_only_when_stderr_is_a_terminal(tmp_path: Path) -> None:
    fill(tmp_path / "db", BINARY)
    piped = ok("dump", tmp_path / "db", "-o", tmp_path / "d.jsonl")
    assert piped.stderr == b""
    piped = ok("load", tmp_path / "db2", tmp_path / "d.jsonl")
    assert b"\r" not in piped.stderr and b"\x1b" not in piped.stderr
    assert with_tty_stderr("dump", tmp_path / "db", "-o", tmp_path / "e.jsonl").startswith(
        "\rdump: ")
    shown = with_tty_stderr("load", tmp_path / "db3", tmp_path / "d.jsonl")
    assert re.search(r"load: 9,004 items .*100% of", shown), shown


# -- import / export -----------------------------------------------------------------------------
DBM_KINDS = ["dumb", "gnu", "ndbm", "sqlite3"]
DATA = {b"\x00\xff bytes": b"\xfe\x00", "ключ".encode(): "значение".encode(), b"": b"",
        **{b"n%04d" % i: b"x" * (i % 7) for i in range(300)}}


def dbm_module(kind: str) -> Any:
    try:
        return importlib.import_module(f"dbm.{kind}")
    except ImportError:
        pytest.skip(f"this Python ({sys.version.split()[0]}) has no dbm.{kind}")


@pytest.mark.parametrize("kind", DBM_KINDS)
def test_import_copies_every_stdlib_dbm_kind(kind: str, dbpath: Path, tmp_path: Path) -> None:
    module = dbm_module(kind)
    src = tmp_path / f"src-{kind}"
    with module.open(str(src), "n") as s:
        for k, v in DATA.items():
            s[k] = v
    r = ok("import", src, dbpath)
    assert f"({dbm.whichdb(str(src))})" in r.stderr.decode()
    assert contents(dbpath) == DATA


def test_import_accepts_the_name_of_a_dumb_dat_file(tmp_path: Path) -> None:
    with dbm.dumb.open(str(tmp_path / "legacy"), "n") as s:
        s[b"k"] = b"v"
    ok("import", tmp_path / "legacy.dat", tmp_path / "db")
    assert contents(tmp_path / "db") == {b"k": b"v"}


OBJECTS = {"int": 42, "nested": {"list": [1, 2.5, None, b"raw"], "set": {1, 2}},
           "ключ": ("tuple", "ü")}


def test_import_a_shelve_file_then_read_it_with_shelve(dbpath: Path, tmp_path: Path) -> None:
    with shelve.open(str(tmp_path / "objects"), "n") as shelf:
        shelf.update(OBJECTS)
    ok("import", tmp_path / "objects", dbpath)
    with shelve.Shelf[Any](partydbm.open(dbpath)) as shelf:
        assert dict(shelf) == OBJECTS


def test_import_refuses_a_non_empty_destination_unless_merge(dbpath: Path,
                                                            tmp_path: Path) -> None:
    with dbm.dumb.open(str(tmp_path / "src"), "n") as s:
        s[b"shared"] = b"from src"
        s[b"new"] = b"n"
    fill(dbpath, {b"shared": b"old", b"mine": b"m"})
    fails(1, "import", tmp_path / "src", dbpath, says="--merge")
    assert contents(dbpath) == {b"shared": b"old", b"mine": b"m"}
    ok("import", tmp_path / "src", dbpath, "--merge")
    assert contents(dbpath) == {b"shared": b"from src", b"mine": b"m", b"new": b"n"}


def test_import_failures(tmp_path: Path) -> None:
    (tmp_path / "plain").write_bytes(b"no database here")
    fails(1, "import", tmp_path / "missing", tmp_path / "db", says="no database at")
    fails(1, "import", tmp_path / "plain", tmp_path / "db", says="not a database the dbm")
    fill(tmp_path / "db", {b"k": b"v"})
    fails(1, "import", tmp_path / "db", tmp_path / "db", says="the same database")
    assert contents(tmp_path / "db") == {b"k": b"v"}


def test_import_another_partydbm_database(dbpath: Path, tmp_path: Path) -> None:
    fill(dbpath, DATA)
    ok("import", dbpath, tmp_path / "copy")
    assert contents(tmp_path / "copy") == DATA


@pytest.mark.parametrize("kind", DBM_KINDS)
def test_export_writes_a_file_the_stdlib_reads(kind: str, dbpath: Path, tmp_path: Path) -> None:
    module = dbm_module(kind)
    fill(dbpath, DATA)
    dest = tmp_path / f"out-{kind}"
    ok("export", dbpath, dest, "--kind", kind)
    assert dbm.whichdb(str(dest)) == f"dbm.{kind}"
    with module.open(str(dest), "r") as out:
        assert {k: out[k] for k in out.keys()} == DATA  # noqa: SIM118 - ndbm has no iter


def test_export_defaults_to_dumb_and_refuses_to_replace_unless_overwrite(
        dbpath: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with dbm.dumb.open(str(dest), "n") as old:
        old[b"old"] = b"1"
    fill(dbpath, {b"new": b"2"})
    fails(1, "export", dbpath, dest, says="--overwrite")
    with dbm.open(str(dest), "r") as out:
        assert dict(out) == {b"old": b"1"}
    ok("export", dbpath, dest, "--overwrite")
    assert dbm.whichdb(str(dest)) == "dbm.dumb"
    with dbm.open(str(dest), "r") as out:
        assert dict(out) == {b"new": b"2"}


def test_export_refuses_a_file_it_does_not_know(tmp_path: Path) -> None:
    fill(tmp_path / "db", {b"k": b"v"})
    (tmp_path / "plain").write_bytes(b"precious, not a dbm file")
    fails(1, "export", tmp_path / "db", tmp_path / "plain", "--overwrite",
          says="not a dbm database")
    assert (tmp_path / "plain").read_bytes() == b"precious, not a dbm file"


@pytest.mark.parametrize("kind", DBM_KINDS)
def test_export_kind_missing_from_this_python_fails_cleanly(kind: str, tmp_path: Path) -> None:
    try:
        importlib.import_module(f"dbm.{kind}")
    except ImportError:
        fill(tmp_path / "db", {b"k": b"v"})
        fails(1, "export", tmp_path / "db", tmp_path / "out", "--kind", kind,
              says=f"dbm.{kind} is not available")
        assert not list(tmp_path.glob("out*"))
    else:
        pytest.skip(f"this Python has dbm.{kind}")


def test_shelf_moves_out_through_export_and_back_through_import(tmp_path: Path) -> None:
    with shelve.Shelf[Any](partydbm.open(tmp_path / "db")) as shelf:
        shelf.update(OBJECTS)
    ok("export", tmp_path / "db", tmp_path / "legacy")
    with shelve.open(str(tmp_path / "legacy"), "r") as shelf:
        assert dict(shelf) == OBJECTS
    ok("import", tmp_path / "legacy", tmp_path / "back")
    with shelve.Shelf[Any](partydbm.open(tmp_path / "back", "r")) as shelf:
        assert dict(shelf) == OBJECTS
