"""shelve on partydbm, and install(): the standard library's dbm and shelve finding and
creating partydbm databases."""

from __future__ import annotations

import dbm
import dbm.dumb
import pickle
import shelve
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import partydbm

from .conftest import Opener

OBJECTS = {
    "int": 42,
    "list": [1, 2.5, "three", b"four", None],
    "dict": {"nested": {"deep": (1, 2)}, 3: frozenset({4})},
    "ключ ☃": "unicode key and value ü",
    "": "empty key",
    "big": list(range(50_000)),
}


# -- shelve --------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_shelf_round_trips_objects_with_every_pickle_protocol(open_db: Opener,
                                                              protocol: int) -> None:
    with shelve.Shelf[Any](open_db("c"), protocol=protocol) as shelf:
        for k, v in OBJECTS.items():
            shelf[k] = v
        assert len(shelf) == len(OBJECTS)
        assert "int" in shelf and "missing" not in shelf
        del shelf["int"]
        with pytest.raises(KeyError):
            shelf["int"]
    expect = {k: v for k, v in OBJECTS.items() if k != "int"}
    with shelve.Shelf[Any](open_db("r")) as shelf:
        assert {k: shelf[k] for k in shelf} == expect
        assert list(shelf) == sorted(expect, key=lambda k: k.encode())
        assert shelf.get("missing", "d") == "d"


@pytest.mark.parametrize("protocol", [0, pickle.HIGHEST_PROTOCOL])
def test_shelf_writeback_keeps_in_place_mutations(open_db: Opener, protocol: int) -> None:
    with shelve.Shelf[Any](open_db("c"), protocol=protocol, writeback=True) as shelf:
        shelf["list"] = []
        shelf["list"].append(1)
        shelf.sync()
        shelf["list"].append(2)
        shelf["d"] = {"a": 1}
        shelf["d"]["b"] = 2
        # close() writes the cache back
    with shelve.Shelf[Any](open_db("r")) as shelf:
        assert shelf["list"] == [1, 2]
        assert shelf["d"] == {"a": 1, "b": 2}


def test_shelf_without_writeback_does_not_keep_in_place_mutations(open_db: Opener) -> None:
    with shelve.Shelf[Any](open_db("c")) as shelf:
        shelf["list"] = [1]
        shelf["list"].append(2)
    with shelve.Shelf[Any](open_db("r")) as shelf:
        assert shelf["list"] == [1]


def test_shelf_on_the_default_flag_creates_a_new_database(tmp_path: Path) -> None:
    path = tmp_path / "shelf"
    with shelve.Shelf[Any](partydbm.open(path)) as shelf:
        shelf["k"] = {"v": 1}
    assert partydbm.whichdb(path) == "partydbm"
    with shelve.Shelf[Any](partydbm.open(path, "r")) as shelf:
        assert dict(shelf) == {"k": {"v": 1}}


def test_shelf_on_a_read_only_handle_refuses_writes(open_db: Opener) -> None:
    with shelve.Shelf[Any](open_db("c")) as shelf:
        shelf["k"] = 1
    with shelve.Shelf[Any](open_db("r")) as shelf:
        with pytest.raises(partydbm.ReadOnlyError):
            shelf["k"] = 2
        assert shelf["k"] == 1


# -- install() -----------------------------------------------------------------------------
def dbm_open(file: str, flag: str) -> Any:
    """dbm.open as an application calls it, looked up at each call (install() patches
    dbm); typed Any, since typeshed says it returns one of the stdlib's databases."""
    return dbm.open(file, flag)  # type: ignore[arg-type]


@pytest.fixture
def fresh_dbm(monkeypatch: pytest.MonkeyPatch) -> None:
    """dbm as in a fresh interpreter (dbm.open() never called yet), whatever ran before
    in this process; restored afterwards."""
    monkeypatch.setattr(dbm, "_defaultmod", None)
    monkeypatch.setattr(dbm, "_modules", {})


@pytest.fixture
def installed(fresh_dbm: None) -> Iterator[None]:
    whichdb, defaultmod = dbm.whichdb, dbm._defaultmod  # type: ignore[attr-defined]
    partydbm.install()
    try:
        yield
    finally:
        partydbm.uninstall()
        assert dbm.whichdb is whichdb
        assert dbm._defaultmod is defaultmod  # type: ignore[attr-defined]


@pytest.mark.parametrize("flag", ["c", "n"])
def test_installed_dbm_open_creates_a_new_path_as_partydbm(installed: None, tmp_path: Path,
                                                           flag: str) -> None:
    path = tmp_path / "new"
    with dbm_open(str(path), flag) as db:
        assert isinstance(db, partydbm.PartyDBM)
        db[b"k"] = b"v"
    assert partydbm.whichdb(path) == "partydbm"
    assert dbm.whichdb(str(path)) == "partydbm"
    assert dbm.whichdb(path) == "partydbm"  # type: ignore[arg-type]  # installed: partydbm's takes a path


@pytest.mark.parametrize("flag", ["r", "w", "c", "n"])
def test_installed_dbm_open_opens_an_existing_partydbm_database(
        installed: None, open_db: Opener, role: str, flag: str) -> None:
    writer = open_db()
    writer[b"k"] = b"v"
    assert dbm.whichdb(str(open_db.path)) == "partydbm"
    with dbm_open(str(open_db.path), flag) as db:
        assert isinstance(db, partydbm.PartyDBM)
        assert db.is_leader is (role == "leader")
        if flag == "n":
            assert dict(db.items()) == {}
        else:
            assert dict(db.items()) == {b"k": b"v"}
        if flag != "r":
            db[b"k2"] = b"v2"
            assert writer[b"k2"] == b"v2"


def test_installed_shelve_open_creates_and_reopens_partydbm(installed: None,
                                                            tmp_path: Path) -> None:
    path = tmp_path / "shelf"
    with shelve.open(str(path)) as shelf:
        shelf["k"] = [1, 2, 3]
    assert partydbm.whichdb(path) == "partydbm"
    assert not list(tmp_path.glob("shelf.*")), "shelve fell back to another dbm"
    with shelve.open(str(path), "r") as shelf:
        assert dict(shelf) == {"k": [1, 2, 3]}
    with shelve.open(str(path), writeback=True) as shelf:
        shelf["k"].append(4)
    with shelve.open(str(path), "r") as shelf:
        assert shelf["k"] == [1, 2, 3, 4]


def test_installed_shelve_open_joins_a_database_open_elsewhere(installed: None, open_db: Opener,
                                                               role: str) -> None:
    with shelve.Shelf[Any](open_db()) as shelf:
        shelf["k"] = {"x": 1}
    with shelve.open(str(open_db.path)) as shelf:
        assert shelf.dict.is_leader is (role == "leader")  # type: ignore[attr-defined]
        assert dict(shelf) == {"k": {"x": 1}}
        shelf["k2"] = 2
    with shelve.Shelf[Any](open_db("r")) as shelf:
        assert dict(shelf) == {"k": {"x": 1}, "k2": 2}


def test_installed_dbm_whichdb_still_names_other_formats(installed: None, tmp_path: Path) -> None:
    with dbm.dumb.open(str(tmp_path / "dumb"), "c") as d:
        d[b"k"] = b"v"
    assert dbm.whichdb(str(tmp_path / "dumb")) == "dbm.dumb"
    assert dbm.whichdb(str(tmp_path / "missing")) is None


def test_installed_dbm_open_still_opens_existing_databases_of_other_formats(
        installed: None, tmp_path: Path) -> None:
    with dbm.dumb.open(str(tmp_path / "dumb"), "c") as d:
        d[b"k"] = b"v"
    with dbm_open(str(tmp_path / "dumb"), "r") as d:
        assert not isinstance(d, partydbm.PartyDBM)
        assert d[b"k"] == b"v"
    with shelve.open(str(tmp_path / "dumb"), "r") as shelf:
        assert list(shelf.dict.keys()) == [b"k"]  # type: ignore[attr-defined]


def test_install_is_idempotent_and_uninstall_undoes_it(fresh_dbm: None, tmp_path: Path) -> None:
    path = tmp_path / "db"
    partydbm.open(path, "c").close()
    original = dbm.whichdb
    assert dbm.whichdb(str(path)) is None  # a directory means nothing to plain dbm
    partydbm.install()
    try:
        partydbm.install()
        assert dbm.whichdb(str(path)) == "partydbm"
    finally:
        partydbm.uninstall()
    assert dbm.whichdb is original
    assert dbm.whichdb(str(path)) is None
    partydbm.uninstall()  # a second uninstall is harmless
    assert dbm.whichdb is original
