"""Many clients and big values: 200 followers at once, 1,000 connections coming and
going without the leader growing (file descriptors, threads, memory), a 10 MB value and
a 100 MB batch from a follower, and the documented limits as clear errors.

The leader is a worker process (tests/workers/, repl) so that its /proc entries can be
read; raw clients (tests/hostile.py) make the numbers cheap."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import partydbm
from partydbm import _protocol as P

from .conftest import Opener
from .hostile import Raw, is_error
from .procs import Party, all_replies

pytestmark = [pytest.mark.multiprocess, pytest.mark.heavy]

MB = 1 << 20


@pytest.fixture
def party() -> Iterator[Party]:
    with Party() as p:
        yield p


def _status(pid: int) -> dict[str, int]:
    """fds, threads, and memory (kB) of a process, from /proc."""
    out = {"fds": len(os.listdir(f"/proc/{pid}/fd")),
           "threads": len(os.listdir(f"/proc/{pid}/task"))}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
    return out


def _settles(pid: int, baseline: dict[str, int], slack: int = 0,
             timeout: float = 15.0) -> dict[str, int]:
    """Wait until the leader's fds and threads are back near `baseline` (handler threads
    leave a moment after their follower does)."""
    deadline = time.monotonic() + timeout
    while True:
        now = _status(pid)
        if (now["fds"] <= baseline["fds"] + slack
                and now["threads"] <= baseline["threads"] + slack):
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"the leader kept resources: {baseline} -> {now}")
        time.sleep(0.05)


# -- many clients ---------------------------------------------------------------------------
FOLLOWER_WORK = """
model = {}
for i in range(150):
    key = b'%s-%d' % (NAME, i)
    db[key] = b'v%d' % i
    model[key] = b'v%d' % i
    assert db[key] == b'v%d' % i
result = {k: v for k, v in db.items() if k.startswith(NAME + b'-')} == model
"""


def test_200_followers_connected_at_once_are_all_served(party: Party, tmp_path: Path) -> None:
    path = tmp_path / "db"
    leader = party.repl()
    assert leader.open(path) == "leader"
    leader.exec("db.update({b'shared': b'yes'})")
    workers = party.repls(3)
    for i, w in enumerate(workers):
        assert w.open(path) == "follower"
        w.exec(f"NAME = b'w{i}'")
    raws: list[Raw] = []
    try:
        for _ in range(200):
            raw = Raw(path)
            assert raw.hello()[1] is True
            raws.append(raw)
        for w in workers:  # real follower handles work while the 200 stay connected
            w.submit("exec", FOLLOWER_WORK)
        for raw in raws:
            assert raw.request(P.GET, b"shared")[1:] == [True, b"yes"]
        assert _status(leader.pid)["threads"] >= 200
        assert all_replies(workers, timeout=60) == [True, True, True]
    finally:
        for raw in raws:
            raw.close()
    assert leader.eval("len(db)") == 1 + 3 * 150


CYCLES = 1000


def _cycle(path: Path, i: int) -> None:
    """One short-lived connection, in one of the ways a follower may come and go."""
    raw = Raw(path)
    try:
        kind = i % 5
        if kind == 0:
            raw.hello()
            assert raw.request(P.GET, b"k")[1:] == [True, b"v"]
        elif kind == 1:
            raw.hello()
            raw.request(P.PUT, b"cycle", b"%d" % i, False)
        elif kind == 2:
            raw.hello()
            raw.send(P.pack([P.GET, 1, b"k"])[:3])  # leaves mid-message
        elif kind == 3:
            raw.send(b"\xc1garbage")
            assert is_error(raw.reply(), "protocol")
        # kind 4: connects and leaves without a word
    finally:
        raw.close()


def test_1000_connections_coming_and_going_leave_no_fds_threads_or_memory(
        party: Party, tmp_path: Path) -> None:
    path = tmp_path / "db"
    leader = party.repl()
    assert leader.open(path) == "leader"
    leader.exec("db[b'k'] = b'v'")
    for i in range(100):  # warm-up: caches, first allocations, pools
        _cycle(path, i)
    _settles(leader.pid, _status(leader.pid), slack=10**6)
    time.sleep(0.2)
    before = _status(leader.pid)
    for i in range(CYCLES):
        _cycle(path, i)
    after = _settles(leader.pid, before)
    assert after["fds"] <= before["fds"], (before, after)
    assert after["threads"] <= before["threads"], (before, after)
    assert after["VmRSS"] - before["VmRSS"] < 16 * 1024, (before, after)  # kB
    assert leader.eval("db[b'k']") == b"v"


def test_follower_handles_opened_and_closed_100_times_leave_the_leader_as_it_was(
        party: Party, tmp_path: Path) -> None:
    path = tmp_path / "db"
    leader = party.repl()
    assert leader.open(path) == "leader"
    churn = party.repl()
    churn.exec(f"import partydbm\nPATH = {str(path)!r}")
    churn.exec("for i in range(10):\n    d = partydbm.open(PATH)\n    d[b'x'] = b'%d' % i\n"
               "    d.close()")
    before = _settles(leader.pid, _status(leader.pid), slack=10**6)
    churn.exec("for i in range(100):\n    d = partydbm.open(PATH)\n    assert not d.is_leader\n"
               "    d[b'x'] = b'%d' % i\n    d.close()", timeout=120)
    after = _settles(leader.pid, before)
    assert after["VmRSS"] - before["VmRSS"] < 16 * 1024, (before, after)
    assert leader.eval("db[b'x']") == b"99"


# -- big values ------------------------------------------------------------------------------
BIG = """
import hashlib, os, resource
def peak_kb():
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) for l in f if l.startswith('VmHWM'))
base = peak_kb()
value = os.urandom(10 * MB)
db[b'ten'] = value
assert db[b'ten'] == value
blob = os.urandom(100 * MB)
with db.write_batch() as wb:
    for i in range(100):
        wb.put(b'batch-%03d' % i, blob[i * MB:(i + 1) * MB])
ok = all(db[b'batch-%03d' % i] == blob[i * MB:(i + 1) * MB] for i in (0, 42, 99))
digest = hashlib.sha256(blob).hexdigest()
del blob, value
result = {'ok': ok, 'digest': digest, 'base_kb': base, 'peak_kb': peak_kb()}
"""


def test_a_10MB_value_and_a_100MB_batch_from_a_follower_work_within_bounded_memory(
        party: Party, tmp_path: Path) -> None:
    path = tmp_path / "db"
    leader = party.repl()
    assert leader.open(path) == "leader"
    leader_base = _status(leader.pid)["VmHWM"]
    follower = party.repl()
    assert follower.open(path) == "follower"
    follower.exec(f"MB = {MB}")
    out = follower.exec(BIG, timeout=180)
    assert out["ok"] is True
    leader_peak = _status(leader.pid)["VmHWM"]
    digest = leader.eval(
        "__import__('hashlib').sha256(b''.join(db[b'batch-%03d' % i] for i in range(100)))"
        ".hexdigest()", timeout=120)
    assert digest == out["digest"]
    payload_kb = 100 * 1024
    # Loose bounds: the follower holds the batch, its frame and the socket's copy; the
    # leader its receive buffer, the decoded batch, LevelDB's WriteBatch and memtable.
    print("follower", out, "leader", leader_base, leader_peak)
    assert out["peak_kb"] - out["base_kb"] < 5 * payload_kb, out
    assert leader_peak - leader_base < 6 * payload_kb, (leader_base, leader_peak)


def test_a_value_over_the_limit_is_a_clear_error_in_both_roles(open_db: Opener) -> None:
    db = open_db()
    with pytest.raises(partydbm.error) as info:
        db[b"huge"] = b"\0" * (P.MAX_VALUE + 1)
    assert info.value.errno == errno.EFBIG and "MAX_VALUE" in str(info.value)
    with pytest.raises(partydbm.error, match="MAX_KEY"):
        db[b"k" * (P.MAX_KEY + 1)] = b"v"
    assert b"huge" not in db and len(db) == 0
    db[b"k" * P.MAX_KEY] = b"v"  # at the limit is fine
    assert db[b"k" * P.MAX_KEY] == b"v"


def test_a_batch_over_the_limits_is_a_clear_error_and_stores_nothing(
        open_db: Opener, monkeypatch: pytest.MonkeyPatch) -> None:
    db = open_db()
    monkeypatch.setattr(P, "MAX_BATCH_OPS", 10)
    monkeypatch.setattr(P, "MAX_BATCH_BYTES", 1000)
    with pytest.raises(partydbm.error, match="MAX_BATCH_OPS"), db.write_batch() as wb:
        for i in range(11):
            wb.put(b"k%d" % i, b"v")
    with pytest.raises(partydbm.error, match="MAX_BATCH_BYTES"), db.write_batch() as wb:
        wb.put(b"a", b"x" * 600)
        wb.put(b"b", b"x" * 600)
    with pytest.raises(partydbm.error, match="MAX_BATCH_BYTES"):
        db.update({b"a": b"x" * 600, b"b": b"x" * 600})
    assert len(db) == 0
    with db.write_batch() as wb:
        for i in range(10):
            wb.put(b"k%d" % i, b"v")
    assert len(db) == 10


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_leader_out_of_file_descriptors_waits_instead_of_spinning(
        party: Party, tmp_path: Path) -> None:
    """accept() failing with EMFILE used to be retried at once, forever: a core spent
    until some follower left. Now it backs off, and serves again once fds are free."""
    path = tmp_path / "db"
    leader = party.repl()
    leader.exec("import resource\nresource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))")
    assert leader.open(path) == "leader"
    leader.exec("db[b'k'] = b'v'")
    raws: list[Raw] = []
    try:
        for _ in range(80):  # more than it has fds for: the rest wait in the backlog
            raws.append(Raw(path))
        time.sleep(0.5)
        start = _cpu_seconds(leader.pid)
        time.sleep(2.0)
        used = _cpu_seconds(leader.pid) - start
        assert used < 1.0, f"the leader burnt {used:.2f}s of CPU in 2s waiting for fds"
    finally:
        for raw in raws:
            raw.close()
    deadline = time.monotonic() + 20
    while True:
        try:
            raw = Raw(path)
            raw.sock.settimeout(2)
            assert raw.hello()[1] is True
            assert raw.request(P.GET, b"k")[1:] == [True, b"v"]
            raw.close()
            break
        except (AssertionError, OSError):
            assert time.monotonic() < deadline, "the leader never served again"
            time.sleep(0.1)
