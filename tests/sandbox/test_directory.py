"""The emulator's directory: mutations, membership rules, and the seeded generator."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

import pytest

from daemon.sandbox.directory import (
    DEFAULT_ENV_ID,
    Directory,
    DirectoryConflict,
    UnknownObject,
    generate,
)

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2024, 1, 1, tzinfo=UTC).timestamp()

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def d() -> Directory:
    return Directory(clock=FakeClock())


# --- users -----------------------------------------------------------------------------------------

def test_add_user_builds_pingone_user_json(d: Directory) -> None:
    user = d.add_user("jane@example.com", email="jane@example.com", given="Jane", family="Doe",
                      department="Sales", employeeNumber="42")
    assert user["environment"] == {"id": DEFAULT_ENV_ID}
    assert user["population"] == {"id": d.population_id}
    assert user["name"] == {"given": "Jane", "family": "Doe", "formatted": "Jane Doe"}
    assert user["enabled"] is True and user["lifecycle"] == {"status": "ACCOUNT_OK"}
    assert user["account"]["status"] == "OK" and user["identityProvider"] == {"type": "PING_ONE"}
    assert user["department"] == "Sales" and user["employeeNumber"] == "42"
    assert STAMP.match(user["createdAt"]) and user["createdAt"] == user["updatedAt"]
    assert d.user_by_username("JANE@example.com") is user


def test_add_user_leaves_out_absent_attributes(d: Directory) -> None:
    user = d.add_user("jdoe")
    assert "email" not in user and "name" not in user


def test_duplicate_username_is_refused_case_insensitively(d: Directory) -> None:
    d.add_user("jane@example.com")
    with pytest.raises(DirectoryConflict):
        d.add_user("JANE@example.com")


def test_update_user_merges_nested_removes_none_and_bumps_updated_at(d: Directory) -> None:
    user = d.add_user("jane@example.com", given="Jane", family="Doe", title="Engineer")
    before = user["updatedAt"]
    d.update_user(user["id"], name={"family": "Roe"}, title=None, costCenter="CC1")
    assert user["name"] == {"given": "Jane", "family": "Roe", "formatted": "Jane Roe"}
    assert "title" not in user and user["costCenter"] == "CC1" and "costCenter" in d.custom_attributes
    assert user["updatedAt"] > before


def test_update_user_renaming_to_a_taken_username_is_refused(d: Directory) -> None:
    d.add_user("a@example.com")
    b = d.add_user("b@example.com")
    with pytest.raises(DirectoryConflict):
        d.update_user(b["id"], username="A@example.com")
    d.update_user(b["id"], username="c@example.com")
    assert d.user_by_username("c@example.com") is b


def test_set_enabled_bumps_updated_at(d: Directory) -> None:
    user = d.add_user("jane@example.com")
    before = user["updatedAt"]
    d.set_enabled(user["id"], False)
    assert user["enabled"] is False and user["updatedAt"] > before


def test_delete_user_leaves_all_groups_and_bumps_them(d: Directory) -> None:
    user = d.add_user("jane@example.com")
    group = d.add_group("G")
    d.add_member(group["id"], user["id"])
    before = group["updatedAt"]
    d.delete_user(user["id"])
    assert user["id"] not in d.users and d.members[group["id"]] == set()
    assert group["updatedAt"] > before
    with pytest.raises(UnknownObject):
        d.user_by_username("jane@example.com")
    with pytest.raises(UnknownObject):
        d.delete_user(user["id"])


# --- groups and membership -------------------------------------------------------------------------

def test_add_group_shape_and_unique_name(d: Directory) -> None:
    group = d.add_group("Engineering", description="eng")
    assert group["name"] == group["displayName"] == "Engineering"
    assert group["population"] == {"id": d.population_id} and group["description"] == "eng"
    assert d.add_group("Env group", population=None).get("population") is None
    with pytest.raises(DirectoryConflict):
        d.add_group("Engineering")


def test_rename_group_bumps_and_reindexes(d: Directory) -> None:
    group = d.add_group("Old")
    before = group["updatedAt"]
    d.rename_group(group["id"], "New")
    assert d.group_by_name("New") is group and group["displayName"] == "New"
    assert group["updatedAt"] > before
    with pytest.raises(UnknownObject):
        d.group_by_name("Old")


def test_membership_change_bumps_group_not_user_by_default(d: Directory) -> None:
    user = d.add_user("jane@example.com")
    group = d.add_group("G")
    user_before, group_before = user["updatedAt"], group["updatedAt"]
    d.add_member(group["id"], user["id"])
    assert group["updatedAt"] > group_before and user["updatedAt"] == user_before
    group_before = group["updatedAt"]
    d.remove_member(group["id"], user["id"])
    assert group["updatedAt"] > group_before and user["updatedAt"] == user_before


def test_membership_change_bumps_user_with_the_knob() -> None:
    d = Directory(clock=FakeClock(), bump_user_on_membership=True)
    user = d.add_user("jane@example.com")
    group = d.add_group("G")
    before = user["updatedAt"]
    d.add_member(group["id"], user["id"])
    assert user["updatedAt"] > before


def test_nest_rejects_cycles(d: Directory) -> None:
    a, b, c = (d.add_group(name)["id"] for name in "ABC")
    d.nest(b, a)
    d.nest(c, b)
    for child, parent in ((a, a), (a, b), (a, c), (b, c)):
        with pytest.raises(DirectoryConflict):
            d.nest(child, parent)
    d.unnest(c, b)
    d.nest(b, c)  # no longer a cycle
    assert d.parents[b] == {a, c} and d.parents[c] == set()
    with pytest.raises(UnknownObject):
        d.unnest(c, b)


def test_nesting_and_dynamic_membership_counts(d: Directory) -> None:
    alice = d.add_user("alice@example.com", department="Engineering")["id"]
    bob = d.add_user("bob@example.com", department="Sales")["id"]
    carol = d.add_user("carol@example.com")["id"]
    parent = d.add_group("Parent")["id"]
    child = d.add_group("Child")["id"]
    eng = d.add_group("Eng", user_filter='department eq "Engineering"')["id"]
    d.add_member(parent, bob)
    d.add_member(child, carol)
    d.nest(child, parent)
    d.nest(eng, parent)
    assert d.direct_member_ids(parent) == {bob}
    assert d.direct_member_ids(eng) == {alice}
    assert d.transitive_member_ids(parent) == {alice, bob, carol}
    assert d.user_group_ids(alice) == {eng}
    assert d.user_group_ids(alice, transitive=True) == {eng, parent}
    d.update_user(bob, department="Engineering")
    assert d.direct_member_ids(eng) == {alice, bob}
    d.delete_group(child)
    assert d.transitive_member_ids(parent) == {alice, bob}
    assert d.user_group_ids(carol) == set()


def test_bad_user_filter_on_a_group_is_refused(d: Directory) -> None:
    with pytest.raises(ValueError):
        d.add_group("Bad", user_filter='nope eq "x"')


# --- generator -------------------------------------------------------------------------------------

def test_generate_is_deterministic_per_seed() -> None:
    one, two, other = generate(500, 20, seed=7), generate(500, 20, seed=7), generate(500, 20, seed=8)
    assert one.users == two.users and one.groups == two.groups and one.members == two.members
    assert one.parents == two.parents and one.population_id == two.population_id
    assert set(one.users) != set(other.users)


def test_generate_has_the_promised_shape_and_proportions() -> None:
    n = 5000
    d = generate(n, 60, seed=1, domain="corp.example")
    users = list(d.users.values())
    disabled = sum(not u["enabled"] for u in users) / n
    plain = [u["username"] for u in users if "@" not in u["username"]]
    assert 0.01 <= disabled <= 0.035
    assert 0.004 <= len(plain) / n <= 0.02
    assert len({u["username"].casefold() for u in users}) == n
    assert all(u["email"].endswith("@corp.example") for u in users)
    names = "".join(u["name"]["given"] + u["name"]["family"] for u in users)
    assert all(ch in names for ch in "éüø李")
    for user in users:
        assert {"department", "employeeNumber", "title", "email", "createdAt", "updatedAt", "account",
                "lifecycle", "identityProvider", "population", "enabled"} <= set(user)
        assert STAMP.match(user["updatedAt"]) and user["createdAt"] <= user["updatedAt"]
    assert len({u["population"]["id"] for u in users}) == 2
    staff = d.group_by_name("All Staff")["id"]
    assert d.group_order.ids[0] == staff
    assert 0.45 <= len(d.direct_member_ids(staff)) / n <= 0.55
    zpa, zia = d.group_by_name("ZPA Users")["id"], d.group_by_name("ZIA Users")["id"]
    assert len(d.direct_member_ids(zpa)) >= n // 5 and len(d.direct_member_ids(zia)) >= n // 5
    contractors = d.group_by_name("ZPA Contractors")["id"]
    assert zpa in d.parents[contractors]
    assert d.transitive_member_ids(zpa) > d.direct_member_ids(zpa)
    sizes = sorted(len(d.direct_member_ids(g)) for g in d.groups)
    assert sizes.count(0) >= 2 and len(set(sizes)) > 20  # some empty, a long tail
    dynamic = d.group_by_name("Engineering (dynamic)")
    assert dynamic["userFilter"] == 'department eq "Engineering"'
    assert len(d.direct_member_ids(dynamic["id"])) > n // 30
    assert len({g["name"] for g in d.groups.values()}) == 60
    for child in d.parents:  # acyclic
        assert child not in d._ancestors([child])


def test_generate_small_counts_still_work() -> None:
    d = generate(3, 2)
    assert len(d.users) == 3 and [g["name"] for g in d.groups.values()] == ["All Staff", "ZPA Users"]
    assert len(generate(0, 0).users) == 0


def test_generate_100k_timing_is_printed() -> None:
    started = time.perf_counter()
    d = generate(100_000, 1000)
    elapsed = time.perf_counter() - started
    print(f"\ngenerate(100000, 1000): {elapsed:.2f} s, "
          f"{sum(len(m) for m in d.members.values())} static memberships")
    assert len(d.users) == 100_000
