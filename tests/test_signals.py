"""SIGINT/SIGTERM delivered to a leader in the middle of a large write batch leave all
of the batch or none of it, many times over, whether the batch is the leader's own or
a follower's being applied by it.

Each batch writes generation g to every key (and moves a marker key), so after any
interruption every key must show the same generation. Timing is random (the seed is
printed); every process is reaped with a deadline."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import partydbm

from .procs import Party

pytestmark = [pytest.mark.multiprocess, pytest.mark.heavy]

N = 20_000  # keys per batch (about 1.5 MB)
ROUNDS = 12

BATCHES = """
import partydbm

def batches(db, n, forever=True):
    gen = int(db.get(b"gen", b"0"))
    while True:
        gen += 1
        value = b"%d" % gen
        with db.write_batch() as wb:
            for i in range(n):
                wb.put(b"k%06d" % i, value)
            wb.delete(b"odd" if gen % 2 == 0 else b"even")
            wb.put(b"even" if gen % 2 == 0 else b"odd", value)
            wb.put(b"gen", value)
        if not forever:
            return
"""

LEADER_WRITER = BATCHES + """
import sys
db = partydbm.open(sys.argv[1])
assert db.is_leader
batches(db, int(sys.argv[2]), forever=False)  # the first batch is complete
print("ready", flush=True)
batches(db, int(sys.argv[2]))
"""


@pytest.fixture
def party() -> Iterator[Party]:
    with Party() as p:
        yield p


def _consistent(path: Path, n: int) -> int:
    """The generation every key shows (AssertionError if a batch was cut)."""
    with partydbm.open(path, "r") as db:
        items = dict(db.items())
    partydbm.let_go(path)  # the next round's writer must lead
    gen = items.pop(b"gen")
    marker = b"even" if int(gen) % 2 == 0 else b"odd"
    assert items.pop(marker) == gen, "the marker key is from another batch"
    assert not any(k in items for k in (b"even", b"odd")), "both marker keys exist"
    assert len(items) == n, f"{n - len(items)} keys of a batch are missing"
    stale = {k: v for k, v in items.items() if v != gen}
    assert not stale, f"{len(stale)} keys hold another generation than {gen!r}"
    return int(gen)


def test_a_signal_to_a_leader_during_its_own_write_batch_leaves_all_or_none(
        party: Party, tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rng = random.Random(seed)
    path = tmp_path / "db"
    last = 0
    for round_ in range(ROUNDS):
        sig = signal.SIGINT if round_ % 2 == 0 else signal.SIGTERM
        writer = party.python(LEADER_WRITER, path, N)
        assert writer.expect("ready") == ""
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(writer.pid, sig)
        code = writer.wait()
        assert code in (1, -sig, 128 + sig), (code, writer.stderr())
        gen = _consistent(path, N)
        assert gen > last, "a completed batch was lost"
        last = gen
        writer.cleanup()


FOLLOWER_WRITER = BATCHES + """
import sys, threading
db = partydbm.open(sys.argv[1])
assert not db.is_leader
print("ready", flush=True)
try:
    batches(db, int(sys.argv[2]))
finally:
    print("stopped", flush=True)
"""


def test_a_signal_to_a_leader_applying_a_followers_batch_leaves_all_or_none(
        party: Party, tmp_path: Path) -> None:
    """The follower's batch in flight is either applied by the dying leader or applied
    once by the next (the follower itself): never half, never twice over a newer one."""
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rng = random.Random(seed)
    path = tmp_path / "db"
    n = N // 4
    for round_ in range(4):
        sig = signal.SIGINT if round_ % 2 == 0 else signal.SIGTERM
        leader = party.repl()
        assert leader.open(path) == "leader"
        writer = party.python(FOLLOWER_WRITER, path, n)
        assert writer.expect("ready") == ""
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(leader.pid, sig)
        leader.wait()
        time.sleep(rng.uniform(0.05, 0.3))  # the follower leads now and carries on
        writer.kill()
        _consistent(path, n)
        leader.cleanup()
        writer.cleanup()
