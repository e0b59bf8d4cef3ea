"""The disk: a directory we may not write, a full disk (a small tmpfs), a read-only
filesystem, corrupt or missing CURRENT/MANIFEST. Each is a partydbm.error naming the
cause; what was stored before is never damaged; partydbm.repair() recovers the
corrupt cases, and refuses while anybody has the database open.

Mounting needs root (CI runs as root); elsewhere those cases skip with the reason."""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import partydbm

from .conftest import PlyvelProbe
from .procs import Holder, Party

is_root = hasattr(os, "geteuid") and os.geteuid() == 0


class Tmpfs:
    def __init__(self, mnt: Path) -> None:
        self.mnt = mnt

    def remount(self, options: str) -> None:
        """Remount with `options`; retried a few times, as mount(8) can fail transiently
        while another mount on the machine holds its lock."""
        for attempt in range(5):
            done = subprocess.run(["mount", "-o", f"remount,{options}", str(self.mnt)],
                                  capture_output=True, text=True, timeout=30)
            if done.returncode == 0:
                return
            time.sleep(0.2 * (attempt + 1))
        raise AssertionError(f"remount,{options} failed: {done.stderr.strip()}")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Tmpfs]:
    """A 4 MB tmpfs, unmounted at the end (lazily: nothing of ours may stay on it)."""
    if not is_root:
        pytest.skip("needs root to mount a tmpfs (a small full disk, a read-only fs)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs",
                           str(mnt)], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield Tmpfs(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def _model(n: int = 50, seed: int = 1) -> dict[bytes, bytes]:
    rng = random.Random(seed)
    return {b"before-%04d" % i: rng.randbytes(rng.randint(0, 2000)) for i in range(n)}


def _check(path: Path, model: dict[bytes, bytes]) -> None:
    with partydbm.open(path, "r") as db:
        assert dict(db.items()) == model


# -- a full disk -----------------------------------------------------------------------------
@pytest.mark.parametrize("role", ["leader", "follower"])
def test_a_full_disk_is_a_clear_error_and_what_was_stored_stays(
        tmpfs: Tmpfs, role: str) -> None:
    path = tmpfs.mnt / "db"
    model = _model()
    holder = Holder(timeout=30) if role == "follower" else None
    try:
        if holder is not None:
            assert holder.open(path) == "leader"
        db = partydbm.open(path)
        assert db.is_leader is (role == "leader")
        db.update(model)
        db.sync()  # stored: on disk for sure (unsynced writes may sit in a buffer)
        rng = random.Random(2)
        acknowledged: dict[bytes, bytes] = {}
        with pytest.raises(partydbm.error) as info:
            for i in range(200):  # 200 x 64 kB: far more than the 4 MB there is
                key, value = b"fill-%04d" % i, rng.randbytes(64 * 1024)
                db[key] = value
                acknowledged[key] = value
        assert acknowledged, "the disk was full before the first write"
        assert "No space left on device" in str(info.value), info.value
        assert info.value.errno == errno.ENOSPC  # a follower's too: errno crosses the wire
        for key, value in model.items():  # reads still work
            assert db[key] == value
        db.close()
    finally:
        if holder is not None:
            holder.close()
    tmpfs.remount("size=64m")
    with partydbm.open(path, "r") as db:
        for key, value in model.items():
            assert db[key] == value
        for key, value in acknowledged.items():  # in the OS's hands before the disk filled
            assert db[key] == value
        assert db.get(b"fill-%04d" % len(acknowledged)) is None  # the one that failed


# -- not writable ----------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["r", "w", "c"])
def test_a_read_only_filesystem_is_a_clear_error_and_nothing_is_lost(
        tmpfs: Tmpfs, flag: str) -> None:
    path = tmpfs.mnt / "db"
    model = _model()
    with partydbm.open(path) as db:
        db.update(model)
    tmpfs.remount("ro")
    try:
        with pytest.raises(partydbm.error, match="Read-only file system"):
            partydbm.open(path, flag)
    finally:
        tmpfs.remount("rw")
    _check(path, model)


NOT_WRITABLE_PROBE = """
import os, sys, json
import partydbm
if os.geteuid() == 0:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
out = {}
for flag in ("r", "w", "c"):
    try:
        partydbm.open(sys.argv[1], flag, timeout=2).close()
        out[flag] = "opened"
    except partydbm.error as exc:
        out[flag] = str(exc)
    except BaseException as exc:
        out[flag] = "NOT a partydbm.error: %s: %s" % (type(exc).__name__, exc)
print(json.dumps(out))
"""


def test_a_database_directory_we_may_not_write_is_a_clear_error(tmp_path: Path) -> None:
    """The database belongs to the prober (nobody, when we are root), its directory is
    read-only (0555): LevelDB cannot create its log there."""
    base = Path(tempfile.mkdtemp(prefix="partydbm-ro-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        path = base / "db"
        model = _model()
        with partydbm.open(path, mode=0o644) as db:
            db.update(model)
        partydbm.let_go(path)
        if is_root:
            for root, dirs, files in os.walk(path):
                for name in [*dirs, *files]:
                    os.chown(os.path.join(root, name), 65534, 65534)
            os.chown(path, 65534, 65534)
        os.chmod(path, 0o555)
        with Party() as party:
            w = party.python(NOT_WRITABLE_PROBE, path)
            line = w.readline()
            assert w.wait() == 0, w.stderr()
        import json

        out = json.loads(line or "{}")
        for flag in "rwc":
            assert "Permission denied" in out[flag], out
        os.chmod(path, 0o755)
        _check(path, model)
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- corruption ------------------------------------------------------------------------------
def _make_db(path: Path) -> dict[bytes, bytes]:
    """A database with data in tables (compacted) and in the log (written after)."""
    model = _model(2000)
    with partydbm.open(path) as db:
        db.update(model)
        db.reorganize()
        late = {b"late-%d" % i: b"in the log %d" % i for i in range(20)}
        db.update(late)
    partydbm.let_go(path)  # LevelDB closed now, not at the end of the grace period
    return {**model, **late}


def _files(path: Path) -> dict[str, bytes]:
    """What LevelDB stored (its LOG and our LOCK change on every open attempt)."""
    return {p.name: p.read_bytes() for p in path.iterdir()
            if p.is_file() and p.name not in ("LOCK", "LOG", "LOG.old")}


def _manifest(path: Path) -> Path:
    (manifest,) = path.glob("MANIFEST-*")
    return manifest


DAMAGE: dict[str, tuple[Callable[[Path], object], str]] = {
    "CURRENT-missing": (lambda p: (p / "CURRENT").unlink(), "CURRENT"),
    "CURRENT-garbage": (lambda p: (p / "CURRENT").write_bytes(b"\x00garbage"), "CURRENT"),
    "CURRENT-names-a-missing-MANIFEST": (
        lambda p: (p / "CURRENT").write_bytes(b"MANIFEST-999999\n"), "MANIFEST-999999"),
    "MANIFEST-missing": (lambda p: _manifest(p).unlink(), "MANIFEST"),
    "MANIFEST-garbage": (
        lambda p: _manifest(p).write_bytes(random.Random(3).randbytes(4096)), "MANIFEST"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_corrupt_or_missing_CURRENT_or_MANIFEST_is_a_clear_error_and_repair_recovers(
        tmp_path: Path, damage: str) -> None:
    path = tmp_path / "db"
    model = _make_db(path)
    spoil, named = DAMAGE[damage]
    spoil(path)
    before = _files(path)
    for flag in ("r", "w", "c"):
        with pytest.raises(partydbm.error) as info:
            partydbm.open(path, flag)
        assert named in str(info.value), info.value
        assert "repair" in str(info.value), "the error should point at partydbm.repair"
        assert _files(path) == before, "a failed open changed the stored files"
    partydbm.repair(path)
    _check(path, model)


def test_missing_CURRENT_never_starts_an_empty_database_over_the_data(tmp_path: Path) -> None:
    """The bug: LevelDB, asked to create a missing database, took a database without
    CURRENT for a new one and deleted its tables (every compacted key lost)."""
    path = tmp_path / "db"
    model = _make_db(path)
    (path / "CURRENT").unlink()
    with pytest.raises(partydbm.error, match="CURRENT file is missing"):
        partydbm.open(path, "c")
    assert any(p.suffix == ".ldb" for p in path.iterdir()), "tables were deleted"
    partydbm.repair(path)
    _check(path, model)


def test_a_corrupt_table_file_is_repaired_keeping_what_can_be_read(tmp_path: Path) -> None:
    path = tmp_path / "db"
    model = _make_db(path)
    (table,) = sorted(path.glob("*.ldb"))[:1]
    table.write_bytes(table.read_bytes()[:-100])  # its footer gone: unreadable
    with pytest.raises(partydbm.error, match=r"Corruption|ldb"), \
            partydbm.open(path, "r") as db:
        dict(db.items())
    partydbm.repair(path)
    with partydbm.open(path, "r") as db:
        got = dict(db.items())
    assert all(model[k] == v for k, v in got.items()), "repair invented or changed values"
    assert all(k in got for k in model if k.startswith(b"late-")), "the log was lost"


# -- repair refuses while the database is open -------------------------------------------------
def test_repair_refuses_while_this_process_has_the_database_open(
        tmp_path: Path, plyvel_can_open: PlyvelProbe) -> None:
    path = tmp_path / "db"
    with partydbm.open(path) as db:
        db[b"k"] = b"v"
        with pytest.raises(partydbm.error) as info:
            partydbm.repair(path)
        assert info.value.errno == errno.EBUSY
        assert db[b"k"] == b"v" and db.is_leader
        assert not plyvel_can_open(path), "repair let go of this process's LOCK"
    partydbm.repair(path)
    _check(path, {b"k": b"v"})


def test_repair_refuses_while_another_process_has_the_database_open(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with Party() as party:
        other = party.repl()
        assert other.open(path) == "leader"
        other.exec("db[b'k'] = b'v'")
        with pytest.raises(partydbm.error) as info:
            partydbm.repair(path)
        assert info.value.errno == errno.EBUSY
        assert str(other.pid) in str(info.value)
        assert other.eval("db[b'k']") == b"v"
        with partydbm.open(path) as db:  # a follower here: repair still refuses
            assert not db.is_leader
            with pytest.raises(partydbm.error):
                partydbm.repair(path)
    partydbm.repair(path)
    _check(path, {b"k": b"v"})


def test_repair_of_something_that_is_not_a_database_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(partydbm.error) as info:
        partydbm.repair(tmp_path / "missing")
    assert info.value.errno == errno.ENOENT
    (tmp_path / "plain").mkdir()
    with pytest.raises(partydbm.error):
        partydbm.repair(tmp_path / "plain")
    assert "repair" in partydbm.__all__


def test_repaired_files_are_no_wider_than_the_database(tmp_path: Path) -> None:
    path = tmp_path / "db"
    old = os.umask(0)
    try:
        with partydbm.open(path, mode=0o644) as db:
            db[b"k"] = b"v"
        partydbm.repair(path)
    finally:
        os.umask(old)
    for p in path.iterdir():
        if p.is_file():
            assert stat.S_IMODE(p.stat().st_mode) & ~0o644 == 0, p.name
    _check(path, {b"k": b"v"})
