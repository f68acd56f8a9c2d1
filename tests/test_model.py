"""`daemon.model`: `Members`, a sorted tuple that must behave exactly as a frozenset of ids does
wherever the planner, the applier, the store and the mapping use member sets; `shared` and
`UNCHANGED`, the identity the module docstring's invariants rest on."""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Set

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.model import UNCHANGED, Members, shared
from tests.twins import twin


def cases() -> list[tuple[frozenset[str], frozenset[str]]]:
    rng = random.Random(7)
    pool = [f"u{i:03d}" for i in range(60)]
    out = [(frozenset(), frozenset()), (frozenset({"a"}), frozenset())]
    for _ in range(200):
        out.append((frozenset(rng.sample(pool, rng.randint(0, 30))), frozenset(rng.sample(pool, rng.randint(0, 30)))))
    return out


@pytest.mark.parametrize(("a", "b"), cases()[:60])
def test_every_set_operation_agrees_with_frozenset(a: frozenset[str], b: frozenset[str]) -> None:
    ma, mb = Members.of(a), Members.of(b)
    keys = dict.fromkeys(b).keys()
    for other in (b, mb, set(b), keys):
        assert (ma == other) == (a == b) and (other == ma) == (a == b)
        assert (ma != other) == (a != b)
        assert (ma <= other) == (a <= b) and (ma >= other) == (a >= b)
        assert (ma < other) == (a < b) and (ma > other) == (a > b)
        assert set(ma - other) == a - b and set(other - ma) == b - a
        assert set(ma & other) == a & b and set(other & ma) == a & b
        assert set(ma | other) == a | b and set(other | ma) == a | b
        assert set(ma ^ other) == a ^ b
        assert ma.isdisjoint(other) == a.isdisjoint(b)
    assert all(x in ma for x in a) and not any(x in ma for x in b - a)
    assert list(ma) == sorted(a) and len(ma) == len(a) and bool(ma) == bool(a)
    assert hash(ma) == hash(a)
    assert isinstance(ma, Set) and isinstance(ma - b, Members) and isinstance(ma & keys, Members)


def test_it_is_built_from_anything_and_stays_sorted_and_unique() -> None:
    assert list(Members.of(["c", "a", "b", "a"])) == ["a", "b", "c"]
    assert list(Members.of(iter({"z", "y"}))) == ["y", "z"]
    m = Members.of("ba")
    assert Members.of(m) is m
    assert 3 not in m and None not in m                  # not a str: not a member, no error
    assert frozenset().union(m, Members.of("xy")) == frozenset("abxy")
    assert json.loads(json.dumps(m)) == ["a", "b"]       # stored as the sorted JSON list it is
    assert repr(m) == "Members(['a', 'b'])"


def test_it_holds_a_member_in_8_bytes_where_a_frozenset_takes_several_times_that() -> None:
    ids = [sys.intern(f"{i:036d}") for i in range(2500)]
    compact, table = Members.of(ids), frozenset(ids)
    assert sys.getsizeof(compact) < 8 * len(ids) + 64
    assert sys.getsizeof(table) > 3 * sys.getsizeof(compact)


# -- identity (the module docstring's invariants) --------------------------------------------------

def test_shared_hands_back_the_other_object_only_when_it_is_equal_and_not_already_the_same() -> None:
    value = {"userName": "ada@example.com"}
    copy = dict(value)
    assert shared(value, copy) is copy                       # equal, not identical: the other one
    assert shared(value, value) is value
    assert shared(value, {"userName": "grace@example.com"}) is value
    ids = [twin("u01"), twin("u02")]
    table, compact = frozenset(ids), Members.of(["u01", "u02"])
    assert shared(table, compact) is compact                 # a frozenset and a Members that are equal
    assert shared(compact, frozenset({"u01"})) is compact


def test_member_sets_answer_by_value_whatever_string_objects_hold_the_ids() -> None:
    held = Members.of([twin("u01"), twin("u02")])
    assert "u01" in held and twin("u02") in held and "u03" not in held
    assert held == frozenset({"u01", "u02"}) == Members.of(["u02", "u01"])
    assert held - {twin("u01")} == Members.of(["u02"])


def test_the_placeholder_equals_an_empty_user_so_only_identity_tells_them_apart() -> None:
    """`UNCHANGED == {}`: every check for it is `is`, never `==` (tests/test_mapping.py and
    tests/test_store.py hold an empty user's JSON next to it)."""
    empty: dict[str, object] = {}
    assert UNCHANGED == empty and UNCHANGED is not empty
    assert shared(empty, UNCHANGED) is UNCHANGED              # so it must never be offered to `shared`


@given(st.frozensets(st.sampled_from([f"u{i:03d}" for i in range(400)]), min_size=0, max_size=300),
       st.lists(st.sampled_from([f"u{i:03d}" for i in range(400)] + ["a", "zz"]), max_size=12))
def test_adding_or_removing_a_few_keeps_the_set_sorted_as_a_rebuild_would(base: frozenset[str],
                                                                         few: list[str]) -> None:
    """`plus`, `minus` and `|` with a small other (ids inserted in place, no sort of the whole set)."""
    m = Members.of(base)
    for got, want in ((m.plus(few), base | set(few)), (m | set(few), base | set(few)),
                      (m.minus(few), base - set(few))):
        assert isinstance(got, Members) and list(got) == sorted(want)
    assert m.plus(x for x in few if x in base) is m and m.minus(x for x in few if x not in base) is m
