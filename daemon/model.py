"""Values shared by the source, the mapping, the planner and the store.

The snapshot keeps PingOne's JSON as it came (mapping expressions run over it), plus the
membership graph the planner needs. Nothing here performs I/O.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Set
from dataclasses import dataclass, field
from typing import Any, TypeVar

JSON = dict[str, Any]
_T = TypeVar("_T")


class Members(tuple[str, ...], Set[str]):
    """An immutable set of ids held as a sorted tuple: 8 bytes a member where a frozenset takes
    ~50 (its hash table is kept at most 60% full, and grows 4x). The member sets of the pushed
    groups are kept from cycle to cycle; at 1,000,000 users and 2.5 memberships each that is
    ~100 MB saved.

    It is a `collections.abc.Set` (its mixins give `^`), with membership by bisection and
    the operators the planner and the applier use written to iterate this set, never the other
    operand (often the 1,000,000 keys of a dict). Mixes with frozenset, set and dict views.
    """

    __slots__ = ()

    @classmethod
    def of(cls, ids: Iterable[str]) -> Members:
        """The set of *ids* (any order, duplicates allowed). Sorting sorted input is linear."""
        if isinstance(ids, Members):
            return ids
        return tuple.__new__(cls, sorted(ids if isinstance(ids, Set) else set(ids)))

    @classmethod
    def _sorted(cls, ids: Iterable[str]) -> Members:
        return tuple.__new__(cls, ids)

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, str):
            return False
        i = bisect_left(self, item)
        return i < len(self) and self[i] == item

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Members):
            return tuple.__eq__(self, other)
        if isinstance(other, (set, frozenset)):
            return len(self) == len(other) and other.issuperset(self)
        if isinstance(other, Set):
            return len(self) == len(other) and all(map(other.__contains__, self))
        return False

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(frozenset(self))

    def __le__(self, other: object) -> bool:
        if not isinstance(other, Set):
            return NotImplemented
        return len(self) <= len(other) and all(map(other.__contains__, self))

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, Set):
            return NotImplemented
        return all(map(self.__contains__, other))

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Set):
            return NotImplemented
        return len(self) < len(other) and self <= other

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, Set):
            return NotImplemented
        return len(self) > len(other) and self >= other

    def __sub__(self, other: Iterable[Any]) -> Members:
        drop = other if isinstance(other, Set) else set(other)
        return Members._sorted(x for x in self if x not in drop)

    def __rsub__(self, other: Iterable[Any]) -> frozenset[str]:
        return frozenset(x for x in other if x not in self)

    def __and__(self, other: Iterable[Any]) -> Members:
        keep = other if isinstance(other, Set) else set(other)
        return Members._sorted(x for x in self if x in keep)

    __rand__ = __and__

    def __or__(self, other: Iterable[Any]) -> Members:
        return Members.of(set(self).union(other))

    __ror__ = __or__

    def isdisjoint(self, other: Iterable[Any]) -> bool:
        return not any(map(self.__contains__, other))

    def __repr__(self) -> str:
        return f"Members({list(self)!r})"


class _Unchanged(dict[str, Any]):
    """The placeholder type of `UNCHANGED`: empty, and refuses to be filled."""

    def __setitem__(self, key: str, value: Any) -> None:
        raise TypeError("UNCHANGED is a placeholder")

    def __repr__(self) -> str:
        return "UNCHANGED"


def shared(value: _T, other: _T) -> _T:
    """*other* when it equals *value* (and is not already it), else *value*: how the snapshot,
    the desired state and the links come to hold one object for what is equal between them."""
    return other if other is not value and other == value else value


# Held in `Snapshot.users` instead of a user's JSON when that JSON is unchanged since it was last
# stored and every target has already mapped it (`mapping.cache_user`): at 1,000,000 users the
# JSON is most of a cycle's memory. Compare with `is`.
UNCHANGED: JSON = _Unchanged()


@dataclass(slots=True)
class Snapshot:
    """What PingOne looked like during one cycle.

    `members` holds the DIRECT user members of the groups that were fetched (the groups any
    target needs, and their nested children when transitive membership is configured);
    `parents` maps a child group id to the ids of the groups it is nested in.
    `complete` is True only when every page arrived and parsed: removals are planned only
    from a complete snapshot. A user's JSON may be the placeholder `UNCHANGED` (see there).
    """

    users: dict[str, JSON] = field(default_factory=dict)
    groups: dict[str, JSON] = field(default_factory=dict)
    members: dict[str, Set[str]] = field(default_factory=dict)       # `Members` mostly
    parents: dict[str, frozenset[str]] = field(default_factory=dict)
    complete: bool = True
    problems: list[str] = field(default_factory=list)
    started_at: float = 0.0
    finished_at: float = 0.0
    # user id -> `mapping.content_hash` of its JSON, for the users held as JSON (one held as
    # `UNCHANGED` has the hash the state file holds: a second copy of 1,000,000 hashes is ~75 MB)
    hashes: dict[str, int] = field(default_factory=dict)
    wanted: int = 0                                        # groups whose members were read

    def children(self) -> dict[str, set[str]]:
        """parent group id -> ids of the groups nested directly in it."""
        out: dict[str, set[str]] = {}
        for child, parents in self.parents.items():
            for parent in parents:
                out.setdefault(parent, set()).add(child)
        return out

    def descendants(self, group_id: str, children: dict[str, set[str]] | None = None) -> set[str]:
        """The group and every group nested in it, at any depth (cycles tolerated)."""
        kids = self.children() if children is None else children
        seen = {group_id}
        stack = [group_id]
        while stack:
            for child in kids.get(stack.pop(), ()):
                if child not in seen:
                    seen.add(child)
                    stack.append(child)
        return seen

    def member_ids(self, group_id: str, *, transitive: bool,
                   children: dict[str, set[str]] | None = None) -> Set[str]:
        """User ids in the group: direct members, or those of every nested group as well. The
        snapshot's own set (no copy) when the group has no nested group to add."""
        groups: Iterable[str] = self.descendants(group_id, children) if transitive else (group_id,)
        sets = [found for gid in groups if (found := self.members.get(gid))]
        if len(sets) == 1:
            return sets[0]
        return frozenset().union(*sets)

    def group_by_name(self, name: str) -> JSON | None:
        for group in self.groups.values():
            if group.get("name") == name:
                return group
        return None
