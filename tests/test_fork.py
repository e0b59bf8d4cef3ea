"""Handles inherited through fork (docs/CONTRACT.md "Many processes, fork"; docs/TRAPS.md, trap 2).

Each scenario runs inside a worker process (tests/workers/fork.py), so pytest itself
never forks while it holds a database; the worker reports one JSON line and the test
checks it, then reads the database back from a fresh process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .procs import Party, Worker, clean_exit_stderr, dump
from .wire import decode

pytestmark = [pytest.mark.multiprocess, pytest.mark.heavy]



@pytest.fixture
def party() -> Iterator[Party]:
    with Party() as p:
        yield p


def _report(w: Worker, timeout: float = 60) -> dict[str, Any]:
    line = w.readline(timeout)
    assert line is not None, w.stderr()
    out: dict[str, Any] = decode(line)
    return out


def _no_errors(results: list[dict[str, Any]]) -> None:
    for r in results:
        assert "error" not in r, r["error"]


def test_handle_inherited_from_a_leader_works_in_the_child(party: Party, tmp_path: Path) -> None:
    path = tmp_path / "db"
    w = party.spawn("fork_from_leader", path)
    out = _report(w)
    assert w.wait() == 0, w.stderr()
    _no_errors(out["children"])
    assert out["parent_leader"] is True
    assert out["exitcodes"] == [0, 0]
    model = {b"parent": b"p"}
    for i, child in enumerate(out["children"]):
        assert child["is_leader"] is False  # the parent still leads: children follow
        assert child["parent"] == b"p"
        own = {b"c%d-%03d" % (i, j): b"v%d-%d" % (i, j) for j in range(50)}
        assert child["own"] == own
        model.update(own)
    assert out["parent_leader_after"] is True
    assert out["items"] == model
    assert dump(party, path) == model


def test_children_forked_from_a_leader_carry_on_when_it_closes(
        party: Party, tmp_path: Path) -> None:
    """The parent closes its handle while its children keep writing: the children (which
    can never open LevelDB themselves) go on, led by a helper, and lose nothing."""
    path = tmp_path / "db"
    w = party.spawn("fork_outlive_close", path)
    out = _report(w)
    assert w.wait() == 0, w.stderr()
    assert out["parent_leader"] is True
    assert out["started"] == ["started", "started"], out
    _no_errors(out["children"])
    assert out["exitcodes"] == [0, 0]
    model = {b"parent": b"p"}
    for i, child in enumerate(out["children"]):
        assert child["closed_at"] is not None
        assert child["n"] >= child["closed_at"] + 100  # writes after the parent closed
        assert child["own_ok"] is True
        model.update({b"c%d-%04d" % (i, j): b"v%d" % j for j in range(child["n"])})
        model.update(child["late"])
    assert dump(party, path) == model


def test_children_forked_from_a_leader_carry_on_when_it_exits(
        party: Party, tmp_path: Path) -> None:
    """The parent exits (interpreter exit, handle never closed) while its children live;
    they start writing only once it is gone."""
    path = tmp_path / "db"
    w = party.spawn("fork_outlive_exit", path)
    parent = _report(w)
    assert parent["leader"] is True
    assert w.wait() == 0, w.stderr()
    assert not clean_exit_stderr(w.stderr()), w.stderr()
    children = [_report(w), _report(w)]
    assert w.readline() is None  # every child done (stdout closed everywhere)
    _no_errors(children)
    model = {b"parent": b"p", b"parent-last": b"x"}
    for child in children:
        assert child["ok"] is True
        assert child["parent"] == b"p"
        assert child["parent_last"] == b"x"
        i = child["child"]
        model[b"c%d-early" % i] = b"e"
        model.update({b"c%d-%03d" % (i, j): b"v%d-%d" % (i, j) for j in range(50)})
        model.update(child["late"])
    assert dump(party, path) == model


def test_child_of_a_leader_carries_on_when_the_leader_returns_then_leaves(
        party: Party, tmp_path: Path) -> None:
    """The child starts a helper when the parent closes, but the parent comes back first,
    so the helper follows; when the parent leaves for good, the child must still find a
    leader (its helper, or a new one)."""
    path = tmp_path / "db"
    w = party.spawn("fork_leader_returns", path)
    out = _report(w)
    assert w.wait() == 0, w.stderr()
    assert out["parent_leader"] is True
    # out["parent_leads_again"]: usually True (the helper is slower to start); either
    # way the child must carry on.
    _no_errors([out["forked"], out["second"], out["third"]])
    assert [out[k]["ok"] for k in ("forked", "second", "third")] == [True] * 3
    assert out["exitcodes"] == [0]
    assert dump(party, path) == {b"c%d-%02d" % (n, j): b"%d" % j
                                 for n in range(3) for j in range(5)}


def test_child_forked_from_a_follower_becomes_leader_itself(
        party: Party, tmp_path: Path) -> None:
    path = tmp_path / "db"
    leader = party.repl()
    assert leader.open(path) == "leader"
    leader.exec("db['from-leader'] = 'L'")
    w = party.spawn("fork_from_follower", path)
    assert w.expect("ready", timeout=60) == ""
    leader.kill()  # the parent has closed its handle: only the child is left to lead
    w.send("go")
    out = _report(w)
    assert w.wait() == 0, w.stderr()
    assert out["parent_leader"] is False
    first, second = out["child_first"], out["child_second"]
    _no_errors([first, second])
    assert first["is_leader"] is False
    assert first["parent"] == b"b"
    assert out["parent_sees_child"] == b"1"  # parent and child used the db side by side
    assert second["is_leader"] is True, "a child of a follower can lead (no helper needed)"
    assert second["written_ok"] is True
    model = {b"from-leader": b"L", b"parent-before": b"b", b"parent-after-fork": b"a",
             b"child-1": b"1", **{b"child-2-%02d" % j: b"%d" % j for j in range(20)}}
    assert second["items"] == model
    assert out["exitcodes"] == [0]
    assert dump(party, path) == model
