"""db.iterator(): range scans against a model (a sorted dict filtered in Python), in
both roles."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import Opener


def model_scan(model: dict[bytes, bytes], start: bytes | None = None,
               stop: bytes | None = None, prefix: bytes | None = None, reverse: bool = False,
               include_start: bool = True, include_stop: bool = False,
               include_key: bool = True, include_value: bool = True) -> list[Any]:
    keys = sorted(model)
    if prefix is not None:
        keys = [k for k in keys if k.startswith(prefix)]
    if start is not None:
        keys = [k for k in keys if k > start or (include_start and k == start)]
    if stop is not None:
        keys = [k for k in keys if k < stop or (include_stop and k == stop)]
    if reverse:
        keys.reverse()
    if include_key and include_value:
        return [(k, model[k]) for k in keys]
    if include_key:
        return keys
    return [model[k] for k in keys]


ABC = {b"a": b"1", b"b": b"2", b"c": b"3"}


# -- the plyvel reverse one-key bug (docs/TRAPS.md, trap 3) -----------------------------------
@pytest.mark.parametrize(("kwargs", "expect"), [
    ({"start": b"c"}, [(b"c", b"3")]),
    ({"start": b"b", "stop": b"c"}, [(b"b", b"2")]),
    ({"stop": b"b"}, [(b"a", b"1")]),
    ({"start": b"a", "stop": b"a", "include_stop": True}, [(b"a", b"1")]),
    ({"start": b"b", "include_start": False}, [(b"c", b"3")]),
    ({"start": b"bb"}, [(b"c", b"3")]),
    ({"prefix": b"a"}, [(b"a", b"1")]),
    ({"prefix": b"c"}, [(b"c", b"3")]),
    ({"start": b"b", "stop": b"b", "include_stop": True}, [(b"b", b"2")]),
])
def test_a_reverse_range_with_exactly_one_key_yields_it(
        open_db: Opener, kwargs: dict[str, Any], expect: list[tuple[bytes, bytes]]) -> None:
    db = open_db()
    db.update(ABC)
    assert list(db.iterator(reverse=True, **kwargs)) == expect
    assert list(db.iterator(reverse=False, **kwargs)) == expect


def test_reverse_over_a_database_of_one_key(open_db: Opener) -> None:
    db = open_db()
    db[b"only"] = b"v"
    assert list(db.iterator(reverse=True)) == [(b"only", b"v")]
    assert list(db.iterator(reverse=True, start=b"only")) == [(b"only", b"v")]
    assert list(db.iterator(reverse=True, stop=b"only", include_stop=True)) == [(b"only", b"v")]
    assert list(db.iterator(reverse=True, stop=b"only")) == []


# -- fixed cases ---------------------------------------------------------------------------
KEYS = [b"", b"\x00", b"\x00\x00", b"\x00\xff", b"a", b"aa", b"aaz", b"ab", b"b", b"b\x00",
        b"b\xff", b"ba", b"c", b"\xfe", b"\xff", b"\xff\x00", b"\xff\xff", b"\xff\xff\xff"]
MODEL = {k: b"v" + k for k in KEYS}
CASES: list[dict[str, Any]] = [
    {},
    {"start": b"a"},
    {"start": b"a", "include_start": False},
    {"stop": b"b"},
    {"stop": b"b", "include_stop": True},
    {"start": b"a", "stop": b"b"},
    {"start": b"a", "stop": b"b", "include_start": False, "include_stop": True},
    {"start": b"", "stop": b"\x00"},
    {"start": b"", "include_start": False},
    {"stop": b""},
    {"stop": b"", "include_stop": True},
    {"start": b"\xff"},
    {"start": b"\xff\xff", "include_start": False},
    {"start": b"c", "stop": b"a"},  # empty: start after stop
    {"start": b"b", "stop": b"b"},
    {"start": b"b", "stop": b"b", "include_stop": True},
    {"start": b"b", "stop": b"b", "include_start": False, "include_stop": True},
    {"start": b"zz", "stop": b"zzz"},
    {"prefix": b""},
    {"prefix": b"a"},
    {"prefix": b"aa"},
    {"prefix": b"b"},
    {"prefix": b"\x00"},
    {"prefix": b"\xff"},
    {"prefix": b"\xff\xff"},
    {"prefix": b"\xff\xff\xff\xff"},
    {"prefix": b"q"},
]


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("case", CASES, ids=[repr(c) for c in CASES])
def test_iterator_range_matches_the_model(open_db: Opener, case: dict[str, Any],
                                          reverse: bool) -> None:
    db = open_db()
    db.update(MODEL)
    assert list(db.iterator(reverse=reverse, **case)) == model_scan(MODEL, reverse=reverse,
                                                                     **case)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_iterator_include_key_and_include_value_shape_the_output(open_db: Opener,
                                                                  reverse: bool) -> None:
    db = open_db()
    db.update(MODEL)
    keys = list(db.iterator(reverse=reverse, include_value=False))
    values = list(db.iterator(reverse=reverse, include_key=False))
    assert keys == model_scan(MODEL, reverse=reverse, include_value=False)
    assert values == model_scan(MODEL, reverse=reverse, include_key=False)
    assert all(type(k) is bytes for k in keys) and all(type(v) is bytes for v in values)
    assert list(db.iterator(prefix=b"a", reverse=reverse, include_value=False)) == \
        model_scan(MODEL, prefix=b"a", reverse=reverse, include_value=False)


def test_iterator_takes_str_bounds_as_utf8(open_db: Opener) -> None:
    db = open_db()
    db.update({"é": "1", "ea": "2", "f": "3"})
    assert list(db.iterator(start="ea", stop="é")) == [(b"ea", b"2"), (b"f", b"3")]
    assert list(db.iterator(start="f", stop="é", include_stop=True, reverse=True)) == [
        ("é".encode(), b"1"), (b"f", b"3")]
    assert list(db.iterator(prefix="é")) == [("é".encode(), b"1")]


@pytest.mark.parametrize("bounds", [{"start": b"a"}, {"stop": b"b"},
                                    {"start": b"a", "stop": b"b"}, {"start": b""}])
def test_prefix_combined_with_start_or_stop_raises_TypeError(open_db: Opener,
                                                             bounds: dict[str, Any]) -> None:
    db = open_db()
    db.update(ABC)
    with pytest.raises(TypeError):
        list(db.iterator(prefix=b"a", **bounds))


def test_iterator_on_an_empty_database_yields_nothing(open_db: Opener) -> None:
    db = open_db()
    for reverse in (False, True):
        assert list(db.iterator(reverse=reverse)) == []
        assert list(db.iterator(reverse=reverse, prefix=b"a")) == []
        assert list(db.iterator(reverse=reverse, start=b"a", stop=b"b")) == []


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_iterator_over_many_keys_pages_without_loss_or_repeat(open_db: Opener,
                                                               reverse: bool) -> None:
    db = open_db()
    rnd = random.Random(5)
    model = {rnd.randbytes(rnd.randrange(1, 5)): rnd.randbytes(rnd.randrange(0, 5))
             for _ in range(6000)}
    db.update(model)
    assert list(db.iterator(reverse=reverse)) == model_scan(model, reverse=reverse)
    lo, hi = sorted(rnd.sample(sorted(model), 2))
    for inc_start in (False, True):
        for inc_stop in (False, True):
            kw: dict[str, Any] = {"start": lo, "stop": hi, "include_start": inc_start,
                  "include_stop": inc_stop}
            assert list(db.iterator(reverse=reverse, **kw)) == model_scan(
                model, reverse=reverse, **kw)
    assert list(db.iterator(reverse=reverse, include_value=False)) == sorted(
        model, reverse=reverse)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_iterator_over_large_values_pages_by_size(open_db: Opener, reverse: bool) -> None:
    db = open_db()
    rnd = random.Random(6)
    model = {b"%03d" % i: rnd.randbytes(100_000) for i in range(12)}
    db.update(model)
    assert list(db.iterator(reverse=reverse)) == model_scan(model, reverse=reverse)
    assert list(db.iterator(reverse=reverse, include_key=False)) == model_scan(
        model, reverse=reverse, include_key=False)


def test_breaking_off_an_iteration_leaves_the_handle_usable(open_db: Opener) -> None:
    db = open_db()
    db.update({b"%04d" % i: b"v" for i in range(3000)})
    for reverse in (False, True):
        it = db.iterator(reverse=reverse)
        next(it)
        del it
    db[b"x"] = b"y"
    assert len(db) == 3001


# -- property test -------------------------------------------------------------------------
# Keys from a tiny alphabet with the awkward bytes, so that prefixes of one another,
# the empty key, \x00 and \xff runs come up all the time.
byte_keys = st.lists(st.sampled_from([b"\x00", b"\x01", b"a", b"b", b"\xfe", b"\xff"]),
                     max_size=4).map(b"".join)
bound = st.one_of(st.none(), byte_keys)


@st.composite
def scans(draw: st.DrawFn) -> dict[str, Any]:
    kw: dict[str, Any] = {"reverse": draw(st.booleans())}
    if draw(st.integers(0, 3)) == 0:
        kw["prefix"] = draw(byte_keys)
    else:
        kw["start"] = draw(bound)
        kw["stop"] = draw(bound)
        kw["include_start"] = draw(st.booleans())
        kw["include_stop"] = draw(st.booleans())
    shape = draw(st.sampled_from(["items", "keys", "values"]))
    kw["include_key"] = shape != "values"
    kw["include_value"] = shape != "keys"
    return kw


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(model=st.dictionaries(byte_keys, st.binary(max_size=3), max_size=24),
       queries=st.lists(scans(), min_size=1, max_size=6))
def test_iterator_matches_the_model_for_any_keys_and_range(
        open_db: Opener, model: dict[bytes, bytes], queries: list[dict[str, Any]]) -> None:
    db = open_db.shared()
    db.clear()
    db.update(model)
    for kw in queries:
        assert list(db.iterator(**kw)) == model_scan(model, **kw), kw


def test_bad_iterator_arguments_raise_when_the_iterator_is_made(open_db: Opener) -> None:
    # As plyvel: the call itself raises, not the first next().
    db = open_db()
    for kw in ({"start": 1}, {"stop": 2.0}, {"prefix": object()},
               {"prefix": b"a", "start": b"a"}, {"prefix": b"a", "stop": b"b"}):
        with pytest.raises(TypeError):
            db.iterator(**kw)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_writing_while_iterating_keeps_order_and_uniqueness(open_db: Opener, reverse: bool) -> None:
    # Not a snapshot: keys written behind or ahead may or may not show up, but every
    # key that stays put is yielded exactly once, and always in order.
    db = open_db()
    original = [b"k%05d" % i for i in range(0, 6000, 2)]
    db.update({k: b"v" for k in original})
    seen = []
    for i, key in enumerate(db.iterator(reverse=reverse, include_value=False)):
        seen.append(key)
        if key in original:
            del db[key]
            db[key + b"\x00"] = b"new"  # just after the key (ahead when forward)
            db[key[:-1]] = b"new"  # just before it (ahead when reverse)
        assert i < 20_000, "the iteration does not end"
    assert seen == sorted(set(seen), reverse=reverse)
    assert set(original) <= set(seen)
    assert not set(original) & set(db.keys())
