"""The handle as a dbm / MutableMapping, in both roles: keys and values, the mapping
surface, firstkey/nextkey, sync/reorganize, close, read-only, write_batch, one path
opened twice, threads."""

from __future__ import annotations

import collections.abc
import os
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import partydbm

from .conftest import Opener, PlyvelProbe
from .procs import Holder

CLOSED = "DBM object has already been closed"
ODD_KEYS = [b"", b"\x00", b"\x00\x00", b"a\x00b", b"a", b"a\xff", b"ab", b"\xff", b"\xff\xff",
            b"\x7f", b"\x80"]


def contents(db: partydbm.PartyDBM) -> dict[bytes, bytes]:
    return dict(db.iterator())


def fill(db: partydbm.PartyDBM, n: int = 50, seed: int = 0) -> dict[bytes, bytes]:
    rnd = random.Random(seed)
    model = {rnd.randbytes(rnd.randrange(0, 6)): rnd.randbytes(rnd.randrange(0, 20))
             for _ in range(n)}
    for k, v in model.items():
        db[k] = v
    return model


# -- keys and values -------------------------------------------------------------------------
def test_str_keys_and_values_are_stored_as_utf8(open_db: Opener) -> None:
    db = open_db()
    db["clé ☃"] = "valeur ü"
    assert db["clé ☃".encode()] == "valeur ü".encode()
    assert db["clé ☃"] == "valeur ü".encode()
    assert db.keys() == ["clé ☃".encode()]
    assert "clé ☃" in db and "clé ☃".encode() in db  # type: ignore[comparison-overlap]
    del db["clé ☃"]
    assert len(db) == 0


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview],
                         ids=["bytes", "bytearray", "memoryview"])
def test_bytes_like_keys_and_values_are_taken_as_bytes(open_db: Opener, wrap: Callable[[bytes], Any]
                                                       ) -> None:
    db = open_db()
    db[wrap(b"key")] = wrap(b"value")
    assert db[b"key"] == b"value"
    assert db[wrap(b"key")] == b"value"
    assert db.get(wrap(b"key")) == b"value"
    assert wrap(b"key") in db
    assert wrap(b"nope") not in db
    assert list(db.iterator(start=wrap(b"key"), stop=wrap(b"kez"))) == [(b"key", b"value")]
    assert list(db.iterator(prefix=wrap(b"ke"))) == [(b"key", b"value")]
    assert db.nextkey(wrap(b"a")) == b"key"
    with db.write_batch() as wb:
        wb.put(wrap(b"k2"), wrap(b"v2"))
        wb.delete(wrap(b"key"))
    assert contents(db) == {b"k2": b"v2"}
    del db[wrap(b"k2")]
    assert len(db) == 0


def test_a_memoryview_slice_is_taken_for_its_bytes_only(open_db: Opener) -> None:
    db = open_db()
    buf = memoryview(b"xxKEYxx")[2:5]
    db[buf] = memoryview(b"__VAL__")[2:5]
    assert contents(db) == {b"KEY": b"VAL"}


def test_reads_always_return_bytes(open_db: Opener) -> None:
    db = open_db()
    db["k"] = bytearray(b"v")
    db[bytearray(b"k2")] = memoryview(b"v2")
    db["k3"] = "v3"
    assert type(db["k"]) is bytes
    assert type(db.get("k2")) is bytes
    assert all(type(k) is bytes for k in db)
    keys = db.keys()
    assert all(type(k) is bytes for k in keys)
    assert all(type(k) is bytes and type(v) is bytes for k, v in db.items())
    assert all(type(v) is bytes for v in db.values())
    assert all(type(k) is bytes and type(v) is bytes for k, v in db.iterator())
    assert type(db.firstkey()) is bytes and type(db.nextkey("k")) is bytes
    assert type(db.setdefault("k3", b"zz")) is bytes
    assert type(db.pop("k3")) is bytes
    k, v = db.popitem()
    assert type(k) is bytes and type(v) is bytes


BAD = [1, None, 1.5, object(), [b"a"], (b"a",), True]
BAD_IDS = ["int", "None", "float", "object", "list", "tuple", "bool"]


@pytest.mark.parametrize("bad", BAD, ids=BAD_IDS)
def test_keys_of_other_types_raise_TypeError(open_db: Opener, bad: Any) -> None:
    db = open_db()
    db[b"a"] = b"1"
    ops: list[Callable[[], Any]] = [
        lambda: db[bad],
        lambda: db.__setitem__(bad, b"v"),
        lambda: db.__delitem__(bad),
        lambda: bad in db,
        lambda: db.get(bad),
        lambda: db.get(bad, b"default"),
        lambda: db.setdefault(bad, b"v"),
        lambda: db.pop(bad),
        lambda: db.pop(bad, b"default"),
        lambda: db.update({bad: b"v"}),
        lambda: db.update([(bad, b"v")]),
        lambda: db.nextkey(bad),
    ]
    if bad is not None:  # None means "no bound" for the iterator
        ops += [
            lambda: list(db.iterator(start=bad)),
            lambda: list(db.iterator(stop=bad)),
            lambda: list(db.iterator(prefix=bad)),
            lambda: list(db.iterator(start=bad, reverse=True)),
        ]
    for op in ops:
        with pytest.raises(TypeError):
            op()
    with pytest.raises(TypeError), db.write_batch() as wb:
        wb.put(bad, b"v")
    with pytest.raises(TypeError), db.write_batch() as wb:
        wb.delete(bad)
    assert contents(db) == {b"a": b"1"}


@pytest.mark.parametrize("bad", BAD, ids=BAD_IDS)
def test_values_of_other_types_raise_TypeError(open_db: Opener, bad: Any) -> None:
    db = open_db()
    ops: list[Callable[[], Any]] = [
        lambda: db.__setitem__(b"k", bad),
        lambda: db.update({b"k": bad}),
        lambda: db.update([(b"k", bad)]),
        lambda: db.update(k=bad),
    ]
    if bad is not None:  # setdefault(k, None) on a missing key is a separate question
        ops.append(lambda: db.setdefault(b"k", bad))
    for op in ops:
        with pytest.raises(TypeError):
            op()
    with pytest.raises(TypeError), db.write_batch() as wb:
        wb.put(b"k", bad)
    assert contents(db) == {}


def test_empty_key_and_empty_value(open_db: Opener) -> None:
    db = open_db()
    db[b""] = b""
    assert b"" in db and "" in db  # type: ignore[comparison-overlap]
    assert db[b""] == b""
    assert db.get(b"") == b""
    assert len(db) == 1 and bool(db)
    assert db.keys() == [b""]
    assert db.firstkey() == b""
    assert db.nextkey(b"") is None
    db[b"a"] = b""
    assert db.nextkey(b"") == b"a"
    assert list(db.items()) == [(b"", b""), (b"a", b"")]
    del db[b""]
    assert b"" not in db
    assert contents(db) == {b"a": b""}


def test_keys_and_values_with_nul_and_ff_bytes(open_db: Opener) -> None:
    db = open_db()
    model = {k: b"\x00\xff" + k + b"\xff\x00" for k in ODD_KEYS}
    for k, v in model.items():
        db[k] = v
    assert db.keys() == sorted(model)
    assert list(db.items()) == sorted(model.items())
    for k, v in model.items():
        assert db[k] == v
        assert k in db
    assert b"a\x00" not in db and b"\x00\x00\x00" not in db


def test_large_values_round_trip(open_db: Opener) -> None:
    db = open_db()
    rnd = random.Random(1)
    model = {b"big%d" % i: rnd.randbytes((1 << 20) + i) for i in range(3)}
    model[b"small"] = b"s"
    for k, v in model.items():
        db[k] = v
    for k, v in model.items():
        assert db[k] == v
    assert list(db.items()) == sorted(model.items())
    assert list(db.values()) == [model[k] for k in sorted(model)]
    assert list(db.iterator(reverse=True)) == sorted(model.items(), reverse=True)


def test_a_large_key_round_trips(open_db: Opener) -> None:
    db = open_db()
    key = bytes(range(256)) * 256  # 64 KiB
    db[key] = b"v"
    assert db[key] == b"v"
    assert db.keys() == [key]


# -- the mapping surface ---------------------------------------------------------------------
def test_handle_is_a_MutableMapping(open_db: Opener) -> None:
    assert isinstance(open_db(), collections.abc.MutableMapping)


def _write_or_delete(db: partydbm.PartyDBM, model: dict[bytes, bytes], k: bytes,
                     rnd: random.Random, write: bool) -> None:
    """One random step against the model: store a random value, or delete (KeyError
    exactly when the model lacks the key)."""
    if write:
        v = rnd.randbytes(rnd.randrange(0, 10))
        db[k] = v
        model[k] = v
    elif k in model:
        del db[k]
        del model[k]
    else:
        with pytest.raises(KeyError):
            del db[k]


def test_getitem_setitem_delitem_contains_against_a_model(open_db: Opener) -> None:
    db = open_db()
    rnd = random.Random(2)
    model: dict[bytes, bytes] = {}
    for _ in range(400):
        k = rnd.choice(ODD_KEYS + [b"x%d" % i for i in range(10)])
        op = rnd.random()
        if op < 0.75:
            _write_or_delete(db, model, k, rnd, op < 0.5)
        elif k in model:
            assert db[k] == model[k]
        else:
            with pytest.raises(KeyError):
                db[k]
        assert (k in db) is (k in model)
    assert contents(db) == model
    assert len(db) == len(model)


def test_missing_key_raises_KeyError_naming_it(open_db: Opener) -> None:
    db = open_db()
    db[b"a"] = b"1"
    with pytest.raises(KeyError) as info:
        db[b"missing"]
    assert info.value.args == (b"missing",)
    with pytest.raises(KeyError) as info:
        del db[b"missing"]
    assert info.value.args == (b"missing",)
    assert contents(db) == {b"a": b"1"}


def test_setitem_overwrites(open_db: Opener) -> None:
    db = open_db()
    db[b"k"] = b"1"
    db[b"k"] = b"22"
    assert db[b"k"] == b"22" and len(db) == 1


def test_len_and_bool(open_db: Opener) -> None:
    db = open_db()
    assert len(db) == 0 and not db and bool(db) is False
    db[b"a"] = b"1"
    assert len(db) == 1 and bool(db) is True
    model = fill(db, 100)
    model[b"a"] = b"1"
    assert len(db) == len(model)
    db.clear()
    assert len(db) == 0 and bool(db) is False


def test_iteration_and_keys_are_in_bytewise_order(open_db: Opener) -> None:
    db = open_db()
    model = fill(db, 300)
    expect = sorted(model)
    assert list(db) == expect
    assert list(iter(db)) == expect
    keys = db.keys()
    assert type(keys) is list and keys == expect
    assert list(db.items()) == sorted(model.items())
    assert list(db.values()) == [model[k] for k in expect]


def test_items_and_values_views(open_db: Opener) -> None:
    db = open_db()
    db.update({b"a": b"1", b"b": b"2"})
    items = db.items()
    assert len(items) == 2
    assert (b"a", b"1") in items
    assert (b"a", b"2") not in items and (b"z", b"1") not in items
    assert b"1" in db.values() and b"3" not in db.values()
    assert len(db.values()) == 2
    db[b"c"] = b"3"  # views are live
    assert list(items) == [(b"a", b"1"), (b"b", b"2"), (b"c", b"3")]


def test_get(open_db: Opener) -> None:
    db = open_db()
    db[b"k"] = b"v"
    assert db.get(b"k") == b"v"
    assert db.get(b"k", b"d") == b"v"
    assert db.get(b"missing") is None
    assert db.get(b"missing", b"d") == b"d"
    assert db.get(b"missing", 42) == 42


def test_setdefault(open_db: Opener) -> None:
    db = open_db()
    assert db.setdefault(b"k", b"first") == b"first"
    assert db[b"k"] == b"first"
    assert db.setdefault(b"k", b"second") == b"first"
    assert db[b"k"] == b"first"
    assert contents(db) == {b"k": b"first"}


def test_setdefault_on_a_missing_key_returns_the_stored_bytes(open_db: Opener) -> None:
    db = open_db()
    got = [db.setdefault("s", "x"), db.setdefault(b"b", bytearray(b"y")),
           db.setdefault(b"m", memoryview(b"z"))]
    assert contents(db) == {b"s": b"x", b"b": b"y", b"m": b"z"}
    assert [type(v) for v in got] == [bytes, bytes, bytes]
    assert got == [b"x", b"y", b"z"]


def test_pop(open_db: Opener) -> None:
    db = open_db()
    db.update({b"a": b"1", b"b": b"2"})
    assert db.pop(b"a") == b"1"
    assert b"a" not in db
    with pytest.raises(KeyError):
        db.pop(b"a")
    assert db.pop(b"a", b"d") == b"d"
    assert db.pop(b"b", b"d") == b"2"
    assert contents(db) == {}


def test_compare_and_set_sets_inserts_and_deletes_only_on_a_match(open_db: Opener) -> None:
    db = open_db()
    assert db.compare_and_set(b"k", None, b"1") is True  # None expected: absent
    assert db.compare_and_set(b"k", None, b"2") is False
    assert db.compare_and_set(b"k", b"0", b"2") is False
    assert db[b"k"] == b"1"
    assert db.compare_and_set("k", "1", bytearray(b"2")) is True  # any bytes-like
    assert db[b"k"] == b"2"
    assert db.compare_and_set(b"k", b"2", None) is True  # None new: delete
    assert b"k" not in db
    assert db.compare_and_set(b"k", b"2", None) is False
    assert db.compare_and_set(b"gone", None, None) is True  # absent stays absent
    assert contents(db) == {}


def test_compare_and_set_checks_types_and_limits_like_a_put(open_db: Opener) -> None:
    db = open_db()
    with pytest.raises(TypeError):
        db.compare_and_set(b"k", None, 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        db.compare_and_set(b"k", 1, b"v")  # type: ignore[arg-type]
    with pytest.raises(partydbm.error) as info:
        db.compare_and_set(b"k", None, b"x" * (partydbm._protocol.MAX_VALUE + 1))
    assert "MAX_VALUE" in str(info.value)
    assert contents(db) == {}


def test_popitem_removes_and_returns_pairs_until_KeyError(open_db: Opener) -> None:
    db = open_db()
    model = fill(db, 20)
    while model:
        k, v = db.popitem()
        assert model.pop(k) == v
        assert k not in db
        assert contents(db) == model
    with pytest.raises(KeyError):
        db.popitem()


def test_update_from_mapping_pairs_keys_object_and_kwargs(open_db: Opener) -> None:
    db = open_db()
    db.update({b"a": b"1", "b": "2"})
    db.update([(b"c", b"3"), ("d", bytearray(b"4"))])
    db.update(iter([(b"e", b"5")]))
    db.update(f=b"6", g="7")
    db.update({b"h": b"8"}, i=b"9")

    class KeysOnly:  # not a Mapping: update() uses keys() and []
        def keys(self) -> list[bytes]:
            return [b"j"]

        def __getitem__(self, k: bytes) -> bytes:
            return b"10"

    db.update(KeysOnly())
    db.update({b"a": b"overwritten"})
    db.update()
    db.update({})
    assert contents(db) == {b"a": b"overwritten", b"b": b"2", b"c": b"3", b"d": b"4",
                            b"e": b"5", b"f": b"6", b"g": b"7", b"h": b"8", b"i": b"9",
                            b"j": b"10"}


def test_update_from_another_handle(open_db: Opener, tmp_path: Path) -> None:
    db = open_db()
    with partydbm.open(tmp_path / "other", "c") as other:
        model = fill(other, 30)
        db.update(other)
    assert contents(db) == model


def test_update_with_many_items(open_db: Opener) -> None:
    db = open_db()
    model = {b"%06d" % i: b"v%d" % i for i in range(10_000)}
    db.update(model)
    assert len(db) == len(model)
    assert contents(db) == model


def test_get_many_returns_values_in_order_with_default_for_missing(open_db: Opener) -> None:
    db = open_db()
    model = fill(db, 40, seed=3)
    rnd = random.Random(4)
    wanted: list[bytes | str] = [*model, b"missing", *ODD_KEYS, "str key"]
    rnd.shuffle(wanted)
    expected = [model.get(k if isinstance(k, bytes) else k.encode(), "dflt") for k in wanted]
    assert db.get_many(wanted, "dflt") == expected
    assert db.get_many([]) == []
    assert db.get_many(iter([b"missing"])) == [None]


def test_get_many_spans_several_requests(open_db: Opener) -> None:
    db = open_db()
    model = {b"%06d" % i: b"v%d" % i for i in range(10_000)}
    db.update(model)
    keys = [b"%06d" % i for i in range(0, 12_000, 1)]  # the last 2000 are missing
    values = db.get_many(keys)
    assert values == [model.get(k) for k in keys]


def test_get_many_rejects_bad_keys_and_closed_handles(open_db: Opener) -> None:
    db = open_db()
    with pytest.raises(TypeError):
        db.get_many([b"a", 3])  # type: ignore[list-item]
    db.close()
    with pytest.raises(partydbm.error, match=CLOSED):
        db.get_many([b"a"])


def test_update_of_big_values_spans_batches_under_the_batch_limit(open_db: Opener) -> None:
    """4096 values of 40 kB are 160 MB, over MAX_BATCH_BYTES: update() must cut its
    chunks by bytes too, not fail on pairs that are each within the limits."""
    db = open_db()
    value = b"x" * 40_000
    db.update((b"%05d" % i, value) for i in range(4096))
    assert len(db) == 4096
    assert db[b"04095"] == value


def test_update_stores_the_pairs_before_a_failing_source_as_dict_does(open_db: Opener) -> None:
    db = open_db()

    def pairs() -> Iterator[tuple[bytes, bytes]]:
        yield b"a", b"1"
        yield b"b", b"2"
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        db.update(pairs())
    with pytest.raises(TypeError):
        db.update([(b"c", b"3"), (b"d", 4)])
    assert contents(db) == {b"a": b"1", b"b": b"2", b"c": b"3"}


def test_update_with_a_malformed_pair_raises(open_db: Opener) -> None:
    db = open_db()
    with pytest.raises((TypeError, ValueError)):
        db.update([(b"a", b"1", b"extra")])
    with pytest.raises((TypeError, ValueError)):
        db.update([b"ab"])  # bytes of length 2 unpack into two ints


def test_clear_removes_everything_and_the_handle_keeps_working(open_db: Opener) -> None:
    db = open_db()
    fill(db, 200)
    db.clear()
    assert contents(db) == {} and len(db) == 0 and db.keys() == []
    db.clear()  # clearing an empty database is fine
    db[b"k"] = b"v"
    assert contents(db) == {b"k": b"v"}


def test_firstkey_nextkey_walk_every_key_in_order_then_None(open_db: Opener) -> None:
    db = open_db()
    assert db.firstkey() is None
    model = fill(db, 60)
    for k in ODD_KEYS:
        db[k] = b"x"
        model[k] = b"x"
    walked = []
    key = db.firstkey()
    while key is not None:
        walked.append(key)
        key = db.nextkey(key)
    assert walked == sorted(model)
    assert db.nextkey(walked[-1]) is None


# -- sync, reorganize ------------------------------------------------------------------------
def test_sync_leaves_content_unchanged(open_db: Opener) -> None:
    db = open_db()
    model = fill(db)
    assert db.sync() is None  # type: ignore[func-returns-value]  # dbm's API
    assert contents(db) == model


def test_sync_flag_s_writes_are_readable(open_db: Opener) -> None:
    db = open_db("cs")
    model = fill(db, 20)
    del db[next(iter(model))]
    del model[next(iter(model))]
    assert contents(db) == model


def test_reorganize_leaves_content_unchanged(open_db: Opener) -> None:
    db = open_db()
    model = {b"%05d" % i: os.urandom(100) for i in range(2000)}
    db.update(model)
    for k in list(model)[::2]:
        del db[k]
        del model[k]
    assert db.reorganize() is None  # type: ignore[func-returns-value]
    assert contents(db) == model
    db[b"after"] = b"1"
    assert db[b"after"] == b"1"


# -- close -----------------------------------------------------------------------------------
def test_close_is_idempotent(open_db: Opener) -> None:
    db = open_db()
    db.close()
    db.close()
    with pytest.raises(partydbm.ClosedError):
        len(db)


def test_with_returns_the_handle_and_closes_it(open_db: Opener) -> None:
    with open_db() as db:
        assert isinstance(db, partydbm.PartyDBM)
        db[b"k"] = b"v"
    with pytest.raises(partydbm.ClosedError):
        db[b"k"]
    with open_db("r") as again:
        assert contents(again) == {b"k": b"v"}


def test_with_closes_even_when_the_block_raises(open_db: Opener) -> None:
    with pytest.raises(RuntimeError), open_db() as db:
        db[b"k"] = b"v"
        raise RuntimeError("boom")
    with pytest.raises(partydbm.ClosedError):
        db.get(b"k")


def _batch_put(db: partydbm.PartyDBM) -> None:
    with db.write_batch() as wb:
        wb.put(b"x", b"y")


AFTER_CLOSE: dict[str, Callable[[partydbm.PartyDBM], Any]] = {
    "getitem": lambda db: db[b"a"],
    "getitem missing": lambda db: db[b"missing"],
    "setitem": lambda db: db.__setitem__(b"a", b"2"),
    "delitem": lambda db: db.__delitem__(b"a"),
    "delitem missing": lambda db: db.__delitem__(b"missing"),
    "contains": lambda db: b"a" in db,
    "len": len,
    "bool": bool,
    "iter": lambda db: list(db),
    "iter object": iter,
    "get": lambda db: db.get(b"a"),
    "get default": lambda db: db.get(b"missing", b"d"),
    "setdefault": lambda db: db.setdefault(b"a", b"x"),
    "pop": lambda db: db.pop(b"a"),
    "pop default": lambda db: db.pop(b"missing", b"d"),
    "popitem": lambda db: db.popitem(),
    "compare_and_set": lambda db: db.compare_and_set(b"a", b"1", b"2"),
    "update": lambda db: db.update({b"b": b"2"}),
    "update kwargs": lambda db: db.update(b="2"),
    "clear": lambda db: db.clear(),
    "keys": lambda db: db.keys(),
    "items": lambda db: list(db.items()),
    "values": lambda db: list(db.values()),
    "len items": lambda db: len(db.items()),
    "firstkey": lambda db: db.firstkey(),
    "nextkey": lambda db: db.nextkey(b"a"),
    "sync": lambda db: db.sync(),
    "reorganize": lambda db: db.reorganize(),
    "iterator": lambda db: db.iterator(),
    "iterator list": lambda db: list(db.iterator(reverse=True)),
    "write_batch": _batch_put,
    "is_leader": lambda db: db.is_leader,
}


@pytest.mark.parametrize("flag", ["c", "r"])
@pytest.mark.parametrize("op", list(AFTER_CLOSE), ids=list(AFTER_CLOSE))
def test_every_operation_after_close_raises_ClosedError(open_db: Opener, op: str,
                                                        flag: str) -> None:
    seed = open_db()
    seed[b"a"] = b"1"
    db = open_db(flag)
    db.close()
    with pytest.raises(partydbm.ClosedError) as info:
        AFTER_CLOSE[op](db)
    assert isinstance(info.value, partydbm.error)
    assert str(info.value) == CLOSED
    assert seed[b"a"] == b"1" and len(seed) == 1  # nothing happened


ITERATORS: dict[str, Callable[[partydbm.PartyDBM], Any]] = {
    "iter": iter,
    "items": lambda db: iter(db.items()),
    "values": lambda db: iter(db.values()),
    "iterator": lambda db: db.iterator(),
    "iterator reverse": lambda db: db.iterator(reverse=True),
    "iterator keys": lambda db: db.iterator(include_value=False),
    "iterator values": lambda db: db.iterator(include_key=False),
    "iterator range": lambda db: db.iterator(start=b"0", stop=b"9", include_stop=True),
    "iterator prefix": lambda db: db.iterator(prefix=b"1"),
}


@pytest.mark.parametrize("started", [False, True], ids=["fresh", "started"])
@pytest.mark.parametrize("make", list(ITERATORS), ids=list(ITERATORS))
def test_advancing_an_iterator_made_before_close_raises_ClosedError(
        open_db: Opener, make: str, started: bool) -> None:
    db = open_db()
    db.update({b"%d" % i: b"v" for i in range(100, 200)})
    it = ITERATORS[make](db)
    if started:
        next(it)  # a page is buffered now: the rest must not be served from it
    db.close()
    with pytest.raises(partydbm.ClosedError) as info:
        next(it)
    assert str(info.value) == CLOSED


def test_a_write_batch_made_before_close_raises_ClosedError_on_exit(open_db: Opener) -> None:
    other = open_db()
    db = open_db()
    with pytest.raises(partydbm.ClosedError) as info, db.write_batch() as wb:
        wb.put(b"k", b"v")
        db.close()
    assert str(info.value) == CLOSED
    assert contents(other) == {}


def test_closing_one_handle_leaves_the_others_iterators_working(open_db: Opener) -> None:
    a = open_db()
    b = open_db()
    model = {b"%04d" % i: b"v" for i in range(100)}
    a.update(model)
    it = b.iterator()
    assert next(it) == (b"0000", b"v")
    a.close()
    assert dict([(b"0000", b"v"), *it]) == model


def _open_fds() -> set[tuple[str, str]]:
    """(fd, target) of this process's open files, bar the listing's own."""
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the listing's own fd, closed by now
        if not target.startswith("/proc/"):
            fds.add((fd, target))
    return fds


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_letting_go_after_the_last_close_releases_every_file_descriptor(
        open_db: Opener) -> None:
    before = _open_fds()
    db = open_db()
    fill(db, 100)
    list(db.iterator(reverse=True))
    db.close()  # the engine lingers (its grace period) until let_go()
    partydbm.let_go(open_db.path)
    assert _open_fds() - before == set()


# -- read-only handles -----------------------------------------------------------------------
def _batch_delete_missing(db: partydbm.PartyDBM) -> None:
    with db.write_batch() as wb:
        wb.delete(b"missing")


WRITES: dict[str, Callable[[partydbm.PartyDBM], Any]] = {
    "setitem new": lambda db: db.__setitem__(b"new", b"1"),
    "setitem existing": lambda db: db.__setitem__(b"a", b"2"),
    "delitem": lambda db: db.__delitem__(b"a"),
    "delitem missing": lambda db: db.__delitem__(b"missing"),
    "setdefault missing": lambda db: db.setdefault(b"new", b"1"),
    "pop": lambda db: db.pop(b"a"),
    "pop with default": lambda db: db.pop(b"a", b"d"),
    "popitem": lambda db: db.popitem(),
    "compare_and_set": lambda db: db.compare_and_set(b"a", b"1", b"2"),
    "compare_and_set failing": lambda db: db.compare_and_set(b"a", b"other", b"2"),
    "update mapping": lambda db: db.update({b"new": b"1"}),
    "update pairs": lambda db: db.update([(b"new", b"1")]),
    "update kwargs": lambda db: db.update(new=b"1"),
    "clear": lambda db: db.clear(),
    "write_batch put": _batch_put,
    "write_batch delete missing": _batch_delete_missing,
    "reorganize": lambda db: db.reorganize(),
}


@pytest.mark.parametrize("flag", ["r", "rf", "rs", "ru"])
@pytest.mark.parametrize("op", list(WRITES), ids=list(WRITES))
def test_every_write_on_a_read_only_handle_raises_ReadOnlyError(open_db: Opener, op: str,
                                                                flag: str) -> None:
    writer = open_db()
    model = {b"a": b"1", b"b": b"2"}
    writer.update(model)
    db = open_db(flag)
    with pytest.raises(partydbm.ReadOnlyError) as info:
        WRITES[op](db)
    assert isinstance(info.value, partydbm.error)
    assert contents(writer) == model
    assert contents(db) == model  # and the handle still reads


def test_reads_work_on_a_read_only_handle_and_see_other_handles_writes(open_db: Opener) -> None:
    writer = open_db()
    writer.update({b"a": b"1", b"b": b"2"})
    db = open_db("r")
    assert db[b"a"] == b"1"
    assert db.get(b"b") == b"2" and db.get(b"zz") is None
    assert b"a" in db and b"zz" not in db
    assert len(db) == 2 and bool(db)
    assert list(db) == [b"a", b"b"] and db.keys() == [b"a", b"b"]
    assert list(db.items()) == [(b"a", b"1"), (b"b", b"2")]
    assert list(db.values()) == [b"1", b"2"]
    assert list(db.iterator(reverse=True)) == [(b"b", b"2"), (b"a", b"1")]
    assert db.firstkey() == b"a" and db.nextkey(b"a") == b"b" and db.nextkey(b"b") is None
    assert db.setdefault(b"a", b"x") == b"1"  # present: a read
    with pytest.raises(KeyError):
        db[b"zz"]
    db.sync()
    writer[b"c"] = b"3"
    del writer[b"a"]
    assert contents(db) == {b"b": b"2", b"c": b"3"}


# -- write_batch -----------------------------------------------------------------------------
def test_write_batch_applies_everything_on_exit_and_nothing_before(open_db: Opener) -> None:
    db = open_db()
    db.update({b"old": b"1", b"gone": b"2"})
    with db.write_batch() as wb:
        wb.put(b"new", b"n")
        wb.put("str", "s")
        wb.delete(b"gone")
        wb.put(b"old", b"updated")
        assert contents(db) == {b"old": b"1", b"gone": b"2"}
    assert contents(db) == {b"old": b"updated", b"new": b"n", b"str": b"s"}


def test_write_batch_applies_nothing_if_the_block_raises(open_db: Opener) -> None:
    db = open_db()
    db.update({b"a": b"1"})
    with pytest.raises(RuntimeError, match="boom"), db.write_batch() as wb:
        wb.put(b"b", b"2")
        wb.delete(b"a")
        raise RuntimeError("boom")
    assert contents(db) == {b"a": b"1"}


def test_write_batch_delete_of_a_missing_key_is_fine(open_db: Opener) -> None:
    db = open_db()
    db[b"a"] = b"1"
    with db.write_batch() as wb:
        wb.delete(b"missing")
        wb.put(b"b", b"2")
    assert contents(db) == {b"a": b"1", b"b": b"2"}


def test_write_batch_applies_operations_in_the_order_given(open_db: Opener) -> None:
    db = open_db()
    with db.write_batch() as wb:
        wb.put(b"k1", b"v")
        wb.delete(b"k1")
        wb.delete(b"k2")
        wb.put(b"k2", b"v")
        wb.put(b"k3", b"first")
        wb.put(b"k3", b"second")
    assert contents(db) == {b"k2": b"v", b"k3": b"second"}


def test_an_empty_write_batch_changes_nothing(open_db: Opener) -> None:
    db = open_db()
    db[b"a"] = b"1"
    with db.write_batch():
        pass
    assert contents(db) == {b"a": b"1"}


def test_a_large_write_batch_applies_whole(open_db: Opener) -> None:
    db = open_db()
    model = {b"%05d" % i: os.urandom(64) for i in range(20_000)}
    with db.write_batch() as wb:
        for k, v in model.items():
            wb.put(k, v)
    assert len(db) == len(model)
    assert contents(db) == model


# -- one path opened twice in one process ----------------------------------------------------
def test_two_handles_on_one_path_share_data_and_closing_one_keeps_the_lock(
        open_db: Opener, role: str, plyvel_can_open: PlyvelProbe) -> None:
    a = open_db()
    b = open_db()
    a[b"k"] = b"v"
    assert b[b"k"] == b"v"
    a.close()
    assert not plyvel_can_open(open_db.path), "closing one of two handles released the LOCK"
    assert b.is_leader is (role == "leader")
    b[b"k2"] = b"v2"
    assert contents(b) == {b"k": b"v", b"k2": b"v2"}
    assert not plyvel_can_open(open_db.path)
    b.close()
    partydbm.let_go(open_db.path)  # or wait for the end of its grace period
    if role == "leader":  # the probe can see a released LOCK: the checks above mean it
        assert plyvel_can_open(open_db.path)


def test_a_path_and_a_symlink_to_it_share_one_engine(open_db: Opener, role: str, tmp_path: Path,
                                                     plyvel_can_open: PlyvelProbe) -> None:
    a = open_db()
    link = tmp_path / "link"
    link.symlink_to(open_db.path, target_is_directory=True)
    b = partydbm.open(link, "w")
    try:
        assert b.is_leader is (role == "leader")
        a[b"k"] = b"v"
        assert b[b"k"] == b"v"
        a.close()
        assert not plyvel_can_open(open_db.path), "closing the other spelling released the LOCK"
        b[b"k2"] = b"v2"
        assert contents(b) == {b"k": b"v", b"k2": b"v2"}
    finally:
        b.close()


def test_open_close_open_again_in_one_process(open_db: Opener) -> None:
    for i in range(5):
        db = open_db()
        db[b"%d" % i] = b"x"
        assert len(db) == i + 1
        db.close()


def test_handles_with_different_flags_on_one_path(open_db: Opener) -> None:
    w = open_db("w" if open_db.path.exists() else "c")
    r = open_db("r")
    c = open_db("c")
    w[b"w"] = b"1"
    c[b"c"] = b"2"
    assert contents(r) == {b"w": b"1", b"c": b"2"}
    with pytest.raises(partydbm.ReadOnlyError):
        r[b"r"] = b"3"
    r.close()
    w[b"still"] = b"writable"  # flags are per handle, not per engine
    assert c[b"still"] == b"writable"


# -- threads ---------------------------------------------------------------------------------
def _run_threads(target: Callable[[int], None], n: int) -> None:
    errors: list[BaseException] = []

    def wrap(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


def _thread_ops(db: partydbm.PartyDBM, i: int, n_ops: int,
                models: list[dict[bytes, bytes]]) -> None:
    rnd = random.Random(i)
    model = models[i]
    prefix = b"t%d/" % i
    for _ in range(n_ops):
        k = prefix + bytes([rnd.randrange(40)])
        op = rnd.random()
        if op < 0.65:
            _write_or_delete(db, model, k, rnd, op < 0.45)
        elif op < 0.9:
            assert db.get(k) == model.get(k)
        else:
            assert dict(db.iterator(prefix=prefix)) == model


def test_threads_sharing_one_handle_match_a_model(open_db: Opener) -> None:
    db = open_db()
    models: list[dict[bytes, bytes]] = [{} for _ in range(4)]
    _run_threads(lambda i: _thread_ops(db, i, 500, models), 4)
    expect = {k: v for m in models for k, v in m.items()}
    assert contents(db) == expect


def test_threads_with_their_own_handles_on_one_path_match_a_model(open_db: Opener) -> None:
    main = open_db()
    models: list[dict[bytes, bytes]] = [{} for _ in range(4)]

    def work(i: int) -> None:
        for _round in range(3):
            db = partydbm.open(open_db.path, "w")
            try:
                assert db.is_leader is main.is_leader
                _thread_ops(db, i, 100, models)
            finally:
                db.close()

    _run_threads(work, 4)
    expect = {k: v for m in models for k, v in m.items()}
    assert contents(main) == expect


def test_clear_of_many_keys(open_db: Opener) -> None:
    db = open_db()
    db.update({b"%06d" % i: b"v" for i in range(12_000)})
    other = open_db()
    db.clear()
    assert len(other) == 0 and other.firstkey() is None
    other[b"k"] = b"v"
    assert contents(db) == {b"k": b"v"}


def test_flags_are_per_handle_across_processes(tmp_path: Path, holder: Holder, role: str) -> None:
    # The leader's own handle being read-only must not make its followers read-only,
    # and a read-only follower must not stop the leader's handle writing.
    path = tmp_path / "db"
    partydbm.open(path, "c").close()
    partydbm.let_go(path)
    if role == "follower":
        assert holder.open(path, "r") == "leader"
        flag, other_flag = "w", "r"
    else:
        flag, other_flag = "r", "w"
    try:
        db = partydbm.open(path, flag)
        try:
            assert db.is_leader is (role == "leader")
            if role == "leader":
                assert holder.open(path, other_flag) == "follower"
                holder.put(path, b"from", b"holder")
                assert contents(db) == {b"from": b"holder"}
                with pytest.raises(partydbm.ReadOnlyError):
                    db[b"k"] = b"v"
            else:
                db[b"k"] = b"v"
                del db[b"k"]
                db[b"k2"] = b"v2"
                assert contents(db) == {b"k2": b"v2"}
        finally:
            db.close()
    finally:
        holder.close_db(path)
