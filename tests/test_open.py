"""open(): flags, paths, creation, mode; the error tree; whichdb()."""

from __future__ import annotations

import dbm
import dbm.dumb
import errno
import os
import pickle
import stat
from pathlib import Path
from typing import Any

import pytest

import partydbm
from partydbm import _protocol as P

from .conftest import Opener
from .procs import Holder, Party

BAD_FLAG_MESSAGE = "Flag must be one of 'r', 'w', 'c', or 'n', not {!r}"
GOOD_FLAGS = ["r", "w", "c", "n", "rf", "rs", "ru", "wf", "ws", "wu", "cf", "cs", "cu",
              "nf", "ns", "nu", "csu", "wfs", "rfsu", "nsf"]
SEED = {b"k": b"v", b"\x00": b"\xff", b"": b""}


def contents(db: partydbm.PartyDBM) -> dict[bytes, bytes]:
    return dict(db.iterator())


# -- flags ---------------------------------------------------------------------------------
def test_open_flags_lists_every_flag_letter() -> None:
    assert partydbm.open_flags == "rwcnfsu"


def test_default_flag_is_c_and_creates_a_missing_database(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with partydbm.open(path) as db:
        assert db.is_leader
        assert len(db) == 0
        db[b"k"] = b"v"
    assert partydbm.whichdb(path) == "partydbm"
    with partydbm.open(path) as db:
        assert contents(db) == {b"k": b"v"}


@pytest.mark.parametrize("flag", GOOD_FLAGS)
def test_every_flag_opens_an_existing_database_with_its_meaning(open_db: Opener, flag: str) -> None:
    seed = open_db("c")
    seed.update(SEED)
    seed.close()
    db = open_db(flag)
    if flag[0] == "n":
        assert contents(db) == {}
    else:
        assert contents(db) == SEED
    if flag[0] == "r":
        with pytest.raises(partydbm.ReadOnlyError):
            db[b"new"] = b"x"
        assert db.get(b"new") is None
    else:
        db[b"new"] = b"x"
        assert db[b"new"] == b"x"


@pytest.mark.parametrize("flag", ["c", "n", "cs", "nfsu"])
def test_c_and_n_create_a_missing_database(tmp_path: Path, flag: str) -> None:
    path = tmp_path / "sub" / "db" if flag == "c" else tmp_path / "db"
    if flag == "c":
        path.parent.mkdir()
    with partydbm.open(path, flag) as db:
        assert dict(db.iterator()) == {}
        db[b"a"] = b"1"
    assert partydbm.whichdb(path) == "partydbm"


@pytest.mark.parametrize("flag", ["x", "", "R", "C", "rr", "rx", "cz", "fc", "s", "c-", "rw"])
def test_bad_flag_is_error_and_ValueError_with_dbm_message(tmp_path: Path, flag: str) -> None:
    path = tmp_path / "db"
    with pytest.raises(partydbm.error) as info:
        partydbm.open(path, flag)
    assert isinstance(info.value, ValueError)
    assert str(info.value) == BAD_FLAG_MESSAGE.format(flag)
    assert not path.exists(), "a rejected open must not create anything"


def test_bad_flag_x_message_is_exactly_the_contract_text(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        partydbm.open(tmp_path / "db", "x")
    assert isinstance(info.value, partydbm.error)
    assert str(info.value) == "Flag must be one of 'r', 'w', 'c', or 'n', not 'x'"


@pytest.mark.parametrize("flag", ["r", "w", "rs", "wf"])
def test_r_and_w_on_a_missing_path_raise_error_naming_it(tmp_path: Path, flag: str) -> None:
    path = tmp_path / "missing"
    with pytest.raises(partydbm.error) as info:
        partydbm.open(str(path), flag)
    assert info.value.filename == str(path)
    assert str(path) in str(info.value)
    assert not path.exists(), "r/w must not create the database"


@pytest.mark.parametrize("kind", ["pathlib", "bytes"])
def test_r_on_a_missing_path_names_it_whatever_the_path_type(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "missing"
    arg: object = path if kind == "pathlib" else os.fsencode(path)
    with pytest.raises(partydbm.error) as info:
        partydbm.open(arg, "r")
    assert os.fsdecode(info.value.filename) == str(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("flag", ["r", "w"])
@pytest.mark.parametrize("what", ["plain file", "empty directory"])
def test_r_and_w_on_something_not_a_database_raise_error_and_touch_nothing(
        tmp_path: Path, flag: str, what: str) -> None:
    path = tmp_path / "thing"
    if what == "plain file":
        path.write_bytes(b"precious")
    else:
        path.mkdir()
    with pytest.raises(partydbm.error) as info:
        partydbm.open(path, flag)
    assert info.value.filename == str(path)
    if what == "plain file":
        assert path.read_bytes() == b"precious"
    else:
        assert os.listdir(path) == []


def test_c_on_a_plain_file_raises_error_and_keeps_the_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"precious")
    with pytest.raises(partydbm.error):
        partydbm.open(path, "c")
    assert path.read_bytes() == b"precious"


def test_n_replaces_a_plain_file_with_an_empty_database(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"not a database")
    with partydbm.open(path, "n") as db:
        assert len(db) == 0
        db[b"k"] = b"v"
    assert path.is_dir()
    assert partydbm.whichdb(path) == "partydbm"
    with partydbm.open(path, "r") as db:
        assert contents(db) == {b"k": b"v"}


def test_n_empties_an_existing_database_also_while_open(open_db: Opener, role: str) -> None:
    other = open_db()
    other.update(SEED)
    if role == "follower":
        # Data the other process (the leader) wrote itself.
        assert open_db.holder is not None
        open_db.holder.put(open_db.path, b"from-holder", b"1")
        assert other[b"from-holder"] == b"1"
    db = open_db("n")
    assert contents(db) == {}
    assert contents(other) == {} and len(other) == 0
    other[b"after"] = b"2"  # the handle open across the 'n' keeps working
    assert contents(db) == {b"after": b"2"}


def test_n_from_another_process_empties_a_database_this_process_leads(
        tmp_path: Path, holder: Holder) -> None:
    path = tmp_path / "db"
    with partydbm.open(path, "c") as db:
        assert db.is_leader
        db.update(SEED)
        try:
            assert holder.open(path, "n") == "follower"
            assert contents(db) == {}
            db[b"x"] = b"y"
            assert contents(db) == {b"x": b"y"}
        finally:
            holder.close_db(path)


# -- paths -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["str", "bytes", "pathlib"])
def test_open_creates_with_a_str_bytes_or_pathlib_path(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "db"
    arg = {"str": str(path), "bytes": os.fsencode(path), "pathlib": path}[kind]
    with partydbm.open(arg, "c") as db:
        db[b"k"] = b"v"
    assert partydbm.whichdb(path) == "partydbm"
    with partydbm.open(str(path), "r") as db:
        assert contents(db) == {b"k": b"v"}


def test_str_bytes_and_pathlib_paths_reach_the_same_database(open_db: Opener, role: str) -> None:
    db = open_db()
    db[b"k"] = b"v"
    path = open_db.path
    for arg in (str(path), os.fsencode(path), path):
        other = partydbm.open(arg, "w")
        try:
            assert other.is_leader is (role == "leader")
            assert contents(other) == {b"k": db[b"k"]}
            other[b"k"] = repr(type(arg)).encode()
            assert db[b"k"] == repr(type(arg)).encode()
        finally:
            other.close()
    assert contents(db) == {b"k": repr(type(path)).encode()}


def test_non_ascii_path(tmp_path: Path) -> None:
    path = tmp_path / "dätä bäse ☃"
    with partydbm.open(path, "c") as db:
        db["ключ"] = "значение"
    with partydbm.open(os.fsencode(path), "r") as db:
        assert db["ключ".encode()] == "значение".encode()


@pytest.mark.parametrize("kw", [{"retry": False}, {"timeout": None}, {"timeout": 0.5},
                                {"retry": True, "timeout": 30.0}])
def test_open_takes_retry_and_timeout(open_db: Opener, kw: dict[str, Any]) -> None:
    db = open_db("c", **kw)
    db[b"k"] = b"v"
    assert contents(db) == {b"k": b"v"}
    assert list(db.iterator(reverse=True)) == [(b"k", b"v")]


def test_open_raises_Timeout_when_the_lock_holder_never_serves(tmp_path: Path) -> None:
    path = tmp_path / "db"
    partydbm.open(path, "c").close()
    partydbm.let_go(path)
    with Party() as party:
        plain = party.spawn("plain_leveldb", path)  # holds the LOCK, never serves
        assert plain.readline() == "ready"
        with pytest.raises(partydbm.Timeout) as info:
            partydbm.open(path, "w", timeout=0.2)
        assert isinstance(info.value, TimeoutError)
        assert isinstance(info.value, partydbm.error)


# -- mode --------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o000])
@pytest.mark.parametrize("mode", [0o666, 0o644, 0o640, 0o600])
@pytest.mark.parametrize("flag", ["c", "n"])
def test_mode_minus_umask_applies_to_created_files(tmp_path: Path, mode: int, umask: int,
                                                   flag: str) -> None:
    path = tmp_path / "db"
    old = os.umask(umask)
    try:
        partydbm.open(path, flag, mode).close()
    finally:
        os.umask(old)
    marker = stat.S_IMODE(os.stat(path / "PARTYDBM").st_mode)
    assert oct(marker) == oct(mode & ~umask)
    # The directory gets the same bits, plus search (x) wherever read is granted:
    # without it nobody could reach the files inside.
    directory = stat.S_IMODE(os.stat(path).st_mode)
    assert oct(directory) == oct((mode | ((mode & 0o444) >> 2)) & ~umask & 0o777)


def test_mode_defaults_to_0o666_minus_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        partydbm.open(tmp_path / "db").close()
    finally:
        os.umask(old)
    assert oct(stat.S_IMODE(os.stat(tmp_path / "db" / "PARTYDBM").st_mode)) == oct(0o640)


# -- the error tree ----------------------------------------------------------------------------
SUBCLASSES = [partydbm.ClosedError, partydbm.ReadOnlyError, partydbm.LeaderLostError,
              partydbm.ProtocolError, partydbm.Timeout]
ALL_ERRORS = [partydbm.error, *SUBCLASSES]


def test_error_is_an_OSError_and_caught_by_dbm_error() -> None:
    assert issubclass(partydbm.error, OSError)
    try:
        raise partydbm.error("x")
    except dbm.error as exc:  # dbm.error is a tuple holding OSError
        assert type(exc) is partydbm.error


@pytest.mark.parametrize("cls", SUBCLASSES)
def test_every_error_class_is_a_partydbm_error(cls: type[BaseException]) -> None:
    assert issubclass(cls, partydbm.error)
    assert issubclass(cls, OSError)


def test_leader_lost_is_a_ConnectionError_and_timeout_a_TimeoutError() -> None:
    assert issubclass(partydbm.LeaderLostError, ConnectionError)
    assert issubclass(partydbm.Timeout, TimeoutError)
    assert not issubclass(partydbm.ClosedError, (ConnectionError, TimeoutError, ValueError))


@pytest.mark.parametrize("cls", ALL_ERRORS)
@pytest.mark.parametrize("args", [(), ("a message",), (errno.ENOENT, "No such thing"),
                                  (errno.EEXIST, "exists", "/some/path")])
def test_every_error_pickles_keeping_type_and_args(cls: type[OSError],
                                                   args: tuple[Any, ...]) -> None:
    exc = cls(*args)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(exc, protocol))
        assert type(back) is cls
        assert back.args == exc.args
        assert back.errno == exc.errno
        assert back.filename == exc.filename
        assert str(back) == str(exc)


@pytest.mark.parametrize("cls", ALL_ERRORS)
@pytest.mark.parametrize("args", [(), ("a message",), (errno.ENOSPC, "No space left"),
                                  (errno.EEXIST, "exists", "/some/path")])
def test_every_error_crosses_the_wire_keeping_type_errno_and_text(
        cls: type[OSError], args: tuple[Any, ...]) -> None:
    """What a follower raises for an error on the leader: same class, errno and text
    (a full disk is ENOSPC in both roles)."""
    from partydbm._errors import from_wire, to_wire

    exc = cls(*args)
    back = from_wire(P.unpack(P.pack(to_wire(exc))))
    assert type(back) is cls
    assert (back.errno, back.filename, str(back)) == (exc.errno, exc.filename, str(exc))


def test_a_raised_open_error_pickles_with_its_filename(tmp_path: Path) -> None:
    with pytest.raises(partydbm.error) as info:
        partydbm.open(tmp_path / "missing", "r")
    back = pickle.loads(pickle.dumps(info.value))
    assert type(back) is type(info.value)
    assert back.args == info.value.args
    assert back.filename == str(tmp_path / "missing")


def test_the_bad_flag_error_pickles(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        partydbm.open(tmp_path / "db", "x")
    back = pickle.loads(pickle.dumps(info.value))
    assert type(back) is type(info.value)
    assert isinstance(back, partydbm.error) and isinstance(back, ValueError)
    assert str(back) == str(info.value)


# -- whichdb ---------------------------------------------------------------------------------
def test_whichdb_names_a_partydbm_database_given_any_path_type(tmp_path: Path) -> None:
    path = tmp_path / "db"
    db = partydbm.open(path, "c")
    try:
        for arg in (path, str(path), os.fsencode(path)):
            assert partydbm.whichdb(arg) == "partydbm"
    finally:
        db.close()
    assert partydbm.whichdb(path) == "partydbm"


def test_whichdb_is_None_for_anything_else(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"hello")
    (tmp_path / "empty").mkdir()
    with dbm.dumb.open(str(tmp_path / "dumb"), "c") as d:
        d[b"k"] = b"v"
    from partydbm._backend import plyvel

    plyvel.DB(str(tmp_path / "leveldb"), create_if_missing=True).close()
    for name in ("missing", "file", "empty", "dumb", "dumb.dat", "leveldb"):
        assert partydbm.whichdb(tmp_path / name) is None, name


def test_creating_while_another_process_just_created_the_database_is_fine(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race four processes hit: one sees the directory without the marker, and by
    the time it lists the directory another has created the marker and LevelDB's files.
    That is a database of ours, not "exists and is not a partydbm database"."""
    from partydbm import _open

    path = tmp_path / "db"
    partydbm.open(path, "c").close()  # the other process's work: marker, CURRENT, ...
    seen = []

    def not_yet(p: str) -> bool:  # the check ran just before the marker appeared
        seen.append(p)
        return len(seen) > 1

    monkeypatch.setattr(_open, "_is_db", not_yet)
    _open._create(str(path), 0o666)
    monkeypatch.undo()
    with partydbm.open(path, "w") as db:
        assert db.is_leader
