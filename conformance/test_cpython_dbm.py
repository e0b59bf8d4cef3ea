"""CPython's own dbm and shelve tests, run against partydbm, in both roles.

The suites are imported from the interpreter's `test` package, never copied:

- test.test_dbm        AnyDBMTestCase with module = partydbm (through the generic dbm.open)
- test.test_shelve     file shelves for every pickle protocol (TestShelveFileBase +
                       mapping_tests.BasicTestMappingProtocol) and shelve's own TestCase,
                       with partydbm as dbm's default backend
- test.test_dbm_gnu    TestGdbm, loaded privately while "dbm.gnu" is partydbm
- test.test_dbm_dumb   DumbDBMTestCase with its `dumbdbm` global patched to partydbm
- test.test_dbm_sqlite3 (3.13+) ReadOnly and Misuse, `dbm_sqlite3` patched to partydbm

Each suite runs twice: as the leader, and as a follower of a holder process (see
_roles.py). `dbm.whichdb` is patched for each test so that 'r' opens reach partydbm
(without it they would fail, or worse, silently test a stdlib backend). The tests write
relative paths, so the module runs in a temporary directory.

Run: `python -m pytest conformance` (or `-k Follower`, `-k Gdbm`), or
`python -m unittest conformance.test_cpython_dbm` from the repository root.

A test is skipped only when it checks another backend's file format or API detail:
SKIPS below is the one list, with the reason for each.
"""

from __future__ import annotations

import dbm
import importlib.util
import os
import pickle
import shutil
import sys
import tempfile
import types
import unittest
from typing import Any
from unittest import mock

import partydbm

from ._roles import ROLES, RoleMixin

try:
    from test import mapping_tests, test_dbm, test_dbm_dumb, test_shelve
    from test.support import os_helper
except ImportError as exc:  # fail loudly: a run that tests nothing must not pass
    raise ImportError(
        f"CPython's test package (test.test_dbm, test.test_shelve, ...) is not installed "
        f"for {sys.executable}, so the conformance suite cannot run. Use an interpreter "
        "that ships it (pyenv and python.org builds do; Debian needs "
        "libpython3.X-testsuite).") from exc


def _sqlite3_suite() -> types.ModuleType | None:
    # A function, not an `if sys.version_info` block: mypy checks for 3.10, where the
    # block would be dead code.
    try:
        return importlib.import_module("test.test_dbm_sqlite3")  # 3.13+
    except ImportError:
        return None


test_dbm_sqlite3 = _sqlite3_suite()

# test id (CPython module.class.method) -> why it cannot apply to partydbm.
SKIPS = {
    "test_dbm_gnu.TestGdbm.test_disallow_instantiation":
        "C-type detail: type(db)() of the _gdbm extension type must raise TypeError",
    "test_dbm_gnu.TestGdbm.test_reorganize":
        "gdbm file format: compares os.path.getsize() of one database file; a partydbm "
        "database is a directory",
    "test_dbm_gnu.TestGdbm.test_context_manager":
        "gdbm's own closed message 'GDBM object has already been closed'; partydbm uses "
        "dbm.dumb's and dbm.sqlite3's 'DBM object has already been closed' (docs/CONTRACT.md)",
    "test_dbm_dumb.DumbDBMTestCase.test_dumbdbm_creation_mode":
        "dbm.dumb file format: stats the .dat and .dir files",
    "test_dbm_dumb.DumbDBMTestCase.test_line_endings":
        "dbm.dumb file format: rewrites the line endings of the .dir file",
    "test_dbm_dumb.DumbDBMTestCase.test_eval":
        "dbm.dumb file format: writes a malicious .dir file",
    "test_dbm_dumb.DumbDBMTestCase.test_missing_data":
        "dbm.dumb file format: checks that no .dir/.dat/.bak files appear (and wants "
        "FileNotFoundError; partydbm raises partydbm.error with errno ENOENT, as dbm.gnu "
        "does: TestGdbm.test_nonexisting_file)",
    "test_dbm_dumb.DumbDBMTestCase.test_missing_index":
        "dbm.dumb file format: deletes the .dir file",
    "test_dbm_dumb.DumbDBMTestCase.test_sync_empty_unmodified":
        "dbm.dumb file format: when sync() writes the .dir and .bak files",
    "test_dbm_dumb.DumbDBMTestCase.test_sync_nonempty_unmodified":
        "dbm.dumb file format: when sync() writes the .dir and .bak files",
    "test_dbm_dumb.DumbDBMTestCase.test_readonly_files":
        "dbm.dumb file format: chmods the .dir and .dat files",
    "test_dbm_dumb.DumbDBMTestCase.test_nonascii_filename":
        "dbm.dumb file format: checks the .dat and .dir files (TestGdbm's "
        "test_nonascii_filename covers the name)",
    "test_dbm_dumb.DumbDBMTestCase.test_invalid_flag":
        "dbm.dumb rejects 'rf'; partydbm accepts dbm.gnu's suffix letters "
        "(open_flags == 'rwcnfsu', docs/CONTRACT.md; TestGdbm.test_flags)",
    "test_dbm_dumb.DumbDBMTestCase.test_check_closed":
        "calls iterkeys(), a dbm.dumb-only method outside the dbm API",
    "test_dbm_sqlite3.Misuse.test_misuse_iter_close1":
        "stores an int value (dbm.sqlite3's type coercion); partydbm raises TypeError "
        "for types other than bytes and str (docs/CONTRACT.md)",
    "test_dbm_sqlite3.Misuse.test_misuse_iter_close2":
        "stores int values (dbm.sqlite3's type coercion); partydbm raises TypeError "
        "for types other than bytes and str (docs/CONTRACT.md)",
    "test_dbm_sqlite3.Misuse.test_misuse_reinit":
        "Python-type detail of dbm.sqlite3's class: calls db.__init__(filename, flag=, "
        "mode=) on an open handle",
}


# -- partydbm under the names the suites import ------------------------------------------
def _flavour(name: str, default_flag: str) -> types.ModuleType:
    """partydbm dressed as one stdlib backend: the same open(), with that backend's
    default flag (every call goes through partydbm.open, so role patches apply)."""
    module = types.ModuleType(name, f"partydbm, as the {name} tests expect to find it")

    def open(file: Any, flag: str = default_flag, mode: int = 0o666) -> Any:
        return partydbm.open(file, flag, mode)

    module.open = open  # type: ignore[attr-defined]
    module.error = partydbm.error  # type: ignore[attr-defined]
    module.open_flags = partydbm.open_flags  # type: ignore[attr-defined]
    return module


GNU = _flavour("dbm.gnu", "r")
DUMB = _flavour("dbm.dumb", "c")
SQLITE3 = _flavour("dbm.sqlite3", "r")


def _remove(path: Any) -> None:
    """os_helper.unlink that also removes a database directory."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os_helper.unlink(path)


def _load_gnu() -> types.ModuleType:
    """A private copy of test.test_dbm_gnu, imported while "dbm.gnu" is partydbm (the
    real one skips itself without _gdbm, and its unlink() cannot remove a directory)."""
    spec = importlib.util.find_spec("test.test_dbm_gnu")
    if spec is None or spec.origin is None:
        raise ImportError(f"test.test_dbm_gnu is missing from {sys.executable}")
    private = importlib.util.spec_from_file_location(f"{__name__}._gnu", spec.origin)
    assert private is not None and private.loader is not None
    module = importlib.util.module_from_spec(private)
    saved = sys.modules.get("dbm.gnu")
    sys.modules["dbm.gnu"] = GNU
    try:
        private.loader.exec_module(module)
    finally:
        if saved is None:
            del sys.modules["dbm.gnu"]
        else:
            sys.modules["dbm.gnu"] = saved
    assert module.gdbm is GNU
    module.unlink = _remove  # type: ignore[attr-defined]
    return module


test_dbm_gnu = _load_gnu()


def _whichdb(original: Any) -> Any:
    def whichdb(filename: Any) -> str | None:
        if partydbm.whichdb(filename) == "partydbm":
            return "partydbm"
        return original(filename)  # type: ignore[no-any-return]

    return whichdb


# -- the adapters: what each suite needs around it -----------------------------------------
class _Partydbm(RoleMixin):
    """dbm.open() and shelve.open() reach partydbm, for this test only."""

    patches: tuple[tuple[Any, str, Any], ...] = ()

    def setUp(self) -> None:
        patchers: list[Any] = [
            mock.patch.object(dbm, "whichdb", _whichdb(dbm.whichdb)),
            mock.patch.dict(dbm._modules, {"partydbm": partydbm}),  # type: ignore[attr-defined]
            mock.patch.object(dbm, "_defaultmod", partydbm),
            *(mock.patch.object(*patch) for patch in self.patches),
        ]
        for patcher in patchers:
            patcher.start()
            self.addCleanup(patcher.stop)  # type: ignore[attr-defined]
        super().setUp()


class _Gnu(_Partydbm):
    def tearDown(self) -> None:
        if self.g is not None:  # type: ignore[attr-defined]
            self.g.close()  # type: ignore[attr-defined]
        self.role_session.finish()
        _remove(test_dbm_gnu.filename)
        super().tearDown()  # type: ignore[misc]


class _Dumb(_Partydbm):
    patches = ((test_dbm_dumb, "dumbdbm", DUMB),)

    def setUp(self) -> None:
        super().setUp()
        _remove(test_dbm_dumb._fname)  # its own setUp removes .dir/.dat/.bak files only

    def tearDown(self) -> None:
        self.role_session.finish()
        _remove(test_dbm_dumb._fname)
        super().tearDown()  # type: ignore[misc]


class _Sqlite3(_Partydbm):
    patches = ((test_dbm_sqlite3, "dbm_sqlite3", SQLITE3),)

    def tearDown(self) -> None:
        db = getattr(self, "db", None)
        if db is not None:
            db.close()
        self.role_session.finish()
        _remove(self.filename)  # type: ignore[attr-defined]
        super().tearDown()  # type: ignore[misc]


# -- the classes pytest and unittest collect ----------------------------------------------
def _suites() -> list[tuple[str, str, tuple[type, ...], dict[str, Any]]]:
    """(class name, CPython suite id, bases, attributes) of every suite, role aside."""
    suites: list[tuple[str, str, tuple[type, ...], dict[str, Any]]] = [
        ("Dbm", "test_dbm.AnyDBMTestCase",
         (_Partydbm, test_dbm.AnyDBMTestCase, unittest.TestCase), {"module": partydbm}),
        ("Shelve", "test_shelve.TestCase", (_Partydbm, test_shelve.TestCase), {}),
        ("Gdbm", "test_dbm_gnu.TestGdbm", (_Gnu, test_dbm_gnu.TestGdbm), {}),
        ("Dumb", "test_dbm_dumb.DumbDBMTestCase", (_Dumb, test_dbm_dumb.DumbDBMTestCase), {}),
    ]
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        suites.append((
            f"ShelveProto{proto}File", "test_shelve.TestShelveFileBase",
            (_Partydbm, test_shelve.TestShelveFileBase, mapping_tests.BasicTestMappingProtocol),
            {"dbm_mod": partydbm, "_args": {"protocol": proto}}))
    if test_dbm_sqlite3 is not None:
        for name in ("ReadOnly", "Misuse"):
            suites.append((f"Sqlite3{name}", f"test_dbm_sqlite3.{name}",
                           (_Sqlite3, getattr(test_dbm_sqlite3, name)), {}))
    return suites


def _with_skips(cls: type, suite: str) -> type:
    for name in unittest.TestLoader().getTestCaseNames(cls):
        reason = SKIPS.get(f"{suite}.{name}")
        if reason is not None:
            setattr(cls, name, unittest.skip(reason)(getattr(cls, name)))
    return cls


def _generate() -> dict[str, type]:
    classes = {}
    for name, suite, bases, attrs in _suites():
        for role in ROLES:
            full = f"{name}{role.capitalize()}"
            cls = type(full, bases, {**attrs, "role": role, "__module__": __name__,
                                     "__qualname__": full})
            classes[full] = _with_skips(cls, suite)
    return classes


globals().update(_generate())


# -- the module runs in a temporary directory ---------------------------------------------
_saved_cwd: str | None = None
_tmpdir: tempfile.TemporaryDirectory[str] | None = None


def setUpModule() -> None:
    global _saved_cwd, _tmpdir
    _saved_cwd = os.getcwd()
    _tmpdir = tempfile.TemporaryDirectory(prefix="partydbm-conformance-")
    os.chdir(_tmpdir.name)


def tearDownModule() -> None:
    global _saved_cwd, _tmpdir
    if _saved_cwd is not None:
        os.chdir(_saved_cwd)
        _saved_cwd = None
    if _tmpdir is not None:
        _tmpdir.cleanup()
        _tmpdir = None
