"""mapping.desired_state and its parts as tables of scenarios: pure data in, data out."""

from __future__ import annotations

import gc
import json
import unicodedata
from typing import Any

import pytest

from daemon.config import PROFILES
from daemon.mapping import (
    CONFLICT,
    INVALID_USERNAME,
    MISSING_USERNAME,
    Desired,
    GroupSelector,
    MappingCache,
    Rules,
    cache_user,
    content_hash,
    desired_state,
    is_email,
    map_user,
    resolve_pins,
)
from daemon.model import JSON, UNCHANGED, Snapshot

ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
POP_A = "pop-a"
POP_B = "pop-b"
SIMPLE_MAPPING = {"userName": "username", "displayName": "name.formatted", "externalId": "id"}


def user(uid: str, username: str | None = None, *, enabled: bool = True, population: str = POP_A,
         given: str = "Ada", family: str = "Lovelace", **extra: Any) -> JSON:
    out: JSON = {
        "id": uid,
        "username": username if username is not None else f"{uid}@example.com",
        "email": f"{uid}@example.com",
        "enabled": enabled,
        "population": {"id": population},
        "name": {"given": given, "family": family, "formatted": f"{given} {family}"},
        "updatedAt": "2024-01-01T00:00:00.000Z",
    }
    out.update(extra)
    return out


def group(gid: str, name: str) -> JSON:
    return {"id": gid, "name": name}


def snapshot(users: list[JSON], groups: dict[str, str] | None = None,
             members: dict[str, set[str]] | None = None,
             parents: dict[str, set[str]] | None = None) -> Snapshot:
    return Snapshot(
        users={u["id"]: u for u in users},
        groups={gid: group(gid, name) for gid, name in (groups or {}).items()},
        members={gid: frozenset(ids) for gid, ids in (members or {}).items()},
        parents={gid: frozenset(ids) for gid, ids in (parents or {}).items()},
    )


def rules(mapping: dict[str, str] | tuple[tuple[str, str], ...] = SIMPLE_MAPPING, **kwargs: Any) -> Rules:
    return Rules.compile(mapping, **kwargs)


# A parent group "Staff" (g-parent) holds u1 directly; "Contractors" (g-child) is nested in it and
# holds u2; u3 is in no group; u4 is in the child and in a second population.
NESTED = snapshot(
    [user("u1"), user("u2"), user("u3"), user("u4", population=POP_B)],
    groups={"g-parent": "Staff", "g-child": "Contractors", "g-other": "Other"},
    members={"g-parent": {"u1"}, "g-child": {"u2", "u4"}, "g-other": {"u3"}},
    parents={"g-child": {"g-parent"}},
)


# -- scope ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("case", "kwargs", "expected"),
    [
        ("no scope: everyone", {}, {"u1", "u2", "u3", "u4"}),
        ("group, direct members only",
         {"scope_groups": (GroupSelector(name="Staff"),), "transitive": False}, {"u1"}),
        ("group, transitive through the nested group",
         {"scope_groups": (GroupSelector(name="Staff"),), "transitive": True}, {"u1", "u2", "u4"}),
        ("group by id", {"scope_groups": (GroupSelector(id="g-child"),)}, {"u2", "u4"}),
        ("two groups: union", {"scope_groups": (GroupSelector(name="Contractors"), GroupSelector(name="Other"))},
         {"u2", "u3", "u4"}),
        ("filter on population", {"scope_filter": f'population.id eq "{POP_B}"'}, {"u4"}),
        ("filter on memberOfGroups (transitive)", {"scope_filter": 'memberOfGroups[id eq "g-parent"]'},
         {"u1", "u2", "u4"}),
        ("filter on memberOfGroups (direct)",
         {"scope_filter": 'memberOfGroups[id eq "g-parent"]', "transitive": False}, {"u1"}),
        ("group and filter: both must hold",
         {"scope_groups": (GroupSelector(name="Staff"),), "scope_filter": f'population.id eq "{POP_A}"'},
         {"u1", "u2"}),
        ("filter with or", {"scope_filter": 'username eq "u3@example.com" or username eq "u1@example.com"'},
         {"u1", "u3"}),
        ("filter that is case-insensitive on username", {"scope_filter": 'username eq "U3@EXAMPLE.COM"'}, {"u3"}),
        ("group that does not exist: nobody", {"scope_groups": (GroupSelector(name="Nope"),)}, set()),
    ],
)
def test_scope_selects_exactly_the_users_the_rule_admits(case: str, kwargs: dict[str, Any],
                                                        expected: set[str]) -> None:
    desired = desired_state(NESTED, rules(**kwargs))
    assert set(desired.users) == expected, case
    assert desired.in_scope == len(expected)
    assert desired.skipped == {}


def test_scope_filter_on_enabled_keeps_disabled_users_out() -> None:
    snap = snapshot([user("u1"), user("u2", enabled=False)])
    desired = desired_state(snap, rules(scope_filter="enabled eq true"))
    assert set(desired.users) == {"u1"}


def test_a_disabled_user_in_scope_is_desired_inactive() -> None:
    snap = snapshot([user("u1"), user("u2", enabled=False)])
    desired = desired_state(snap, rules())
    assert desired.users["u1"].active is True
    assert desired.users["u2"].active is False


def test_a_scope_filter_is_parsed_by_scim2_filter_parser_and_bad_ones_are_refused() -> None:
    with pytest.raises(ValueError):
        rules(scope_filter='username eq "unterminated')
    with pytest.raises(ValueError):
        rules(scope_filter='enabled eq "maybe"')
    with pytest.raises(ValueError):
        rules(scope_filter='not (username eq "a@example.com")')


# -- mapping ---------------------------------------------------------------------------------------

def test_jmespath_expressions_map_to_flat_scim_paths_including_the_enterprise_extension() -> None:
    mapping = {
        "userName": "username",
        "name.givenName": "name.given",
        "name.familyName": "name.family",
        "displayName": "join(' ', [name.given, name.family])",
        "externalId": "id",
        'emails[type eq "work"].value': "email",
        f"{ENTERPRISE}:department": "department",
        f"{ENTERPRISE}:employeeNumber": "employeeNumber",
        "title": "title || 'Staff'",
        "nickName": "nickname || username",
    }
    u = user("u1", department="Research", employeeNumber="E100001")
    user_name, attrs = map_user(u, rules(mapping))
    assert user_name == "u1@example.com"
    assert attrs == {
        "userName": "u1@example.com",
        "name.givenName": "Ada",
        "name.familyName": "Lovelace",
        "displayName": "Ada Lovelace",
        "externalId": "u1",
        'emails[type eq "work"].value': "u1@example.com",
        f"{ENTERPRISE}:department": "Research",
        f"{ENTERPRISE}:employeeNumber": "E100001",
        "title": "Staff",
        "nickName": "u1@example.com",
    }


@pytest.mark.parametrize("profile", ["zpa", "zia", "generic"])
def test_each_profile_default_mapping_maps_a_full_user(profile: str) -> None:
    u = user("u1", department="Research")
    _, attrs = map_user(u, rules(PROFILES[profile].mapping))
    assert attrs["userName"] == "u1@example.com"
    assert attrs["displayName"] == "Ada Lovelace"
    assert attrs["externalId"] == "u1"
    assert attrs["name.givenName"] == "Ada"
    if profile != "generic":
        assert attrs[f"{ENTERPRISE}:department"] == "Research"


def test_an_absent_or_empty_source_value_maps_to_none() -> None:
    u = user("u1")
    u["name"] = {"given": "", "formatted": "Ada"}
    _, attrs = map_user(u, rules({"userName": "username", "name.givenName": "name.given",
                                  "name.familyName": "name.family"}))
    assert attrs["name.givenName"] is None
    assert attrs["name.familyName"] is None


def test_a_mapping_without_username_is_refused_at_compile_time() -> None:
    with pytest.raises(ValueError, match="userName"):
        rules({"displayName": "name.formatted"})


@pytest.mark.parametrize(
    ("value", "is_valid"),
    [
        ("ada@example.com", True),
        ("ada.lovelace+tag@sub.example.co.uk", True),
        ("alovelace", False),
        ("ada@localhost", False),
        ("ada@@example.com", False),
        ("ada lovelace@example.com", False),
        ("@example.com", False),
        ("ada@example.c", False),
    ],
)
def test_is_email(value: str, is_valid: bool) -> None:
    assert is_email(value) is is_valid


def test_a_username_that_is_not_an_email_is_skipped_as_invalid_username_and_the_others_kept() -> None:
    snap = snapshot([user("u1"), user("u2", "alovelace"), user("u3")])
    desired = desired_state(snap, rules(require_email_username=True))
    assert set(desired.users) == {"u1", "u3"}
    skip = desired.skipped["u2"]
    assert skip.reason == INVALID_USERNAME
    assert skip.user_name == "alovelace"
    assert "alovelace" in skip.detail
    assert desired.in_scope == 3


def test_without_require_email_username_a_plain_username_is_provisioned() -> None:
    snap = snapshot([user("u2", "alovelace")])
    desired = desired_state(snap, rules(require_email_username=False))
    assert set(desired.users) == {"u2"}
    assert desired.users["u2"].user_name == "alovelace"


@pytest.mark.parametrize("username", ["", None])
def test_a_missing_username_is_skipped_as_missing_username(username: str | None) -> None:
    u = user("u1")
    if username is None:
        del u["username"]
    else:
        u["username"] = username
    desired = desired_state(snapshot([u, user("u2")]), rules(require_email_username=True))
    assert set(desired.users) == {"u2"}
    assert desired.skipped["u1"].reason == MISSING_USERNAME


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("same@example.com", "same@example.com"),
        ("Same@Example.com", "same@example.com"),                      # userName is caseExact=false
        ("jos\u00e9@example.com", "jose\u0301@example.com"),             # composed vs decomposed
    ],
)
def test_two_users_mapping_to_one_username_are_both_skipped_as_conflict(first: str, second: str) -> None:
    snap = snapshot([user("u1", first), user("u2", second), user("u3")])
    desired = desired_state(snap, rules(require_email_username=True))
    assert set(desired.users) == {"u3"}
    assert {sid: s.reason for sid, s in desired.skipped.items()} == {"u1": CONFLICT, "u2": CONFLICT}
    assert "u2" in desired.skipped["u1"].detail
    assert "u1" in desired.skipped["u2"].detail


def test_conflicting_users_are_no_group_members() -> None:
    snap = snapshot([user("u1", "x@example.com"), user("u2", "x@example.com"), user("u3")],
                    groups={"g1": "G"}, members={"g1": {"u1", "u2", "u3"}})
    desired = desired_state(snap, rules(groups=(GroupSelector(name="G"),)))
    assert desired.groups["g1"].members == frozenset({"u3"})


def test_mapped_strings_are_nfc_normalised() -> None:
    decomposed = "Jose\u0301"
    assert unicodedata.is_normalized("NFD", decomposed)
    u = user("u1", given=decomposed)
    u["name"]["formatted"] = f"{decomposed} Lovelace"
    desired = desired_state(snapshot([u]), rules({"userName": "username", "name.givenName": "name.given",
                                                  "displayName": "name.formatted"}))
    attrs = desired.users["u1"].attrs
    assert attrs["name.givenName"] == "Jos\u00e9"
    assert attrs["displayName"] == "Jos\u00e9 Lovelace"


def test_nfc_forms_of_one_user_map_to_the_same_canonical_json() -> None:
    r = rules({"userName": "username", "name.givenName": "name.given"})
    composed = desired_state(snapshot([user("u1", given="Jos\u00e9")]), r).users["u1"]
    decomposed = desired_state(snapshot([user("u1", given="Jose\u0301")]), r).users["u1"]
    assert composed.attrs == decomposed.attrs
    assert json.dumps(dict(composed.attrs)) == json.dumps(dict(decomposed.attrs))


def test_a_group_display_name_is_nfc_normalised() -> None:
    snap = snapshot([user("u1")], groups={"g1": "E\u0301quipe"}, members={"g1": {"u1"}})
    desired = desired_state(snap, rules(groups=(GroupSelector(id="g1"),)))
    assert desired.groups["g1"].display_name == "\u00c9quipe"


def test_the_mapping_cache_maps_a_changed_user_again_and_an_unchanged_one_the_same() -> None:
    r = rules(require_email_username=True)
    cache: MappingCache = {}
    users = [user("u1"), user("u2", "plain")]
    snap = snapshot(users)
    first = desired_state(snap, r, hashes={u["id"]: content_hash(u) for u in users}, cache=cache)
    assert set(first.users) == {"u1"} and first.skipped["u2"].reason == INVALID_USERNAME
    changed = [user("u1", given="Grace"), user("u2", "grace@example.com")]
    snap = snapshot(changed)
    second = desired_state(snap, r, hashes={u["id"]: content_hash(u) for u in changed}, cache=cache)
    assert second.users["u1"].attrs["displayName"] == "Grace Lovelace"
    assert set(second.users) == {"u1", "u2"} and second.skipped == {}
    third = desired_state(snap, r, hashes={u["id"]: content_hash(u) for u in changed}, cache=cache)
    assert third.users == second.users


def test_a_user_held_as_unchanged_is_taken_from_the_cache_filter_result_included() -> None:
    r = rules(scope_filter='department eq "Engineering"')
    cache: MappingCache = {}
    inside, outside = user("u1", department="Engineering"), user("u2", department="Sales")
    for u in (inside, outside):
        assert cache_user(cache, r, u["id"], u, content_hash(u))     # JSON no longer needed
    snap = snapshot([inside, outside])
    snap.users = {uid: UNCHANGED for uid in snap.users}
    desired = desired_state(snap, r, cache=cache)
    assert set(desired.users) == {"u1"} and desired.in_scope == 1
    assert desired.users["u1"] is cache["u1"]
    with pytest.raises(RuntimeError, match="u1"):
        desired_state(snap, r, cache={})


def test_a_user_whose_json_equals_the_placeholder_is_mapped_not_taken_from_the_cache() -> None:
    """`user is UNCHANGED`, not `==`: an empty JSON object equals the placeholder, and is mapped as
    the (useless) user it is rather than looked up in a cache that does not hold it."""
    snap = snapshot([user("u1")])
    snap.users["u2"] = {}
    desired = desired_state(snap, rules(), cache={})
    assert set(desired.users) == {"u1"} and desired.skipped["u2"].reason == MISSING_USERNAME


def test_a_user_outside_the_filter_is_not_reported_skipped_whether_held_as_json_or_not() -> None:
    """Scope first, then mapping: a user the filter excludes is never `skipped`, also when it would
    fail the mapping and the snapshot holds it as UNCHANGED."""
    r = rules(scope_filter='department eq "Engineering"', require_email_username=True)
    outside = user("u1", "not-an-email", department="Sales")
    held = desired_state(snapshot([outside]), r, hashes={"u1": content_hash(outside)}, cache={})
    cache: MappingCache = {}
    assert cache_user(cache, r, "u1", outside, content_hash(outside))
    snap = snapshot([outside])
    snap.users = {"u1": UNCHANGED}
    dropped = desired_state(snap, r, cache=cache)
    for desired in (held, dropped):
        assert desired.skipped == {} and desired.users == {} and desired.in_scope == 0


def test_a_membership_filter_is_not_cached_and_keeps_the_json() -> None:
    r = rules(scope_filter='memberOfGroups[id eq "g1"]')
    cache: MappingCache = {}
    assert not cache_user(cache, r, "u1", user("u1"), 1)
    assert cache["u1"].passes is True       # decided on the JSON every cycle instead


def test_mapping_users_leaves_no_garbage_for_the_cyclic_collector() -> None:
    """The engine pauses the collector while it maps 100,000s of users: what mapping allocates must
    be freed by reference counting alone (jmespath's `search` left a cycle per call)."""
    r = rules(scope_filter='department eq "Engineering"')
    users = [user(f"u{i}", department="Engineering") for i in range(50)]
    gc.collect()
    gc.disable()
    try:
        for u in users:
            map_user(u, r)
            cache_user({}, r, u["id"], u, content_hash(u))
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_mapped_attributes_are_a_read_only_mapping_equal_to_their_dict() -> None:
    r = rules()
    _, attrs = map_user(user("u1"), r)
    _, same = map_user(user("u1"), r)
    _, other = map_user(user("u1", given="Grace"), r)
    as_dict = dict(attrs)
    assert attrs == as_dict and as_dict == attrs and attrs == same and attrs != other
    assert list(attrs) == list(r.paths) and len(attrs) == len(r.paths) and "userName" in attrs
    assert attrs["userName"] == attrs.get("userName") and attrs.get("nope", 7) == 7
    with pytest.raises(KeyError):
        attrs["nope"]
    with pytest.raises(TypeError):
        attrs["userName"] = "x"  # type: ignore[index]
    with pytest.raises(TypeError):
        hash(attrs)
    assert attrs._keys is same._keys            # one keys tuple per rule
    # short values repeated across users are one string (parsed JSON gives each user its own copy)
    ada, eve = user("u1", given=json.loads('"Grace"')), user("u2", given=json.loads('"Grace"'))
    assert ada["name"]["given"] is not eve["name"]["given"]
    first, second = map_user(ada, r)[1], map_user(eve, r)[1]
    shared = [p for p in r.paths if isinstance(first[p], str) and "Grace" in first[p]]
    assert shared and all(first[p] is second[p] for p in shared)


# -- groups ---------------------------------------------------------------------------------------

def pushed(desired: Desired) -> dict[str, tuple[str, set[str]]]:
    return {gid: (g.display_name, set(g.members)) for gid, g in desired.groups.items()}


def test_pushed_groups_hold_their_in_scope_members_transitively() -> None:
    r = rules(scope_groups=(GroupSelector(name="Staff"),),
              groups=(GroupSelector(name="Staff"), GroupSelector(name="Contractors"), GroupSelector(name="Other")))
    desired = desired_state(NESTED, r)
    # u3 ("Other") is out of scope: the group is pushed, empty
    assert pushed(desired) == {
        "g-parent": ("Staff", {"u1", "u2", "u4"}),
        "g-child": ("Contractors", {"u2", "u4"}),
        "g-other": ("Other", set()),
    }


def test_pushed_groups_hold_direct_members_only_with_direct_membership() -> None:
    r = rules(groups=(GroupSelector(name="Staff"),), transitive=False)
    assert pushed(desired_state(NESTED, r)) == {"g-parent": ("Staff", {"u1"})}


def test_skipped_users_are_not_members_of_pushed_groups() -> None:
    snap = snapshot([user("u1"), user("u2", "plain")], groups={"g1": "G"}, members={"g1": {"u1", "u2"}})
    desired = desired_state(snap, rules(groups=(GroupSelector(name="G"),), require_email_username=True))
    assert pushed(desired) == {"g1": ("G", {"u1"})}


def test_a_configured_group_absent_from_pingone_is_reported_missing() -> None:
    desired = desired_state(NESTED, rules(groups=(GroupSelector(name="Staff"), GroupSelector(name="Gone"),
                                                  GroupSelector(id="g-nope"))))
    assert set(desired.groups) == {"g-parent"}
    assert desired.missing_groups == ["Gone", "id:g-nope"]


def test_a_group_pinned_by_id_is_followed_through_a_rename() -> None:
    r = rules(scope_groups=(GroupSelector(name="Staff"),), groups=(GroupSelector(name="Staff"),))
    pins = resolve_pins(NESTED, r, {})
    assert pins == {"Staff": "g-parent"}
    renamed = snapshot(
        [user("u1"), user("u2")], groups={"g-parent": "Staff (renamed)"}, members={"g-parent": {"u1", "u2"}})
    desired = desired_state(renamed, r, resolve_pins(renamed, r, pins))
    assert pushed(desired) == {"g-parent": ("Staff (renamed)", {"u1", "u2"})}
    assert set(desired.users) == {"u1", "u2"}
    # without the pin, the renamed group is not found by its old name
    assert desired_state(renamed, r).groups == {}


def test_present_users_and_groups_list_everything_in_the_snapshot() -> None:
    desired = desired_state(NESTED, rules(scope_groups=(GroupSelector(name="Other"),)))
    assert set(desired.present_users) == {"u1", "u2", "u3", "u4"}
    assert set(desired.present_groups) == {"g-parent", "g-child", "g-other"}
    assert set(desired.users) == {"u3"}


# -- the keys a rule reads (snapshot projection) -----------------------------------------------------

def test_source_keys_cover_every_field_the_mapping_and_the_filter_read() -> None:
    rules = Rules.compile(
        {"userName": "username", "displayName": "name.formatted || join(' ', [name.given, name.family][?@])",
         "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department": "department",
         'emails[type eq "work"].value': "email"},
        scope_filter='population.id eq "p" and title sw "Eng"')
    keys = rules.source_keys()
    assert keys is not None
    assert {"username", "name", "department", "email", "population", "title", "enabled", "id"} <= keys
    assert "mobilePhone" not in keys


@pytest.mark.parametrize("expression", ["@", "*", "values(@)[0]", "keys(@)", "to_string(@)"])
def test_an_expression_that_can_read_the_whole_user_keeps_every_key(expression: str) -> None:
    assert Rules.compile({"userName": "username", "x": expression}).source_keys() is None


# -- groups chosen by rule ---------------------------------------------------------------------

RULED = snapshot(
    [user("u1"), user("u2"), user("u3")],
    groups={"g1": "ZPA-Finance", "g2": "ZPA-Sales", "g3": "Other", "g4": "zpa-lower"},
    members={"g1": {"u1"}, "g2": {"u2"}, "g3": {"u3"}, "g4": {"u3"}},
)


def rule(text: str) -> GroupSelector:
    from daemon.pingone_filter import GROUP_RULE_DIALECT, compile_filter

    return GroupSelector(rule=compile_filter(text, GROUP_RULE_DIALECT))


@pytest.mark.parametrize(
    ("case", "selectors", "expected"),
    [
        ("a prefix selects every group whose name starts with it (case-sensitive)",
         (GroupSelector(prefix="ZPA-"),), {"g1", "g2"}),
        ("a filter with sw", (rule('name sw "ZPA-"'),), {"g1", "g2"}),
        ("a filter with or", (rule('name eq "Other" or name ew "Sales"'),), {"g2", "g3"}),
        ("a rule and a name selecting the same group: pushed once",
         (GroupSelector(name="ZPA-Finance"), GroupSelector(prefix="ZPA-")), {"g1", "g2"}),
        ("a rule that matches nothing", (GroupSelector(prefix="Nope-"),), set()),
    ],
)
def test_groups_chosen_by_rule(case: str, selectors: tuple[GroupSelector, ...], expected: set[str]) -> None:
    desired = desired_state(RULED, rules(groups=selectors))
    assert set(desired.groups) == expected, case
    assert desired.missing_groups == [], case     # a rule matching nothing is not a missing group


def test_a_scope_rule_admits_the_members_of_every_matching_group() -> None:
    desired = desired_state(RULED, rules(scope_groups=(GroupSelector(prefix="ZPA-"),)))
    assert set(desired.users) == {"u1", "u2"}
