"""The LevelDB binding: which one partydbm takes, and a database moving between plyvel
(LevelDB 1.22) and plyvel-next (LevelDB 1.23) — written under one, opened and read
under the other, and a leader on one failing over to a follower on the other.

The moving tests need both bindings installed (CI's Python 3.12 venv: the `bindings`
extra) and skip elsewhere. Each process blocks the binding it must not use
(`sys.modules[name] = None`) before partydbm is imported."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from partydbm import _backend

from .procs import Party

BOTH = all(importlib.util.find_spec(n) is not None for n in _backend.BINDINGS)
needs_both = pytest.mark.skipif(not BOTH, reason="needs plyvel and plyvel-next installed "
                                "(pip install -e '.[bindings]' on CPython 3.12, Linux x86_64)")
OTHER = {"plyvel": "plyvel_next", "plyvel_next": "plyvel"}


@pytest.fixture
def party() -> Iterator[Party]:
    with Party() as p:
        yield p


RUN = """
import json, sys
for name in json.loads(sys.argv[1]):
    sys.modules[name] = None
import partydbm
from partydbm import _backend
out = {"binding": _backend.plyvel.__name__}
exec(sys.argv[2])
print(json.dumps(out))
"""


def run(party: Party, code: str, *args: Any, without: tuple[str, ...] = (),
        extra_path: str | None = None) -> dict[str, Any]:
    """Run `code` (sys.argv[3:] = `args`) in a fresh interpreter that cannot import the
    modules `without`; what it puts in `out` comes back, or {"error": the last line of
    its stderr}. `extra_path` goes first on sys.path (after the script's directory)."""
    env = {}
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_path,
                                                          os.environ.get("PYTHONPATH")]))
    worker = party.python(RUN, json.dumps(without), code, *args, env=env)
    line = worker.readline()
    if worker.wait() != 0 or line is None:
        return {"error": worker.stderr().strip().splitlines()[-1]}
    result: dict[str, Any] = json.loads(line)
    return result


# -- which binding ---------------------------------------------------------------------------
def test_with_neither_binding_the_import_error_says_what_to_install(party: Party) -> None:
    out = run(party, "", without=_backend.BINDINGS)
    assert out["error"].startswith("ModuleNotFoundError: partydbm needs a LevelDB binding"), out
    assert "pip install plyvel-next" in out["error"]


def test_a_binding_that_is_installed_but_broken_is_not_quietly_replaced(
        party: Party, tmp_path: Path) -> None:
    """A plyvel_next that fails to import (a missing library of its own) must surface,
    not make partydbm fall back to plyvel."""
    fake = tmp_path / "plyvel_next"
    fake.mkdir()
    (fake / "__init__.py").write_text("import _partydbm_no_such_module\n")
    out = run(party, "", extra_path=str(tmp_path))
    assert out == {"error": "ModuleNotFoundError: No module named '_partydbm_no_such_module'"}


@pytest.mark.parametrize("name", ["plyvel", "plyvel_next"])
def test_the_binding_is_plyvel_next_where_installed_else_plyvel(party: Party, name: str) -> None:
    installed = importlib.util.find_spec(name) is not None
    if not installed:
        pytest.skip(f"{name} is not installed here")
    alone = run(party, "", without=(OTHER[name],))
    assert alone == {"binding": name}
    if BOTH:  # deterministic whatever the order of sys.path or of installation
        assert run(party, "") == {"binding": "plyvel_next"}


@pytest.mark.parametrize(("msg", "kind"), [
    (b"IO error: lock /d/LOCK: Resource temporarily unavailable", _backend.LockHeld),
    (b"IO error: lock /d/LOCK: " + os.strerror(13).encode(), _backend.LockHeld),  # EACCES
    (b"IO error: lock /d/LOCK: already held by process", _backend.LockTainted),
    (b"IO error: /d/LOCK: " + os.strerror(13).encode(), None),  # the file, not the lock
    (b"IO error: /d/LOCK: Resource temporarily unavailable", None),
    (b"Corruption: lock /d/LOCK: already held by process", None),
])
def test_lock_failures_are_told_by_leveldbs_message(msg: bytes, kind: type | None) -> None:
    assert _backend.lock_failure(msg) is kind


# -- a database moving between the bindings -----------------------------------------------
WRITE = """
path, start, n = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
with partydbm.open(path, "c") as db:
    with db.write_batch() as wb:
        for i in range(start, start + n):
            wb.put(b"k%06d" % i, b"v%d-" % i + bytes(range(256)) * 4)
    del db[b"k%06d" % start]
    db.reorganize()  # table files of this LevelDB's making, not only its log
    db[b"last"] = out["binding"]
"""
READ = """
import hashlib
path = sys.argv[3]
with partydbm.open(path, "r") as db:
    out["keys"] = [k.hex() for k in db.keys()]
    out["digest"] = hashlib.sha256(b"".join(v for _, v in db.items())).hexdigest()
    out["last"] = db[b"last"].decode()
    out["one"] = [k.hex() for k, _ in db.iterator(prefix=b"la", reverse=True)]
"""


def _model(batches: list[tuple[str, int, int]]) -> tuple[list[str], str, str]:
    data: dict[bytes, bytes] = {}
    for binding, start, n in batches:
        data.update({b"k%06d" % i: b"v%d-" % i + bytes(range(256)) * 4
                     for i in range(start, start + n)})
        data.pop(b"k%06d" % start)
        data[b"last"] = binding.encode()
    keys = sorted(data)
    digest = hashlib.sha256(b"".join(data[k] for k in keys)).hexdigest()
    return [k.hex() for k in keys], digest, batches[-1][0]


def _under(party: Party, binding: str, code: str, *args: Any) -> dict[str, Any]:
    out = run(party, code, *args, without=(OTHER[binding],))
    assert out.get("binding") == binding, out
    return out


@needs_both
@pytest.mark.parametrize("first", ["plyvel", "plyvel_next"])
def test_a_database_written_under_one_binding_is_read_and_written_under_the_other(
        party: Party, tmp_path: Path, first: str) -> None:
    path = tmp_path / "db"
    second = OTHER[first]
    batches: list[tuple[str, int, int]] = []
    for binding, start in ((first, 0), (second, 1500), (first, 3000)):
        _under(party, binding, WRITE, path, start, 2000)
        batches.append((binding, start, 2000))
        keys, digest, last = _model(batches)
        for reader in (first, second):
            got = _under(party, reader, READ, path)
            assert got["keys"] == keys and got["digest"] == digest, reader
            assert (got["last"], got["one"]) == (last, [b"last".hex()])


@needs_both
def test_a_leader_on_one_binding_fails_over_to_a_follower_on_the_other(
        party: Party, tmp_path: Path) -> None:
    path = tmp_path / "db"
    a = party.repl(without="plyvel_next")
    b = party.repl(without="plyvel")
    assert a.eval("partydbm._backend.plyvel.__name__") == "plyvel"
    assert b.eval("partydbm._backend.plyvel.__name__") == "plyvel_next"
    assert a.open(path) == "leader"
    assert b.open(path) == "follower"
    a.exec("db.update({b'a%03d' % i: b'from plyvel' for i in range(300)})")
    b.exec("db.update({b'b%03d' % i: b'from plyvel_next' for i in range(300)})")
    model = {b"a%03d" % i: b"from plyvel" for i in range(300)}
    model.update({b"b%03d" % i: b"from plyvel_next" for i in range(300)})
    a.kill()
    b.exec("db[b'after'] = b'takeover'")
    model[b"after"] = b"takeover"
    assert b.eval("db.is_leader") is True
    c = party.repl(without="plyvel_next")
    assert c.open(path) == "follower"
    assert c.eval("dict(db.items())") == model
    b.kill()
    assert c.eval("dict(db.items())") == model
    assert c.eval("db.is_leader") is True
