"""A crowd is never refused: many processes opening one database at the same instant, or
reconnecting at once when their leader is SIGKILLed, all get through.

The storms run in the crowd worker, tests/workers/crowd.py (a parent that imported
partydbm forks the crowd, so pytest never forks); here they run with 64 processes and
a leader's listen backlog of 2 (the PARTYDBM_LISTEN_BACKLOG seam), so that most
connects find it full and must wait. The full 300 against the system's own backlog
are marked `crowd` (deselected by default: `pytest -m crowd`); bench/crowd.py reports
their timings.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import partydbm
from partydbm import _sockets

from .procs import Holder, Party, wait_for
from .wire import decode

pytestmark = [pytest.mark.multiprocess, pytest.mark.heavy]

SMALL = 64
FULL = 300
SMALL_BACKLOG = {"PARTYDBM_LISTEN_BACKLOG": "2"}
# (crowd size, extra environment): the CI size with a tiny backlog, and the full crowd
# against the system's backlog (somaxconn), marked `crowd`.
SIZES = [pytest.param(SMALL, SMALL_BACKLOG, id=f"{SMALL}-backlog2"),
         pytest.param(FULL, {}, id=f"{FULL}", marks=pytest.mark.crowd)]


@pytest.fixture
def party() -> Iterator[Party]:
    with Party() as p:
        yield p


def storm(party: Party, *args: Any, env: dict[str, str], deadline: float = 90) -> Any:
    w = party.spawn("crowd", *args, env=env)
    line = w.readline(deadline)
    assert line is not None, w.stderr()
    assert w.wait() == 0, w.stderr()
    return decode(line)


def everyone_got_through(report: dict[str, Any], n: int) -> None:
    """Every child opened, wrote and read back what the model says; nothing it was told
    was written is missing from the database, and nothing else is there."""
    assert report["errors"] == {}
    assert report["reported"] == n
    assert report["ok"] == n
    assert report["bad_exits"] == 0
    assert report["lost_count"] == 0, report["lost"]
    assert report["unexpected"] == []


@pytest.mark.parametrize(("n", "env"), SIZES)
def test_a_crowd_opening_at_once_is_never_refused(
        party: Party, tmp_path: Path, n: int, env: dict[str, str]) -> None:
    report = storm(party, "open", tmp_path / "db", n, "--lead", env=env)
    everyone_got_through(report, n)
    assert report["seed_seen"] == n  # each one read what the leader had written
    assert report["leaders"] == 0  # the Holder led throughout


@pytest.mark.parametrize(("n", "env"), SIZES)
def test_a_crowd_racing_to_create_a_new_database_all_get_in(
        party: Party, tmp_path: Path, n: int, env: dict[str, str]) -> None:
    report = storm(party, "open", tmp_path / "new", n, env=env)
    everyone_got_through(report, n)
    assert report["leaders"] == 1


@pytest.mark.parametrize(("n", "env"), SIZES)
def test_a_crowd_of_followers_carries_on_when_its_leader_is_killed(
        party: Party, tmp_path: Path, n: int, env: dict[str, str]) -> None:
    report = storm(party, "failover", tmp_path / "db", n, env=env)
    assert report["opened_before_kill"] == n
    everyone_got_through(report, n)


@pytest.mark.parametrize("n", [32, pytest.param(FULL, marks=pytest.mark.crowd)])
def test_a_crowd_forked_from_a_killed_leader_starts_one_helper(
        party: Party, tmp_path: Path, n: int) -> None:
    """Children forked by a leader (after it opened the database) can never lead
    themselves: when it is SIGKILLed, one helper process leads for all of them. One
    each would start as many interpreters at once (150 took longer than the timeout)."""
    report = storm(party, "prefork", tmp_path / "db", n, env={})
    everyone_got_through(report, n)
    assert report["helpers"] == 1


def test_a_leader_short_of_file_descriptors_takes_more(party: Party, tmp_path: Path) -> None:
    """The Holder may have 40 files open (LevelDB and Python take about 15): the crowd
    would need 64 more. Waiting for fds to come back would time every latecomer out."""
    report = storm(party, "open", tmp_path / "db", SMALL, "--lead", "--leader-nofile", 40,
                   "--timeout", 5, env={})
    everyone_got_through(report, SMALL)


LEADER_WITHOUT_THREADS = """
import sys, threading, partydbm
start, refusals = threading.Thread.start, [3]
def failing_start(self):  # as under a limit on tasks (cgroup pids.max, RLIMIT_NPROC)
    if threading.current_thread().name.startswith("partydbm-accept") and refusals[0]:
        refusals[0] -= 1
        raise RuntimeError("can't start new thread")
    start(self)
threading.Thread.start = failing_start
db = partydbm.open(sys.argv[1], "c")
db[b"seed"] = b"s"
print("leader" if db.is_leader else "follower", flush=True)
sys.stdin.read()
"""


def test_a_leader_that_cannot_start_a_thread_lets_the_follower_wait(
        party: Party, tmp_path: Path) -> None:
    path = tmp_path / "db"
    leader = party.python(LEADER_WITHOUT_THREADS, path)
    assert leader.readline() == "leader", leader.stderr()
    with partydbm.open(path, "w", timeout=20) as db:
        assert not db.is_leader
        db[b"k"] = b"v"
        assert dict(db.items()) == {b"seed": b"s", b"k": b"v"}


# -- the backlog itself -------------------------------------------------------------------
def _fill_backlog(address: str, most: int) -> list[socket.socket]:
    """Connections that fill the listener's backlog (fewer than `most`: the last connect
    found it full)."""
    socks: list[socket.socket] = []
    while len(socks) < most:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(address)
        except BlockingIOError:
            s.close()
            break
        socks.append(s)
    return socks


def test_the_listen_backlog_is_as_large_as_the_system_allows(tmp_path: Path) -> None:
    """Linux caps listen(n) at net.core.somaxconn (and queues one more): counted up to
    256, which fits a default limit of 1024 open files."""
    try:
        somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    except OSError:
        pytest.skip("no /proc/sys/net/core/somaxconn")
    address = str(tmp_path / "s.sock")
    listener = _sockets.listen(address, 0o600)
    socks: list[socket.socket] = []
    try:
        socks = _fill_backlog(address, 256)
        assert len(socks) >= min(somaxconn, 256)
    finally:
        for s in socks:
            s.close()
        listener.close()


def test_a_fork_closes_the_copies_of_connections_its_parent_accepted(tmp_path: Path) -> None:
    """What a forked child of a leader runs (Server.forget_after_fork): every fd on a
    connection accepted on the leader's socket goes, even one no object knows of (as
    when accept() returned just before the fork); nothing else does. A copy left open
    kept a follower's connection up after the leader died (a crowd forked from the
    leader: one in 32 waited out its timeout)."""
    address = str(tmp_path / "s.sock")
    listener = _sockets.listen(address, 0o600)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    others = socket.socketpair()
    try:
        client.connect(address)
        accepted, _ = listener._accept()  # type: ignore[attr-defined]  # a bare fd
        _sockets.drop_accepted(listener)
        with pytest.raises(OSError):
            os.fstat(accepted)
        for sock in (listener, client, *others):
            os.fstat(sock.fileno())  # still open
        assert client.recv(1) == b""  # its peer is gone: the only copy was closed
    finally:
        for sock in (listener, client, *others):
            sock.close()


@pytest.fixture
def stopped_leader(tmp_path: Path) -> Iterator[tuple[Path, list[socket.socket], Holder]]:
    """A Holder leading with a backlog of 0, SIGSTOPped, its backlog filled by raw
    connections: every connect finds it full until the Holder is continued."""
    path = tmp_path / "db"
    holder = Holder(env={"PARTYDBM_LISTEN_BACKLOG": "0"})
    socks: list[socket.socket] = []
    try:
        assert holder.open(path) == "leader"
        holder.put(path, b"seed", b"s")
        os.kill(holder.pid, signal.SIGSTOP)
        wait_for(lambda: os.waitpid(holder.pid, os.WUNTRACED | os.WNOHANG)[0],
                 what="the Holder stopped")  # a stopped Holder accepts no more
        socks = _fill_backlog(str(path / "partydbm.sock"), 100)
        assert len(socks) < 100, "the backlog never filled"
        yield path, socks, holder
    finally:
        for s in socks:
            s.close()
        holder.kill()  # SIGKILL ends a stopped process too


def test_a_full_backlog_is_retried_until_the_deadline_then_times_out(
        stopped_leader: tuple[Path, list[socket.socket], Holder]) -> None:
    path, _, holder = stopped_leader
    with pytest.raises(partydbm.Timeout) as info:
        partydbm.open(path, "w", timeout=0.5)
    message = str(info.value)
    assert "listen backlog stayed full" in message, message
    tries = int(re.search(r"\((\d+) tries\)", message).group(1))  # type: ignore[union-attr]
    assert 2 <= tries < 100  # retried, with backoff: no busy spin
    os.kill(holder.pid, signal.SIGCONT)
    with partydbm.open(path, "w", timeout=20) as db:  # the leader is fine
        assert db[b"seed"] == b"s"


def test_a_full_backlog_is_retried_until_the_leader_accepts(
        stopped_leader: tuple[Path, list[socket.socket], Holder],
        monkeypatch: pytest.MonkeyPatch) -> None:
    path, _, holder = stopped_leader
    backing_off = threading.Event()

    def sleep(seconds: float) -> None:  # _sockets' sleeps between connects only
        backing_off.set()
        time.sleep(seconds)

    monkeypatch.setattr(_sockets, "time", types.SimpleNamespace(
        monotonic=time.monotonic, sleep=sleep))
    result: list[Any] = []

    def follow() -> None:
        try:
            with partydbm.open(path, "w", timeout=20) as db:
                db[b"k"] = b"v"
                result.append((db.is_leader, dict(db.items())))
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=follow)
    t.start()
    try:
        assert backing_off.wait(20), "the connect never found the backlog full"
        assert not result  # still waiting for room
    finally:
        os.kill(holder.pid, signal.SIGCONT)
        t.join(30)
    assert not t.is_alive()
    assert result == [(False, {b"seed": b"s", b"k": b"v"})]
