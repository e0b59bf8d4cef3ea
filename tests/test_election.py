"""Who leads: handover on close, the socket's life cycle, a LOCK nobody serves, long
paths, stale sockets, one leader at a time, and who may use the socket.

All processes are workers (tests/workers/, driven through tests/procs.py); crashes are SIGKILL.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import partydbm
from partydbm import _election

from .procs import (
    DEADLINE,
    Party,
    RemoteError,
    Witness,
    all_replies,
    leaders_of,
)
from .wire import decode

pytestmark = pytest.mark.multiprocess

SOCK = "partydbm.sock"


@pytest.fixture
def party() -> Iterator[Party]:
    with Party() as p:
        yield p


def _create(party: Party, path: Path, **kwargs: object) -> None:
    """Create the database in a worker that then exits (nobody holds it afterwards)."""
    w = party.repl()
    w.open(path, **kwargs)  # type: ignore[arg-type]
    w.exec("db.close()")
    assert w.finish() == 0, w.stderr()


# -- handover on close ---------------------------------------------------------------------
def test_leader_closing_its_last_handle_hands_over(party: Party, tmp_path: Path) -> None:
    path = tmp_path / "db"
    sock = path / SOCK
    link = tmp_path / "link"
    link.symlink_to(path, target_is_directory=True)
    a, b, c = party.repls(3)
    assert a.open(path) == "leader"
    a.open(link, name="db2")  # a second handle in the leader process, another spelling
    assert b.open(path) == "follower"
    assert c.open(path) == "follower"
    a.exec("db['a'] = '1'")
    old = Witness(sock)
    a.exec("db.close()")  # not the last handle: still the leader, still holding the LOCK
    assert a.eval("db2.is_leader") is True
    assert old.same()
    late = party.repl()
    assert late.open(path) == "follower"
    late.exec("db.close()")
    b.exec("db['b'] = '1'")
    a.exec("db2.close(); partydbm.let_go()")  # the last one: hand over (now, not later)
    b.exec("db['b'] = '2'")
    c.exec("db['c'] = '1'")
    model = {b"a": b"1", b"b": b"2", b"c": b"1"}
    assert b.eval("dict(db.items())") == model
    assert c.eval("dict(db.items())") == model
    assert len(leaders_of([b, c])) == 1
    assert old.replaced(), "the new leader serves a socket of its own"
    # The old leader's process lives on and can join again, as a follower.
    assert a.open(path) == "follower"
    assert a.eval("dict(db.items())") == model


def test_closing_a_lone_leader_removes_its_socket(party: Party, tmp_path: Path) -> None:
    path = tmp_path / "db"
    a = party.repl()
    a.open(path)
    assert stat.S_ISSOCK(os.lstat(path / SOCK).st_mode)
    a.exec("db.close(); partydbm.let_go()")
    assert not (path / SOCK).exists()
    assert a.open(path) == "leader"  # the same process can lead again
    assert stat.S_ISSOCK(os.lstat(path / SOCK).st_mode)


def test_a_leader_of_a_deleted_database_leaves_the_new_ones_socket_alone(
        party: Party, tmp_path: Path) -> None:
    """The directory is removed under a leader and a database made anew at the path,
    which another process leads: when the old leader closes at last, the socket it
    unlinks must be its own, not the new leader's, or nobody could reach the new one."""
    path = tmp_path / "db"
    old, new, late = party.repls(3)
    assert old.open(path) == "leader"
    shutil.rmtree(path)
    assert new.open(path) == "leader"
    new.exec("db['k'] = 'v'")
    theirs = Witness(path / SOCK)
    old.exec("db.close(); partydbm.let_go()")  # not at the end of its grace period
    assert theirs.same(), "the old leader removed the new leader's socket"
    assert late.open(path, timeout=5) == "follower"
    assert late.eval("db['k']") == b"v"


# -- a LOCK held by someone who never serves -----------------------------------------------
def test_lock_held_by_plain_leveldb_user_raises_timeout(party: Party, tmp_path: Path) -> None:
    path = tmp_path / "db"
    _create(party, path)
    plain = party.spawn("plain_leveldb", path)
    assert plain.expect("ready") == ""
    prober = party.repl()
    for flag in ("c", "r"):
        with pytest.raises(RemoteError) as info:
            prober.open(path, flag, timeout=1)
        err = info.value
        assert err.isa("Timeout", "TimeoutError", "error"), err
        assert "does not answer" in err.message, err.message
        assert str(plain.pid) in err.message, err.message
    # Once the plain user is gone, the same process opens (no endless loop, no stuck
    # waiter left over from the failed opens).
    plain.kill()
    assert prober.open(path, timeout=DEADLINE) == "leader"
    prober.exec("db['k'] = 'v'")
    assert prober.eval("db['k']") == b"v"


def test_non_leader_never_unlinks_a_socket_even_a_stale_one(
        party: Party, tmp_path: Path) -> None:
    """Only the LOCK holder may remove the socket: an opener that cannot get the lock
    must not touch a socket file, even one nobody listens on."""
    path = tmp_path / "db"
    _create(party, path)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path / SOCK))
    stale.close()  # a socket file with nobody listening
    before = Witness(path / SOCK)
    plain = party.spawn("plain_leveldb", path)
    plain.expect("ready")
    prober = party.repl()
    with pytest.raises(RemoteError) as info:
        prober.open(path, timeout=1)
    assert info.value.isa("Timeout")
    assert before.same()
    plain.kill()
    assert prober.open(path) == "leader"  # now it holds the LOCK: it may replace it
    assert before.replaced()


# -- long paths ----------------------------------------------------------------------------
def _long_path(tmp_path: Path) -> Path:
    path = tmp_path / ("d" * 50) / ("e" * 50) / "db"
    assert len(os.fsencode(path / SOCK)) > 107
    return path


def test_database_too_deep_for_a_socket_path_works_with_followers(
        party: Party, tmp_path: Path) -> None:
    path = _long_path(tmp_path)
    a, b = party.repls(2)
    assert a.open(path) == "leader"
    assert b.open(path) == "follower"
    a.exec("db['from-a'] = '1'")
    b.exec("db['from-b'] = '2'")
    model = {b"from-a": b"1", b"from-b": b"2"}
    assert a.eval("dict(db.items())") == model
    assert b.eval("dict(db.items())") == model
    # Failover works there too.
    a.kill()
    b.exec("db['after'] = '3'")
    assert b.eval("db.is_leader") is True
    c = party.repl()
    assert c.open(path) == "follower"
    assert c.eval("db['after']") == b"3"
    # The socket lives in the database directory (reached through /proc/self/fd/N, or
    # a symlink of ours): the directory's permissions guard it, and no one can squat
    # its address.
    found = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files
             if f == SOCK]
    assert found == [os.path.join(os.path.realpath(path), SOCK)]
    via = "/proc/self/fd/" if _election.VIA_PROC else tempfile.gettempdir()
    assert b.eval("db._engine.address").startswith(via)


# -- stale sockets -------------------------------------------------------------------------
def test_socket_left_by_a_killed_leader_is_replaced_by_the_next(
        party: Party, tmp_path: Path) -> None:
    path = tmp_path / "db"
    a = party.repl()
    assert a.open(path) == "leader"
    a.exec("db['a'] = '1'")
    stale = Witness(path / SOCK)
    a.kill()
    assert stale.same(), "SIGKILL leaves the socket file behind"
    b = party.repl()
    assert b.open(path) == "leader"
    assert stale.replaced()
    c = party.repl()
    assert c.open(path) == "follower"
    assert c.eval("db['a']") == b"1"
    c.exec("db['c'] = '1'")
    assert b.eval("db['c']") == b"1"


def test_followers_coming_and_going_never_touch_the_leaders_socket(
        party: Party, tmp_path: Path) -> None:
    path = tmp_path / "db"
    leader = party.repl()
    assert leader.open(path) == "leader"
    sock = Witness(path / SOCK)
    for how in ("close", "exit", "kill"):
        f = party.repl()
        assert f.open(path, "r" if how == "exit" else "c") == "follower"
        assert f.eval("db.get('x')") is None
        if how == "close":
            f.exec("db.close()")
        elif how == "exit":
            assert f.finish() == 0
        else:
            f.kill()
        assert sock.same(), how
        assert leader.eval("db.is_leader") is True
    late = party.repl()
    assert late.open(path) == "follower"


# -- one leader at a time ------------------------------------------------------------------
def test_exactly_one_of_four_processes_leads(party: Party, tmp_path: Path) -> None:
    path = tmp_path / "db"
    go = tmp_path / "go"
    workers = party.repls(4)
    for w in workers:
        w.submit("exec", f"wait_file({str(go)!r})\ndb = partydbm.open({str(path)!r})\n"
                         "result = db.is_leader")
    go.touch()
    assert sum(all_replies(workers)) == 1
    model: dict[bytes, bytes] = {}
    for round_ in range(2):  # kill the leader twice: 4, then 3, then 2 processes
        leaders = leaders_of(workers)
        assert len(leaders) == 1, f"round {round_}: {leaders}"
        leaders[0].kill()
        workers.remove(leaders[0])
        for i, w in enumerate(workers):
            w.submit("exec", f"db[b'r{round_}-{i}'] = b'x'")
            model[b"r%d-%d" % (round_, i)] = b"x"
        all_replies(workers)
        assert len(leaders_of(workers)) == 1, f"after round {round_}"
        for w in workers:
            assert w.eval("dict(db.items())") == model


# -- access --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644, 0o666])
def test_socket_is_no_wider_than_the_database_files(
        party: Party, tmp_path: Path, mode: int) -> None:
    path = tmp_path / "db"
    a = party.repl()
    a.open(path, mode=mode)
    sock_bits = stat.S_IMODE(os.lstat(path / SOCK).st_mode)
    marker_bits = stat.S_IMODE(os.stat(path / "PARTYDBM").st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert marker_bits == mode & ~umask
    assert sock_bits & ~marker_bits == 0, (oct(sock_bits), oct(marker_bits))
    if mode == 0o600:
        assert sock_bits & 0o077 == 0


def _world_traversable_dir() -> str:
    """pytest's tmp_path lives under a 0700 directory: another user could not reach
    anything there whatever the database's mode, which would prove nothing."""
    base = tempfile.mkdtemp(prefix="partydbm-uid-", dir="/tmp")
    os.chmod(base, 0o755)
    return base


def _probe(party: Party, path: str, address: str | bytes) -> dict[str, object]:
    raw = os.fsencode(address) if isinstance(address, str) else address
    w = party.spawn("uid_probe", 65534, path, raw.hex())
    line = w.readline()
    assert w.wait() == 0, w.stderr()
    assert line is not None, w.stderr()
    result: dict[str, object] = decode(line)
    assert result["uid"] == 65534
    return result


needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="needs root to run a probe as another uid (os.setuid)")


@needs_root
@pytest.mark.parametrize("where", ["socket-file", "deep"])
def test_another_uid_cannot_use_the_database_through_the_socket(
        party: Party, where: str) -> None:
    """A user who may not write the database files gets nothing through the socket: not
    through the API, not by speaking the protocol to the socket directly."""
    base = _world_traversable_dir()
    try:
        if where == "socket-file":
            path = os.path.join(base, "db")
            mode = 0o644  # others may read the files, not write them
        else:
            path = os.path.join(base, "x" * 60, "y" * 60, "db")
            os.makedirs(os.path.dirname(path), mode=0o755)
            mode = 0o600
        leader = party.repl()
        leader.open(path, mode=mode)
        leader.exec("db['secret'] = 'kept'")
        assert stat.S_ISSOCK(os.lstat(os.path.join(path, SOCK)).st_mode)
        # deep: too long a path to connect to; the probe reaches it as partydbm does
        address: str | bytes = os.path.join(path, SOCK) if where == "socket-file" else b""
        result = _probe(party, path, address)
        assert result["api"] != "opened", result
        replies = result["raw"]
        assert isinstance(replies, list)
        accepted = [r for r in replies if isinstance(r, list) and len(r) == 3 and r[1] is True]
        assert accepted == [], result
        assert leader.eval("dict(db.items())") == {b"secret": b"kept"}
    finally:
        shutil.rmtree(base, ignore_errors=True)


@needs_root
def test_another_uid_is_refused_with_a_partydbm_error(party: Party) -> None:
    base = _world_traversable_dir()
    try:
        path = os.path.join(base, "db")
        leader = party.repl()
        leader.open(path, mode=0o644)  # readable by others, LOCK not writable by them
        result = _probe(party, path, os.path.join(path, SOCK))
        assert result["api"] != "opened"
        assert result["api_error_is_partydbm_error"] is True, result["api"]
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- the lock waiter's callback ----------------------------------------------------------
@pytest.mark.parametrize("how", ["closed", "retired"])
def test_a_lock_granted_to_a_lockfile_closed_meanwhile_is_dropped_quietly(
        tmp_path: Path, how: str) -> None:
    """The race behind a crash of the waiter thread under load: the waiter got the LOCK,
    then release() closed the LockFile (it saw no waiter left) before the callback ran.
    The close gave the lock back; the callback must not touch the closed fd."""
    from partydbm import _registry
    from partydbm._election import LockFile

    path = str(tmp_path / "db")
    partydbm.open(path, "c").close()
    lockfile = LockFile(path)
    assert lockfile.try_lock()
    if how == "closed":
        lockfile.close()
    else:
        lockfile.retire()
    _registry._lock_acquired(path, lockfile)  # raised ValueError (fd -1) before
    assert lockfile.fd == -1
    with partydbm.open(path, "c") as db:  # the lock really is free
        assert db.is_leader
