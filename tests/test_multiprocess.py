"""The party: several processes on one database at once, checked against a model.

Every process here is a worker (tests/workers/) driven through tests/procs.py: the test
process itself never opens a database, so no test leaves an engine or a lock-waiter
thread behind in pytest. Crashes are SIGKILL; every wait has a deadline.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .procs import (
    DEADLINE,
    Party,
    RemoteError,
    Witness,
    Worker,
    all_replies,
    clean_exit_stderr,
    dump,
    leaders_of,
    wait_for,
)
from .wire import decode, encode

pytestmark = [pytest.mark.multiprocess, pytest.mark.heavy]

@pytest.fixture
def party() -> Iterator[Party]:
    with Party() as p:
        yield p


def _start_together(workers: list[Worker], codes: list[str], go: Path) -> None:
    """Submit one piece of code to each worker behind a barrier file, then release them
    all at once (see `all_replies` for the answers)."""
    for w, code in zip(workers, codes, strict=True):
        w.submit("exec", f"wait_file({str(go)!r})\n{code}")
    go.touch()


# -- concurrent writers --------------------------------------------------------------------
def test_three_writers_on_distinct_keys_all_land(party: Party, tmp_path: Path) -> None:
    path = tmp_path / "db"
    writers = party.repls(3)
    roles = [w.open(path) for w in writers]
    assert sorted(roles) == ["follower", "follower", "leader"]
    _start_together(writers, [f"result = write_range(db, 'w{i}-%04d', 300, 'value-{i}-%d')"
                              for i in range(3)], tmp_path / "go")
    model: dict[bytes, bytes] = {}
    for written in all_replies(writers):
        model.update(written)
    assert len(model) == 900
    for w in writers:  # every process sees the same whole
        assert w.eval("len(db)") == 900
        assert w.eval("dict(db.items())") == model
    for w in writers:
        w.exec("db.close()")
    assert dump(party, path) == model


def test_three_writers_on_the_same_keys_leave_one_of_the_last_values(
        party: Party, tmp_path: Path) -> None:
    """Writes from one handle apply in order, so each key ends with the *last* value some
    writer gave it — never an older one, never a mix."""
    path = tmp_path / "db"
    writers = party.repls(3)
    for w in writers:
        w.open(path)
    keys = 40
    rounds = 8
    code = ("for r in range({rounds}):\n"
            "    for k in range({keys}):\n"
            "        db[b'k%02d' % k] = b'w{i}-r%d' % r\n")
    _start_together(writers, [code.format(rounds=rounds, keys=keys, i=i) for i in range(3)],
                    tmp_path / "go")
    all_replies(writers, timeout=60)
    final = dump_via(writers[0])
    assert len(final) == keys
    assert writers[1].eval("len(db)") == keys
    last_values = {b"w%d-r%d" % (i, rounds - 1) for i in range(3)}
    for k in range(keys):
        assert final[b"k%02d" % k] in last_values
    assert writers[2].eval("dict(db.items())") == final


def dump_via(worker: Worker) -> dict[bytes, bytes]:
    items: dict[bytes, bytes] = worker.eval("dict(db.items())")
    return items


# -- read your writes across processes -----------------------------------------------------
@pytest.mark.parametrize("roles", ["writer-leads", "reader-leads", "both-follow"])
def test_a_write_acknowledged_in_one_process_is_read_by_another(
        party: Party, tmp_path: Path, roles: str) -> None:
    path = tmp_path / "db"
    third = None
    if roles == "both-follow":
        third = party.repl()
        assert third.open(path) == "leader"
    writer, reader = party.repl(), party.repl()
    first, second = (reader, writer) if roles == "reader-leads" else (writer, reader)
    first.open(path)
    second.open(path)
    assert writer.eval("db.is_leader") is (roles == "writer-leads")
    assert reader.eval("db.is_leader") is (roles == "reader-leads")
    rng = random.Random(7)
    model: dict[bytes, bytes] = {}
    for n in range(60):
        key = b"key-%d" % rng.randrange(12)
        if rng.random() < 0.7:
            value = b"%d" % n
            writer.exec(f"db[{key!r}] = {value!r}")
            model[key] = value
        else:
            writer.exec(f"db.pop({key!r}, None)")
            model.pop(key, None)
        # The write was acknowledged: the other process sees it on its very next read.
        assert reader.eval(f"db.get({key!r})") == model.get(key)
        assert reader.eval(f"{key!r} in db") is (key in model)
    assert reader.eval("dict(db.items())") == model
    assert reader.eval("len(db)") == len(model)
    if third is not None:
        assert third.eval("dict(db.items())") == model


# -- read-only followers -------------------------------------------------------------------
READ_ONLY_WRITES = [
    "db['a'] = 'x'",
    "db['new'] = 'x'",
    "del db['a']",
    "del db['missing']",
    "db.pop('a')",
    "db.popitem()",
    "db.setdefault('new', b'x')",
    "db.update({'a': 'x'})",
    "db.clear()",
    "db.reorganize()",
    "db.write_batch()",
]


def test_read_only_follower_reads_and_refuses_every_write(party: Party, tmp_path: Path) -> None:
    path = tmp_path / "db"
    leader, follower = party.repl(), party.repl()
    assert leader.open(path) == "leader"
    model = {b"a": b"1", b"b": b"2", b"c": b"3"}
    leader.exec("db.update({b'a': b'1', b'b': b'2', b'c': b'3'})")
    assert follower.open(path, "r") == "follower"
    assert follower.eval("db['a']") == b"1"
    assert follower.eval("db.get('zz')") is None
    assert follower.eval("'b' in db") is True
    assert follower.eval("len(db)") == 3
    assert follower.eval("db.keys()") == [b"a", b"b", b"c"]
    assert follower.eval("dict(db.items())") == model
    assert follower.eval("list(db.iterator(start='b', include_value=False))") == [b"b", b"c"]
    assert follower.eval("(db.firstkey(), db.nextkey('a'))") == [b"a", b"b"]
    for statement in READ_ONLY_WRITES:
        with pytest.raises(RemoteError) as info:
            follower.exec(statement)
        assert info.value.isa("ReadOnlyError", "error"), (statement, info.value)
    # The leader's data is untouched, and the 'r' handle still reads new writes.
    leader.exec("db['d'] = '4'")
    assert follower.eval("dict(db.items())") == {**model, b"d": b"4"}
    assert leader.eval("dict(db.items())") == {**model, b"d": b"4"}


def test_read_only_handle_stays_read_only_after_its_process_becomes_leader(
        party: Party, tmp_path: Path) -> None:
    path = tmp_path / "db"
    leader, follower = party.repl(), party.repl()
    leader.open(path)
    leader.exec("db['a'] = '1'")
    assert follower.open(path, "r") == "follower"
    leader.kill()
    assert follower.eval("db['a']") == b"1"  # fails over and takes the lead
    assert follower.eval("db.is_leader") is True
    with pytest.raises(RemoteError) as info:
        follower.exec("db['a'] = '2'")
    assert info.value.isa("ReadOnlyError")
    assert follower.eval("db['a']") == b"1"


# -- leader turnover -----------------------------------------------------------------------
def test_constant_leader_turnover_loses_no_key(party: Party, tmp_path: Path) -> None:
    """20 rounds of 10 short-lived processes that each open, write one key and exit: the
    leader changes all the time, and every one of the 200 writes survives. (The
    processes are forked by a worker that never opens the database: see forker.)"""
    path = tmp_path / "db"
    rounds, per_round = 20, 10
    forker = party.spawn("forker")
    model: dict[bytes, bytes] = {}
    for r in range(rounds):
        for p in range(per_round):
            key, value = f"r{r:02d}-p{p}", f"value-{r}-{p}"
            how = "close" if p % 2 else "exit"
            forker.send(encode([str(path), key, value, how]))
            assert isinstance(decode(forker.expect("")), int)
            model[key.encode()] = value.encode()
        forker.send(encode("reap"))
        codes = decode(forker.expect("", DEADLINE + 10))  # the forker's own deadline first
        assert codes == [0] * per_round, f"round {r}: exit codes {codes}:\n{forker.stderr()}"
    assert not clean_exit_stderr(forker.stderr()), forker.stderr()
    assert dump(party, path) == model


# -- handover on close and on exit ---------------------------------------------------------
def test_leader_exit_without_close_hands_over_cleanly(party: Party, tmp_path: Path) -> None:
    path = tmp_path / "db"
    sock = path / "partydbm.sock"
    leader, follower = party.repl(), party.repl()
    assert leader.open(path) == "leader"
    leader.exec("db['from-leader'] = 'a'")
    assert follower.open(path) == "follower"
    old = Witness(sock)
    assert leader.finish() == 0  # stdin closed: the script ends, the handle still open
    assert not clean_exit_stderr(leader.stderr()), leader.stderr()
    follower.exec("db['from-follower'] = 'b'")
    assert follower.eval("db.is_leader") is True
    assert follower.eval("dict(db.items())") == {b"from-leader": b"a", b"from-follower": b"b"}
    assert old.replaced()
    latecomer = party.repl()
    assert latecomer.open(path) == "follower"
    assert latecomer.eval("db['from-leader']") == b"a"


def test_lone_leader_exit_leaves_no_socket(party: Party, tmp_path: Path) -> None:
    path = tmp_path / "db"
    leader = party.repl()
    leader.open(path)
    leader.exec("db['k'] = 'v'")
    assert (path / "partydbm.sock").exists()
    assert leader.finish() == 0
    assert not clean_exit_stderr(leader.stderr()), leader.stderr()
    assert not (path / "partydbm.sock").exists()
    assert dump(party, path) == {b"k": b"v"}


FOLLOWER_SCRIPT = """
import sys, partydbm
db = partydbm.open(sys.argv[1])
assert not db.is_leader
db['follower'] = 'was here'
assert db['leader'] == b'here'
{extra}
print('follower done', flush=True)
"""


@pytest.mark.parametrize("extra", [
    "",
    "it = db.iterator(); next(it)  # an unfinished iterator",
    "db2 = partydbm.open(sys.argv[1], 'r'); db2.get('leader')  # a second handle",
], ids=["plain", "open-iterator", "two-handles"])
def test_idle_follower_does_not_keep_its_interpreter_alive(
        party: Party, tmp_path: Path, extra: str) -> None:
    path = tmp_path / "db"
    leader = party.repl()
    assert leader.open(path) == "leader"
    leader.exec("db['leader'] = 'here'")
    before = Witness(path / "partydbm.sock")
    script = party.python(FOLLOWER_SCRIPT.format(extra=extra), path)
    assert script.expect("follower done") == ""
    assert script.wait(20) == 0, script.stderr()
    assert not clean_exit_stderr(script.stderr()), script.stderr()
    # The follower's exit took nothing from the leader.
    assert leader.eval("db.is_leader") is True
    assert before.same()
    assert leader.eval("db['follower']") == b"was here"


# -- threads in a follower -----------------------------------------------------------------
def test_one_follower_handle_shared_by_four_threads(party: Party, tmp_path: Path) -> None:
    path = tmp_path / "db"
    leader, follower = party.repl(), party.repl()
    assert leader.open(path) == "leader"
    base = leader.exec("result = write_range(db, 'base-%02d', 20, 'b%d')")
    assert follower.open(path) == "follower"
    seed = int.from_bytes(os.urandom(4), "big")
    print(f"thread workload seed {seed}")
    outcome = follower.eval(f"thread_workload(db, {seed})", timeout=60)
    assert outcome["errors"] == [], "\n".join(outcome["errors"])
    expected = {**base, **outcome["model"]}
    assert follower.eval("dict(db.items())") == expected
    assert leader.eval("dict(db.items())") == expected
    assert follower.eval("len(db)") == len(expected)


def test_four_follower_threads_ride_through_a_leader_kill(party: Party, tmp_path: Path) -> None:
    """The leader is SIGKILLed while four threads of a follower have requests in flight:
    the follower takes over and every thread's model still holds (each write applied
    exactly once, in order)."""
    path = tmp_path / "db"
    started = tmp_path / "started"
    leader, follower = party.repl(), party.repl()
    assert leader.open(path) == "leader"
    base = leader.exec("result = write_range(db, 'base-%02d', 20, 'b%d')")
    assert follower.open(path) == "follower"
    seed = int.from_bytes(os.urandom(4), "big")
    print(f"thread workload seed {seed}")
    follower.submit("eval", f"thread_workload(db, {seed}, nops=600, started={str(started)!r})")
    wait_for(started.exists, what="the threads' 50th operation")
    leader.kill()
    outcome = follower.reply(timeout=60)
    assert outcome["errors"] == [], "\n".join(outcome["errors"])
    assert follower.eval("db.is_leader") is True
    expected = {**base, **outcome["model"]}
    assert follower.eval("dict(db.items())") == expected
    assert dump_via(follower) == expected


# -- writers through failover and handover -------------------------------------------------
def test_writers_carry_on_through_a_leader_kill(party: Party, tmp_path: Path) -> None:
    """Two followers write without pause; the writing leader is SIGKILLed. Every write the
    followers made is there once; of the leader's own writes, those present are exactly
    the first k it made (its writes apply in order; none after a gap)."""
    path = tmp_path / "db"
    flag = tmp_path / "killed"
    a, b, c = party.repls(3)
    assert a.open(path) == "leader"
    b.open(path)
    c.open(path)
    a.submit("exec", f"write_through(db, 'a-%05d', None, {str(tmp_path / 'never')!r})")
    for name, w in (("b", b), ("c", c)):
        w.submit("exec", f"result = write_through(db, '{name}-%05d', "
                         f"{str(tmp_path / ('started-' + name))!r}, {str(flag)!r})")
    wait_for(lambda: all((tmp_path / f"started-{n}").exists() for n in "bc"),
             what="both followers writing")
    a.kill()
    flag.touch()
    model: dict[bytes, bytes] = {}
    for written in all_replies([b, c], timeout=60):
        model.update(written)
    final = dump_via(b)
    assert len(leaders_of([b, c])) == 1
    theirs = {k: v for k, v in final.items() if not k.startswith(b"a-")}
    assert theirs == model
    mine = sorted(k for k in final if k.startswith(b"a-"))
    assert mine == [b"a-%05d" % j for j in range(len(mine))], "a gap in the leader's writes"
    assert all(final[k] == b"%d" % j for j, k in enumerate(mine))


@pytest.mark.parametrize("how", ["close", "grace", "exit"])
def test_writers_carry_on_while_the_leader_hands_over(
        party: Party, tmp_path: Path, how: str) -> None:
    """The leader closes its handle and lets go (or closes it and lingers through its
    grace period, or its script ends) while two followers write without pause: nothing
    is lost, one of them leads afterwards."""
    path = tmp_path / "db"
    sock = path / "partydbm.sock"
    flag = tmp_path / "gone"
    a, b, c = party.repls(3)
    assert a.open(path) == "leader"
    a.exec("db['a'] = '1'")
    b.open(path)
    c.open(path)
    for name, w in (("b", b), ("c", c)):
        w.submit("exec", f"result = write_through(db, '{name}-%05d', "
                         f"{str(tmp_path / ('started-' + name))!r}, {str(flag)!r})")
    wait_for(lambda: all((tmp_path / f"started-{n}").exists() for n in "bc"),
             what="both followers writing")
    old = Witness(sock)
    if how == "close":
        a.exec("db.close(); partydbm.let_go()")
    elif how == "grace":
        a.exec("db.close()")  # idle: it serves them until its grace period ends
        wait_for(old.replaced, what="a follower leading after the grace period")
    else:
        assert a.finish() == 0
        assert not clean_exit_stderr(a.stderr()), a.stderr()
    flag.touch()
    model = {b"a": b"1"}
    for written in all_replies([b, c], timeout=60):
        model.update(written)
    assert len(leaders_of([b, c])) == 1
    assert dump_via(b) == model
    assert dump_via(c) == model


PIPELINED_DELETE_THEN_PUT = """
out = {}
def deleter():
    try:
        del db['missing']
        out['del'] = 'no error'
    except KeyError:
        out['del'] = 'KeyError'
    except Exception as exc:
        out['del'] = repr(exc)
def putter():
    db['x'] = '1'
    out['put'] = 'ok'
t1 = threading.Thread(target=deleter)
t1.start()
time.sleep(0.1)  # the delete is sent first (smaller request id)
t2 = threading.Thread(target=putter)
t2.start()
t1.join(30)
t2.join(30)
result = out
"""


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_pipelined_delete_of_a_missing_key_still_raises_after_leader_death(
        party: Party, tmp_path: Path) -> None:
    """Two threads of a follower have a delete (of a missing key) and a put in flight; the
    leader applies both and dies before answering. Replayed on the new leader, the delete
    must still report that the key was missing."""
    path = tmp_path / "db"
    leader = party.repl(env={"PARTYDBM_CRASH_AT": "after_apply:2"})
    assert leader.open(path) == "leader"
    follower = party.repl()
    assert follower.open(path) == "follower"
    os.kill(leader.pid, signal.SIGSTOP)
    wait_for(lambda: _stopped(leader.pid), what="the leader stopped")
    follower.submit("exec", PIPELINED_DELETE_THEN_PUT)
    time.sleep(0.3)  # both requests wait in the stopped leader's socket: one recv reads both
    os.kill(leader.pid, signal.SIGCONT)
    out = follower.reply()
    assert leader.wait() == -signal.SIGKILL  # the seam: dead after applying both
    assert follower.eval("db.is_leader") is True
    assert out == {"del": "KeyError", "put": "ok"}
    assert follower.eval("dict(db.items())") == {b"x": b"1"}


# -- scheduling ------------------------------------------------------------------------------
NICENESS = """
import os, threading
from partydbm._server import SERVE_NICENESS
def niceness():
    return {t.name: os.getpriority(os.PRIO_PROCESS, t.native_id)
            for t in threading.enumerate() if t.native_id is not None}
"""


@pytest.mark.skipif(sys.platform != "linux" or len(os.sched_getaffinity(0)) < 2,
                    reason="threads have their own niceness on Linux; given way with 2 CPUs")
def test_serving_threads_give_way_to_the_leaders_own_threads(party: Party,
                                                              tmp_path: Path) -> None:
    path = tmp_path / "db"
    leader, follower = party.repl(), party.repl()
    assert leader.open(path) == "leader"
    assert follower.open(path) == "follower"
    follower.exec("db[b'k'] = b'v'")  # a serving thread exists and has served
    leader.exec(NICENESS)
    nice = leader.eval("niceness()")
    step = leader.eval("SERVE_NICENESS")
    base = os.getpriority(os.PRIO_PROCESS, 0)  # the worker's, inherited (`nice make test`)
    assert step > 0 and base < 19, "at niceness 19 the serving threads cannot go lower"
    assert nice["MainThread"] == base
    by_job = {name.split()[0]: v for name, v in nice.items()}
    assert by_job["partydbm-serve"] == min(base + step, 19)
    assert by_job["partydbm-accept"] == min(base + step, 19)
    # The application's own threads keep theirs, new ones included.
    leader.exec("t = threading.Thread(target=lambda: None, name='app'); t.start(); t.join()")
    assert leader.eval("os.getpriority(os.PRIO_PROCESS, threading.get_native_id())") == base
    assert follower.eval("db[b'k']") == b"v"


@pytest.mark.skipif(sys.platform != "linux", reason="threads have their own niceness on Linux")
def test_a_leader_on_one_cpu_keeps_its_serving_threads_at_its_priority(
        party: Party, tmp_path: Path) -> None:
    # Nowhere else to run: a niced server would get a tenth of the CPU against a busy
    # application thread, and its followers would crawl.
    path = tmp_path / "db"
    leader, follower = party.repl(), party.repl()
    leader.exec("import os\nos.sched_setaffinity(0, {min(os.sched_getaffinity(0))})")
    assert leader.open(path) == "leader"
    assert follower.open(path) == "follower"
    follower.exec("db[b'k'] = b'v'")
    leader.exec(NICENESS)
    assert set(leader.eval("list(niceness().values())")) == {os.getpriority(os.PRIO_PROCESS, 0)}


def test_every_thread_of_partydbm_has_a_name_of_its_own(party: Party, tmp_path: Path) -> None:
    """py-spy and threading.enumerate() tell partydbm's threads apart: no two share a
    name, whatever their job or database (the hang-up watch and the passing watchdog
    were both "partydbm-watch" once)."""
    leader, follower = party.repl(), party.repl()
    for name in ("db", "db2"):
        assert leader.open(tmp_path / name, name=name) == "leader"
        assert follower.open(tmp_path / name, name=name) == "follower"
        follower.exec(f"{name}[b'k'] = b'v'")  # its serving thread has its name
    names = "[t.name for t in threading.enumerate() if t.name.startswith('partydbm')]"
    for worker, jobs in ((leader, ["accept", "serve", "watchdog"]),
                         (follower, ["hangup-watch"])):
        got = worker.eval(names)
        assert len(got) == len(set(got)), got
        assert sorted(n.split()[0] for n in got) == sorted(
            f"partydbm-{job}" for job in jobs for _ in range(2)), got
        assert all(str(tmp_path) in n for n in got), got
