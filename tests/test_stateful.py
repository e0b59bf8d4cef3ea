"""A hypothesis state machine: the mapping against a dict model, in both roles, with
reopening in the middle. Kept small so it runs in seconds per role."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

import partydbm

from .conftest import Opener

keys = st.lists(st.sampled_from([b"\x00", b"a", b"b", b"\xff"]), max_size=3).map(b"".join)
values = st.binary(max_size=4)


def make_machine(open_db: Any) -> type[RuleBasedStateMachine]:
    class MappingMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.model: dict[bytes, bytes] = {}
            self.db: partydbm.PartyDBM = open_db()

        @initialize()
        def start_empty(self) -> None:
            self.db.clear()

        @rule(k=keys, v=values)
        def set(self, k: bytes, v: bytes) -> None:
            self.db[k] = v
            self.model[k] = v

        @rule(k=keys)
        def delete(self, k: bytes) -> None:
            if k in self.model:
                del self.db[k]
                del self.model[k]
            else:
                with pytest.raises(KeyError):
                    del self.db[k]

        @rule(k=keys)
        def get(self, k: bytes) -> None:
            assert self.db.get(k) == self.model.get(k)
            assert (k in self.db) is (k in self.model)
            if k not in self.model:
                with pytest.raises(KeyError):
                    self.db[k]

        @rule(k=keys, v=values)
        def setdefault(self, k: bytes, v: bytes) -> None:
            assert self.db.setdefault(k, v) == self.model.setdefault(k, v)

        @rule(k=keys)
        def pop(self, k: bytes) -> None:
            assert self.db.pop(k, None) == self.model.pop(k, None)

        @rule(pairs=st.dictionaries(keys, values, max_size=4))
        def update(self, pairs: dict[bytes, bytes]) -> None:
            self.db.update(pairs)
            self.model.update(pairs)

        @rule(start=keys, reverse=st.booleans())
        def scan(self, start: bytes, reverse: bool) -> None:
            expect = sorted((k, v) for k, v in self.model.items() if k >= start)
            if reverse:
                expect.reverse()
            assert list(self.db.iterator(start=start, reverse=reverse)) == expect

        @rule()
        def clear(self) -> None:
            self.db.clear()
            self.model.clear()

        @rule(flag=st.sampled_from(["c", "w"]))
        def reopen(self, flag: str) -> None:
            self.db.close()
            self.db = open_db(flag)

        @invariant()
        def same_items(self) -> None:
            assert list(self.db.items()) == sorted(self.model.items())
            assert len(self.db) == len(self.model)

        def teardown(self) -> None:
            self.db.close()

    return MappingMachine


def test_mapping_state_machine_matches_a_dict(open_db: Opener) -> None:
    run_state_machine_as_test(make_machine(open_db), settings=settings(
        max_examples=25, stateful_step_count=15, deadline=None, database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]))
