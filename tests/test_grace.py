"""The grace period (partydbm/_grace.py): after its last handle closes, a process's
engine lingers (a leader keeps LevelDB, a follower its connection and cache), and the
README's promises hold meanwhile:

1. another program gets the database within the grace period, and partydbm itself
   (repair) at once;
2. nothing lingers past interpreter exit, os._exit or fork;
3. a handle opened later sees every write made before, in any process.

Processes are workers (tests/workers/); most run with PARTYDBM_GRACE set to an hour, so
that whatever a test sees while an engine lingers cannot be the end of the grace period.
Crashes are SIGKILL; every wait has a deadline.
"""

from __future__ import annotations

import errno
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import partydbm
from partydbm._grace import LEADER

from .conftest import PlyvelProbe
from .procs import DEADLINE, Party, Witness, clean_exit_stderr, wait_for

pytestmark = pytest.mark.multiprocess

SOCK = "partydbm.sock"
LONG = {"PARTYDBM_GRACE": "3600"}  # no grace period ends during a test


@pytest.fixture
def party() -> Iterator[Party]:
    with Party() as p:
        yield p


# -- 1. another program gets the database ------------------------------------------------
def test_an_idle_leader_keeps_the_database_open_and_takes_it_back(
        party: Party, tmp_path: Path, plyvel_can_open: PlyvelProbe) -> None:
    path = tmp_path / "db"
    a = party.repl(env=LONG)
    assert a.open(path) == "leader"
    a.exec("db['k'] = 'v'; engine = db._engine; db.close()")
    server = Witness(path / SOCK)
    assert not plyvel_can_open(path), "the idle leader let go before its grace period ended"
    assert a.open(path) == "leader"
    assert a.eval("db._engine is engine"), "the lingering engine was not taken back"
    assert server.same() and a.eval("db['k']") == b"v"
    a.exec("partydbm.let_go()")  # a handle is open: no effect
    assert a.eval("db.is_leader") and not plyvel_can_open(path)
    a.exec("db.close(); partydbm.let_go()")
    assert plyvel_can_open(path)


def test_another_program_gets_the_database_once_the_grace_period_ends(
        party: Party, tmp_path: Path, plyvel_can_open: PlyvelProbe) -> None:
    path = tmp_path / "db"
    a = party.repl()  # the real grace period
    assert a.open(path) == "leader"
    a.exec("db['k'] = 'v'; db.close()")
    wait_for(lambda: plyvel_can_open(path), timeout=LEADER + DEADLINE,
             what="plain LevelDB opening the database after the grace period")
    assert not (path / SOCK).exists(), "the leader did not hand over cleanly"
    threads = "[t.name for t in threading.enumerate() if t.name.startswith('partydbm')]"
    wait_for(lambda: a.eval(threads) == [], what="no thread of partydbm left")
    assert a.open(path) == "leader"
    assert a.eval("db['k']") == b"v"


def test_repair_asks_an_idle_leader_to_let_go_at_once(party: Party, tmp_path: Path) -> None:
    path = tmp_path / "db"
    a = party.repl(env=LONG)
    assert a.open(path) == "leader"
    a.exec("db['k'] = 'v'; db.close()")
    partydbm.repair(path)  # else EBUSY for an hour
    assert a.open(path) == "leader"  # it let go: its LevelDB is opened anew
    assert a.eval("dict(db.items())") == {b"k": b"v"}


def test_repair_still_refuses_while_a_follower_has_the_database_open(
        party: Party, tmp_path: Path) -> None:
    """The idle leader does not let go while another process follows it: that one has
    the database open (or opened it a moment ago, and lingers)."""
    path = tmp_path / "db"
    a, b = party.repl(env=LONG), party.repl(env=LONG)
    assert a.open(path) == "leader"
    assert b.open(path) == "follower"
    a.exec("db['k'] = 'v'; db.close()")
    for b_open in (True, False):
        with pytest.raises(partydbm.error) as info:
            partydbm.repair(path)
        assert info.value.errno == errno.EBUSY
        assert str(a.pid) in str(info.value)
        if b_open:
            assert b.eval("db['k']") == b"v"
            b.exec("db.close()")  # lingering now, still connected
    assert b.open(path) == "follower"  # the leader never let go
    assert b.eval("dict(db.items())") == {b"k": b"v"}


def test_repair_closes_this_process_s_own_idle_engine(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with partydbm.open(path) as db:
        db[b"k"] = b"v"
    partydbm.repair(path)  # else EBUSY: "open in this process"
    with partydbm.open(path, "r") as db:
        assert dict(db.items()) == {b"k": b"v"}
    partydbm.let_go(path)


def test_an_idle_follower_whose_leader_dies_does_not_take_the_database(
        party: Party, tmp_path: Path, plyvel_can_open: PlyvelProbe) -> None:
    """It would lead for nobody, keeping every other program from the database."""
    path = tmp_path / "db"
    leader, idle = party.repl(env=LONG), party.repl(env=LONG)
    assert leader.open(path) == "leader"
    assert idle.open(path) == "follower"
    idle.exec("db['k'] = 'v'; db.close()")
    leader.kill()
    wait_for(lambda: plyvel_can_open(path), what="the LOCK free after the leader died")
    assert idle.open(path) == "leader"
    assert idle.eval("db['k']") == b"v"


# -- 2. nothing lingers past the process ---------------------------------------------------
LINGER_AND_END = """
import os, sys, partydbm
db = partydbm.open(sys.argv[1])
assert db.is_leader == (sys.argv[2] == "leader"), db.is_leader
db['by-' + sys.argv[2]] = 'x'
db.close()
print("closed", flush=True)
if sys.argv[3] == "os._exit":
    os._exit(0)
"""


@pytest.mark.parametrize("role", ["leader", "follower"])
def test_an_interpreter_exits_at_once_and_hands_over_what_lingers(
        party: Party, tmp_path: Path, role: str, plyvel_can_open: PlyvelProbe) -> None:
    path = tmp_path / "db"
    if role == "follower":
        leader = party.repl()
        assert leader.open(path) == "leader"
    script = party.python(LINGER_AND_END, path, role, "return", env=LONG)
    assert script.expect("closed") == ""
    assert script.wait(DEADLINE) == 0, "the grace period kept the interpreter alive"
    assert not clean_exit_stderr(script.stderr()), script.stderr()
    if role == "leader":  # handed over at exit, cleanly: its socket removed, the LOCK free
        assert not (path / SOCK).exists()
        assert plyvel_can_open(path)
    else:
        assert leader.eval("db['by-follower']") == b"x"


CLOSE_WHILE_EXITING = """
import sys, threading, time, partydbm
db = partydbm.open(sys.argv[1])
def late():
    time.sleep(0.3)  # the main thread is gone by now: the interpreter is joining this one
    db['late'] = 'x'
    db.close()
threading.Thread(target=late).start()
"""


def test_a_handle_closed_while_the_interpreter_exits_lets_go_at_once(
        party: Party, tmp_path: Path, plyvel_can_open: PlyvelProbe) -> None:
    """Python 3.12+ starts no thread once the interpreter joins its threads at exit, so
    no grace period can begin then: the close must not raise, and hand over now."""
    path = tmp_path / "db"
    script = party.python(CLOSE_WHILE_EXITING, path, env=LONG)
    assert script.wait(DEADLINE) == 0
    assert not clean_exit_stderr(script.stderr()), script.stderr()
    assert not (path / SOCK).exists()
    assert plyvel_can_open(path)
    b = party.repl()
    assert b.open(path) == "leader"
    assert b.eval("dict(db.items())") == {b"late": b"x"}


def test_os_exit_of_an_idle_leader_leaves_nothing_in_the_way(
        party: Party, tmp_path: Path) -> None:
    path = tmp_path / "db"
    script = party.python(LINGER_AND_END, path, "leader", "os._exit", env=LONG)
    assert script.expect("closed") == ""
    assert script.wait(DEADLINE) == 0
    stale = Witness(path / SOCK)  # left by the dead leader, as after SIGKILL
    b = party.repl()
    assert b.open(path, timeout=5) == "leader"
    assert stale.replaced()
    assert b.eval("dict(db.items())") == {b"by-leader": b"x"}


FORK_AND_OPEN = """
import json
ready = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        inherited = len(partydbm._registry._engines)
        with partydbm.open(path) as child_db:
            out = {"inherited": inherited, "leader": child_db.is_leader,
                   "seen": dict(child_db.items())}
            child_db[b'child'] = b'1'
        os.write(ready[1], json.dumps({k: repr(v) for k, v in out.items()}).encode())
    finally:
        os._exit(0)
os.close(ready[1])
got = os.read(ready[0], 65536)
os.waitpid(pid, 0)
result = json.loads(got)
"""


def test_a_child_forked_from_an_idle_leader_inherits_nothing_and_can_lead(
        party: Party, tmp_path: Path) -> None:
    """The idle leader closes before the fork (a child forked while LevelDB is open
    here could never lead it itself: docs/TRAPS.md, trap 2), and the child has no engine of
    the parent's waiting to be closed."""
    path = tmp_path / "db"
    a = party.repl(env=LONG)
    assert a.open(path) == "leader"
    a.exec(f"db['parent'] = '1'; db.close(); path = {str(path)!r}")
    got = a.exec(FORK_AND_OPEN)
    assert got == {"inherited": "0", "leader": "True", "seen": repr({b"parent": b"1"})}
    assert a.open(path) == "leader"  # the child's process is gone, and with it its hold
    assert a.eval("dict(db.items())") == {b"parent": b"1", b"child": b"1"}


def test_a_child_forked_from_an_idle_follower_inherits_nothing(
        party: Party, tmp_path: Path) -> None:
    path = tmp_path / "db"
    leader, a = party.repl(), party.repl(env=LONG)
    assert leader.open(path) == "leader"
    assert a.open(path) == "follower"
    a.exec(f"db['parent'] = '1'; engine = db._engine; db.close(); path = {str(path)!r}")
    got = a.exec(FORK_AND_OPEN)
    assert got == {"inherited": "0", "leader": "False", "seen": repr({b"parent": b"1"})}
    assert a.open(path) == "follower"
    assert a.eval("db._engine is engine"), "the child's exit took the parent's engine"
    assert a.eval("dict(db.items())") == {b"parent": b"1", b"child": b"1"}


# -- 3. a handle opened later sees everything written before -----------------------------
def _churn(rnd: random.Random, model: dict[bytes, bytes], n: int) -> str:
    """Code for a worker to change `n` random keys of the model (puts and deletes)."""
    lines = []
    for _ in range(n):
        key = b"k%02d" % rnd.randrange(40)
        if rnd.random() < 0.25:
            lines.append(f"db.pop({key!r}, None)")
            model.pop(key, None)
        else:
            value = b"%d" % rnd.randrange(10**6)
            lines.append(f"db[{key!r}] = {value!r}")
            model[key] = value
    return "\n".join(lines)


def test_a_lingering_follower_reads_every_write_made_meanwhile(
        party: Party, tmp_path: Path) -> None:
    """Its cache, kept while it lingers, stays coherent: each reopen reads (key by key,
    through the cache) what the other processes wrote while no handle was open."""
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rnd = random.Random(seed)
    path = tmp_path / "db"
    leader, writer, reader = party.repl(), party.repl(), party.repl(env=LONG)
    assert leader.open(path) == "leader"
    assert writer.open(path) == "follower"
    keys = [b"k%02d" % i for i in range(40)]
    model: dict[bytes, bytes] = {}
    for round_ in range(8):
        assert reader.open(path) == "follower"
        if round_:
            assert reader.eval("db._engine is engine"), "not the lingering engine"
        got = reader.eval(f"[db.get(k) for k in {keys!r}]")
        assert got == [model.get(k) for k in keys], f"round {round_}"
        reader.exec("engine = db._engine; db.close()")
        who = writer if round_ % 2 else leader
        who.exec(_churn(rnd, model, 30))
    # Each reopen read through the cache it kept: had it been dropped, all 40 would miss.
    assert reader.eval("engine.route.cache.misses") < 8 * 40


def test_a_lingering_follower_whose_leader_died_reads_the_new_leader_s_writes(
        party: Party, tmp_path: Path) -> None:
    path = tmp_path / "db"
    leader, other, idle = party.repl(), party.repl(), party.repl(env=LONG)
    assert leader.open(path) == "leader"
    assert other.open(path) == "follower"
    assert idle.open(path) == "follower"
    leader.exec("db['k'] = 'old'")
    assert idle.eval("db['k']") == b"old"  # cached
    idle.exec("db.close()")
    leader.kill()
    other.exec("db['k'] = 'new'")  # it leads now
    assert other.eval("db.is_leader")
    assert idle.open(path) == "follower"
    assert idle.eval("db['k']") == b"new"


def test_a_follower_back_within_the_ring_s_linger_finds_the_same_ring(
        party: Party, tmp_path: Path) -> None:
    """The leader keeps its change ring a while after its last follower left (a new one
    costs the next follower's hello milliseconds); the first write after that retires
    it, and a later follower gets a new one. Reads are exact throughout."""
    path = tmp_path / "db"
    leader, f = party.repl(), party.repl()
    assert leader.open(path) == "leader"
    leader.exec("db['k'] = '1'")
    epoch = "db._engine.route.conn.ring_epoch"
    assert f.open(path) == "follower"
    first = f.eval(epoch)
    assert first is not None and f.eval("db['k']") == b"1"
    f.exec("db.close(); partydbm.let_go()")  # the ring has no follower now
    leader.exec("db['k'] = '2'")  # published all the same
    assert f.open(path) == "follower"
    assert f.eval(epoch) == first
    assert f.eval("db['k']") == b"2"
    f.exec("db.close(); partydbm.let_go()")
    wait_for(lambda: leader.eval("db._engine.server.followers()") == 0,
             what="the leader seeing its follower leave")
    leader.exec("partydbm._publish.RING_LINGER = 0.0; db['k'] = '3'")
    assert leader.eval("db._engine.route.store.publisher.ring is None"), "not retired"
    assert f.open(path) == "follower"
    assert f.eval(epoch) not in (None, first)
    assert f.eval("db['k']") == b"3"


@pytest.mark.parametrize("how", ["deleted and made anew", "flag n elsewhere"])
def test_a_lingering_leader_reopened_sees_its_database_replaced(
        party: Party, tmp_path: Path, how: str) -> None:
    path = tmp_path / "db"
    a, b = party.repl(env=LONG), party.repl()
    assert a.open(path) == "leader"
    a.exec("db['old'] = '1'; db.close()")
    if how == "deleted and made anew":  # b leads the new database: a follows it
        shutil.rmtree(path)
        assert b.open(path) == "leader"
    else:  # emptied through the lingering leader, which a then takes back
        assert b.open(path, "n") == "follower"
    b.exec("db['new'] = '1'")
    assert a.open(path) == ("follower" if how == "deleted and made anew" else "leader")
    assert a.eval("dict(db.items())") == {b"new": b"1"}
