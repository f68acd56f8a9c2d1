"""Flat SCIM paths <-> SCIM resources, and PatchOp bodies: tables of scenarios, no I/O."""

from __future__ import annotations

from typing import Any

import pytest

from daemon.target.resource import (
    CORE_GROUP,
    CORE_USER,
    ENTERPRISE_USER,
    PATCH_OP,
    ResourceError,
    build_group,
    build_user,
    member_remove_op,
    members_add_op,
    parse_path,
    patch_body,
    read_active,
    read_user,
    user_patch,
)

DEPT = f"{ENTERPRISE_USER}:department"
MANAGER = f"{ENTERPRISE_USER}:manager.value"
WORK_EMAIL = 'emails[type eq "work"].value'
HOME_EMAIL = 'emails[type eq "home"].value'
MOBILE = 'phoneNumbers[type eq "mobile"].value'


def test_build_user_core_attributes_and_active() -> None:
    body = build_user({"userName": "a@x.com", "name.givenName": "Ann", "name.familyName": "Lee",
                       "displayName": "Ann Lee", "externalId": "p1"}, active=False)
    assert body == {
        "schemas": [CORE_USER],
        "userName": "a@x.com",
        "name": {"givenName": "Ann", "familyName": "Lee"},
        "displayName": "Ann Lee",
        "externalId": "p1",
        "active": False,
    }


def test_build_user_value_path_makes_typed_items_and_first_email_primary() -> None:
    body = build_user({WORK_EMAIL: "a@x.com", HOME_EMAIL: "a@home.org", MOBILE: "+1 555"}, active=True)
    assert body["emails"] == [
        {"type": "work", "value": "a@x.com", "primary": True},
        {"type": "home", "value": "a@home.org"},
    ]
    assert body["phoneNumbers"] == [{"type": "mobile", "value": "+1 555"}]


def test_build_user_enterprise_schema_only_when_used() -> None:
    assert build_user({"userName": "a@x.com"}, active=True)["schemas"] == [CORE_USER]
    body = build_user({"userName": "a@x.com", DEPT: "Eng", MANAGER: "m-1"}, active=True)
    assert body["schemas"] == [CORE_USER, ENTERPRISE_USER]
    assert body[ENTERPRISE_USER] == {"department": "Eng", "manager": {"value": "m-1"}}
    assert "department" not in body


def test_build_user_drops_none_values_and_unused_extension() -> None:
    body = build_user({"userName": "a@x.com", "name.givenName": None, WORK_EMAIL: None, DEPT: None},
                      active=True)
    assert body == {"schemas": [CORE_USER], "userName": "a@x.com", "active": True}


@pytest.mark.parametrize(
    ("attrs", "paths"),
    [
        ({"userName": "a@x.com", "displayName": "A"}, ["userName", "displayName"]),
        ({"name.givenName": "Ann", "name.familyName": "Lee"}, ["name.givenName", "name.familyName"]),
        ({WORK_EMAIL: "a@x.com", HOME_EMAIL: "h@y.org"}, [WORK_EMAIL, HOME_EMAIL]),
        ({DEPT: "Eng", MANAGER: "m-1"}, [DEPT, MANAGER]),
        ({MOBILE: "+1 555", "title": "Dr"}, [MOBILE, "title"]),
    ],
)
def test_read_user_inverts_build_user(attrs: dict[str, Any], paths: list[str]) -> None:
    assert read_user(build_user(attrs, active=True), paths) == attrs


def test_read_user_absent_paths_are_none() -> None:
    resource = build_user({"userName": "a@x.com"}, active=True)
    assert read_user(resource, ["name.givenName", WORK_EMAIL, DEPT, MANAGER]) == {
        "name.givenName": None, WORK_EMAIL: None, DEPT: None, MANAGER: None,
    }


def test_read_user_zia_top_level_department_is_accepted() -> None:
    resource = {"userName": "a@x.com", "department": "Sales"}
    assert read_user(resource, [DEPT]) == {DEPT: "Sales"}
    both = {"department": "Old", ENTERPRISE_USER: {"department": "Sales"}}
    assert read_user(both, [DEPT]) == {DEPT: "Sales"}


def test_read_user_untyped_emails_stand_in_for_the_typed_path() -> None:
    # ZPA returns emails without `type`.
    assert read_user({"emails": [{"value": "a@x.com"}]}, [WORK_EMAIL]) == {WORK_EMAIL: "a@x.com"}
    primary = {"emails": [{"value": "b@x.com"}, {"value": "a@x.com", "primary": True}]}
    assert read_user(primary, [WORK_EMAIL]) == {WORK_EMAIL: "a@x.com"}
    # Typed items that do not match are not stand-ins.
    assert read_user({"emails": [{"type": "home", "value": "h@y.org"}]}, [WORK_EMAIL]) == {WORK_EMAIL: None}


def test_read_user_attribute_names_are_case_insensitive() -> None:
    resource = {"username": "a@x.com", "Name": {"GivenName": "Ann"},
                "emails": [{"Type": "Work", "Value": "a@x.com"}]}
    assert read_user(resource, ["userName", "name.givenName", WORK_EMAIL]) == {
        "userName": "a@x.com", "name.givenName": "Ann", WORK_EMAIL: "a@x.com",
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), ("true", True), ("false", False), ("True", True), (" FALSE ", False)],
)
def test_read_active_accepts_booleans_and_strings(value: Any, expected: bool) -> None:
    assert read_active({"active": value}) is expected


def test_read_active_absent_counts_as_active() -> None:
    assert read_active({"userName": "a@x.com"}) is True


@pytest.mark.parametrize("value", ["yes", 1, [], {}])
def test_read_active_rejects_other_types(value: Any) -> None:
    with pytest.raises(ResourceError):
        read_active({"active": value})


def test_user_patch_replaces_changed_paths_and_removes_none() -> None:
    ops = user_patch({"displayName": "B", "name.givenName": None, DEPT: "Ops"}, active=False)
    assert ops == [
        {"op": "replace", "path": "displayName", "value": "B"},
        {"op": "remove", "path": "name.givenName"},
        {"op": "replace", "path": DEPT, "value": "Ops"},
        {"op": "replace", "path": "active", "value": False},
    ]


def test_user_patch_nothing_changed_is_empty() -> None:
    assert user_patch({}) == []
    assert user_patch({}, active=True) == [{"op": "replace", "path": "active", "value": True}]


def test_user_patch_value_path_replaces_whole_attribute_from_full() -> None:
    full = {"userName": "a@x.com", WORK_EMAIL: "new@x.com", HOME_EMAIL: "h@y.org"}
    ops = user_patch({WORK_EMAIL: "new@x.com"}, full=full)
    assert ops == [{"op": "replace", "path": "emails", "value": [
        {"type": "work", "value": "new@x.com", "primary": True},
        {"type": "home", "value": "h@y.org"},
    ]}]


def test_user_patch_value_path_all_none_removes_attribute() -> None:
    assert user_patch({WORK_EMAIL: None}) == [{"op": "remove", "path": "emails"}]


def test_patch_body_wraps_operations() -> None:
    assert patch_body([]) == {"schemas": [PATCH_OP], "Operations": []}


def test_group_bodies_and_member_ops() -> None:
    assert build_group("G") == {"schemas": [CORE_GROUP], "displayName": "G"}
    assert build_group("G", external_id="p")["externalId"] == "p"
    assert members_add_op(["u1", "u2"]) == {"op": "add", "path": "members",
                                             "value": [{"value": "u1"}, {"value": "u2"}]}
    assert member_remove_op('we"ird\\') == {"op": "remove", "path": 'members[value eq "we\\"ird\\\\"]'}


@pytest.mark.parametrize("path", ["", "a b", "emails[type ne \"x\"].value", "a.b.c", "urn:x"])
def test_unsupported_paths_are_refused(path: str) -> None:
    with pytest.raises(ResourceError):
        parse_path(path)


def test_parse_path_unknown_extension_urn() -> None:
    parsed = parse_path("urn:example:params:scim:schemas:extension:acme:User:badge")
    assert parsed.schema == "urn:example:params:scim:schemas:extension:acme:User"
    assert parsed.attr == "badge"
