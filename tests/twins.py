"""Equal values as one object, or as equal copies: the two ways a desired state and its links can
meet (`daemon/model.py`, "Identity"). The identity tests plan, summarise and share both and
check that the answer does not depend on which one they were given."""

from __future__ import annotations

from collections.abc import Set
from typing import Any

from daemon.links import DISABLED_IN_SOURCE, Actual, GroupLink, UserLink
from daemon.mapping import Desired, DesiredGroup, DesiredUser
from daemon.model import Members


def twin(text: str) -> str:
    """An equal string that is not the same object (what a second parse of the same id gives)."""
    out = "".join([text[:1], text[1:]])
    assert out == text and out is not text
    return out


def scenario(*, shared: bool, create_only: frozenset[str] = frozenset()) -> tuple[Desired, Actual]:
    """One target in most of the states the planner knows, with the desired state and the links
    sharing every equal object (`shared`: canonical ids, one attributes dict, one member set), or
    holding equal copies of each (other id strings, other dicts, a frozenset where the other
    side holds a `Members`)."""
    canon = {f"u{i:02d}": f"u{i:02d}" for i in range(1, 11)} | {f"g{i}": f"g{i}" for i in range(1, 7)}

    def wid(key: str) -> str:
        return canon[key] if shared else twin(key)

    def lid(key: str) -> str:
        return canon[key] if shared else twin(key)

    def attrs(key: str, **over: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"userName": f"{key}@example.com", "displayName": f"User {key}",
                               "externalId": key, "title": None}
        out.update(over)
        return out

    def members(keys: list[str], *, side: str) -> Set[str]:
        if shared:
            return frozenset(canon[k] for k in keys)
        ids = [twin(k) for k in keys]
        return Members.of(ids) if side == "want" else frozenset(ids)

    users: dict[str, DesiredUser] = {}
    links: dict[str, UserLink] = {}
    for key, want_over, link_over, want_active, link_active, reason in (
        ("u01", {}, {}, True, True, None),
        ("u02", {}, {}, True, True, None),
        ("u03", {}, {}, True, True, None),
        ("u04", {}, {}, True, True, None),
        ("u05", {"title": "Engineer", "displayName": "Renamed"}, {}, True, True, None),   # changed
        ("u06", {}, {}, False, True, None),                             # disabled in PingOne
        ("u10", {}, {}, True, False, DISABLED_IN_SOURCE),               # enabled again
    ):
        want_attrs = attrs(key, **want_over)
        link_attrs = want_attrs if shared and want_over == link_over else attrs(key, **link_over)
        sid = wid(key)
        users[sid] = DesiredUser(sid, want_attrs["userName"], want_attrs, want_active)
        lsid = lid(key)
        links[lsid] = UserLink(lsid, f"t-{key}", link_attrs["userName"], link_attrs, link_active,
                               disabled_reason=reason)
    new = attrs("u07")
    users[wid("u07")] = DesiredUser(wid("u07"), new["userName"], new, True)                  # new in scope
    for key in ("u08", "u09"):                                                              # left / deleted
        links[lid(key)] = UserLink(lid(key), f"t-{key}", f"{key}@example.com", attrs(key), True)

    groups: dict[str, DesiredGroup] = {}
    glinks: dict[str, GroupLink] = {}
    same = members(["u01", "u02", "u03"], side="want")
    for key, name, link_name, want_keys, link_keys in (
        ("g1", "Unchanged", "Unchanged", ["u01", "u02", "u03"], ["u01", "u02", "u03"]),
        ("g2", "Changed", "Changed", ["u01", "u04", "u07"], ["u01", "u02", "u08"]),
        ("g3", "Renamed", "Old name", ["u02", "u03"], ["u02", "u03"]),
    ):
        want_members = same if key == "g1" else members(want_keys, side="want")
        link_members = (want_members if shared and want_keys == link_keys
                        else members(link_keys, side="link"))
        groups[wid(key)] = DesiredGroup(wid(key), name, want_members)
        glinks[lid(key)] = GroupLink(lid(key), f"tg-{key}", link_name, link_members)
    groups[wid("g4")] = DesiredGroup(wid("g4"), "New", members(["u01", "u07"], side="want"))
    glinks[lid("g5")] = GroupLink(lid("g5"), "tg-g5", "Gone", members(["u01"], side="link"))
    present = {wid(k) for k in ("u01", "u02", "u03", "u04", "u05", "u06", "u07", "u08", "u10")}
    desired = Desired(users=users, groups=groups, present_users=present,
                      present_groups=set(groups), in_scope=len(users), create_only=create_only)
    return desired, Actual(users=links, groups=glinks)
