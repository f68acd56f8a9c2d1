"""`daemon.pingone_filter`: a target's scope filter, parsed once and evaluated over PingOne's JSON."""

from __future__ import annotations

import pytest

from daemon.pingone_filter import SCOPE_DIALECT, UnsupportedFilter, compile_filter


def test_a_boolean_matches_only_a_json_boolean_by_identity() -> None:
    """`current is self.value` is identity by design, not a shortcut: `1 == True` in Python, but
    `enabled eq true` must not admit a user whose `enabled` is the number 1 or the string "true"."""
    enabled = compile_filter("enabled eq true", SCOPE_DIALECT)
    assert enabled.matches({"enabled": True})
    assert not any(enabled.matches({"enabled": v}) for v in (1, 1.0, "true", False, None))
    disabled = compile_filter("enabled eq false", SCOPE_DIALECT)
    assert disabled.matches({"enabled": False})
    assert not any(disabled.matches({"enabled": v}) for v in (0, "", "false", True))


def test_strings_compare_by_value_and_group_membership_by_the_lookup() -> None:
    f = compile_filter('department eq "Engineering" and memberOfGroups[id eq "g1"]', SCOPE_DIALECT)
    assert f.group_ids == frozenset({"g1"})
    user = {"id": "".join(["u", "1"]), "department": "".join(["Engin", "eering"])}
    assert f.matches(user, lambda gid: frozenset({"u1"}) if gid == "g1" else frozenset())
    assert not f.matches(user, lambda gid: frozenset())


def test_a_filter_outside_the_dialect_is_refused() -> None:
    with pytest.raises(UnsupportedFilter, match="'not'"):
        compile_filter("not (enabled eq true)", SCOPE_DIALECT)
    with pytest.raises(UnsupportedFilter, match="memberOfGroups"):
        compile_filter('memberOfGroups[id ne "g1"]', SCOPE_DIALECT)
    with pytest.raises(UnsupportedFilter):
        compile_filter("not a filter ((", SCOPE_DIALECT)
