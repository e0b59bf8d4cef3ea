"""The `partydbm` command line, called in-process (tests/cli_run.py): usage, formats,
one key, ranges, info, compact and repair.

Most tests run twice: with nobody else holding the database (the command leads it) and
with a Holder process leading it (the command follows). What a command wrote is checked
by opening the database here, not through the command line.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import partydbm
from partydbm.cli import _formats as F

from .cli_run import contents, fails, fill, info_json, ok
from .procs import Holder

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



# -- the command itself ---------------------------------------------------------------------
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
