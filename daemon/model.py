"""Values shared by the source, the mapping, the planner and the store.

The snapshot keeps PingOne's JSON as it came (mapping expressions run over it), plus the
membership graph the planner needs. Nothing here performs I/O.

Identity: the invariants memory rests on
-----------------------------------------
At 1,000,000 users, what is equal between the snapshot, the mapping caches, the desired state
and the links is held as one object, and a few places then test `is` before `==`. Every rule
below names the tests that guard it (`tests/twins.py` builds one target's desired state and
links both ways: sharing every equal object, or as equal copies of each).

1. `is` is only ever a shortcut for `==`. Where `a is b` skips a comparison, the comparison
   decides when they are two objects and gives the same answer: no plan, summary or write
   depends on whether equal values are one object. The shortcuts:
     planner `_plan_users`         `want.attrs is not link.attrs`     (create-only paths to mask)
     planner `_plan_linked_user`   `want.attrs is link.attrs`         (no attribute changed)
     planner `_plan_linked_group`  `want.members is link.members`     (no member to add or remove)
     planner `_plan_groups`        `members is wanted.members`        (the desired group as it is)
     engine  `Engine.summarize`    `link.attrs is want.attrs`, `glink.members is wantg.members`
     engine  `share_member_sets`, `share_with_desired`, and `shared` here: `is not` only decides
             whether a value is replaced by an equal one.
   Guarded by tests/test_planner.py::test_a_plan_over_equal_copies_is_the_plan_over_shared_objects,
   ::test_a_restricted_member_set_equal_to_the_desired_one_plans_the_same,
   tests/test_engine.py::test_the_summary_of_equal_copies_is_the_summary_of_shared_objects,
   ::test_sharing_makes_equal_values_one_object_and_changes_no_plan,
   tests/test_model.py::test_shared_hands_back_the_other_object_only_when_it_is_equal_and_not_already_the_same.

2. Canonical id strings. A user id is one `str` object wherever it is held: the snapshot's
   users and member sets, every mapping cache (`MappedUser.source_id`), the desired state and
   the links. The engine's `_canonical_ids` hands the snapshot the string the first mapping
   cache holds; `Store.load_links` takes the desired state's. This saves memory only: every
   lookup hashes and compares by value, so a non-canonical id plans the same.
   Guarded by tests/test_engine.py::test_every_structure_holds_one_string_object_per_user_id
   (it holds), tests/test_planner.py::test_a_plan_over_equal_copies_is_the_plan_over_shared_objects
   and tests/test_model.py::test_member_sets_answer_by_value_whatever_string_objects_hold_the_ids
   (nothing depends on it).

3. Member sets live across cycles. A group whose PingOne members did not change keeps last
   cycle's set object (`take_snapshot`'s `previous_members`, compared by value); the desired
   state takes the snapshot's set when every member is provisioned, and the links take the
   desired one where equal (`engine.share_member_sets` before planning, `share_with_desired`
   after the apply, `Store.load_links`). Sets are immutable (`Members`, frozenset): sharing one
   never lets a change to one side show on the other; the applier builds a new set per change.
   Guarded by tests/test_engine.py::test_unchanged_member_sets_are_one_object_across_cycles_snapshot_and_links
   and ::test_sharing_makes_equal_values_one_object_and_changes_no_plan.

4. Links live across cycles. `TargetRuntime.links` is the store's links as the last cycle
   left them; it is cleared while a cycle runs (until it ends well, SQLite is the truth) and
   used only while `links.generation.<target>` is what it was read with, which
   `provisiond sync-user` and `sync-group` bump when they write links. Link values are frozen
   dataclasses; the applier replaces entries, never mutates them; a no-op cycle reuses the
   dicts as they are.
   Guarded by tests/test_engine.py::test_the_cycle_after_a_successful_one_plans_nothing_and_sends_nothing
   and tests/test_ondemand.py::test_a_new_user_is_created_in_each_target_and_added_to_its_pushed_groups_only
   (a link written by another process is not created a second time).

5. `UNCHANGED` is tested with `is` only, never `==`: it equals an empty dict. A user held as
   `UNCHANGED` has the hash the state file holds and is in every mapping cache with it;
   `desired_state` takes it from the cache, `Store.save_snapshot` writes nothing for it, and it
   refuses item assignment. Guarded by tests/source/test_snapshot.py::test_the_placeholder_cannot_be_filled,
   ::test_every_user_is_hashed_and_the_hook_lets_the_snapshot_drop_its_json,
   tests/test_mapping.py::test_a_user_held_as_unchanged_is_taken_from_the_cache_filter_result_included,
   tests/test_engine.py::test_a_no_op_cycle_holds_no_user_json_and_a_changed_user_is_mapped_again;
   an empty user is not taken for it: tests/test_model.py::test_the_placeholder_equals_an_empty_user_so_only_identity_tells_them_apart,
   tests/test_mapping.py::test_a_user_whose_json_equals_the_placeholder_is_mapped_not_taken_from_the_cache,
   tests/test_store.py::test_a_user_whose_json_equals_the_placeholder_is_stored_not_skipped.

6. Identity by design (not shortcuts; an equal object must NOT pass):
     engine  `_streaming_hook`  `known is cache`: the cache trusted to mirror the state file must
             be one a target still fills; an equal copy (a reconfigured target) is not trusted and
             the stored hashes are read: tests/test_engine.py::test_an_equal_copy_of_the_mapping_cache_is_not_trusted_for_what_the_state_file_holds.
     pingone_filter `_Compare.test`  `current is self.value` for a boolean (`1 == True`, but
             `enabled eq true` must not admit 1): tests/test_pingone_filter.py::test_a_boolean_matches_only_a_json_boolean_by_identity.
     service `reload`  `before is runtime`: a target whose runtime `reconfigure` kept needs
             nothing; a rebuilt one gives the running cycle's old runtime its new limits:
             tests/test_service.py::test_sighup_with_a_changed_config_takes_effect_in_the_next_cycle.
     mapping `Attrs.__ne__`  `equal is NotImplemented`: the sentinel, not a value.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Set, Sized
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
        if isinstance(other, Sized) and len(other) * _FEW <= len(self):
            return self.plus(other)
        return Members.of(set(self).union(other))

    __ror__ = __or__

    def plus(self, ids: Iterable[str]) -> Members:
        """This set with *ids* added: each new one inserted in place (a copy and a move of
        pointers each), not the whole set sorted again; for a few ids into a big set."""
        extra = sorted({x for x in ids if x not in self})
        if not extra:
            return self
        out = list(self)
        for x in extra:
            insort(out, x)
        return Members._sorted(out)

    def minus(self, ids: Iterable[str]) -> Members:
        """This set without *ids*, in order (no sort); itself when none of them is in it."""
        drop = {x for x in ids if x in self}
        return Members._sorted(x for x in self if x not in drop) if drop else self

    def isdisjoint(self, other: Iterable[Any]) -> bool:
        return not any(map(self.__contains__, other))

    def __repr__(self) -> str:
        return f"Members({list(self)!r})"


# `Members | other` inserts other's ids one by one when it has at most 1/_FEW as many.
_FEW = 16


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
