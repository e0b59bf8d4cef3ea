"""Hypothesis state machine: mapping operations against a dict while the leader is
killed (SIGKILL of a Holder process) and handles are reopened.

The test process keeps one handle. Two Holder processes hold the database too; the
rule `kill_leader` SIGKILLs whichever Holder leads and starts a fresh one; when the
test process itself leads, `hand_over` closes and reopens its handle, so that a Holder
leads again.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import partydbm

from .procs import Holder

pytestmark = pytest.mark.multiprocess

KEYS = st.sampled_from([b"", b"\x00", b"\xff", b"a", b"aa", b"ab", b"b", b"k1", b"k2"])
VALUES = st.binary(max_size=20)


class FailoverMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="partydbm-sm-"))
        self.path = self.dir / "db"
        self.holders = [Holder(), Holder()]
        for h in self.holders:
            h.open(self.path)
        self.db = partydbm.open(self.path)
        self.model: dict[bytes, bytes] = {}

    def teardown(self) -> None:
        self.db.close()
        for h in self.holders:
            h.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(key=KEYS, value=VALUES)
    def put(self, key: bytes, value: bytes) -> None:
        self.db[key] = value
        self.model[key] = value

    @rule(key=KEYS)
    def delete(self, key: bytes) -> None:
        try:
            del self.db[key]
            existed = True
        except KeyError:
            existed = False
        assert existed == (key in self.model)
        self.model.pop(key, None)

    @rule(pairs=st.dictionaries(KEYS, VALUES, max_size=4))
    def update(self, pairs: dict[bytes, bytes]) -> None:
        self.db.update(pairs)
        self.model.update(pairs)

    @rule(reverse=st.booleans(), lo=KEYS)
    def scan(self, reverse: bool, lo: bytes) -> None:
        got = list(self.db.iterator(start=lo, reverse=reverse))
        want = sorted((k, v) for k, v in self.model.items() if k >= lo)
        assert got == (want[::-1] if reverse else want)

    @precondition(lambda self: not self.db.is_leader)
    @rule()
    def kill_leader(self) -> None:
        for i, h in enumerate(self.holders):
            if h.pid == self.db._engine.leader_pid:
                h.kill()
                h.close()
                self.holders[i] = Holder()
                self.holders[i].open(self.path)
                return
        raise AssertionError("the handle follows a leader that is none of the holders")

    @rule()
    def reopen(self) -> None:
        self.db.close()
        self.db = partydbm.open(self.path)

    @invariant()
    def matches_model(self) -> None:
        assert dict(self.db.items()) == self.model
        assert len(self.db) == len(self.model)


FailoverMachine.TestCase.settings = settings(
    max_examples=8, stateful_step_count=12, deadline=None)
test_failover_state_machine = FailoverMachine.TestCase
