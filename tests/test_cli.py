"""The `partydbm` command line, run as a subprocess (`python -m partydbm ...`).

Every run has a deadline. Most tests run twice: with nobody else holding the database
(the command leads it) and with a Holder process leading it (the command follows).
What a command wrote is checked by opening the database here, not through the CLI.
"""

from __future__ import annotations

import contextlib
import dbm
import dbm.dumb
import importlib
import json
import os
import pty
import re
import select
import shelve
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import partydbm
from partydbm.cli import _formats as F

from .procs import Holder

PY = [sys.executable, "-m", "partydbm"]
DEADLINE = 60.0
COMMANDS = ["info", "get", "set", "delete", "keys", "items", "dump", "load", "import",
            "export", "compact", "serve", "demo"]

# Awkward bytes and how each format must show them (written out by hand, so the test
# does not check the code against itself).
SAMPLES: list[tuple[bytes, dict[str, str]]] = [
    (b"plain", {"text": "plain", "hex": "706c61696e", "base64": "cGxhaW4=",
                "json": '"plain"'}),
    ("héllo ✓".encode(), {"text": "héllo ✓", "hex": "68c3a96c6c6f20e29c93",
                          "base64": "aMOpbGxvIOKckw==", "json": '"héllo ✓"'}),
    (b"\x00\xff\xfe", {"text": "\\x00\\xff\\xfe", "hex": "00fffe", "base64": "AP/+",
                       "json": '{"base64": "AP/+"}'}),
    (b"back\\slash", {"text": "back\\\\slash", "hex": "6261636b5c736c617368",
                      "base64": "YmFja1xzbGFzaA==", "json": '"back\\\\slash"'}),
    (b"tab\tnl\n\x1b[31m", {"text": "tab\\x09nl\\x0a\\x1b[31m",
                            "hex": "746162096e6c0a1b5b33316d", "base64": "dGFiCW5sChtbMzFt",
                            "json": '"tab\\tnl\\n\\u001b[31m"'}),
    (b"cut\xe2\x82", {"text": "cut\\xe2\\x82", "hex": "637574e282", "base64": "Y3V04oI=",
                      "json": '{"base64": "Y3V04oI="}'}),
]


def cli(*args: Any, input: bytes | None = None, timeout: float = DEADLINE,
        cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    argv = [a if isinstance(a, bytes) else str(a) for a in args]
    return subprocess.run([*PY, *argv], input=input, capture_output=True, timeout=timeout,
                          cwd=cwd)


def ok(*args: Any, **kw: Any) -> subprocess.CompletedProcess[bytes]:
    r = cli(*args, **kw)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r


def fails(code: int, *args: Any, says: str = "", **kw: Any) -> str:
    """Run; the exit code must be `code` and stderr one line, no traceback."""
    r = cli(*args, **kw)
    err = r.stderr.decode()
    assert r.returncode == code, (args, r.stdout, err)
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert says in err, err
    return err


def contents(path: Path) -> dict[bytes, bytes]:
    with partydbm.open(path, "r") as db:
        return dict(db.items())


def fill(path: Path, data: dict[bytes, bytes]) -> None:
    with partydbm.open(path, "c") as db:
        db.update(data)


@pytest.fixture(params=["alone", "led"])
def dbpath(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A database path. 'led': a Holder process leads it, so the CLI is a follower."""
    path = tmp_path / "db"
    if request.param == "alone":
        yield path
        return
    holder: Holder = request.getfixturevalue("holder")
    assert holder.open(path, "c") == "leader"
    try:
        yield path
        assert info_json(path)["leader_pid"] == holder.pid, "the holder no longer leads"
    finally:
        holder.close_db(path)


def info_json(path: Path) -> dict[str, Any]:
    return json.loads(ok("info", path, "--json").stdout)  # type: ignore[no-any-return]


# -- the command itself ---------------------------------------------------------------------
def test_console_script_is_installed_and_runs() -> None:
    script = Path(sys.executable).parent / "partydbm"
    assert script.exists(), f"no console script at {script}"
    r = subprocess.run([script, "--version"], capture_output=True, timeout=DEADLINE)
    assert r.returncode == 0 and r.stdout.decode().strip() == f"partydbm {partydbm.__version__}"


def test_every_subcommand_has_help() -> None:
    top = ok("--help").stdout.decode()
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s", top, re.M), f"{command} missing from --help"
        r = ok(command, "--help")
        assert r.stdout.decode().startswith(f"usage: partydbm {command}")


@pytest.mark.parametrize("args, says", [
    ([], "required: COMMAND"),
    (["frobnicate"], "invalid choice"),
    (["get", "db"], "required: KEY"),
    (["keys", "db", "--format", "rot13"], "invalid choice"),
    (["keys", "db", "--limit", "-1"], "--limit"),
    (["info", "db", "--timeout", "soon"], "--timeout"),
    (["keys", "db", "--prefix", "a", "--start", "b"], "cannot be combined"),
    (["get", "db", "bad\\q"], "bad escape \\q"),
    (["get", "db", "-f", "hex", "abc"], "not valid hex"),
    (["get", "db", "-f", "base64", "!!"], "not valid base64"),
    (["get", "db", "-f", "json", "[1]"], "expected a JSON string"),
    (["get", "db", "-f", "json", "{nope"], "not valid json"),
])
def test_usage_errors_exit_2_with_one_line_and_no_traceback(tmp_path: Path, args: list[str],
                                                             says: str) -> None:
    fill(tmp_path / "db", {b"a": b"1"})
    fails(2, *args, says=says, cwd=tmp_path)


def test_failures_exit_1_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    fill(tmp_path / "db", {b"a": b"1"})
    (tmp_path / "plain").write_text("not a database")
    fails(1, "get", "db", "missing", says="no such key: missing", cwd=tmp_path)
    fails(1, "delete", "db", "missing", says="no such key: missing", cwd=tmp_path)
    fails(1, "keys", "nowhere", says="nowhere: No such partydbm database", cwd=tmp_path)
    fails(1, "info", "plain", says="plain: Not a partydbm database", cwd=tmp_path)
    fails(1, "set", "plain", "k", "v", says="exists and is not a partydbm database",
          cwd=tmp_path)
    fails(1, "compact", "nowhere", says="No such partydbm database", cwd=tmp_path)
    fails(1, "dump", "db", "-o", "nodir/out", says="cannot write nodir/out", cwd=tmp_path)
    fails(1, "load", "db", "nofile", says="nofile: No such file", cwd=tmp_path)
    assert not (tmp_path / "nowhere").exists(), "a read or delete created a database"
    assert contents(tmp_path / "db") == {b"a": b"1"}


# -- formats ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", F.FORMATS)
def test_set_and_get_take_and_print_every_format(dbpath: Path, fmt: str) -> None:
    for key, shown in SAMPLES:
        value = key[::-1]
        ok("set", dbpath, "--format", fmt, shown[fmt], F.show(value, fmt))
    assert contents(dbpath) == {key: key[::-1] for key, _ in SAMPLES}
    for key, shown in SAMPLES[1:4]:
        out = ok("get", dbpath, "-f", fmt, shown[fmt]).stdout.decode()
        assert out == F.show(key[::-1], fmt) + "\n"
    keys = ok("keys", dbpath, "-f", fmt).stdout.decode().split("\n")
    assert keys == [shown[fmt] for _, shown in sorted(SAMPLES)] + [""]


@pytest.mark.parametrize("key, shown", SAMPLES)
def test_show_matches_the_hand_written_forms(key: bytes, shown: dict[str, str]) -> None:
    for fmt in F.FORMATS:
        assert F.show(key, fmt) == shown[fmt]
        assert F.parse(shown[fmt], fmt) == key


@given(st.binary(max_size=40))
def test_every_format_round_trips_any_bytes(data: bytes) -> None:
    for fmt in F.FORMATS:
        shown = F.show(data, fmt)
        assert "\n" not in shown and "\t" not in shown
        assert F.parse(shown, fmt) == data
    assert F.parse_record(F.record(data, data[::-1]).encode()) == (data, data[::-1])


def test_text_arguments_accept_convenience_escapes_and_raw_argv_bytes(tmp_path: Path) -> None:
    path = tmp_path / "db"
    ok("set", path, "k\\n\\t\\0\\r", "v")
    ok("set", path, b"caf\xe9", b"\xff")  # argv that is not UTF-8 is taken as its bytes
    assert contents(path) == {b"k\n\t\0\r": b"v", b"caf\xe9": b"\xff"}
    assert ok("get", path, "caf\\xe9").stdout == b"\\xff\n"


# -- get / set / delete / keys / items --------------------------------------------------------
def test_set_creates_get_reads_delete_removes(dbpath: Path) -> None:
    ok("set", dbpath, "greeting", "hello")
    assert ok("get", dbpath, "greeting").stdout == b"hello\n"
    ok("set", dbpath, "greeting", "again")
    assert contents(dbpath) == {b"greeting": b"again"}
    ok("delete", dbpath, "greeting")
    assert contents(dbpath) == {}
    fails(1, "delete", dbpath, "greeting", says="no such key: greeting")
    fails(1, "get", dbpath, "greeting", says="no such key: greeting")


def test_set_creates_a_missing_database(tmp_path: Path) -> None:
    ok("set", tmp_path / "new", "k", "v")
    assert partydbm.whichdb(tmp_path / "new") == "partydbm"


MODEL = {b"%s%02d" % (p, i): b"v%d" % i for p in (b"a", b"ab", b"b", b"\xff")
         for i in range(12)}


@pytest.mark.parametrize("opts, pick", [
    ([], lambda ks: ks),
    (["--reverse"], lambda ks: ks[::-1]),
    (["--prefix", "ab"], lambda ks: [k for k in ks if k.startswith(b"ab")]),
    (["--prefix", "ab", "--reverse", "--limit", "3"],
     lambda ks: [k for k in ks if k.startswith(b"ab")][::-1][:3]),
    (["--prefix", "\\xff"], lambda ks: [k for k in ks if k.startswith(b"\xff")]),
    (["--start", "a05", "--stop", "b03"], lambda ks: [k for k in ks if b"a05" <= k < b"b03"]),
    (["--start", "b", "--reverse"], lambda ks: [k for k in ks if k >= b"b"][::-1]),
    (["--stop", "ab", "--limit", "5"], lambda ks: [k for k in ks if k < b"ab"][:5]),
    (["--limit", "0"], lambda ks: []),
])
def test_keys_and_items_select_ranges_like_the_model(dbpath: Path, opts: list[str],
                                                     pick: Any) -> None:
    fill(dbpath, MODEL)
    expect = pick(sorted(MODEL))
    keys = ok("keys", dbpath, *opts).stdout.decode().splitlines()
    assert keys == [F.show(k, "text") for k in expect]
    lines = ok("items", dbpath, *opts).stdout.decode().splitlines()
    assert lines == [f"{F.show(k, 'text')}\t{MODEL[k].decode()}" for k in expect]


def test_range_options_are_read_in_the_format_given(dbpath: Path) -> None:
    fill(dbpath, MODEL)
    keys = ok("keys", dbpath, "-f", "hex", "--prefix", "ff", "--limit", "2").stdout.split()
    assert keys == [b"ff3030", b"ff3031"]
    keys = ok("keys", dbpath, "-f", "base64", "--start", "Yg==", "--stop", "YjAy").stdout.split()
    assert keys == [b"YjAw", b"YjAx"]


def test_items_json_prints_dump_records(dbpath: Path) -> None:
    data = {b"\xffbin": b"\xff", b"\x00text": "ü".encode()}
    fill(dbpath, data)
    lines = ok("items", dbpath, "--format", "json").stdout.decode().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"key": "\x00text", "value": "ü"},
        {"key": {"base64": "/2Jpbg=="}, "value": {"base64": "/w=="}}]


def test_keys_into_a_closed_pipe_stops_quietly(tmp_path: Path) -> None:
    fill(tmp_path / "db", {b"%06d" % i: b"" for i in range(20000)})
    r = subprocess.run(f"{sys.executable} -m partydbm keys db | head -1", shell=True,
                       capture_output=True, timeout=DEADLINE, cwd=tmp_path)
    assert r.stdout == b"000000\n" and r.stderr == b""


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
    assert _with_tty_stderr("dump", tmp_path / "db", "-o", tmp_path / "e.jsonl").startswith(
        "\rdump: ")
    shown = _with_tty_stderr("load", tmp_path / "db3", tmp_path / "d.jsonl")
    assert re.search(r"load: 9,004 items .*100% of", shown), shown


def _with_tty_stderr(*args: Any) -> str:
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen([*PY, *map(str, args)], stdout=subprocess.DEVNULL,
                                stderr=follower, stdin=subprocess.DEVNULL)
        os.close(follower)
        follower = -1
        chunks = []
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1)
            if ready:
                try:
                    data = os.read(leader, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        assert proc.wait(DEADLINE) == 0
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    return b"".join(chunks).decode()


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
    with shelve.Shelf(partydbm.open(dbpath)) as shelf:
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
    with shelve.Shelf(partydbm.open(tmp_path / "db")) as shelf:
        shelf.update(OBJECTS)
    ok("export", tmp_path / "db", tmp_path / "legacy")
    with shelve.open(str(tmp_path / "legacy"), "r") as shelf:
        assert dict(shelf) == OBJECTS
    ok("import", tmp_path / "legacy", tmp_path / "back")
    with shelve.Shelf(partydbm.open(tmp_path / "back", "r")) as shelf:
        assert dict(shelf) == OBJECTS


# -- info / compact ----------------------------------------------------------------------------
def test_info_when_the_command_leads(tmp_path: Path) -> None:
    fill(tmp_path / "db", {b"a": b"1", b"b": b"2"})
    facts = info_json(tmp_path / "db")
    assert facts["role"] == "leader"
    assert facts["path"] == str(tmp_path / "db")
    assert facts["socket"] == str(tmp_path / "db" / "partydbm.sock")
    assert facts["keys"] == 2 and facts["size_bytes"] > 0
    assert "Compactions" in facts["leveldb_stats"]
    text = ok("info", tmp_path / "db").stdout.decode()
    assert re.search(r"^role of a new opener: +leader", text, re.M)
    assert re.search(r"^keys: +2$", text, re.M)
    assert "Compactions" in text


def test_info_shows_the_socket_file_of_a_deep_database_by_its_real_path(
        tmp_path: Path) -> None:
    path = tmp_path / ("deep" * 30)  # too long a path to bind: reached via /proc/self/fd
    fill(path, {b"k": b"v"})
    assert info_json(path)["socket"] == os.path.join(os.path.realpath(path), "partydbm.sock")


def test_info_when_another_process_leads(tmp_path: Path, holder: Holder) -> None:
    path = tmp_path / "db"
    assert holder.open(path) == "leader"
    try:
        holder.put(path, b"k", b"v")
        facts = info_json(path)
        assert (facts["role"], facts["leader_pid"], facts["keys"]) == ("follower",
                                                                       holder.pid, 1)
        assert facts["leveldb_stats"] is None
        text = ok("info", path).stdout.decode()
        assert re.search(r"^role of a new opener: +follower", text, re.M)
        assert re.search(rf"^leader pid: +{holder.pid}$", text, re.M)
        assert f"n/a (held by leader pid {holder.pid}" in text
    finally:
        holder.close_db(path)


def test_compact_keeps_the_data(dbpath: Path) -> None:
    data = {b"%05d" % i: b"x" * 100 for i in range(2000)}
    fill(dbpath, data)
    with partydbm.open(dbpath) as db:
        for i in range(0, 2000, 2):
            del db[b"%05d" % i]
    r = ok("compact", dbpath)
    assert r.stdout.decode().startswith(f"compacted {dbpath}: ")
    assert contents(dbpath) == {k: v for i, (k, v) in enumerate(data.items()) if i % 2}


def test_repair_brings_back_a_database_whose_CURRENT_is_lost(tmp_path: Path) -> None:
    path = tmp_path / "db"
    data = {b"%05d" % i: b"v%d" % i for i in range(3000)}
    fill(path, data)
    ok("compact", path)  # the keys now live in table files
    (path / "CURRENT").unlink()
    fails(1, "get", path, "00001", says="CURRENT")
    r = ok("repair", path)
    assert r.stdout.decode().strip() == f"repaired {path}: 3000 keys readable"
    assert contents(path) == data


def test_repair_is_refused_while_another_process_has_the_database_open(
        tmp_path: Path, holder: Holder) -> None:
    path = tmp_path / "db"
    fill(path, {b"k": b"v"})
    assert holder.open(path, "c") == "leader"
    fails(1, "repair", path, says=str(holder.pid))
    fails(1, "repair", tmp_path / "missing", says="No such partydbm database")
    assert contents(path) == {b"k": b"v"}


# -- serve ---------------------------------------------------------------------------------------
class Serve:
    """A `partydbm serve` process whose stderr log is read line by line, with deadlines."""

    def __init__(self, path: Path, *opts: str) -> None:
        self.proc = subprocess.Popen([*PY, "serve", str(path), *opts],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.log: list[str] = []

    def expect(self, pattern: str, timeout: float = 30) -> str:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log:
                if re.search(pattern, line):
                    return line
            ready, _, _ = select.select([self.proc.stderr], [], [], 0.5)
            if ready:
                line = self.proc.stderr.readline().decode()
                if not line:
                    break
                self.log.append(line)
        raise AssertionError(f"serve never logged {pattern!r}; log: {self.log}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(DEADLINE)
        assert self.proc.stderr is not None
        self.log += self.proc.stderr.read().decode().splitlines(keepends=True)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(DEADLINE)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@contextlib.contextmanager
def _serving_one_follower(path: Path) -> Iterator[tuple[Serve, Holder]]:
    """A verbose `partydbm serve` leading `path`, and a follower it logged connecting;
    the serve process is killed at the end whatever happened."""
    serve = Serve(path, "--verbose")
    try:
        serve.expect(r"leading .* on .*partydbm\.sock")
        with Holder() as follower:
            assert follower.open(path) == "follower"
            serve.expect(rf"follower pid {follower.pid} connected \(1 connected\)")
            yield serve, follower
    finally:
        serve.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_leads_until_signalled_and_a_follower_carries_on(tmp_path: Path,
                                                               sig: int) -> None:
    path = tmp_path / "db"
    with _serving_one_follower(path) as (serve, follower):
        with Holder() as passing:
            assert passing.open(path) == "follower"
            serve.expect(rf"follower pid {passing.pid} connected \(2 connected\)")
        serve.expect(rf"follower pid {passing.pid} left \(1 connected\)")
        follower.put(path, b"before", b"1")
        assert serve.stop(sig) == 0
        assert any("closed" in line for line in serve.log), serve.log
        follower.put(path, b"after", b"2")  # it took over
        assert info_json(path)["leader_pid"] == follower.pid
        assert contents(path) == {b"before": b"1", b"after": b"2"}


def _niceness_of_threads(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            out.append(int(f.read().rsplit(")", 1)[1].split()[16]))  # field 19: nice
    return out


@pytest.mark.skipif(sys.platform != "linux", reason="threads have their own niceness on Linux")
def test_serve_does_not_lower_its_serving_threads(tmp_path: Path) -> None:
    # A process that only serves has nothing of its own to give way to (a library
    # leader's serving threads run at SERVE_NICENESS: test_multiprocess).
    path = tmp_path / "db"
    with _serving_one_follower(path) as (serve, follower):
        follower.put(path, b"k", b"v")
        nice = _niceness_of_threads(serve.proc.pid)
        assert len(nice) >= 3 and set(nice) == {os.getpriority(os.PRIO_PROCESS, 0)}, nice


def test_serve_follows_and_takes_over_when_the_leader_dies(tmp_path: Path) -> None:
    path = tmp_path / "db"
    leader = Holder()
    serve: Serve | None = None
    try:
        assert leader.open(path) == "leader"
        serve = Serve(path)
        serve.expect(rf"led by pid {leader.pid}: following")
        leader.kill()
        serve.expect(r"leading ")
        facts = info_json(path)
        assert (facts["role"], facts["leader_pid"]) == ("follower", serve.proc.pid)
        assert serve.stop() == 0
    finally:
        if serve is not None:
            serve.kill()
        leader.close()


# -- demo ------------------------------------------------------------------------------------------
def test_demo_short_passes_and_leaves_nothing_behind() -> None:
    r = cli("demo", "--short", timeout=120)
    out = r.stdout.decode()
    assert r.returncode == 0, (out, r.stderr)
    assert out.rstrip().endswith("PASS")
    assert "leader SIGKILLed 3 times" in out
    assert "0 out of order, duplicated or with a gap" in out
    where = re.search(r"reader on (\S+);", out)
    assert where and not os.path.exists(os.path.dirname(where.group(1))), "temp dir left"
    for pid in {int(p) for p in re.findall(r"pid (\d+)", out)}:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_demo_stops_every_process_it_started_on_SIGTERM() -> None:
    proc = subprocess.Popen([*PY, "demo", "--short"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out = b""
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + DEADLINE
        while b"SIGKILL the leader" not in out:  # mid-run, once the first leader is gone
            assert time.monotonic() < deadline and proc.poll() is None, out
            ready, _, _ = select.select([proc.stdout], [], [], 1)
            if ready:
                out += os.read(proc.stdout.fileno(), 65536)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(DEADLINE)
    text = out.decode()
    where = re.search(r"reader on (\S+);", text)
    assert where and not os.path.exists(os.path.dirname(where.group(1))), "temp dir left"
    pids = {int(p) for p in re.findall(r"pid (\d+)", text)}
    assert len(pids) >= 5  # the host, three writers and the reader, at least
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_demo_refuses_a_database_with_data_or_in_use(tmp_path: Path, holder: Holder) -> None:
    fill(tmp_path / "db", {b"k": b"v"})
    fails(1, "demo", tmp_path / "db", "--short", says="not empty")
    assert holder.open(tmp_path / "busy") == "leader"
    try:
        fails(1, "demo", tmp_path / "busy", "--short", says=f"open in process {holder.pid}")
    finally:
        holder.close_db(tmp_path / "busy")
    assert contents(tmp_path / "db") == {b"k": b"v"}
